"""ClassifyDense under a mixed load for minutes: answers, up-front refusals and the server's memory.

    python scripts/dense_soak.py [--minutes M] [--clients N] [--quick]

Starts ``convserve serve`` on the bundled repository (the demo model and its dense twin) with
its default limits. Each client sends, back to back, one image of a random size (width and
height each 64..1024 px), a random stride_divisor (1 or 2), map_format (FP32, FP16 or TOP_K
with top_k 1..3) and now and then return_map=false, with the gRPC client's default message
limit (4 MiB). The server's resident memory is sampled throughout; after the first minute the
clients pause while the idle server's memory is read, and again at the end, so the two are
read in the same state. Prints one JSON document: answers, refusals by reason (the server
refuses an answer or a request too large before computing it), client-side RESOURCE_EXHAUSTED
(an answer larger than the client accepts: there must be none), server errors (none),
latencies, and RSS (the peak under load, idle after the first minute, idle at the end).

``--quick`` (the test suite runs it) soaks for seconds with small images, then sends a request
whose answer is too large and one that needs too much memory, and checks they are refused up
front: at once, counted by the server, and without any dense cell computed. It exits 1 when a
check fails.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.server_readings import rss_bytes, scrape  # noqa: E402
from service import BUNDLED_REPOSITORY  # noqa: E402
from service._generated.convserve.v1 import classifier_pb2 as pb  # noqa: E402
from service._generated.convserve.v1 import classifier_pb2_grpc as pb_grpc  # noqa: E402
from service.tools.server_process import ServerProcess  # noqa: E402

FORMATS = (pb.MAP_FORMAT_FP32, pb.MAP_FORMAT_FP16, pb.MAP_FORMAT_TOP_K)
CLIENT_LIMIT = "Received message larger than max"
"""How gRPC's client words a refusal of an answer over its receive limit."""


def png(height: int, width: int, rng: np.random.Generator) -> bytes:
    """A ``width`` x ``height`` grayscale PNG: noise with a bright square somewhere."""
    pixels = rng.integers(0, 64, (height, width), dtype=np.uint8)
    y, x = rng.integers(0, height - 8), rng.integers(0, width - 8)
    pixels[y : y + 8, x : x + 8] = 255
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def random_request(rng: np.random.Generator, largest: int) -> pb.ClassifyDenseRequest:
    """One request of the mix the module docstring describes."""
    height, width = (int(v) for v in rng.integers(64, largest + 1, 2))
    request = pb.ClassifyDenseRequest(
        model="digits",
        image=pb.Image(encoded=png(height, width, rng)),
        stride_divisor=int(rng.integers(1, 3)),
        map_format=FORMATS[int(rng.integers(0, len(FORMATS)))],
        top_k=int(rng.integers(1, 4)),
    )
    if rng.random() < 0.1:
        request.return_map = False
    return request


def map_is_whole(reply: pb.ClassifyDenseResponse, request: pb.ClassifyDenseRequest) -> bool:
    """Whether the answer's map holds as many values as its shape says, in its format."""
    if request.HasField("return_map") and not request.return_map:
        return not reply.HasField("map")
    values = int(np.prod(reply.map.shape))
    if reply.map.format == pb.MAP_FORMAT_FP32:
        return len(reply.map.fp32_probabilities) == 4 * values
    if reply.map.format == pb.MAP_FORMAT_FP16:
        return len(reply.map.fp16_probabilities) == 2 * values
    return len(reply.map.top_classes) == values and len(reply.map.top_probabilities) == 2 * values


class Tally:
    """What the clients saw, shared between their threads."""

    def __init__(self, full: bool) -> None:
        self.full = full
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.counts: dict[str, int] = {}
        self.examples: dict[str, str] = {}

    def add(self, outcome: str, seconds: float, detail: str = "") -> None:
        """Count one answer or refusal."""
        with self.lock:
            self.counts[outcome] = self.counts.get(outcome, 0) + 1
            if outcome == "ok":
                self.latencies.append(seconds)
            elif detail:
                self.examples.setdefault(outcome, detail)


