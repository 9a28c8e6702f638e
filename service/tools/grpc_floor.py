"""The gRPC floor: a bare grpc.aio KServe ``ModelInfer`` handler, for ``convserve bench --floor``.

The scale an overhead-bound model's serving is measured against: the model run inline by ONNX
Runtime (the same session options and threads as the server, through :class:`Runtime`) behind
grpc.aio, with no batching, no validation beyond what numpy needs, no statistics and one
counter. Measured in the same run as ``convserve serve`` on the same machine, it tells what the
server costs above gRPC Python itself, which is the part the project controls; a shared or
slower machine moves both.

Not a server to deploy: it answers ``ModelInfer`` only, with raw contents in and out, and one
``model`` (name). Run as ``python -m service.tools.grpc_floor``; it logs the same "listening" and
"ready" lines as ``serve``, so :class:`~service.tools.server_process.ServerProcess` can start it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np
from prometheus_client import CollectorRegistry, Counter, start_http_server

from model_format import MODEL_FILE
from service import BUNDLED_REPOSITORY
from service._generated.inference import grpc_service_pb2 as pb
from service._generated.inference import grpc_service_pb2_grpc as pb_grpc
from service.core import event_loop
from service.engine.runtime import DeviceChoice, Runtime

__all__ = ["main"]


class _Floor(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, name: str, runtime: Runtime, requests: Counter) -> None:
        self._name, self._runtime = name, runtime
        self._input = runtime.inputs[0]
        self._ok = requests.labels(name, "OK")
        self._refused = requests.labels(name, "INVALID_ARGUMENT")

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        try:
            if request.model_name != self._name:
                raise ValueError(f"unknown model {request.model_name!r}")
            tensor = request.inputs[0]
            feed = np.frombuffer(request.raw_input_contents[0], self._input.dtype).reshape(
                tuple(tensor.shape)
            )
            outputs = self._runtime.run({self._input.name: feed})
        except Exception as exc:  # the floor checks nothing: whatever numpy or ORT refuses
            self._refused.inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{type(exc).__name__}: {exc}")
        reply = pb.ModelInferResponse(model_name=self._name, id=request.id)
        for spec, value in zip(self._runtime.outputs, outputs, strict=True):
            reply.outputs.add(name=spec.name, datatype=spec.datatype, shape=value.shape)
            reply.raw_output_contents.append(value.tobytes())
        self._ok.inc()
        return reply


async def _serve(args: argparse.Namespace) -> int:
    path = args.model_repository / args.model / str(args.version) / MODEL_FILE
    runtime = Runtime(path, DeviceChoice(args.device), 1, args.cpu_threads, False)
    registry = CollectorRegistry()
    requests = Counter(
        "convserve_requests_total",
        "Requests answered by the gRPC floor, by gRPC status code.",
        ["model", "code"],
        registry=registry,
    )
    metrics, _ = start_http_server(args.metrics_port, args.host, registry)
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(  # type: ignore[no-untyped-call]
        _Floor(args.model, runtime, requests), server
    )
    port = server.add_insecure_port(f"{args.host}:{args.grpc_port}")
    await server.start()
    log = sys.stderr
    print(f"event loop: {event_loop.describe(asyncio.get_running_loop())}", file=log)
    print(f"grpc listening on {args.host}:{port}", file=log)
    print(f"metrics listening on {args.host}:{metrics.server_port}", file=log)
    print(
        f"ready: serving {args.model} on the gRPC floor ({runtime.provider}, "
        f"{runtime.threads} thread(s))",
        file=log,
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)
    metrics.shutdown()
    runtime.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m service.tools.grpc_floor``."""
    parser = argparse.ArgumentParser(prog="python -m service.tools.grpc_floor", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--grpc-port", type=int, default=0)
    parser.add_argument("--metrics-port", type=int, default=0)
    parser.add_argument("--model-repository", type=Path, default=BUNDLED_REPOSITORY)
    parser.add_argument("--model", default="digits")
    parser.add_argument("--version", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--cpu-threads", type=int, default=0, help="ONNX Runtime threads (0: the cores)"
    )
    parser.add_argument(
        "--event-loop", choices=event_loop.CHOICES, default="auto", help="as for serve"
    )
    args = parser.parse_args(argv)
    return event_loop.run(lambda: _serve(args), event_loop.loop_factory(args.event_loop))


if __name__ == "__main__":
    sys.exit(main())
