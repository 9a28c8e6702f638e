"""SIGTERM under load: is every request the server received answered, and how soon does it exit?

    python scripts/drain.py [--grace S] [--seconds S] [--quick]

Starts ``convserve serve`` on the bundled repository with ``--drain-grace-seconds S`` (10), then
runs 32 clients, each on its own connection sending one 8x8 digit (KServe ModelInfer) after the
other, and one ModelStreamInfer stream sending bursts of 4 dense requests (a 384x384 image each
to ``digits_dense``, which take a while), each burst once the last is answered. After the load
has run for a few seconds, SIGTERM goes out while a burst of the stream is being answered. A
client that is refused (or finds the server gone) stops, as one that goes to another replica.

It prints: the unary calls in flight at SIGTERM (sent before it, not answered yet) by how they
ended, and the server's own count of the calls it held then (its log); the calls sent after
SIGTERM by how they ended; the stream's messages sent before SIGTERM, answered or not, and how
the stream ended; the time from SIGTERM to the server's exit against the grace; and the server's
log lines by level. The last line is the JSON of every figure.

``--quick`` (the test suite runs it) loads for 2 seconds and checks what must hold on any
machine: no call in flight at SIGTERM ended CANCELLED (each was answered, or refused with
UNAVAILABLE before it started, as one that had not reached the server yet), the server answered
at least the calls it held, the stream's burst in flight at SIGTERM was answered and the stream
then ended with UNAVAILABLE, the server exited 0 before the grace ended, and its log holds no
ERROR line. It exits 1 when a check fails. Timings are reported, never checked.
"""

from __future__ import annotations

import argparse
import json
import queue
import re
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.server_readings import levels  # noqa: E402
from service import BUNDLED_REPOSITORY  # noqa: E402
from service._generated.inference import grpc_service_pb2 as pb  # noqa: E402
from service._generated.inference import grpc_service_pb2_grpc as pb_grpc  # noqa: E402
from service.tools.server_process import ServerProcess  # noqa: E402

CLIENTS = 32
BURST = 4  # dense messages the stream keeps in flight
SIDE = 384  # of the stream's dense images
HELD = re.compile(r"draining: finishing in-flight requests \((\d+) calls")
DRAINED = re.compile(r"drained in ([\d.]+) s")


def tensor_request(model: str, pixels: np.ndarray, request_id: str = "") -> pb.ModelInferRequest:
    """A ModelInferRequest of ``pixels`` ([1, 1, H, W] float32) for ``model``."""
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name="input", datatype="FP32", shape=list(pixels.shape))
    request.raw_input_contents.append(pixels.tobytes())
    return request


def code_of(error: grpc.RpcError) -> str:
    """The status name, with UNAVAILABLE told apart by who said it."""
    code = error.code().name
    if code == "UNAVAILABLE":
        details = error.details() or ""
        return "UNAVAILABLE (refused)" if "shutting down" in details else "UNAVAILABLE (gone)"
    return str(code)


