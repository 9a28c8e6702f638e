"""The demo model under more requests in flight than its queue bound: who is answered, who counted.

    python scripts/overload.py [--seconds S] [--quick]

Starts ``convserve serve`` on the bundled repository with ``--max-queue-size 16`` on free ports.
A calibration run (8 in flight, under the bound: nothing refused) gives the server's CPU per
answered request. Then each phase keeps requests in flight for S seconds: 512 from h2load (64
connections of 8 streams, where h2load is installed), 512 from the project's Python generator
(``service.tools.loadgen``, 8 connections), and, in the full mode, 4,096 from h2load (64 x 64)
and a deadline probe (calls with 1, 5 and 50 ms deadlines beside 512 in flight). For each
phase it prints what the clients saw answered, what the server counted by status code and drop
reason (the share of answered calls it accounted for), the server's CPU per call and its
estimate per refusal (the phase's CPU less the calibrated cost of the answered ones), the p99
bucket of the server-side request duration against the queue bound in time (16 requests over
the phase's throughput, plus one batch), the server's resident memory before and after (idle),
and one request right after the load. At the end: the memory before and after all phases, one
more request, and the server's log lines by level. The last line is the JSON of every figure.
h2load sees HTTP statuses only (gRPC's travel in trailers): for its phases the codes are the
server's.

The gRPC floor (``service.tools.grpc_floor``: the model behind a bare grpc.aio handler) is
measured beside it: its CPU per answered call and per call it refuses at once (an unknown
model name, aborted before any work), the least a refusal can cost in gRPC Python.

``--quick`` (the test suite runs it) drives 256 in flight for a few seconds, then 2,048 from
h2load (more than gRPC holds for a server by default), and checks: every refusal a client saw
was counted, the server accounted for at least 99 % of the answered calls, a request after the
load is answered, and the log holds no ERROR line. It exits 1 when a check fails. Timings are
reported, never checked: they belong to the machine.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.server_readings import Scrape, cpu_seconds, levels, rss_bytes, scrape  # noqa: E402
from service import BUNDLED_REPOSITORY  # noqa: E402
from service._generated.inference import grpc_service_pb2 as pb  # noqa: E402
from service.tools.server_process import ServerProcess  # noqa: E402

METHOD = "/inference.GRPCInferenceService/ModelInfer"
BOUND = 16
MODEL = "digits"


def request_bytes() -> bytes:
    """One serialised ModelInferRequest of one 8x8 digit."""
    request = pb.ModelInferRequest(
        model_name=MODEL,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 1, 8, 8])
        ],
    )
    pixels = np.random.default_rng(0).uniform(0, 16, (1, 1, 8, 8)).astype(np.float32)
    request.raw_input_contents.append(pixels.tobytes())
    return bytes(request.SerializeToString())


def h2load(
    address: str, in_flight: int, connections: int, seconds: float, body: bytes
) -> dict[str, Any]:
    """``in_flight`` calls kept in flight by h2load over ``connections`` connections."""
    with tempfile.TemporaryDirectory() as folder:
        frame = Path(folder, "request")
        frame.write_bytes(b"\0" + len(body).to_bytes(4, "big") + body)
        out = subprocess.run(
            [
                "h2load",
                f"--duration={round(seconds * 1000)}ms",
                "--warm-up-time=0",
                f"--clients={connections}",
                f"--max-concurrent-streams={in_flight // connections}",
                "--header=content-type:application/grpc",
                "--header=te:trailers",
                f"--data={frame}",
                f"http://{address}{METHOD}",
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 120,
            check=True,
        ).stdout
    done = re.search(
        r"requests: \d+ total, \d+ started, (\d+) done, \d+ succeeded, \d+ failed, (\d+) errored",
        out,
    )
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+(\S+)", out)
    assert done is not None, out
    return {
        "answered": int(done.group(1)),
        "errored": int(done.group(2)),
        "client_codes": {},  # HTTP/2 only: gRPC's status travels in trailers h2load ignores
        "client_mean": mean.group(1) if mean else "?",
    }


def loadgen(
    address: str, in_flight: int, connections: int, seconds: float, body: bytes
) -> dict[str, Any]:
    """``in_flight`` calls kept in flight by the project's Python load generator."""
    with tempfile.NamedTemporaryFile() as payload:
        payload.write(body)
        payload.flush()
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "service.tools.loadgen",
                "--address",
                address,
                "--method",
                METHOD,
                "--payload",
                payload.name,
                "--concurrency",
                str(in_flight),
                "--duration",
                str(seconds),
                "--warmup",
                "0",
                "--connections",
                str(connections),
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 120,
            check=True,
            cwd=ROOT,
        ).stdout
    summary = json.loads(out.splitlines()[-1])
    codes = {"OK": summary["requests"], **summary["errors"]}
    return {
        "answered": sum(codes.values()),
        "client_codes": codes,
        "client_p50_ms": round(summary["p50_ms"], 1),
        "client_p99_ms": round(summary["p99_ms"], 1),
    }


