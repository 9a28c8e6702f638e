"""KServe v2 over HTTP/REST in ``convserve bench``: the requests, their load, the comparison.

Two forms of the same inference request, both of the KServe v2 HTTP protocol: ``rest-json``
(the tensor as a JSON ``data`` list, answered in JSON) and ``rest-binary`` (Triton's binary
tensor data extension: the tensor's bytes after a JSON header whose length goes in
``Inference-Header-Content-Length``, the answer asked for in binary too). Their load comes from
h2load in HTTP/1.1 mode (one request in flight per connection, no pipelining) or, with
``--generator python``, from an aiohttp client in its own process (``python -m
service.tools.bench.http``), so each protocol is loaded by the same kind of generator as gRPC.

``--protocol http`` sends the sweep's KServe requests over REST in both forms; ``--protocol
both`` keeps the gRPC sweep and adds the comparison: gRPC, REST JSON and REST binary at every
concurrency of the sweep, in alternating rounds against the one server, printed side by side
with REST binary's throughput over gRPC's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from service.tools.bench.comparisons import Comparison
from service.tools.bench.servers import Server, target_of
from service.tools.bench.steps import ServedRow, Step, Target
from service.tools.bench.sweep import served_benchmark
from service.tools.server_process import ServerProcess

if TYPE_CHECKING:
    from service.engine.runtime import Runtime

__all__ = [
    "REST_BINARY",
    "REST_JSON",
    "compare_protocols",
    "infer_path",
    "is_rest",
    "main",
    "rest_load",
    "rest_payloads",
    "rest_target",
]

REST_JSON = "rest-json"
REST_BINARY = "rest-binary"
HEADER_LENGTH = "Inference-Header-Content-Length"
_PREFIX = "/v2/"
_HTTP_PORT = 8000  # where a server started elsewhere (--server) serves REST, as Triton does
_NAMES = (("gRPC", "kserve"), ("REST-JSON", REST_JSON), ("REST-binary", REST_BINARY))


def infer_path(model: str) -> str:
    """The REST inference path of ``model``: what a REST step sends to."""
    return f"/v2/models/{model}/infer"


def is_rest(method: str) -> bool:
    """Whether a step's ``method`` is a REST path rather than a gRPC method."""
    return method.startswith(_PREFIX)


def rest_payloads(runtime: Runtime) -> dict[str, bytes]:
    """The JSON and the binary body of one input of the model's shape, batch 1.

    The values are the gRPC payload's (:func:`service.tools.bench.payloads.kserve_payload`).
    """
    spec = runtime.inputs[0]
    shape = [1, *spec.shape[1:]]
    values = np.random.default_rng(0).standard_normal(shape).astype(spec.dtype)
    tensor = {"name": spec.name, "shape": shape, "datatype": spec.datatype}
    as_json = {"inputs": [{**tensor, "data": values.ravel().tolist()}]}
    raw = values.tobytes()
    header = {
        "inputs": [{**tensor, "parameters": {"binary_data_size": len(raw)}}],
        "parameters": {"binary_data_output": True},
    }
    return {
        REST_JSON: json.dumps(as_json).encode(),
        REST_BINARY: json.dumps(header).encode() + raw,
    }


def _json_length(body: bytes) -> int:
    """Bytes of the JSON document ``body`` starts with (all of it for a JSON body).

    latin-1 maps every byte to one character, so the binary tail decodes and the index is a
    byte count.
    """
    return json.JSONDecoder().raw_decode(body.decode("latin-1"))[1]


def _headers(body: bytes) -> dict[str, str]:
    """The request headers of ``body``: JSON, or a JSON header with binary data after it."""
    length = _json_length(body)
    if length == len(body):
        return {"Content-Type": "application/json"}
    return {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(length)}