def outcome_of(error: grpc.RpcError) -> str:
    """The tally's name for a failed call."""
    details = error.details() or ""
    if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
        if details.startswith(CLIENT_LIMIT):
            return "client_resource_exhausted"
        if "--max-response-bytes" in details:
            return "refused_answer_size"
        if "--dense-memory-bytes" in details:
            return "refused_memory"
        return "refused_other_limit"
    return f"error_{error.code().name}"


def client(address: str, seed: int, until: float, tally: Tally, gate: Gate) -> None:
    """One client's requests, back to back until ``until``, through ``gate``."""
    rng = np.random.default_rng(seed)
    largest = 1024 if tally.full else 256
    with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        while time.monotonic() < until:
            request = random_request(rng, largest)
            with gate:
                started = time.perf_counter()
                try:
                    reply = stub.ClassifyDense(request, timeout=600)
                except grpc.RpcError as exc:
                    tally.add(outcome_of(exc), 0.0, exc.details() or "")
                    continue
            whole = map_is_whole(reply, request)
            tally.add("ok" if whole else "error_incomplete_map", time.perf_counter() - started)


class Gate:
    """Lets the clients' requests through, or holds them while the idle server is measured."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._paused = False
        self._active = 0

    def __enter__(self) -> None:
        with self._condition:
            self._condition.wait_for(lambda: not self._paused)
            self._active += 1

    def __exit__(self, *exc: object) -> None:
        with self._condition:
            self._active -= 1
            self._condition.notify_all()

    def pause(self) -> None:
        """Hold new requests and wait for those in flight."""
        with self._condition:
            self._paused = True
            self._condition.wait_for(lambda: not self._active)

    def resume(self) -> None:
        """Let requests through again."""
        with self._condition:
            self._paused = False
            self._condition.notify_all()


def idle_rss(pid: int) -> int:
    """The server's resident memory once it has been idle a second, in bytes."""
    time.sleep(1.0)
    return rss_bytes(pid)


class Memory:
    """The server process's resident memory, sampled on a thread of its own."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        self._pid = pid
        self._interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._started = time.monotonic()
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.samples.append((time.monotonic() - self._started, rss_bytes(self._pid)))

    def stop(self, first: int, end: int) -> dict[str, Any]:
        """Stop sampling; the peak, the idle figures ``first`` and ``end``, in MB."""
        self._stop.set()
        self._thread.join()
        end_time = self.samples[-1][0]
        peak = max(rss for _, rss in self.samples)
        return {
            "peak_mb": round(peak / 1e6, 1),
            "idle_after_first_mark_mb": round(first / 1e6, 1),
            "idle_end_mb": round(end / 1e6, 1),
            "end_vs_first_mark_pct": round(100 * (end - first) / first, 1),
            "peak_per_30s_mb": [
                round(max(r for t, r in self.samples if start <= t < start + 30) / 1e6)
                for start in range(0, int(end_time) + 1, 30)
                if any(start <= t < start + 30 for t, _ in self.samples)
            ],
        }


def metric(server: ServerProcess, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include ``labels``."""
    return scrape(server.metrics_url).total(name, **labels)


