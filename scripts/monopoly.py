"""Does one large Classify monopolise the server? A small ModelInfer's latency while it runs.

    python scripts/monopoly.py [--repeats N] [--quick]

Starts ``convserve serve`` on the bundled repository with its default limits and measures, on
another connection, the latency of a small KServe ModelInfer (one 8x8 digit) sent back to back:
alone (the baseline), while the largest Classify the defaults allow runs again and again (as
many images as one request may carry, each as large as the request's pixel limit allows), and
while the audit's request (100,000 8x8 PNGs, about 8 MB) is sent, which the server refuses
up front. Prints one JSON document of the figures, then a summary.

It also checks what must hold whatever the machine: a Classify over the image limit is refused
(RESOURCE_EXHAUSTED naming the limit), the largest allowed one is answered in full, no server
error occurs, and every small request is answered. ``--quick`` checks only that, in seconds,
with small images (the test suite runs it); it exits 1 when something does not hold.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service import BUNDLED_REPOSITORY  # noqa: E402
from service._generated.convserve.v1 import classifier_pb2 as cpb  # noqa: E402
from service._generated.convserve.v1 import classifier_pb2_grpc as cpb_grpc  # noqa: E402
from service._generated.inference import grpc_service_pb2 as kpb  # noqa: E402
from service._generated.inference import grpc_service_pb2_grpc as kpb_grpc  # noqa: E402
from service.core.settings import Settings  # noqa: E402
from service.tools.server_process import ServerProcess  # noqa: E402

OPTIONS = [("grpc.max_send_message_length", 256 << 20), ("grpc.use_local_subchannel_pool", 1)]
LIMIT = re.compile(r"takes at most (\d+) per Classify")


def encoded(pixels: np.ndarray) -> bytes:
    """``pixels`` as a PNG."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def small_infer() -> kpb.ModelInferRequest:
    """One 8x8 digit for the demo classifier, over KServe v2."""
    request = kpb.ModelInferRequest(model_name="digits")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 1, 8, 8])
    values = np.random.default_rng(0).standard_normal((1, 1, 8, 8)).astype(np.float32)
    request.raw_input_contents.append(values.tobytes())
    return request


def classify_request(count: int, side: int) -> cpb.ClassifyRequest:
    """``count`` distinct ``side`` x ``side`` PNGs (a digit-like blob on a gradient)."""
    rng = np.random.default_rng(1)
    images = []
    for _ in range(count):
        ramp = np.linspace(0, 200, side, dtype=np.float32)
        pixels = (ramp[None, :] + ramp[:, None] * rng.uniform(0, 0.25)).clip(0, 255)
        images.append(cpb.Image(encoded=encoded(pixels.astype(np.uint8))))
    return cpb.ClassifyRequest(model="digits", images=images, top_k=1)


def percentiles(latencies: list[float]) -> dict[str, float]:
    """Count, p50, p99 and max of latencies in seconds, as milliseconds."""
    if not latencies:
        return {"count": 0}
    values = np.asarray(latencies) * 1000
    return {
        "count": len(values),
        "p50_ms": round(float(np.percentile(values, 50)), 2),
        "p99_ms": round(float(np.percentile(values, 99)), 2),
        "max_ms": round(float(values.max()), 2),
    }


class SmallRequests:
    """Small ModelInfers back to back on a connection of their own, until told to stop."""

    def __init__(self, address: str) -> None:
        self._channel = grpc.insecure_channel(address, options=OPTIONS)
        self._infer = kpb_grpc.GRPCInferenceServiceStub(self._channel).ModelInfer
        self._request = small_infer()
        self._infer(self._request, timeout=30)  # connected before any clock starts
        self.errors: list[str] = []

    def during(self, work: Callable[[], Any], minimum: int = 0) -> tuple[list[float], Any]:
        """Latencies of the small requests sent while ``work()`` runs (at least ``minimum``)."""
        latencies: list[float] = []
        done = threading.Event()
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                result["value"] = work()
            except BaseException as exc:  # re-raised by the caller's thread below
                result["error"] = exc
            finally:
                done.set()

        worker = threading.Thread(target=run)
        worker.start()
        while not done.is_set() or len(latencies) < minimum:
            started = time.perf_counter()
            try:
                self._infer(self._request, timeout=60)
            except grpc.RpcError as exc:
                self.errors.append(f"{exc.code().name}: {exc.details()}")
            latencies.append(time.perf_counter() - started)
        worker.join()
        if "error" in result:
            raise result["error"]
        return latencies, result.get("value")

    def close(self) -> None:
        """Close the connection."""
        self._channel.close()


