"""A gRPC load generator that runs in its own process: ``python -m service.tools.loadgen``.

Sends one pre-serialised request over and over from ``concurrency`` coroutines for a fixed time,
spread over ``connections`` grpc.aio channels, each its own TCP connection (a server that runs
several processes on one port balances connections, not requests), and prints one JSON document:
requests, errors, latency percentiles (ms), achieved rate, and the generator's own CPU seconds,
since on a small machine it competes with the server for the same cores. Payloads are bytes on
both sides, so the generator spends nothing on protobuf.

With ``--stream`` the method is KServe's ModelStreamInfer: one stream per connection, and
``concurrency`` messages in flight spread over them, each sent again as soon as its answer
arrives. Answers come in completion order, so every message carries its own id (appended to the
payload's bytes: a repeated protobuf field's last value wins) and is matched by it; an answer
with an error message counts as an error.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import resource
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from service._generated.inference import grpc_service_pb2 as pb
from service.core import event_loop

__all__ = ["main"]


async def _connect(calls: list[grpc.aio.UnaryUnaryMultiCallable], payload: bytes) -> None:
    """One request per channel, so every connection is up before the clock starts."""
    for call in calls:
        try:
            await call(payload, timeout=60)
        except grpc.aio.AioRpcError as exc:  # a request the server refuses still connects
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise  # no server there: say so instead of measuring failures


# Without use_local_subchannel_pool, channels to one address share one subchannel (connection).
_OPTIONS = [
    ("grpc.max_send_message_length", 256 << 20),
    ("grpc.max_receive_message_length", 256 << 20),
    ("grpc.use_local_subchannel_pool", 1),
]


class _Phase:
    """The clock (warm-up, then the measured phase) and what the measured phase saw."""

    def __init__(self, warmup: float, duration: float) -> None:
        self.warmup, self.duration = warmup, duration
        self.stop = time.perf_counter() + warmup + duration  # no new requests after this
        self.measuring = False
        self.latencies: list[float] = []
        self.errors: dict[str, int] = {}
        self.elapsed = 0.0

    def answered(self, started: float, error: str | None = None) -> None:
        """A request sent at ``started`` is answered (``error``: how it failed)."""
        if not self.measuring:
            return
        if error is None:
            self.latencies.append(time.perf_counter() - started)
        else:
            self.errors[error] = self.errors.get(error, 0) + 1

    async def run(self) -> None:
        """Time the measured phase."""
        await asyncio.sleep(self.warmup)
        self.measuring = True
        begun = time.perf_counter()
        await asyncio.sleep(self.duration)
        self.measuring = False
        self.elapsed = time.perf_counter() - begun

    async def measure(self, *load: Awaitable[None]) -> dict[str, object]:
        """Run ``load`` beside the clock; the summary, with this process's CPU meanwhile."""
        before = resource.getrusage(resource.RUSAGE_SELF)
        await asyncio.gather(self.run(), *load)
        after = resource.getrusage(resource.RUSAGE_SELF)
        values = np.array(self.latencies) * 1000 if self.latencies else np.array([np.nan])
        return {
            "requests": len(self.latencies),
            "errors": self.errors,
            "seconds": self.elapsed,
            "rate": len(self.latencies) / self.elapsed,
            "p50_ms": float(np.percentile(values, 50)),
            "p90_ms": float(np.percentile(values, 90)),
            "p99_ms": float(np.percentile(values, 99)),
            "generator_cpu_seconds": (after.ru_utime - before.ru_utime)
            + (after.ru_stime - before.ru_stime),
        }


def _with_id(payload: bytes, number: int) -> bytes:
    """``payload`` (a serialised ModelInferRequest) with its ``id`` (field 3) set to ``number``."""
    text = str(number).encode()
    return payload + b"\x1a" + bytes([len(text)]) + text  # tag 3, length-delimited; < 128 bytes


