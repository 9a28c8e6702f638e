"""KServe v2 over HTTP/REST with Triton's extensions: each endpoint translates, nothing more.

The REST form of every ``inference.GRPCInferenceService`` RPC but the stream, on the same data
plane, repository, lifecycle and model control as the gRPC servicer
(:mod:`service.wire.kserve_servicer`), answered in Triton's HTTP terms: health as 200 or 400
with an empty body, metadata, configuration, statistics and the repository index as Triton's
JSON (:mod:`.json_messages`), inference as KServe v2 JSON with Triton's binary tensor data
(:mod:`.tensors`, :mod:`.answers`). With ``serve --workers N`` statistics add up every worker's
and loads and unloads are repeated on each, as over gRPC; the header
``convserve-worker-local: 1`` confines them to the worker holding the connection.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from aiohttp import web

from service import __version__
from service._generated.inference import grpc_service_pb2 as pb
from service.core.errors import InvalidArgument, ModelNotFound
from service.engine.dataplane import Outcome
from service.engine.repository import ServedModel
from service.wire.http.answers import encode_inference
from service.wire.http.json_messages import message_json
from service.wire.http.routes import HttpParts, Routes, read_body
from service.wire.http.tensors import HEADER_LENGTH, decode_inference, read_json
from service.wire.kserve_messages import (
    merge_statistics,
    model_config,
    model_metadata,
    model_statistics,
    repository_index,
)
from service.wire.kserve_servicer import EXTENSIONS
from service.wire.restrictions import KSERVE
from service.wire.siblings import LOCAL_ONLY, Siblings

__all__ = ["add_kserve_routes"]

_EXTENSIONS = [*EXTENSIONS, "binary_tensor_data"]
_MODEL = "/v2/models/{model}"
_VERSION = "/v2/models/{model}/versions/{version}"
_CONTROL_BODY = 1 << 20  # a load or unload request's JSON: its parameters, nothing more


def _json(document: Any) -> web.Response:
    return web.Response(
        body=json.dumps(document, separators=(",", ":")).encode(), content_type="application/json"
    )


def _status(ok: bool) -> web.Response:
    """A health answer: 200 for true, 400 for false, with no body (KServe v2, Triton)."""
    return web.Response(status=200 if ok else 400)


def _model(request: web.Request) -> tuple[str, str]:
    info = request.match_info
    return info["model"], info.get("version", "")


async def _document(request: web.Request, what: str) -> dict[str, Any]:
    """A control request's optional JSON object body ({} when empty)."""
    body = await read_body(request, _CONTROL_BODY)
    if not body.strip():
        return {}
    document = read_json(body, what)
    if not isinstance(document, dict):
        raise InvalidArgument(f"the {what} must be a JSON object")
    return document


def _parameters(document: dict[str, Any], what: str) -> dict[str, Any]:
    parameters = document.get("parameters", {})
    if not isinstance(parameters, dict):
        raise InvalidArgument(f"the {what}'s 'parameters' must be a JSON object")
    return parameters


