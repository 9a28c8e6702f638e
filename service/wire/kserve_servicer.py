"""``inference.GRPCInferenceService``: KServe v2 over gRPC, translating only.

Each RPC turns its message into a domain call and the result back into a message; errors become
statuses in :mod:`service.wire.rpc`. Which load and unload requests are served is the model
control mode's decision (:mod:`service.engine.model_control`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeAlias

import grpc

from service import __version__
from service._generated.inference import grpc_service_pb2 as pb
from service._generated.inference import grpc_service_pb2_grpc as pb_grpc
from service.core.errors import InvalidArgument, ModelNotFound, ServingError
from service.engine.admission import Draining
from service.engine.dataplane import DataPlane, Outcome
from service.engine.model_control import ModelControl
from service.wire.codec import decode_request, encode_response
from service.wire.kserve_messages import (
    merge_statistics,
    model_config,
    model_metadata,
    model_statistics,
    repository_index,
)
from service.wire.rpc import Undecodable, counted, deadline_of, inference_rpc, rpc
from service.wire.siblings import Siblings, from_sibling, wants_local_only
from service.wire.streams import completion_order

__all__ = ["KServeServicer"]

log = logging.getLogger(__name__)

Context: TypeAlias = grpc.aio.ServicerContext
# Messages of one ModelStreamInfer stream in the server at once (see ModelStreamInfer).
STREAM_IN_FLIGHT = 64

EXTENSIONS = [
    "classification",
    "model_repository",
    "model_configuration",
    "statistics",
    "parameters",
]


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    """See the module docstring."""

    def __init__(
        self,
        plane: DataPlane,
        max_elements: int,
        siblings: Siblings | None = None,
        control: ModelControl | None = None,
    ) -> None:
        self._plane = plane
        self._repository = plane.repository
        self.lifecycle = plane.lifecycle
        self._max_elements = max_elements
        # The other workers (serve --workers): statistics add up, model control is repeated.
        self._siblings = siblings
        self._control = control or ModelControl("none")

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: Context
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.lifecycle.live())

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: Context
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.lifecycle.ready())

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: Context
    ) -> pb.ModelReadyResponse:
        try:
            if isinstance(request, Undecodable):
                raise request.error()
            ready = self.lifecycle.model_ready(request.name, request.version)
        except InvalidArgument as exc:  # a version that is no number: a client's mistake
            await context.abort(exc.code, exc.message)
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Context
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="convserve", version=__version__, extensions=EXTENSIONS
        )

    @rpc
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Context
    ) -> pb.ModelMetadataResponse:
        model = self._repository.get(request.name, request.version)
        return model_metadata(model, self._repository.versions(model.name))

    @rpc
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: Context
    ) -> pb.ModelConfigResponse:
        return model_config(self._repository.get(request.name, request.version))

    @rpc
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Context
    ) -> pb.ModelStatisticsResponse:
        if request.name:
            models = (
                [self._repository.get(request.name, request.version)]
                if request.version
                else [
                    self._repository.get(request.name, str(v))
                    for v in self._repository.versions(request.name)
                ]
            )
            if not models:
                raise ModelNotFound(request.name)
        else:
            models = self._repository.served()
        own = model_statistics(models)
        if (siblings := self._siblings_to_ask(context)) is None:
            return own
        parts = await siblings.statistics(request, context.time_remaining())
        return merge_statistics([own, *parts])

    @rpc
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Context
    ) -> pb.RepositoryIndexResponse:
        _one_repository(request.repository_name)
        return repository_index(self._repository, request.ready)

    @rpc
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> pb.RepositoryModelLoadResponse:
        _one_repository(request.repository_name)
        # Parameters before the mode, as Triton's gRPC frontend checks them before its core.
        self._control.check_load_parameters(list(request.parameters))
        self._control.check_request(self._from_sibling(context))
        await self._repository.load(request.model_name)
        if (siblings := self._siblings_to_ask(context)) is not None:
            await siblings.repeat("RepositoryModelLoad", request, context.time_remaining())
        return pb.RepositoryModelLoadResponse()

    @rpc
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        _one_repository(request.repository_name)
        self._control.check_request(self._from_sibling(context))
        await self._repository.unload(request.model_name)
        if (siblings := self._siblings_to_ask(context)) is not None:
            await siblings.repeat("RepositoryModelUnload", request, context.time_remaining())
        return pb.RepositoryModelUnloadResponse()

    def _from_sibling(self, context: Context) -> bool:
        """The call is another worker's repeat of what it did (see service.wire.siblings)."""
        return self._siblings is not None and from_sibling(context)

    def _siblings_to_ask(self, context: Context) -> Siblings | None:
        """The other workers, when this call is for the whole server (not marked local-only)."""
        return None if wants_local_only(context) else self._siblings

    @inference_rpc("kserve")
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Context, outcome: Outcome
    ) -> pb.ModelInferResponse:
        return await self._infer(request, deadline_of(context), outcome)

    async def _infer(
        self, request: pb.ModelInferRequest, deadline: float | None, outcome: Outcome
    ) -> pb.ModelInferResponse:
        if isinstance(request, Undecodable):  # a stream's message (unary calls stop earlier)
            raise request.error()
        if request.id:
            outcome.request_id = request.id
        try:
            decoded = decode_request(request, self._max_elements)
        except ServingError:
            self._plane.refused(outcome, request.model_name, request.model_version)
            raise
        model, rows = await self._plane.infer(decoded, deadline, outcome)
        outputs = [
            (spec.name, spec.datatype, value)
            for spec, value in zip(model.outputs, rows, strict=True)
        ]
        return encode_response(decoded, model.name, model.version, outputs, model.info.labels)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Answers arrive in completion order; an error is reported in-band, per request.

        Each message counts as a KServe request in the metrics (api ``kserve``); at most
        ``STREAM_IN_FLIGHT`` are answered at once, and as many answers wait unread (see
        :mod:`service.wire.streams`). The stream is admitted as one call: once the drain has
        begun, a new stream is refused, and an open one answers every message it has read and
        then ends with UNAVAILABLE, the messages after them unread (the client resends them to
        another replica).
        """
        lifecycle = self.lifecycle
        if not lifecycle.admit():
            await context.abort(grpc.StatusCode.UNAVAILABLE, Draining().message)
        try:
            messages = _Messages(request_iterator)
            async for answer in completion_order(
                messages, self._one_of_stream(context), STREAM_IN_FLIGHT, lifecycle.drain_begun
            ):
                yield answer
            if lifecycle.drain_begun.is_set() and not messages.ended:  # closed by the drain
                await context.abort(grpc.StatusCode.UNAVAILABLE, Draining().message)
        finally:
            lifecycle.release()

    def _one_of_stream(
        self, context: Context
    ) -> Callable[[pb.ModelInferRequest], Awaitable[pb.ModelStreamInferResponse]]:
        """What answers one message of a ModelStreamInfer stream (its errors in-band)."""

        async def one(message: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
            outcome = Outcome()
            deadline = deadline_of(context)
            try:
                response = await counted(
                    "kserve", outcome, self._infer(message, deadline, outcome), deadline=deadline
                )
                return pb.ModelStreamInferResponse(infer_response=response)
            except ServingError as exc:
                error = exc.message
            except Exception:
                log.exception("stream request failed")
                error = "internal error (logged by the server)"
            return pb.ModelStreamInferResponse(  # an Undecodable one has no id
                error_message=error,
                infer_response=pb.ModelInferResponse(id=getattr(message, "id", "")),
            )

        return one


class _Messages:
    """A stream's request messages, noting whether the client ended them (not the drain)."""

    def __init__(self, messages: AsyncIterator[pb.ModelInferRequest]) -> None:
        self._messages = aiter(messages)
        self.ended = False

    def __aiter__(self) -> _Messages:
        return self

    async def __anext__(self) -> pb.ModelInferRequest:
        try:
            return await anext(self._messages)
        except StopAsyncIteration:
            self.ended = True
            raise


def _one_repository(name: str) -> None:
    """Refuse a named repository: the server has one, and a name must not pick another."""
    if name:
        raise InvalidArgument(
            f"repository_name '{name}': this server serves one model repository; "
            "leave repository_name empty"
        )
