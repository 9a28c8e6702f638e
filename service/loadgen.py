"""A gRPC load generator that runs in its own process: ``python -m service.loadgen``.

Sends one pre-serialised request over and over from ``concurrency`` coroutines for a fixed time,
spread over ``connections`` grpc.aio channels, each its own TCP connection (a server that runs
several processes on one port balances connections, not requests), and prints one JSON document:
requests, errors, latency percentiles (ms), achieved rate, and the generator's own CPU seconds,
since on a small machine it competes with the server for the same cores. Payloads are bytes on
both sides, so the generator spends nothing on protobuf.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from pathlib import Path

import grpc
import numpy as np

from . import event_loop

__all__ = ["main"]


async def _connect(calls: list[grpc.aio.UnaryUnaryMultiCallable], payload: bytes) -> None:
    """One request per channel, so every connection is up before the clock starts."""
    for call in calls:
        try:
            await call(payload, timeout=60)
        except grpc.aio.AioRpcError as exc:  # a request the server refuses still connects
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise  # no server there: say so instead of measuring failures


async def _drive(
    address: str,
    method: str,
    payload: bytes,
    concurrency: int,
    duration: float,
    warmup: float,
    connections: int = 1,
) -> dict[str, object]:
    options = [
        ("grpc.max_send_message_length", 256 << 20),
        ("grpc.max_receive_message_length", 256 << 20),
        # Without this, channels to one address share one subchannel, i.e. one connection.
        ("grpc.use_local_subchannel_pool", 1),
    ]
    channels = [
        grpc.aio.insecure_channel(address, options=options)
        for _ in range(max(1, min(connections, concurrency)))
    ]
    try:
        calls = [channel.unary_unary(method) for channel in channels]
        await _connect(calls, payload)

        latencies: list[float] = []
        errors: dict[str, int] = {}
        measuring = False
        stop = time.perf_counter() + warmup + duration

        async def worker(call: grpc.aio.UnaryUnaryMultiCallable) -> None:
            while time.perf_counter() < stop:
                started = time.perf_counter()
                try:
                    await call(payload, timeout=60)
                except grpc.aio.AioRpcError as exc:
                    if measuring:
                        errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
                    continue
                if measuring:
                    latencies.append(time.perf_counter() - started)

        async def clock() -> float:
            nonlocal measuring
            await asyncio.sleep(warmup)
            measuring = True
            begun = time.perf_counter()
            await asyncio.sleep(duration)
            measuring = False
            return time.perf_counter() - begun

        cpu_before = resource.getrusage(resource.RUSAGE_SELF)
        timer = asyncio.create_task(clock())
        await asyncio.gather(timer, *(worker(calls[i % len(calls)]) for i in range(concurrency)))
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        for channel in channels:
            await channel.close()
    elapsed = timer.result()
    values = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return {
        "requests": len(latencies),
        "errors": errors,
        "seconds": elapsed,
        "rate": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(values, 50)),
        "p90_ms": float(np.percentile(values, 90)),
        "p99_ms": float(np.percentile(values, 99)),
        "generator_cpu_seconds": cpu,
    }


def main() -> int:
    """Parse flags, drive the load, print the JSON summary."""
    parser = argparse.ArgumentParser(prog="python -m service.loadgen")
    parser.add_argument("--address", required=True)
    parser.add_argument("--method", required=True, help="/package.Service/Method")
    parser.add_argument("--payload", type=Path, required=True, help="serialised request")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--connections", type=int, default=1, help="TCP connections to spread over")
    args = parser.parse_args()
    payload = args.payload.read_bytes()
    summary = event_loop.run(
        lambda: _drive(
            args.address,
            args.method,
            payload,
            args.concurrency,
            args.duration,
            args.warmup,
            args.connections,
        ),
        event_loop.loop_factory("auto"),  # the lighter loop leaves more of the cores to the server
    )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
