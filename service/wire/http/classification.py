"""convserve's Classifier over REST: classify and classify_dense, answered as ``classify --json``.

``POST /v2/models/{model}[/versions/{version}]/classify`` and ``.../classify_dense``. The body
holds the images (:mod:`.image_bodies`): one image, or several in a multipart body;
classify_dense takes exactly one. The query string holds the request's options, named and typed
as the fields of ``ClassifyRequest`` and ``ClassifyDenseRequest`` (classifier.proto), so a field
the proto gains is served here too: ``?top_k=3``, ``?stride_divisor=2&scales=1,0.5&pool=max``,
``&return_map=false&map_format=top_k&mode=crops``. A list is comma-separated; an enum is named
as in the proto (``POOL_MAX``) or without its prefix, in any case (``max``, ``top-k``); a
boolean is ``true``/``false`` or ``1``/``0``. ``timeout`` (microseconds, as KServe's) is the
request's deadline, what a gRPC client's deadline is to the same call: once it passes, the
request is dropped and answered 504. A name the endpoint does not take is refused naming those
it does.

The options go through the gRPC servicer's own translation (:func:`dense_query`), the call
through the same :class:`Classification`, the answer through the servicer's reply message
(:func:`classify_response`, :func:`dense_response`) into the documents ``convserve classify
--json`` prints (:mod:`service.core.classifier_documents`): classify answers a list, one
document per image in order (``image`` is the part's filename, or null); classify_dense one
document, with the map under ``map`` unless ``return_map=false``. Limits and refusals are the
gRPC API's, in HTTP terms (:mod:`.statuses`), and each request is counted with
``api="classify"`` or ``"dense"`` and ``protocol="http"``.
"""

from __future__ import annotations

import asyncio
import difflib
import json
import time
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from aiohttp import web
from google.protobuf.descriptor import FieldDescriptor  # type: ignore[import-untyped]
from google.protobuf.message import Message  # type: ignore[import-untyped]
from multidict import MultiMapping

from service._generated.convserve.v1 import classifier_pb2 as pb
from service.classification.api import Classification
from service.classification.lookup import ModelRef
from service.core.classifier_documents import (
    classify_documents,
    dense_document,
    map_document,
    short_names,
)
from service.core.errors import DeadlineExceeded, InvalidArgument
from service.engine.dataplane import Outcome
from service.wire.classifier_servicer import classify_response, dense_query, dense_response
from service.wire.http.image_bodies import ImageBody, read_images
from service.wire.http.routes import Routes
from service.wire.restrictions import CLASSIFIER

__all__ = ["TIMEOUT", "add_classification_routes", "read_options"]

T = TypeVar("T")

TIMEOUT = "timeout"
"""The query parameter of a request's deadline, in microseconds from its arrival (0: none)."""
_MAX_TIMEOUT = 2**63 - 1
# Fields the path (model, version) and the body (the images) carry, not the query.
_NOT_OPTIONS = frozenset({"model", "version", "image", "images"})
_RANGES = {
    FieldDescriptor.CPPTYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.CPPTYPE_UINT64: (0, 2**64 - 1),
}
_FLOATS = (FieldDescriptor.CPPTYPE_FLOAT, FieldDescriptor.CPPTYPE_DOUBLE)
_TRUE, _FALSE = ("true", "1"), ("false", "0")


def _options(message: type[Message]) -> dict[str, FieldDescriptor]:
    """A request message's fields that the query string gives (scalars and lists of them)."""
    return {
        field.name: field
        for field in message.DESCRIPTOR.fields
        if field.name not in _NOT_OPTIONS
        and field.type not in (FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_BYTES)
    }


_ROUTES = {
    "classify": _options(pb.ClassifyRequest),
    "classify_dense": _options(pb.ClassifyDenseRequest),
}


def read_options(query: MultiMapping[str], message: Message, route: str) -> int:
    """Set ``message``'s fields from the query string; returns its ``timeout`` (0: none).

    Args:
        query: the request's query parameters.
        message: the request message of ``route`` to fill (a field given is set, so an
            optional one counts as present).
        route: ``classify`` or ``classify_dense``.

    Raises:
        InvalidArgument: a name ``route`` does not take, one given twice, or a value that is
            not of its field's type and range.
    """
    fields = _ROUTES[route]
    names = list(dict.fromkeys(query))
    if unknown := [name for name in names if name not in fields and name != TIMEOUT]:
        raise InvalidArgument(_unknown(unknown, route))
    timeout = 0
    for name in names:
        values = query.getall(name)
        if len(values) > 1:
            raise InvalidArgument(
                f"parameter '{name}' is given {len(values)} times; give it once (a list is "
                "comma-separated: scales=1,0.5)"
            )
        if name == TIMEOUT:
            timeout = _integer(name, values[0], (0, _MAX_TIMEOUT))
            continue
        field = fields[name]
        if field.is_repeated:
            getattr(message, name).extend(_value(field, item) for item in values[0].split(","))
        else:
            setattr(message, name, _value(field, values[0]))
    return timeout


def _unknown(names: Sequence[str], route: str) -> str:
    """The refusal of parameters ``route`` does not take, with what it does take."""
    known = [*_ROUTES[route], TIMEOUT]
    described = []
    for name in names:
        close = difflib.get_close_matches(name, known, n=1)
        other = next((r for r, fields in _ROUTES.items() if name in fields), None)
        if close:
            described.append(f"'{name}' (did you mean '{close[0]}'?)")
        elif other is not None:
            described.append(f"'{name}' (a parameter of {other})")
        else:
            described.append(f"'{name}'")
    plural = "s" if len(names) > 1 else ""
    return f"unknown parameter{plural} {', '.join(described)}; {route} takes {', '.join(known)}"


