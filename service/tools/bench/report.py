"""The bench's results for people: the served steps against the limit, a printed report, a plot."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from service.tools.bench.raw import RawRow
from service.tools.bench.steps import ServedRow

__all__ = ["plot", "print_report", "ratios"]


def ratios(served: list[ServedRow], limits: list[dict[int, RawRow]]) -> list[str]:
    """Each served step against the limit measured just before and just after it.

    ``limits[i]``: step i's limit, averaged over those two runs, by batch size (the best batch
    size of the first sweep, and batch 1).
    """
    lines = []
    for row, limit in zip(served, limits, strict=True):
        best = max(limit.values(), key=lambda r: r.images_per_second)
        lines.append(
            f"{row.api} c={row.concurrency}: served/raw-best throughput "
            f"{row.requests_per_second / best.images_per_second:.2f} (raw batch {best.batch} "
            f"beside it: {best.images_per_second:.1f} images/s)"
        )
    for row, limit in zip(served, limits, strict=True):
        if row.concurrency == 1 and 1 in limit:
            lines.append(
                f"{row.api}: p50 at c=1 minus raw batch-1 latency "
                f"{row.p50_ms - limit[1].ms_per_batch:+.2f} ms (raw beside it: "
                f"{limit[1].ms_per_batch:.3f} ms)"
            )
    return lines


def plot(results: dict[str, Any], target: Path) -> bool:
    """Throughput and latency of the served steps in a PNG; False where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, api in enumerate(sorted({r["api"] for r in results["served"]})):
        rows = [r for r in results["served"] if r["api"] == api]
        colour = colours[index % len(colours)]  # one colour per API in both panels
        left.plot(
            [r["concurrency"] for r in rows],
            [r["requests_per_second"] for r in rows],
            marker="o",
            color=colour,
            label=f"served {api}",
        )
        right.plot(
            [r["requests_per_second"] for r in rows],
            [r["p50_ms"] for r in rows],
            marker="o",
            color=colour,
            label=f"{api} p50",
        )
        right.plot(
            [r["requests_per_second"] for r in rows],
            [r["p99_ms"] for r in rows],
            marker="x",
            linestyle="--",
            color=colour,
            label=f"{api} p99",
        )
    floor = [r for r in results["floor"] if r["api"] == "kserve-floor"]
    if floor:  # the bare grpc.aio handler, measured beside the server (--floor)
        rates = [r["requests_per_second"] for r in floor]
        style: dict[str, Any] = {"marker": "s", "linestyle": "--", "color": "black"}
        left.plot([r["concurrency"] for r in floor], rates, label="gRPC floor", **style)
        right.plot(rates, [r["p50_ms"] for r in floor], label="gRPC floor p50", **style)
    if results["raw"]:
        after = {r["batch"]: r["images_per_second"] for r in results["raw_after"]}
        best = max(  # as the ratios take it: before and after the load, averaged
            statistics.fmean(
                [r["images_per_second"], after.get(r["batch"], r["images_per_second"])]
            )
            for r in results["raw"]
        )
        left.axhline(best, color="grey", linestyle=":", label="raw ONNX Runtime best")
    left.set(
        xscale="log",
        yscale="log",  # an overhead-bound model's raw limit is orders of magnitude above its rate
        xlabel="concurrency",
        ylabel="images/s",
        title=f"{results['model']}: throughput",
    )
    right.set(xlabel="images/s", ylabel="latency (ms)", yscale="log", title="latency vs throughput")
    _plain_axes(left, right, sorted({r["concurrency"] for r in results["served"]}))
    left.legend()
    right.legend()
    figure.tight_layout()
    figure.savefig(target, dpi=100)
    plt.close(figure)
    return True


def _plain_axes(throughput: Any, latency: Any, concurrencies: list[int]) -> None:
    """Plain numbers on log axes (58, not 5.8x10^1), and the concurrencies measured as ticks."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda value, _position: f"{value:,.0f}" if value >= 1 else f"{value:g}")
    if concurrencies:
        throughput.set_xticks(concurrencies)
        throughput.xaxis.set_minor_formatter(NullFormatter())
    for axis in (throughput.xaxis, throughput.yaxis, latency.yaxis):
        axis.set_major_formatter(plain)
    latency.yaxis.set_minor_formatter(NullFormatter())


def print_report(results: dict[str, Any]) -> None:
    """The results, one line per raw batch size, served step, ratio and dense comparison."""
    print(
        f"model {results['model']} on {results['device']}, {results['workers']} server "
        f"worker(s) ({results['server_threads'] or '?'} ONNX Runtime thread(s) each, event loop "
        f"{results['event_loop'] or '?'}), load from "
        f"{results['generator']} over up to {results['connections']} connection(s)"
    )
    after = {row["batch"]: row for row in results["raw_after"]}
    for row in results["raw"]:
        again = after.get(row["batch"])
        print(
            f"  raw batch {row['batch']:>4} ({row['threads']} thread(s)): "
            f"{row['images_per_second']:10.1f} images/s, {row['ms_per_batch']:8.3f} ms per batch"
            + (
                f"; after the load {again['images_per_second']:10.1f} images/s, "
                f"{again['ms_per_batch']:8.3f} ms"
                if again
                else ""
            )
        )
    for row in results["served"]:
        print(
            f"  served {row['api']:<8} c={row['concurrency']:>3}: "
            f"{row['requests_per_second']:9.1f} req/s, p50 {row['p50_ms']:7.2f} ms, "
            f"p90 {row['p90_ms']:7.2f}, p99 {row['p99_ms']:7.2f}, batch "
            f"{row['mean_batch']:5.2f} (compute {row['compute_ms_per_batch']:.2f} ms/batch, "
            f"queue {row['queue_ms']:.2f} ms), server CPU "
            f"{row['server_cpu_ms_per_request']:.3f} ms/request, load generator "
            f"({row['generator']}) {row['generator_cpu_share']:.0%} of a core over "
            f"{row['connections']} "
            f"connection(s), errors {row['errors']}"
        )
    for line in results["ratios"]:
        print(f"  {line}")
    for row in results["dense"]:
        print(
            f"  dense {row['model']}: {row['cells']} cells, dense {row['dense_ms']:.1f} ms, "
            f"crops {row['crops_ms']:.1f} ms: crops/dense {row['crops_over_dense']:.1f}x"
        )