def deadlines(address: str) -> dict[str, int]:
    """Calls with 1, 5 and 50 ms deadlines on a connection that is up: what their clients saw."""
    codes: dict[str, int] = {}
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        call = channel.unary_unary(METHOD)
        futures = [
            call.future(request_bytes(), timeout=t)
            for t in (0.001, 0.005, 0.05)
            for _ in range(100)
        ]
        for future in futures:
            code = future.code().name
            codes[code] = codes.get(code, 0) + 1
    return codes


@dataclass(frozen=True)
class Phase:
    """One load on the server: what the clients saw and what the server counted meanwhile."""

    name: str
    drive: Callable[[str, int, int, float, bytes], dict[str, Any]]
    in_flight: int
    connections: int

    def run(
        self, server: ServerProcess, seconds: float, calibrated: float, probe: bool = False
    ) -> dict[str, Any]:
        """Drive the load (and the deadline probe beside it); the phase's figures.

        Besides :func:`figures`: the server's resident memory before and after (idle), and a
        request right after the load.
        """
        pid = server.process.pid if server.process else 0
        rss, before, cpu = rss_bytes(pid), scrape(server.metrics_url), cpu_seconds(pid)
        probed: dict[str, int] = {}
        prober = threading.Thread(target=lambda: probed.update(deadlines(server.grpc_address)))
        if probe:
            threading.Timer(seconds / 3, prober.start).start()
        client = self.drive(
            server.grpc_address, self.in_flight, self.connections, seconds, request_bytes()
        )
        if probe:
            time.sleep(seconds / 3 + 1)
            prober.join(30)
        time.sleep(1.0)  # the calls the clients abandoned at the end are picked up and counted
        used = cpu_seconds(pid) - cpu
        found = figures(
            self, client, scrape(server.metrics_url).minus(before), used, calibrated, seconds
        )
        found["after_load"] = after_load(server.grpc_address)
        found["rss_mb"] = [round(rss / 2**20, 1), round(rss_bytes(pid) / 2**20, 1)]
        return found | ({"deadline_probe_client_codes": probed} if probe else {})


def figures(
    phase: Phase,
    client: dict[str, Any],
    delta: Scrape,
    cpu: float,
    calibrated: float,
    seconds: float,
) -> dict[str, Any]:
    """The figures of one phase from what its client saw and the server's metrics meanwhile."""
    codes = {
        k: int(v) for k, v in delta.by("convserve_requests_total", "code", api="kserve").items()
    }
    counted = sum(codes.values())
    accepted = codes.get("OK", 0)
    refused = sum(n for code, n in codes.items() if code in ("RESOURCE_EXHAUSTED", "UNAVAILABLE"))
    batches = delta.total("convserve_compute_duration_seconds_count", model=MODEL)
    batch = (
        delta.total("convserve_compute_duration_seconds_sum", model=MODEL) / batches
        if batches
        else 0.0
    )
    bound = BOUND / (accepted / seconds) + batch if accepted else float("nan")
    p99 = delta.quantile("convserve_request_duration_seconds", 0.99, model=MODEL, api="kserve")
    per_refusal = (
        (cpu - accepted * calibrated) / refused if refused >= 0.01 * max(counted, 1) else None
    )
    return {
        "phase": phase.name,
        "in_flight": phase.in_flight,
        **client,
        "server_codes": codes,
        "server_dropped": {
            k: int(v) for k, v in delta.by("convserve_dropped_requests_total", "reason").items()
        },
        "accounted_share": round(counted / client["answered"], 4) if client["answered"] else None,
        "server_cpu_ms_per_call": round(cpu / counted * 1000, 3) if counted else None,
        "server_cpu_ms_per_accepted_calibrated": round(calibrated * 1000, 3),
        "server_cpu_ms_per_refusal_estimated": None
        if per_refusal is None
        else round(per_refusal * 1000, 3),
        "accepted_p99_bucket_ms": round(p99 * 1000, 1),
        "queue_bound_ms": round(bound * 1000, 2),
        "accepted_per_s": round(accepted / seconds, 1),
    }