def _value(field: FieldDescriptor, text: str) -> Any:
    """One value of ``field`` from its text, refused naming the field and what it takes."""
    name, kind = field.name, field.cpp_type
    text = text.strip()
    if kind in _RANGES:
        return _integer(name, text, _RANGES[kind])
    if kind in _FLOATS:
        try:
            return float(text)
        except ValueError:
            raise InvalidArgument(f"parameter '{name}' must be a number, got {text!r}") from None
    if kind == FieldDescriptor.CPPTYPE_BOOL:
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise InvalidArgument(f"parameter '{name}' must be true or false, got {text!r}")
    if kind == FieldDescriptor.CPPTYPE_ENUM:
        return _enum(field, text)
    return text


def _integer(name: str, text: str, bounds: tuple[int, int]) -> int:
    low, high = bounds
    digits = text.strip().removeprefix("-")
    if digits.isascii() and digits.isdigit() and low <= (value := int(text)) <= high:
        return value
    raise InvalidArgument(
        f"parameter '{name}' must be an integer from {low} to {high}, got {text!r}"
    )


def _enum(field: FieldDescriptor, text: str) -> int:
    """An enum's number from its name in the proto (``POOL_MAX``) or its short one (``max``)."""
    short = short_names(field.enum_type)
    wanted = text.lower().replace("-", "_")
    for number, name in short.items():
        if wanted in (name, field.enum_type.values_by_number[number].name.lower()):
            return number
    names = ", ".join(short.values())
    raise InvalidArgument(f"parameter '{field.name}' must be one of {names}, got {text!r}")


def _deadline(timeout: int) -> float | None:
    """The deadline, on the monotonic clock, of a request with ``timeout`` microseconds."""
    return time.monotonic() + timeout / 1e6 if timeout else None


async def _within(call: Coroutine[Any, Any, T], timeout: int) -> T:
    """``call``, cancelled once ``timeout`` microseconds have passed (0: never).

    As gRPC cancels a call at its deadline; the request then ends DEADLINE_EXCEEDED (504).
    """
    if not timeout:
        return await call
    timer = asyncio.timeout(timeout / 1e6)
    try:
        async with timer:
            return await call
    except TimeoutError:
        if not timer.expired():
            raise
        raise DeadlineExceeded(
            f"the request's timeout ({timeout} microseconds) passed before its answer"
        ) from None


def _json(document: Any) -> web.Response:
    return web.Response(
        body=json.dumps(document, separators=(",", ":")).encode(), content_type="application/json"
    )


class _Classifier:
    """The two endpoints' handlers over one :class:`Classification`."""

    def __init__(self, routes: Routes, classification: Classification) -> None:
        self._classification = classification
        self._plane = routes.parts.plane
        self._max_body = routes.parts.max_body

    async def _read(
        self, request: web.Request, outcome: Outcome, message: Message, route: str
    ) -> tuple[int, ImageBody]:
        """The options into ``message``, then the timeout and the images.

        A refusal here counts as a failed request of the model the path names, as an
        undecodable one does over KServe.
        """
        info = request.match_info
        try:
            timeout = read_options(request.query, message, route)
            images = await read_images(request, self._max_body)
            if route == "classify_dense":
                if len(images) != 1:
                    raise InvalidArgument(
                        f"classify_dense takes exactly one image; the body holds {len(images)}"
                    )
                images.name(0)  # its part read now: a malformed one is refused here
        except Exception:
            self._plane.refused(outcome, info["model"], info.get("version", ""))
            raise
        return timeout, images

    async def classify(self, request: web.Request, outcome: Outcome) -> web.Response:
        asked = pb.ClassifyRequest()
        timeout, images = await self._read(request, outcome, asked, "classify")
        ref = ModelRef(request.match_info["model"], request.match_info.get("version", ""))
        model, results = await _within(
            self._classification.classify(ref, images, asked.top_k, _deadline(timeout), outcome),
            timeout,
        )
        names = [images.name(i) for i in range(len(images))]
        return _json(classify_documents(classify_response(model, results), names))

    async def classify_dense(self, request: web.Request, outcome: Outcome) -> web.Response:
        asked = pb.ClassifyDenseRequest()
        timeout, images = await self._read(request, outcome, asked, "classify_dense")
        ref = ModelRef(request.match_info["model"], request.match_info.get("version", ""))
        query = dense_query(asked)
        result = await _within(
            self._classification.classify_dense(ref, images[0], query, _deadline(timeout), outcome),
            timeout,
        )
        reply = dense_response(result, query)
        document = dense_document(reply, images.name(0))
        if reply.HasField("map"):
            document["map"] = map_document(reply.map)
        return _json(document)


def add_classification_routes(routes: Routes, classification: Classification) -> None:
    """Add classify and classify_dense, with and without a version, to ``routes``."""
    classifier = _Classifier(routes, classification)
    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        routes.inference(
            f"{prefix}/classify", classifier.classify, "classify", CLASSIFIER + "Classify"
        )
        routes.inference(
            f"{prefix}/classify_dense",
            classifier.classify_dense,
            "dense",
            CLASSIFIER + "ClassifyDense",
        )
