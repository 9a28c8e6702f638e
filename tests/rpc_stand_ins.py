"""A KServe servicer stand-in served in-process through ``register``, and metric deltas."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping

import grpc
from prometheus_client import REGISTRY

from service._generated.inference import grpc_service_pb2 as pb
from service._generated.inference import grpc_service_pb2_grpc as pb_grpc
from service.core.errors import ModelNotFound
from service.engine.dataplane import Outcome
from service.engine.lifecycle import Lifecycle
from service.wire.rpc import REFUSALS, inference_rpc, register

METHOD = "/inference.GRPCInferenceService/ModelInfer"


class NoModels:
    """The model states of a server that serves none (its lifecycle's door admits every call)."""

    def get(self, name: str, version: str = "") -> object:
        raise ModelNotFound(name)

    def all_ready(self) -> bool:
        return True


class Infer(pb_grpc.GRPCInferenceServiceServicer):
    """ModelInfer that sleeps ``delay`` seconds, or raises ``error``; it records every call."""

    def __init__(self) -> None:
        self.lifecycle = Lifecycle(NoModels())
        self.delay = 0.0
        self.error: BaseException | None = None
        self.calls = 0

    @inference_rpc("kserve")
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext, outcome: Outcome
    ) -> pb.ModelInferResponse:
        self.calls += 1
        if self.error is not None:
            raise self.error
        await asyncio.sleep(self.delay)
        return pb.ModelInferResponse(model_name=request.model_name)


async def serve(servicer: Infer) -> AsyncIterator[str]:
    """Serve ``servicer`` on a free port of this loop; yields its address."""
    server = grpc.aio.server()
    register(pb_grpc.add_GRPCInferenceServiceServicer_to_server, servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)
        REFUSALS.flush()  # its line in this test's log, its timer gone with this loop


def sample(name: str, labels: Mapping[str, str]) -> float:
    """A metric's value in this process (0 where it has no such series yet)."""
    return REGISTRY.get_sample_value(name, dict(labels)) or 0.0


def requests(code: str, model: str = "_unknown") -> float:
    """``convserve_requests_total`` of KServe calls to ``model`` that ended with ``code``."""
    version = "" if model == "_unknown" else "1"
    return sample(
        "convserve_requests_total",
        {"model": model, "version": version, "api": "kserve", "code": code, "protocol": "grpc"},
    )


def dropped(reason: str, model: str = "_unknown") -> float:
    """``convserve_dropped_requests_total`` of ``model`` for ``reason``."""
    return sample("convserve_dropped_requests_total", {"model": model, "reason": reason})
