"""Running ``convserve bench``: the limit, the served sweep beside it, the comparisons, the results.

The arguments are declared in :mod:`service.tools.bench.cli`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from model_format import MODEL_FILE
from service.core.event_loop import loop_factory
from service.engine.runtime import Runtime
from service.tools.bench.comparisons import Comparison, compare_batching, compare_floor
from service.tools.bench.dense import dense_comparison
from service.tools.bench.http import (
    REST_BINARY,
    REST_JSON,
    compare_protocols,
    infer_path,
    is_rest,
    rest_payloads,
    rest_target,
)
from service.tools.bench.payloads import classify_payload, kserve_payload
from service.tools.bench.raw import RawLimit, RawRow, averaged
from service.tools.bench.report import plot, print_report, ratios
from service.tools.bench.servers import Server, open_server, server_threads, target_of
from service.tools.bench.steps import (
    CLASSIFY_METHOD,
    KSERVE_METHOD,
    STREAM_METHOD,
    ServedRow,
    Step,
)
from service.tools.bench.sweep import served_benchmark

__all__ = ["run"]


class _Beside:
    """The limit measured again after every served step, at the best batch size and batch 1.

    Each step's ratios then stand on the limit just before and just after it.
    """

    def __init__(
        self, limit: RawLimit, raw: list[RawRow], batches: list[int], seconds: float
    ) -> None:
        best = max(raw, key=lambda r: r.images_per_second).batch
        self._limit = limit
        self._batches = sorted({best, 1} & set(batches))
        self._seconds = seconds / 4
        self._latest = {r.batch: r for r in raw}
        self.limits: list[dict[int, RawRow]] = []  # per step: the limit around it, averaged
        self.rows: list[dict[str, Any]] = []  # every measurement, labelled with its step

    def after(self, api: str, concurrency: int) -> None:
        """Measure the limit after the step of ``api`` at ``concurrency``."""
        after = self._limit.measure(self._batches, self._seconds)
        self.rows.extend({"api": api, "concurrency": concurrency, **asdict(r)} for r in after)
        self.limits.append({r.batch: averaged(self._latest[r.batch], r) for r in after})
        self._latest.update((r.batch, r) for r in after)


def _progress(step: str) -> None:
    """What the bench is doing now, on stderr: a sweep takes minutes, its report comes last."""
    print(f"convserve bench: {step}", file=sys.stderr, flush=True)


def _loop_name(choice: str) -> str:
    return "asyncio" if loop_factory(choice) is None else "uvloop"


def _refusal(args: argparse.Namespace, path: Path) -> str | None:
    """Why the arguments cannot make a benchmark, or None."""
    if not path.is_file():
        return f"{path} does not exist"
    try:
        loop_factory(args.event_loop)
    except ValueError as exc:
        return str(exc)
    if args.server and (args.floor or args.compare_batching):
        return (
            "--floor and --compare-batching start servers on this machine to measure beside "
            "the one under test, so they need the bench to start that one too (leave out "
            "--server)"
        )
    return None


def _payloads(
    args: argparse.Namespace, runtime: Runtime, kserve: tuple[str, bytes]
) -> dict[str, tuple[str, bytes]]:
    """The method and request of each API of ``--apis`` the model can answer."""
    payloads = {"kserve": kserve, "stream": (STREAM_METHOD, kserve[1])}
    if args.protocol == "http" and "kserve" in args.apis:  # the KServe requests over REST
        del payloads["kserve"]
        rest = rest_payloads(runtime)
        for form in (REST_JSON, REST_BINARY):
            payloads[form] = (infer_path(args.model), rest[form])
    classify = classify_payload(runtime)
    if classify is not None and "classify" in args.apis:
        payloads["classify"] = (CLASSIFY_METHOD, classify)
    return {k: v for k, v in payloads.items() if k in args.apis or is_rest(v[0])}


def _sweep(
    comparison: Comparison,
    server: Server,
    payloads: dict[str, tuple[str, bytes]],
    concurrency: list[int],
    beside: _Beside,
) -> list[ServedRow]:
    """Every API at every level of ``concurrency``, the limit measured after each step."""
    args = comparison.args
    served: list[ServedRow] = []
    total = len(payloads) * len(concurrency)
    for api, (method, payload) in payloads.items():
        target = (rest_target if is_rest(method) else target_of)(server, args.model)
        for level in concurrency:
            _progress(
                f"step {len(served) + 1}/{total}: {api} at concurrency {level} "
                f"({comparison.seconds:g} s, then the limit again)"
            )
            step = Step(
                api,
                method,
                payload,
                level,
                comparison.seconds,
                comparison.connections,
                args.generator,
            )
            served.append(served_benchmark(target, step))
            beside.after(api, level)
    return served


def _beside_the_sweep(
    comparison: Comparison, server: Server, server_args: list[str], results: dict[str, Any]
) -> None:
    """What else is measured with the server under test: dense, batching, the gRPC floor."""
    args = comparison.args
    if args.dense:
        results["dense"] = [
            dense_comparison(server.grpc_address, args.model, 2 if args.smoke else 5)
        ]
    results["server_threads"] = server_threads(server, args.model)
    if args.compare_batching:
        rows, lines = compare_batching(comparison, server, server_args)
        results["batching"] = [asdict(r) for r in rows]
        results["ratios"].extend(lines)
    if args.floor:
        rows, lines = compare_floor(comparison, server)
        results["floor"] = [asdict(r) for r in rows]
        results["ratios"].extend(lines)


def _results(args: argparse.Namespace, device: str, connections: int) -> dict[str, Any]:
    """The results document, its measurements still empty."""
    return {
        "model": args.model,
        "device": device,
        "workers": args.workers,
        "protocol": args.protocol,
        # what the servers started here run on; unknown for --server
        "event_loop": None if args.server else _loop_name(args.event_loop),
        "connections": connections,
        "generator": args.generator,
        "server_threads": None,
        "raw": [],
        "served": [],
        "ratios": [],
        "dense": [],
        "batching": [],
        "floor": [],
        "protocols": [],
        "raw_after": [],
        "raw_beside": [],
    }


def _write(results: dict[str, Any], output: Path) -> None:
    """``bench.json`` and, with served steps, ``bench.png`` in ``output``; the report printed."""
    output.mkdir(parents=True, exist_ok=True)
    (output / "bench.json").write_text(json.dumps(results, indent=2))
    plotted = bool(results["served"]) and plot(results, output / "bench.png")
    print_report(results)
    print(
        f"results: {output / 'bench.json'}"
        + (f", plot: {output / 'bench.png'}" if plotted else " (no plot: no matplotlib)")
    )


def run(args: argparse.Namespace) -> int:
    """The ``bench`` command."""
    if args.compare_precision:
        from service.tools.bench.precision import compare_precision

        return compare_precision(args)
    seconds = 1.0 if args.smoke else args.duration
    concurrency = [1, 4] if args.smoke else args.concurrency
    batches = [1, 8] if args.smoke else args.batch_sizes
    path = args.model_repository / args.model / str(args.version) / MODEL_FILE
    if problem := _refusal(args, path):
        print(f"convserve bench: error: {problem}", file=sys.stderr)
        return 1
    server_args = [
        *("--device", args.device, "--workers", str(args.workers)),
        *("--event-loop", args.event_loop),
        *(["--cpu-threads", str(args.cpu_threads)] if args.cpu_threads else []),
    ]
    # Several workers share the port by connection, so the load needs several connections.
    connections = args.connections or (1 if args.workers == 1 else 8 * args.workers)
    if args.generator == "auto":
        args.generator = "h2load" if shutil.which("h2load") else "python"
    limit = RawLimit(path, args.device, batches, args.cpu_threads)
    served: list[ServedRow] = []
    try:
        runtime = limit.runtime  # also what the payloads are built for
        results = _results(args, runtime.provider, connections)
        _progress(f"the limit: {path.name} in-process at batch sizes {batches}")
        raw = limit.measure(batches, seconds)
        results["raw"] = [asdict(r) for r in raw]
        beside = _Beside(limit, raw, batches, seconds)
        if not args.raw:
            kserve = (KSERVE_METHOD, kserve_payload(runtime))  # also for the comparisons
            payloads = _payloads(args, runtime, kserve)
            comparison = Comparison(args, kserve, max(concurrency), seconds, connections)
            with open_server(args, server_args) as server:
                served = _sweep(comparison, server, payloads, concurrency, beside)
                _beside_the_sweep(comparison, server, server_args, results)
                if args.protocol == "both":
                    _progress("gRPC, REST JSON and REST binary side by side")
                    rows, lines = compare_protocols(
                        comparison, server, concurrency, rest_payloads(runtime)
                    )
                    results["protocols"] = [asdict(r) for r in rows]
                    results["ratios"].extend(lines)
            # The limit again, after the load: on a shared machine it drifts, and the ratios
            # should not hang on one moment's luck.
            _progress("the limit again, after the load")
            results["raw_after"] = [asdict(r) for r in limit.measure(batches, seconds)]
    finally:
        limit.close()
    results["raw_beside"] = beside.rows
    results["served"] = [asdict(r) for r in served]
    results["ratios"] = ratios(served, beside.limits) + results["ratios"]
    _write(results, args.output)
    return 0