def rest_target(server: Server, model: str) -> Target:
    """``server``'s REST port as a load step's target (port 8000 of a server elsewhere)."""
    grpc = target_of(server, model)
    if isinstance(server, ServerProcess):
        address = server.http_address
    else:
        address = f"{server.grpc_address.rsplit(':', 1)[0]}:{_HTTP_PORT}"
    return Target(address, grpc.metrics_url, model, grpc.pid)


def _summary(latencies_ms: list[float], seconds: float) -> dict[str, Any]:
    values = np.array(latencies_ms) if latencies_ms else np.array([np.nan])
    return {
        "requests": len(latencies_ms),
        "seconds": seconds,
        "rate": len(latencies_ms) / seconds if seconds else 0.0,
        "p50_ms": float(np.percentile(values, 50)),
        "p90_ms": float(np.percentile(values, 90)),
        "p99_ms": float(np.percentile(values, 99)),
    }


def _h2load(url: str, step: Step, body: bytes, warmup: float) -> dict[str, Any]:
    """h2load in HTTP/1.1 mode: ``concurrency`` connections, one request in flight on each."""
    program = shutil.which("h2load")
    if program is None:
        raise FileNotFoundError("h2load is not installed (Debian/Ubuntu: nghttp2-client)")
    headers = [f"--header={k.lower()}:{v}" for k, v in _headers(body).items()]
    with tempfile.TemporaryDirectory() as folder:
        data, log = Path(folder, "request"), Path(folder, "requests.tsv")
        data.write_bytes(body)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(
            [
                program,
                "--h1",
                f"--duration={round(step.seconds * 1000)}ms",
                f"--warm-up-time={round(warmup * 1000)}ms",
                f"--clients={step.concurrency}",
                "--max-concurrent-streams=1",
                *headers,
                f"--data={data}",
                f"--log-file={log}",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=step.seconds + warmup + 120,
            check=True,
        )
        used = resource.getrusage(resource.RUSAGE_CHILDREN)
        rows = [line.split("\t") for line in log.read_text().splitlines() if line]
    answered = [int(latency) / 1000 for _, status, latency, *_ in rows if status == "200"]
    summary = _summary(answered, step.seconds)
    failed = len(rows) - len(answered)
    summary["errors"] = {"http": failed} if failed else {}
    summary["generator_cpu_seconds"] = (used.ru_utime - children.ru_utime) + (
        used.ru_stime - children.ru_stime
    )
    return summary


def _python(url: str, step: Step, body: bytes, warmup: float) -> dict[str, Any]:
    """The aiohttp generator of this module, in its own process."""
    with tempfile.NamedTemporaryFile(suffix=".bin") as handle:
        handle.write(body)
        handle.flush()
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "service.tools.bench.http",
                *("--url", url, "--payload", handle.name),
                *("--concurrency", str(step.concurrency), "--duration", str(step.seconds)),
                *("--warmup", str(warmup)),
            ],
            capture_output=True,
            text=True,
            timeout=step.seconds + warmup + 120,
            check=True,
        )
    summary: dict[str, Any] = json.loads(result.stdout)
    return summary


def rest_load(address: str, step: Step, warmup: float) -> dict[str, Any]:
    """Send ``step.payload`` to ``step.method`` on ``address`` (host:port) over HTTP/1.1.

    Returns the summary :mod:`service.tools.loadgen` prints, with the connections used (one per
    request in flight: HTTP/1.1 carries one at a time). A non-200 answer is an error.
    """
    url = f"http://{address}{step.method}"
    load = _h2load if step.generator == "h2load" else _python
    summary = load(url, step, step.payload, warmup)
    summary["connections"] = step.concurrency
    return summary