def after_load(address: str) -> dict[str, Any]:
    """One request once the load has ended: its status and latency."""
    with grpc.insecure_channel(address) as channel:
        started = time.perf_counter()
        try:
            channel.unary_unary(METHOD)(request_bytes(), timeout=10)
            code = "OK"
        except grpc.RpcError as exc:
            code = exc.code().name
    return {"code": code, "ms": round((time.perf_counter() - started) * 1000, 1)}


def floor(seconds: float) -> dict[str, Any]:
    """The gRPC floor's CPU per answered call and per immediate refusal, 16 in flight each."""
    refused = pb.ModelInferRequest.FromString(request_bytes())
    refused.model_name = "no-such-model"  # the floor aborts it before decoding anything
    drive = h2load if shutil.which("h2load") else loadgen
    found: dict[str, Any] = {}
    with ServerProcess(
        BUNDLED_REPOSITORY, "--model", MODEL, module=("service.tools.grpc_floor",)
    ) as server:
        pid = server.process.pid if server.process else 0
        for kind, body in (("answered", request_bytes()), ("refused", refused.SerializeToString())):
            cpu = cpu_seconds(pid)
            calls = drive(server.grpc_address, 16, 2, seconds, body)["answered"]
            found[f"cpu_ms_per_{kind}"] = round((cpu_seconds(pid) - cpu) / calls * 1000, 3)
    found["refusal_to_answer"] = round(
        found["cpu_ms_per_refused"] / found["cpu_ms_per_answered"], 2
    )
    return found


def check(report: dict[str, Any]) -> list[str]:
    """The behaviour --quick asserts (never the timings)."""
    failures = []
    for phase in report["phases"]:
        if phase["accounted_share"] is None or phase["accounted_share"] < 0.99:
            failures.append(
                f"{phase['phase']}: the server accounted for {phase['accounted_share']}"
            )
        for code, seen in phase["client_codes"].items():
            if code != "OK" and phase["server_codes"].get(code, 0) < seen:
                failures.append(
                    f"{phase['phase']}: clients saw {seen} {code}, the server counted fewer"
                )
    for phase in [*report["phases"], report]:
        if phase["after_load"]["code"] != "OK":
            failures.append(f"a request after the load: {phase['after_load']['code']}")
    errors = sum(report["log_levels"].get(k, 0) for k in ("ERROR", "CRITICAL", "traceback"))
    if errors:
        failures.append(f"{errors} ERROR lines or tracebacks in the server log")
    return failures


def phases(quick: bool) -> list[Phase]:
    """The loads to drive, h2load's where it is installed."""
    in_flight = 256 if quick else 512
    chosen = [Phase(f"python {in_flight}", loadgen, in_flight, 8)]
    if shutil.which("h2load"):
        chosen.insert(0, Phase(f"h2load {in_flight}", h2load, in_flight, 64))
        # Past the calls gRPC holds for the server by default (1,000; some up to 3,000).
        chosen.append(
            Phase("h2load 2048", h2load, 2048, 64)
            if quick
            else Phase("h2load 4096", h2load, 4096, 64)
        )
    return chosen


def main() -> int:
    """Start the server, calibrate, drive the phases, print the figures; 1 if --quick fails."""
    parser = argparse.ArgumentParser(prog="python scripts/overload.py")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    parser.add_argument("--quick", action="store_true", help="seconds, smaller, and checked")
    args = parser.parse_args()
    seconds = 3.0 if args.quick else args.seconds
    drive = h2load if shutil.which("h2load") else loadgen
    with ServerProcess(BUNDLED_REPOSITORY, "--max-queue-size", str(BOUND)) as server:
        pid = server.process.pid if server.process else 0
        warm = Phase("calibration 8", drive, 8, 8).run(server, 2.0 if args.quick else 5.0, 0.0)
        calibrated = warm["server_cpu_ms_per_call"] / 1000
        rss_before = rss_bytes(pid)
        report: dict[str, Any] = {"calibration": warm, "phases": []}
        for index, phase in enumerate(phases(args.quick)):
            probe = not args.quick and index == 0
            report["phases"].append(phase.run(server, seconds, calibrated, probe))
            print(json.dumps(report["phases"][-1]), flush=True)
        time.sleep(2.0)
        report["rss_mb"] = [round(rss_before / 2**20, 1), round(rss_bytes(pid) / 2**20, 1)]
        report["after_load"] = after_load(server.grpc_address)
        time.sleep(6.0)  # the refusal summary's line, a few seconds after the last refusal
        report["log_levels"] = levels(server.lines)
    report["grpc_floor"] = floor(2.0 if args.quick else 10.0)
    report["failures"] = check(report) if args.quick else []
    print(json.dumps(report))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