def refused(stub: cpb_grpc.ClassifierStub, request: cpb.ClassifyRequest) -> dict[str, Any]:
    """Send a Classify that must be refused; its status, message and time to the refusal."""
    started = time.perf_counter()
    try:
        stub.Classify(request, timeout=120)
    except grpc.RpcError as exc:
        return {
            "code": exc.code().name,
            "details": exc.details(),
            "seconds": round(time.perf_counter() - started, 3),
        }
    return {"code": "OK", "details": "", "seconds": round(time.perf_counter() - started, 3)}


def largest(
    stub: cpb_grpc.ClassifierStub, request: cpb.ClassifyRequest, repeats: int
) -> list[float]:
    """Send the largest Classify ``repeats`` times; the seconds each took, all answered in full."""
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        reply = stub.Classify(request, timeout=600)
        seconds.append(round(time.perf_counter() - started, 3))
        assert len(reply.results) == len(request.images), "the largest Classify lost images"
    return seconds


def measure(address: str, quick: bool, repeats: int) -> dict[str, Any]:
    """Every figure of the module docstring, from a server at ``address``."""
    settings = Settings()
    channel = grpc.insecure_channel(address, options=OPTIONS)
    stub = cpb_grpc.ClassifierStub(channel)
    small = SmallRequests(address)
    figures: dict[str, Any] = {}
    try:
        probe = refused(stub, classify_request(10_000, 1))  # the limit, as the server says it
        match = LIMIT.search(probe["details"])
        assert probe["code"] == "RESOURCE_EXHAUSTED" and match, probe
        limit = int(match.group(1))
        side = 64 if quick else int((settings.max_request_pixels / limit) ** 0.5)
        request = classify_request(limit, side)
        figures["largest_classify"] = {
            "images": limit,
            "side_px": side,
            "request_bytes": request.ByteSize(),
        }
        figures["idle"] = percentiles(small.during(lambda: time.sleep(0.5 if quick else 3))[0])
        latencies, seconds = small.during(lambda: largest(stub, request, repeats), 20)
        figures["largest_classify"]["seconds"] = seconds
        figures["during_largest_classify"] = percentiles(latencies)
        over = classify_request(limit + 1, 8)
        figures["over_the_limit"] = refused(stub, over)
        if not quick:
            audit = cpb.ClassifyRequest(
                model="digits", images=[over.images[0]] * 100_000, top_k=1
            )  # the audit's request: 100,000 8x8 PNGs
            outcome: dict[str, Any] = {}
            latencies, _ = small.during(lambda: outcome.update(refused(stub, audit)), 20)
            figures["audit_request"] = {**outcome, "request_bytes": audit.ByteSize()}
            figures["during_audit_request"] = percentiles(latencies)
        figures["small_request_errors"] = small.errors
    finally:
        small.close()
        channel.close()
    return figures


def check(figures: dict[str, Any]) -> list[str]:
    """What must hold on any machine; the failures, as sentences."""
    failures = []
    over = figures["over_the_limit"]
    if over["code"] != "RESOURCE_EXHAUSTED" or "per Classify" not in over["details"]:
        failures.append(f"a Classify over the image limit was not refused as it should be: {over}")
    audit = figures.get("audit_request")
    if audit is not None and audit["code"] != "RESOURCE_EXHAUSTED":
        failures.append(f"the audit's request was not refused: {audit}")
    if figures["small_request_errors"]:
        failures.append(f"small requests failed: {figures['small_request_errors'][:3]}")
    return failures


def main() -> int:
    """Start a server, measure, print; exit 1 when a check fails."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="largest Classifies in a row")
    parser.add_argument("--quick", action="store_true", help="small images: the checks only")
    args = parser.parse_args()
    repeats = 2 if args.quick else args.repeats
    with ServerProcess(BUNDLED_REPOSITORY) as server:
        figures = measure(server.grpc_address, args.quick, repeats)
        log = server.log()
    failures = check(figures)
    if "Traceback" in log or "INTERNAL" in log:
        failures.append("the server logged an internal error")
    figures["failures"] = failures
    print(json.dumps(figures))
    largest_figures = figures["largest_classify"]
    print(
        f"largest Classify: {largest_figures['images']} images of {largest_figures['side_px']}px "
        f"({largest_figures['request_bytes']} bytes), seconds {largest_figures['seconds']}",
        file=sys.stderr,
    )
    for phase in ("idle", "during_largest_classify", "during_audit_request"):
        if phase in figures:
            print(f"small ModelInfer {phase}: {figures[phase]}", file=sys.stderr)
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