@dataclass
class Calls:
    """Every unary call of every client: when it was sent, when it ended, how."""

    ended: list[tuple[float, float, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def client(self, address: str, stop: threading.Event) -> None:
        """One client: calls back to back until refused, gone, or told to stop."""
        pixels = np.random.default_rng(0).uniform(0, 16, (1, 1, 8, 8)).astype(np.float32)
        request = tensor_request("digits", pixels)
        with grpc.insecure_channel(address) as channel:
            infer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    infer(request, timeout=60)
                    code = "OK"
                except grpc.RpcError as exc:
                    code = code_of(exc)
                with self.lock:
                    self.ended.append((sent, time.monotonic(), code))
                if code != "OK":
                    return


@dataclass
class Stream:
    """One ModelStreamInfer stream sending bursts of dense requests."""

    sent: dict[str, float] = field(default_factory=dict)
    answered: dict[str, tuple[float, str]] = field(default_factory=dict)
    burst_sent: threading.Event = field(default_factory=threading.Event)  # each burst's
    status: str = ""
    status_at: float = 0.0

    def run(self, address: str, stop: threading.Event) -> None:
        """Send bursts until the stream ends (the drain) or ``stop``; note every answer."""
        pixels = np.random.default_rng(1).uniform(0, 16, (1, 1, SIDE, SIDE)).astype(np.float32)
        outgoing: queue.Queue[pb.ModelInferRequest | None] = queue.Queue()

        def requests() -> Iterator[pb.ModelInferRequest]:
            while (message := outgoing.get()) is not None:
                yield message

        def burst(number: int) -> None:
            for index in range(BURST):
                name = f"{number}.{index}"
                self.sent[name] = time.monotonic()
                outgoing.put(tensor_request("digits_dense", pixels, name))
            self.burst_sent.set()

        with grpc.insecure_channel(address) as channel:
            call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(requests())
            number = 0
            burst(number)
            try:
                for reply in call:
                    outcome = "error: " + reply.error_message if reply.error_message else "OK"
                    self.answered[reply.infer_response.id] = (time.monotonic(), outcome)
                    if len(self.answered) == len(self.sent) and not stop.is_set():
                        number += 1
                        burst(number)
                self.status = "OK"
            except grpc.RpcError as exc:
                self.status = f"{exc.code().name}: {exc.details()}"
            self.status_at = time.monotonic()
            outgoing.put(None)


def unary_figures(calls: Calls, sigterm: float) -> dict[str, Any]:
    """The unary calls in flight at SIGTERM and those sent after it, by how they ended."""
    before = [code for sent, ended, code in calls.ended if sent < sigterm <= ended]
    after = [code for sent, _, code in calls.ended if sent >= sigterm]
    done = [ended for sent, ended, code in calls.ended if sent < sigterm <= ended and code == "OK"]
    return {
        "in_flight_at_sigterm": len(before),
        "in_flight_ended": dict(Counter(before)),
        "last_in_flight_answer_ms": round((max(done) - sigterm) * 1000, 1) if done else None,
        "new_calls": len(after),
        "new_calls_ended": dict(Counter(after)),
    }


def stream_figures(stream: Stream, sigterm: float) -> dict[str, Any]:
    """The stream's messages around SIGTERM, and how the stream ended."""
    before = [name for name, at in stream.sent.items() if at < sigterm]
    pending = [
        name
        for name in before
        if name not in stream.answered or stream.answered[name][0] >= sigterm
    ]
    answered = [stream.answered[n][1] for n in pending if n in stream.answered]
    after = [name for name, at in stream.sent.items() if at >= sigterm]
    return {
        "in_flight_at_sigterm": len(pending),
        "in_flight_answered": dict(Counter(answered)),
        "in_flight_unanswered": len(pending) - len(answered),
        "sent_after_sigterm": len(after),
        "sent_after_sigterm_answered": dict(
            Counter(stream.answered[n][1][:60] for n in after if n in stream.answered)
        ),
        "ended": stream.status,
        "ended_ms_after_sigterm": round((stream.status_at - sigterm) * 1000, 1),
    }


def check(report: dict[str, Any]) -> list[str]:
    """The behaviour --quick asserts (never the timings)."""
    failures = []
    unary, stream, server = report["unary"], report["stream"], report["server"]
    ended = unary["in_flight_ended"]
    if not unary["in_flight_at_sigterm"]:
        failures.append("no unary call was in flight at SIGTERM: nothing was tested")
    wrong = {c: n for c, n in ended.items() if c not in ("OK", "UNAVAILABLE (refused)")}
    if wrong:
        failures.append(f"unary calls in flight at SIGTERM ended {wrong}")
    if ended.get("OK", 0) < (server["held_at_sigterm"] or 0):
        failures.append(f"the server held {server['held_at_sigterm']}, fewer were answered")
    if not stream["in_flight_at_sigterm"]:
        failures.append("no stream message was in flight at SIGTERM: nothing was tested")
    if stream["in_flight_answered"] != {"OK": stream["in_flight_at_sigterm"]}:
        failures.append(f"the stream's in-flight messages: {stream['in_flight_answered']}")
    if not stream["ended"].startswith("UNAVAILABLE"):
        failures.append(f"the stream ended {stream['ended']!r}, not UNAVAILABLE")
    if server["exit_code"] != 0:
        failures.append(f"the server exited {server['exit_code']}")
    if server["exit_after_sigterm_s"] >= server["grace_s"]:
        failures.append("the server waited out the grace")
    errors = sum(report["log_levels"].get(k, 0) for k in ("ERROR", "CRITICAL", "traceback"))
    if errors:
        failures.append(f"{errors} ERROR lines or tracebacks in the server log")
    return failures


def run(grace: float, seconds: float) -> dict[str, Any]:
    """Start the server, load it, SIGTERM it mid-load; every figure."""
    server = ServerProcess(BUNDLED_REPOSITORY, "--drain-grace-seconds", str(grace)).start()
    calls, stream, stop = Calls(), Stream(), threading.Event()
    try:
        threads = [
            threading.Thread(target=calls.client, args=(server.grpc_address, stop))
            for _ in range(CLIENTS)
        ]
        threads.append(threading.Thread(target=stream.run, args=(server.grpc_address, stop)))
        for thread in threads:
            thread.start()
        time.sleep(seconds)
        stream.burst_sent.clear()
        stream.burst_sent.wait(30)
        time.sleep(0.05)  # the burst has reached the server; its answers take longer than this
        sigterm = time.monotonic()
        server.signal(signal.SIGTERM)
        code = server.wait(grace + 60)
        exited = time.monotonic()
        stop.set()
        for thread in threads:
            thread.join(60)
    finally:
        stop.set()
        server.stop()
    log = server.log()
    held, drained = HELD.search(log), DRAINED.search(log)
    return {
        "unary": unary_figures(calls, sigterm),
        "stream": stream_figures(stream, sigterm),
        "server": {
            "held_at_sigterm": int(held.group(1)) if held else None,
            "drained_s": float(drained.group(1)) if drained else None,
            "exit_code": code,
            "exit_after_sigterm_s": round(exited - sigterm, 3),
            "grace_s": grace,
        },
        "log_levels": levels(server.lines),
    }


def main() -> int:
    """Run the drain, print the figures; 1 if --quick's checks fail."""
    parser = argparse.ArgumentParser(prog="python scripts/drain.py")
    parser.add_argument("--grace", type=float, default=10.0, help="--drain-grace-seconds")
    parser.add_argument("--seconds", type=float, default=5.0, help="load before SIGTERM")
    parser.add_argument("--quick", action="store_true", help="2 s of load, and checked")
    args = parser.parse_args()
    report = run(args.grace, 2.0 if args.quick else args.seconds)
    report["failures"] = check(report) if args.quick else []
    for part in ("unary", "stream", "server"):
        print(f"{part}: {json.dumps(report[part])}", flush=True)
    print(json.dumps(report))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