class _Stream:
    """One ModelStreamInfer call that keeps its share of the messages in flight until the end."""

    def __init__(self, phase: _Phase, payload: bytes, numbers: Iterator[int]) -> None:
        self._phase, self._payload, self._numbers = phase, payload, numbers
        self._outgoing: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._sent: dict[str, float] = {}  # id -> when it was sent

    def _send(self) -> None:
        number = next(self._numbers)
        self._sent[str(number)] = time.perf_counter()
        self._outgoing.put_nowait(_with_id(self._payload, number))

    async def _requests(self) -> AsyncIterator[bytes]:
        while (message := await self._outgoing.get()) is not None:
            yield message

    def _answered(self, raw: bytes) -> None:
        answer = pb.ModelStreamInferResponse.FromString(raw)
        started = self._sent.pop(answer.infer_response.id, None)
        if started is None:  # an answer without its request's id: the oldest one's
            started = self._sent.pop(next(iter(self._sent)))
        self._phase.answered(started, "stream" if answer.error_message else None)
        if time.perf_counter() < self._phase.stop:
            self._send()
        elif not self._sent:
            self._outgoing.put_nowait(None)  # every answer is in: end the stream

    async def run(self, channel: grpc.aio.Channel, method: str, in_flight: int) -> None:
        """Send ``in_flight`` messages, then one more per answer until the phase ends."""
        for _ in range(in_flight):
            self._send()
        try:
            async for raw in channel.stream_stream(method)(self._requests()):
                self._answered(raw)
        except grpc.aio.AioRpcError as exc:  # the stream failed, and every message in it
            for started in self._sent.values():
                self._phase.answered(started, exc.code().name)


async def _call(call: grpc.aio.UnaryUnaryMultiCallable, payload: bytes, phase: _Phase) -> None:
    """Send ``payload`` again as soon as its answer arrives, until the phase ends."""
    while time.perf_counter() < phase.stop:
        started = time.perf_counter()
        try:
            await call(payload, timeout=60)
        except grpc.aio.AioRpcError as exc:
            phase.answered(started, exc.code().name)
            continue
        phase.answered(started)


@dataclass(frozen=True)
class _Load:
    """What to send where, how hard and for how long (the command's flags)."""

    address: str
    method: str
    payload: bytes
    concurrency: int
    duration: float
    warmup: float
    connections: int = 1
    stream: bool = False


async def _drive(load: _Load) -> dict[str, object]:
    """``concurrency`` requests in flight over ``connections`` channels: unary calls, or streams."""
    concurrency, payload = load.concurrency, load.payload
    count = max(1, min(load.connections, concurrency))
    channels = [grpc.aio.insecure_channel(load.address, options=_OPTIONS) for _ in range(count)]
    try:
        if load.stream:  # one stream per channel, the requests in flight shared out over them
            phase = _Phase(load.warmup, load.duration)
            numbers = itertools.count()
            shares = [concurrency // count + (i < concurrency % count) for i in range(count)]
            work = [
                _Stream(phase, payload, numbers).run(channel, load.method, share)
                for channel, share in zip(channels, shares, strict=True)
            ]
        else:
            calls = [channel.unary_unary(load.method) for channel in channels]
            await _connect(calls, payload)
            phase = _Phase(load.warmup, load.duration)
            work = [_call(calls[i % count], payload, phase) for i in range(concurrency)]
        return await phase.measure(*work)
    finally:
        for channel in channels:
            await channel.close()


def main() -> int:
    """Parse flags, drive the load, print the JSON summary."""
    parser = argparse.ArgumentParser(prog="python -m service.tools.loadgen")
    parser.add_argument("--address", required=True)
    parser.add_argument("--method", required=True, help="/package.Service/Method")
    parser.add_argument("--payload", type=Path, required=True, help="serialised request")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--connections", type=int, default=1, help="TCP connections to spread over")
    parser.add_argument(
        "--stream", action="store_true", help="a bidirectional stream per connection (see above)"
    )
    args = parser.parse_args()
    load = _Load(
        args.address,
        args.method,
        args.payload.read_bytes(),
        args.concurrency,
        args.duration,
        args.warmup,
        args.connections,
        args.stream,
    )
    summary = event_loop.run(
        lambda: _drive(load),
        event_loop.loop_factory("auto"),  # the lighter loop leaves more of the cores to the server
    )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