class _KServe:
    """The endpoints' handlers over one server's parts."""

    def __init__(self, parts: HttpParts) -> None:
        self._parts = parts
        self._plane = parts.plane
        self._repository = parts.plane.repository
        self._lifecycle = parts.plane.lifecycle

    def _siblings(self, request: web.Request) -> Siblings | None:
        """The other workers, unless the request is confined to this one (see LOCAL_ONLY)."""
        key, value = LOCAL_ONLY
        return None if request.headers.get(key) == value else self._parts.siblings

    async def live(self, request: web.Request) -> web.Response:
        return _status(self._lifecycle.live())

    async def ready(self, request: web.Request) -> web.Response:
        return _status(self._lifecycle.ready())

    async def model_ready(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        return _status(self._lifecycle.model_ready(name, version))

    async def server_metadata(self, request: web.Request) -> web.Response:
        return _json({"name": "convserve", "version": __version__, "extensions": _EXTENSIONS})

    async def model_metadata(self, request: web.Request) -> web.Response:
        model = self._repository.get(*_model(request))
        return _json(message_json(model_metadata(model, self._repository.versions(model.name))))

    async def model_config(self, request: web.Request) -> web.Response:
        return _json(message_json(model_config(self._repository.get(*_model(request))).config))

    async def statistics(self, request: web.Request) -> web.Response:
        name, version = request.match_info.get("model", ""), request.match_info.get("version", "")
        own = model_statistics(self._versions(name, version))
        siblings = self._siblings(request)
        if siblings is not None:
            asked = pb.ModelStatisticsRequest(name=name, version=version)
            own = merge_statistics([own, *await siblings.statistics(asked, None)])
        for entry in own.model_stats:  # Triton's JSON has them, and perf_analyzer reads them
            entry.inference_stats.cache_hit.SetInParent()
            entry.inference_stats.cache_miss.SetInParent()
        return _json(message_json(own))

    def _versions(self, name: str, version: str) -> list[ServedModel]:
        """The served versions statistics cover: one, every one of a name, or every model."""
        if not name:
            return self._repository.served()
        if version:
            return [self._repository.get(name, version)]
        models = [self._repository.get(name, str(v)) for v in self._repository.versions(name)]
        if not models:
            raise ModelNotFound(name)
        return models

    async def index(self, request: web.Request) -> web.Response:
        document = await _document(request, "repository index request")
        ready = document.get("ready", False)
        if not isinstance(ready, bool):
            raise InvalidArgument("Invalid value for 'ready': expected a boolean")
        index = repository_index(self._repository, ready)
        return _json([message_json(entry) for entry in index.models])

    async def load(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        parameters = _parameters(await _document(request, "load request"), "load request")
        control = self._parts.control
        control.check_load_parameters(list(parameters))
        control.check_request(False)  # a sibling's repeat comes over its own gRPC socket
        await self._repository.load(name)
        if (siblings := self._siblings(request)) is not None:
            asked = pb.RepositoryModelLoadRequest(model_name=name)
            await siblings.repeat("RepositoryModelLoad", asked, None)
        return web.Response()

    async def unload(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        parameters = _parameters(await _document(request, "unload request"), "unload request")
        if not isinstance(parameters.get("unload_dependents", False), bool):
            raise InvalidArgument("Unable to parse 'unload_dependents': expected a boolean")
        self._parts.control.check_request(False)
        await self._repository.unload(name)
        if (siblings := self._siblings(request)) is not None:
            asked = pb.RepositoryModelUnloadRequest(model_name=name)
            await siblings.repeat("RepositoryModelUnload", asked, None)
        return web.Response()

    async def infer(self, request: web.Request, outcome: Outcome) -> web.Response:
        name, version = _model(request)
        try:
            body = await read_body(request, self._parts.max_body)
            inference = decode_inference(
                body, request.headers.get(HEADER_LENGTH), (name, version), self._parts.max_elements
            )
        except Exception:
            self._plane.refused(outcome, name, version)
            raise
        if inference.request.id:
            outcome.request_id = inference.request.id
        model, rows = await self._plane.infer(inference.request, None, outcome)
        outputs = [
            (spec.name, spec.datatype, value)
            for spec, value in zip(model.outputs, rows, strict=True)
        ]
        answer, header_length = encode_inference(
            inference, (model.name, model.version), outputs, model.info.labels
        )
        if header_length is None:
            return web.Response(body=answer, content_type="application/json")
        response = web.Response(body=answer, content_type="application/octet-stream")
        response.headers[HEADER_LENGTH] = str(header_length)
        return response


def add_kserve_routes(routes: Routes) -> None:
    """Add every KServe v2 endpoint and Triton extension this server serves to ``routes``."""
    kserve = _KServe(routes.parts)
    get: list[tuple[str, Callable[[web.Request], Any], str]] = [
        ("/v2/health/live", kserve.live, "ServerLive"),
        ("/v2/health/ready", kserve.ready, "ServerReady"),
        ("/v2", kserve.server_metadata, "ServerMetadata"),
        ("/v2/models/stats", kserve.statistics, "ModelStatistics"),  # before {model}
    ]
    for prefix in (_MODEL, _VERSION):
        get += [
            (f"{prefix}/ready", kserve.model_ready, "ModelReady"),
            (prefix, kserve.model_metadata, "ModelMetadata"),
            (f"{prefix}/config", kserve.model_config, "ModelConfig"),
            (f"{prefix}/stats", kserve.statistics, "ModelStatistics"),
        ]
    for path, handler, rpc in get:
        routes.add("GET", path, handler, KSERVE + rpc)
    routes.add("POST", "/v2/repository/index", kserve.index, KSERVE + "RepositoryIndex")
    routes.add(
        "POST", "/v2/repository/models/{model}/load", kserve.load, KSERVE + "RepositoryModelLoad"
    )
    routes.add(
        "POST",
        "/v2/repository/models/{model}/unload",
        kserve.unload,
        KSERVE + "RepositoryModelUnload",
    )
    for prefix in (_MODEL, _VERSION):
        routes.inference(f"{prefix}/infer", kserve.infer, "kserve", KSERVE + "ModelInfer")
