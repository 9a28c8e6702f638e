"""Side-by-side comparisons: batching on and off, and the server against the gRPC floor.

The servers compared run side by side and are measured in alternating rounds, so the ratios do
not hang on one moment of a shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from dataclasses import asdict, dataclass, replace
from typing import Any

from service.tools.bench.servers import Server, server_threads, target_of
from service.tools.bench.steps import ServedRow, Step
from service.tools.bench.sweep import served_benchmark
from service.tools.server_process import ServerProcess

__all__ = ["Comparison", "compare_batching", "compare_floor"]


@dataclass(frozen=True)
class Comparison:
    """What every comparison shares.

    Attributes:
        args: the ``bench`` command's arguments.
        kserve: the KServe method and request every compared step sends.
        level: the highest concurrency of the sweep, the one compared.
        seconds: length of a step (each of its two rounds takes half).
        connections: TCP connections the load is spread over.
    """

    args: argparse.Namespace
    kserve: tuple[str, bytes]
    level: int
    seconds: float
    connections: int


def _ratio(over: float, under: float) -> float:
    """``over / under``, or NaN where ``under`` is 0 or NaN (a step with no answers)."""
    return over / under if under and under == under else float("nan")


def _versus(label: str, on: ServedRow, off: ServedRow) -> str:
    """One report line: ``on``'s throughput and server CPU per request over ``off``'s."""
    return (
        f"{label}: {_ratio(on.requests_per_second, off.requests_per_second):.2f}x throughput, "
        f"{_ratio(on.server_cpu_ms_per_request, off.server_cpu_ms_per_request):.2f}x server "
        "CPU per request (alternating rounds)"
    )


def _combined(rounds: list[ServedRow]) -> ServedRow:
    """Several rounds of one step as one row: errors summed, every other figure averaged."""
    first = rounds[0]
    figures: dict[str, Any] = {
        name: statistics.fmean(getattr(r, name) for r in rounds)
        for name, value in asdict(first).items()
        if isinstance(value, float)
    }
    figures["errors"] = sum(r.errors for r in rounds)
    return replace(first, **figures)


def _alternating(
    comparison: Comparison, variants: list[tuple[str, Server, int]]
) -> dict[tuple[str, int], ServedRow]:
    """Each (label, server, concurrency) step in two alternating rounds of ``seconds / 2``."""
    method, payload = comparison.kserve
    args = comparison.args
    rounds: dict[tuple[str, int], list[ServedRow]] = {}
    for _ in range(2):
        for api, server, concurrency in variants:
            step = Step(
                api,
                method,
                payload,
                concurrency,
                comparison.seconds / 2,
                comparison.connections,
                args.generator,
            )
            rounds.setdefault((api, concurrency), []).append(
                served_benchmark(target_of(server, args.model), step)
            )
    return {key: _combined(found) for key, found in rounds.items()}


def compare_floor(comparison: Comparison, server: Server) -> tuple[list[ServedRow], list[str]]:
    """KServe at concurrency 1 and the highest against the gRPC floor.

    The floor (:mod:`service.tools.grpc_floor`) runs the model inline behind a bare grpc.aio
    handler, on the ONNX Runtime threads the measured server chose, in one process. Alternating
    rounds, as for batching.
    """
    args, level = comparison.args, comparison.level
    threads = args.cpu_threads or server_threads(server, args.model) or 0
    floor_args = [
        *("--model", args.model, "--version", str(args.version), "--device", args.device),
        *("--event-loop", args.event_loop),
    ]
    with ServerProcess(
        args.model_repository,
        *floor_args,
        "--cpu-threads",
        str(threads),
        module=("service.tools.grpc_floor",),
    ) as floor:
        rows = _alternating(
            comparison,
            [
                ("kserve", server, 1),
                ("kserve-floor", floor, 1),
                ("kserve", server, level),
                ("kserve-floor", floor, level),
            ],
        )
    lone, bare = rows[("kserve", 1)], rows[("kserve-floor", 1)]
    processes = f" (convserve: {args.workers} processes, the floor: 1)" if args.workers > 1 else ""
    lines = [
        _versus(
            f"convserve/gRPC floor at c={level}{processes}",
            rows[("kserve", level)],
            rows[("kserve-floor", level)],
        ),
        f"p50 at c=1: convserve {lone.p50_ms:.2f} ms, gRPC floor {bare.p50_ms:.2f} ms "
        f"({lone.p50_ms - bare.p50_ms:+.2f} ms above it)",
    ]
    return list(rows.values()), lines


def compare_batching(
    comparison: Comparison, server: Server, server_args: list[str]
) -> tuple[list[ServedRow], list[str]]:
    """KServe at the highest level: batching as configured, off, and with ``--batching-window``.

    ``server_args``: the flags ``server`` was started with, for the variants started beside it.
    The window is also measured at concurrency 1: what it costs a lone request.
    """
    args, level = comparison.args, comparison.level
    # The variants warm up on other batch sizes, so they could choose other threads (see
    # Runtime.single_thread_if_cheaper): pin them to the ones the measured server chose.
    threads = server_threads(server, args.model)
    if threads and not args.cpu_threads:
        server_args = [*server_args, "--cpu-threads", str(threads)]
    variants: list[tuple[str, Server, int]] = [("kserve", server, level)]
    with contextlib.ExitStack() as stack:
        variants.append(
            (
                "kserve-nobatch",
                stack.enter_context(
                    ServerProcess(args.model_repository, *server_args, "--max-batch-size", "1")
                ),
                level,
            )
        )
        if args.batching_window:
            windowed = stack.enter_context(
                ServerProcess(
                    args.model_repository,
                    *server_args,
                    "--max-queue-delay-microseconds",
                    str(args.batching_window),
                )
            )
            variants += [
                ("kserve", server, 1),
                ("kserve-window", windowed, 1),
                ("kserve-window", windowed, level),
            ]
        rows = _alternating(comparison, variants)
    on, off = rows[("kserve", level)], rows[("kserve-nobatch", level)]
    lines = [_versus(f"batching on/off at c={level}", on, off)]
    if args.batching_window:
        window = rows[("kserve-window", level)]
        lone, unwindowed = rows[("kserve-window", 1)], rows[("kserve", 1)]
        lines.append(
            _versus(
                f"batching with a {args.batching_window} us window/off at c={level}", window, off
            )
            + f"; mean batch {window.mean_batch:.1f}; p50 at c=1 {lone.p50_ms:.2f} ms against "
            f"{unwindowed.p50_ms:.2f} ms without the window"
        )
    return list(rows.values()), lines