async def _drive(url: str, body: bytes, concurrency: int, duration: float, warmup: float) -> Any:
    """``concurrency`` aiohttp clients posting ``body`` until the time is up; the summary."""
    import aiohttp

    headers = _headers(body)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    begin = time.perf_counter() + warmup
    end = begin + duration

    async def client(session: aiohttp.ClientSession) -> None:
        while (started := time.perf_counter()) < end:
            try:
                async with session.post(url, data=body, headers=headers) as reply:
                    await reply.read()
                    error = None if reply.status == 200 else str(reply.status)
            except aiohttp.ClientError as exc:
                error = type(exc).__name__
            if started >= begin and time.perf_counter() <= end:  # the measured phase only
                if error is None:
                    latencies.append((time.perf_counter() - started) * 1000)
                else:
                    errors[error] = errors.get(error, 0) + 1

    before = resource.getrusage(resource.RUSAGE_SELF)
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    after = resource.getrusage(resource.RUSAGE_SELF)
    summary = _summary(latencies, duration)
    summary["errors"] = errors
    summary["generator_cpu_seconds"] = (after.ru_utime - before.ru_utime) + (
        after.ru_stime - before.ru_stime
    )
    return summary


def _alternating(
    comparison: Comparison, variants: list[tuple[Target, Step]]
) -> dict[tuple[str, int], ServedRow]:
    """Each step in two alternating rounds of half its length, the rounds averaged."""
    rounds: dict[tuple[str, int], list[ServedRow]] = {}
    for _ in range(2):
        for target, step in variants:
            half = replace(step, seconds=comparison.seconds / 2)
            rounds.setdefault((step.api, step.concurrency), []).append(
                served_benchmark(target, half)
            )
    combined = {}
    for key, found in rounds.items():
        figures: dict[str, Any] = {
            name: statistics.fmean(getattr(r, name) for r in found)
            for name, value in asdict(found[0]).items()
            if isinstance(value, float)
        }
        figures["errors"] = sum(r.errors for r in found)
        combined[key] = replace(found[0], **figures)
    return combined


def compare_protocols(
    comparison: Comparison, server: Server, levels: list[int], payloads: dict[str, bytes]
) -> tuple[list[ServedRow], list[str]]:
    """gRPC, REST JSON and REST binary at every level of ``levels``, alternating rounds.

    ``payloads``: :func:`rest_payloads`. Returns the rows and the report's lines: each level's
    requests/s and p50 side by side, and REST binary's throughput over gRPC's.
    """
    args, (method, payload) = comparison.args, comparison.kserve
    grpc, rest = target_of(server, args.model), rest_target(server, args.model)
    path = infer_path(args.model)
    variants: list[tuple[Target, Step]] = []
    for level in levels:
        for target, api, url, body in (
            (grpc, "kserve", method, payload),
            (rest, REST_JSON, path, payloads[REST_JSON]),
            (rest, REST_BINARY, path, payloads[REST_BINARY]),
        ):
            connections = comparison.connections
            step = Step(api, url, body, level, comparison.seconds, connections, args.generator)
            variants.append((target, step))
    rows = _alternating(comparison, variants)
    lines = []
    for level in levels:
        found = {api: rows[(api, level)] for api in ("kserve", REST_JSON, REST_BINARY)}
        figures = ", ".join(
            f"{name} {found[api].requests_per_second:,.1f} req/s p50 {found[api].p50_ms:.2f} ms"
            for name, api in _NAMES
        )
        grpc_rate = found["kserve"].requests_per_second
        ratio = found[REST_BINARY].requests_per_second / grpc_rate if grpc_rate else float("nan")
        lines.append(
            f"protocols at c={level}: {figures}; REST-binary/gRPC throughput {ratio:.2f}x "
            "(alternating rounds)"
        )
    return list(rows.values()), lines


def main() -> int:
    """``python -m service.tools.bench.http``: the aiohttp generator; prints its JSON summary."""
    parser = argparse.ArgumentParser(prog="python -m service.tools.bench.http")
    parser.add_argument("--url", required=True)
    parser.add_argument("--payload", type=Path, required=True, help="the request body")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    args = parser.parse_args()
    from service.core import event_loop

    body = args.payload.read_bytes()
    summary = event_loop.run(
        lambda: _drive(args.url, body, args.concurrency, args.duration, args.warmup),
        event_loop.loop_factory("auto"),
    )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