def refusals_up_front(server: ServerProcess) -> dict[str, Any]:
    """Two requests the server must refuse before computing anything; what it answered."""
    rng = np.random.default_rng(7)
    too_large = pb.ClassifyDenseRequest(  # a 41 MB map at fp32 (the audit's request)
        model="digits", image=pb.Image(encoded=png(1024, 1024, rng)), stride_divisor=2
    )
    too_much = pb.ClassifyDenseRequest(  # one pass of 4 Mpx is more than --dense-memory-bytes
        model="digits", image=pb.Image(encoded=png(2000, 2000, rng)), return_map=False
    )
    cells = metric(server, "convserve_dense_cells_total")
    refused = metric(server, "convserve_requests_total", api="dense", code="RESOURCE_EXHAUSTED")
    seen: dict[str, Any] = {}
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        for name, request in (("answer_size", too_large), ("memory", too_much)):
            started = time.perf_counter()
            try:
                stub.ClassifyDense(request, timeout=120)
                seen[name] = {"outcome": "answered"}
            except grpc.RpcError as exc:
                seen[name] = {"outcome": outcome_of(exc), "details": exc.details()}
            seen[name]["seconds"] = round(time.perf_counter() - started, 3)
    seen["cells_computed"] = metric(server, "convserve_dense_cells_total") - cells
    seen["counted_by_the_server"] = (
        metric(server, "convserve_requests_total", api="dense", code="RESOURCE_EXHAUSTED") - refused
    )
    return seen


def check(figures: dict[str, Any], quick: bool) -> list[str]:
    """What must hold; the failures, as sentences."""
    counts = figures["counts"]
    failures = [
        f"{counts[name]} answers were {name}"
        for name in counts
        if name.startswith("error_") or name == "client_resource_exhausted"
    ]
    if not counts.get("ok"):
        failures.append("no request was answered")
    up_front = figures.get("up_front")
    if up_front is not None:
        for name, outcome in (("answer_size", "refused_answer_size"), ("memory", "refused_memory")):
            if up_front[name]["outcome"] != outcome or up_front[name]["seconds"] > 5:
                failures.append(f"the {name} request was not refused up front: {up_front[name]}")
        if up_front["cells_computed"] or up_front["counted_by_the_server"] != 2:
            failures.append(f"the refusals were not counted before compute: {up_front}")
    rss = figures["rss"]
    if not quick and rss["peak_mb"] >= 1500:
        failures.append(f"peak RSS {rss['peak_mb']} MB")
    if not quick and abs(rss["end_vs_first_mark_pct"]) > 10:
        failures.append(f"idle RSS moved {rss['end_vs_first_mark_pct']} % after the first mark")
    return failures


def main() -> int:
    """Start a server, soak it, print the figures; exit 1 when a check fails."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="seconds, small images, the checks")
    args = parser.parse_args()
    seconds = 6.0 if args.quick else args.minutes * 60
    mark = 2.0 if args.quick else min(60.0, seconds / 2)
    clients = 2 if args.quick else args.clients
    tally, gate = Tally(not args.quick), Gate()
    with ServerProcess(BUNDLED_REPOSITORY) as server:
        assert server.process is not None
        pid = server.process.pid
        memory = Memory(pid)
        started = time.monotonic()
        threads = [
            threading.Thread(
                target=client, args=(server.grpc_address, seed, started + seconds, tally, gate)
            )
            for seed in range(clients)
        ]
        for thread in threads:
            thread.start()
        time.sleep(mark)
        gate.pause()
        first = idle_rss(pid)
        gate.resume()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
        rss = memory.stop(first, idle_rss(pid))
        rss["first_mark_s"] = mark
        up_front = refusals_up_front(server) if args.quick else None
        log = server.log()
    latencies = np.asarray(tally.latencies) * 1000
    figures: dict[str, Any] = {
        "seconds": round(elapsed, 1),
        "clients": clients,
        "counts": tally.counts,
        "refusal_examples": tally.examples,
        "answers_per_s": round(len(latencies) / elapsed, 2),
        "latency_p50_ms": round(float(np.percentile(latencies, 50)), 1) if len(latencies) else None,
        "latency_p99_ms": round(float(np.percentile(latencies, 99)), 1) if len(latencies) else None,
        "rss": rss,
    }
    if up_front is not None:
        figures["up_front"] = up_front
    failures = check(figures, args.quick)
    if "Traceback" in log:
        failures.append("the server logged a traceback")
    figures["failures"] = failures
    print(json.dumps(figures))
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
