"""Restricted API groups: calls in a group need a request header that only trusted callers send.

Triton's ``--grpc-restricted-protocol=<groups>:<key>=<value>``, with its group names and its
answer: a call in a restricted group without header ``triton-grpc-protocol-<key>: <value>`` is
refused with UNAVAILABLE and ``This protocol is restricted, expecting header
'triton-grpc-protocol-<key>'``, before its request is parsed, and counted in
``convserve_restricted_refusals_total{group}``. With no restriction set no interceptor is
installed, so unrestricted servers pay nothing per call.

The HTTP port's ``--http-restricted-api`` uses the same groups: each REST route names the RPC it
is the REST form of, and :func:`group_of` gives its group (see :mod:`service.wire.http.routes`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import grpc

from service.core.settings import Restriction
from service.engine import metrics

__all__ = ["CLASSIFIER", "GROUPS", "KSERVE", "RestrictionInterceptor", "group_of"]

_KSERVE = "/inference.GRPCInferenceService/"
_CLASSIFIER = "/convserve.v1.Classifier/"
KSERVE = _KSERVE
"""The KServe v2 RPCs' path prefix (``KSERVE + "ModelInfer"``)."""
CLASSIFIER = _CLASSIFIER
"""The Classifier RPCs' path prefix."""
_HEALTH = "/grpc.health.v1.Health/"

GROUPS: Mapping[str, frozenset[str]] = {
    "health": frozenset(
        {
            _KSERVE + "ServerLive",
            _KSERVE + "ServerReady",
            _KSERVE + "ModelReady",
            _HEALTH + "Check",
            _HEALTH + "Watch",
        }
    ),
    "metadata": frozenset(
        {_KSERVE + "ServerMetadata", _KSERVE + "ModelMetadata", _CLASSIFIER + "ListModels"}
    ),
    "inference": frozenset(
        {
            _KSERVE + "ModelInfer",
            _KSERVE + "ModelStreamInfer",
            _CLASSIFIER + "Classify",
            _CLASSIFIER + "ClassifyDense",
        }
    ),
    "model-config": frozenset({_KSERVE + "ModelConfig"}),
    "model-repository": frozenset(
        {
            _KSERVE + "RepositoryIndex",
            _KSERVE + "RepositoryModelLoad",
            _KSERVE + "RepositoryModelUnload",
        }
    ),
    "statistics": frozenset({_KSERVE + "ModelStatistics"}),
    # Triton's groups for APIs convserve does not serve: accepted, so a Triton command line
    # works unchanged; their calls are answered UNIMPLEMENTED whatever the header.
    "shared-memory": frozenset(),
    "trace": frozenset(),
    "logging": frozenset(),
}
"""Triton's group names and the RPCs each one covers."""

_GROUP_OF = {method: group for group, methods in GROUPS.items() for method in methods}


def group_of(method: str) -> str | None:
    """The API group of RPC ``method`` (``KSERVE + "ModelInfer"``: ``inference``), or None."""
    return _GROUP_OF.get(method)


class RestrictionInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses calls in a restricted group that lack their header, before any parsing."""

    def __init__(self, restrictions: Iterable[Restriction]) -> None:
        self._by_method: dict[str, tuple[str, Restriction]] = {}
        for restriction in restrictions:
            for group in restriction.groups:
                for method in GROUPS[group]:
                    self._by_method[method] = (group, restriction)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Pass the call on, or answer it with the refusal when its header is missing."""
        found = self._by_method.get(details.method)
        if found is None:
            return await continuation(details)
        group, restriction = found
        if (restriction.header, restriction.value) in tuple(details.invocation_metadata or ()):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:
            return None
        return _refusal(handler, group, restriction.header)


def _refusal(handler: grpc.RpcMethodHandler, group: str, header: str) -> grpc.RpcMethodHandler:
    message = f"This protocol is restricted, expecting header '{header}'"

    async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> None:
        metrics.RESTRICTED_REFUSALS.labels(group).inc()
        await context.abort(grpc.StatusCode.UNAVAILABLE, message)

    # The request is never parsed: the refusal takes its bytes as they came.
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)
