"""``convserve bench``: the served model against the limit, side by side in one run.

The limit is the same model run in-process by ONNX Runtime with the server's own thread settings
(``--raw``). The served figures come from ``convserve serve`` in another process (started here on
free ports unless ``--server`` names one), loaded from a third process (h2load, or
:mod:`service.tools.loadgen`) so the load generator never shares the server's GIL; its own
CPU use is reported because on a small machine it competes for the same cores. ``--dense`` compares
ClassifyDense with ``mode=crops``. ``--apis stream`` sends KServe requests over ModelStreamInfer
(one stream per connection, the concurrency in flight over them), always from
:mod:`service.tools.loadgen`, since h2load cannot tell which answer is whose. Results go to
JSON and a PNG plot.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from model_format import MODEL_FILE, read_model_info
from service import BUNDLED_REPOSITORY
from service.core.event_loop import CHOICES, loop_factory
from service.core.settings import Settings
from service.engine.runtime import DeviceChoice, Runtime
from service.tools.server_process import ServerProcess

__all__ = ["add_commands", "dense_comparison", "raw_benchmark", "served_benchmark"]

KSERVE_METHOD = "/inference.GRPCInferenceService/ModelInfer"
CLASSIFY_METHOD = "/convserve.v1.Classifier/Classify"
STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"


@dataclass(frozen=True)
class RawRow:
    """In-process ONNX Runtime at one batch size."""

    batch: int
    images_per_second: float
    ms_per_batch: float
    threads: int


@dataclass(frozen=True)
class ServedRow:
    """One step of the concurrency sweep."""

    api: str
    concurrency: int
    requests_per_second: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_batch: float
    generator_cpu_share: float
    errors: int
    compute_ms_per_batch: float
    queue_ms: float
    server_cpu_ms_per_request: float
    connections: int
    generator: str


class RawLimit:
    """The model in-process, as the server would run it: measured at the start and beside steps.

    With the server's default threads, a tiny model gets the server's choice between them and
    one thread (:meth:`Runtime.single_thread_if_cheaper`).
    """

    def __init__(self, path: Path, device: str, batch_sizes: list[int], cpu_threads: int) -> None:
        self.runtime = Runtime(path, DeviceChoice(device), 1, cpu_threads, dynamic_shapes=False)
        spec = self.runtime.inputs[0]
        self._samples = {
            batch: {
                spec.name: np.random.default_rng(0)
                .standard_normal((batch, *spec.shape[1:]))
                .astype(spec.dtype)
            }
            for batch in batch_sizes
        }
        self.runtime.warm_up(list(self._samples.values()))
        if not cpu_threads:
            self.runtime.single_thread_if_cheaper(
                list(self._samples.values()), Settings.inline_compute_microseconds / 1e6
            )

    def measure(self, batch_sizes: list[int], seconds: float) -> list[RawRow]:
        """Images/s and time per batch at each of ``batch_sizes`` (given to the constructor)."""
        rows = []
        for batch in batch_sizes:
            feeds = self._samples[batch]
            for _ in range(3):
                self.runtime.run(feeds)
            runs, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                self.runtime.run(feeds)
                runs += 1
            elapsed = time.perf_counter() - started
            rows.append(
                RawRow(batch, runs * batch / elapsed, elapsed / runs * 1000, self.runtime.threads)
            )
        return rows

    def close(self) -> None:
        """Stop the runtime's threads."""
        self.runtime.close()


def raw_benchmark(
    path: Path, device: str, batch_sizes: list[int], seconds: float, cpu_threads: int
) -> list[RawRow]:
    """Images/s and time per batch of the model run in-process, as the server would run it."""
    limit = RawLimit(path, device, batch_sizes, cpu_threads)
    try:
        return limit.measure(batch_sizes, seconds)
    finally:
        limit.close()


def _kserve_payload(runtime: Runtime) -> bytes:
    from service._generated.inference import grpc_service_pb2 as pb

    spec = runtime.inputs[0]
    shape = [1, *spec.shape[1:]]
    request = pb.ModelInferRequest(
        model_name="",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name=spec.name, datatype=spec.datatype, shape=shape
            )
        ],
    )
    # The same kind of values as the raw run's (zeros could take faster paths in some kernels).
    values = np.random.default_rng(0).standard_normal(shape).astype(spec.dtype)
    request.raw_input_contents.append(values.tobytes())
    return bytes(request.SerializeToString())


def _classify_payload(runtime: Runtime) -> bytes | None:
    from PIL import Image

    from service._generated.convserve.v1 import classifier_pb2 as pb

    info = read_model_info(runtime.metadata)
    if info.preprocess is None or info.window is None or len(info.window) != 2:
        return None
    mode = "RGB" if info.preprocess.color == "RGB" else "L"
    shape = (*info.window, 3) if mode == "RGB" else info.window
    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode).save(buffer, format="PNG")
    request = pb.ClassifyRequest(images=[pb.Image(encoded=buffer.getvalue())])
    return bytes(request.SerializeToString())


def _with_model(payload: bytes, method: str, model: str) -> bytes:
    from service._generated.convserve.v1 import classifier_pb2
    from service._generated.inference import grpc_service_pb2

    if method in (KSERVE_METHOD, STREAM_METHOD):
        kserve = grpc_service_pb2.ModelInferRequest.FromString(payload)
        kserve.model_name = model
        return bytes(kserve.SerializeToString())
    classify = classifier_pb2.ClassifyRequest.FromString(payload)
    classify.model = model
    return bytes(classify.SerializeToString())


def _process_tree_cpu_seconds(pid: int | None) -> float | None:
    """User plus system CPU seconds of a process and its descendants (Linux /proc; else None).

    Server CPU per request tells the server's own cost apart from the load generator's, which
    runs on the same cores (on a shared machine it is still noisy: caches and frequency are).
    """
    if pid is None:
        return None
    stats = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = entry.read_text()
        except OSError:  # gone meanwhile
            continue
        fields = text.rsplit(")", 1)[-1].split()  # after the command name, which may hold spaces
        stats[int(entry.parent.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    if pid not in stats:
        return None
    tree, grew = {pid}, True
    while grew:
        children = {child for child, (parent, _) in stats.items() if parent in tree} - tree
        tree |= children
        grew = bool(children)
    ticks = sum(stats[member][1] for member in tree)
    return ticks / os.sysconf("SC_CLK_TCK")


def _server_counters(metrics_url: str, model: str) -> dict[str, float]:
    """Sums and counts of ``model``'s histograms (over label sets such as the API), requests.

    ``requests`` counts the finished ones and ``failed_requests`` the refused ones: the only
    figures the gRPC floor reports.
    """
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("model") != model:
                continue
            if sample.name.endswith(("_sum", "_count")):
                found[sample.name] = found.get(sample.name, 0.0) + sample.value  # over APIs
            elif sample.name == "convserve_requests_total":
                found["requests"] = found.get("requests", 0.0) + sample.value
                if sample.labels["code"] not in (
                    "OK",
                    "CANCELLED",  # h2load resets the streams still open when its time is up
                ):
                    found["failed_requests"] = found.get("failed_requests", 0.0) + sample.value
    return found


def _mean(before: dict[str, float], after: dict[str, float], name: str) -> float:
    count = after.get(name + "_count", 0.0) - before.get(name + "_count", 0.0)
    total = after.get(name + "_sum", 0.0) - before.get(name + "_sum", 0.0)
    return total / count if count else float("nan")


def served_benchmark(
    address: str,
    metrics_url: str,
    model: str,
    api: str,
    method: str,
    payload: bytes,
    concurrency: int,
    seconds: float,
    connections: int = 1,
    server_pid: int | None = None,
    generator: str = "python",
) -> ServedRow:
    """One load step, the load generated by another process.

    ``generator`` is ``python`` (:mod:`service.tools.loadgen`, grpc.aio) or ``h2load`` (nghttp2's C
    HTTP/2 load generator, which spends several times less CPU per request, so on a small
    machine it leaves more of the cores to the server and saturates later). With
    ``server_pid`` (a server on this machine), also the server's CPU per request: its
    processes' CPU time across the step over the requests its metrics counted meanwhile.
    """
    before = _server_counters(metrics_url, model)
    cpu_before = _process_tree_cpu_seconds(server_pid)
    body = _with_model(payload, method, model)
    warmup = min(1.0, seconds / 4)
    stream = method == STREAM_METHOD
    if stream:  # answers come in completion order, matched by id: only loadgen does that
        generator = "python"
    if generator == "h2load":
        summary = _h2load(address, method, body, concurrency, seconds, warmup, connections)
    else:
        summary = _python_loadgen(
            address, method, body, concurrency, seconds, warmup, connections, stream
        )
    cpu_after = _process_tree_cpu_seconds(server_pid)
    after = _server_counters(metrics_url, model)
    if generator == "h2load":  # it sees HTTP statuses only; gRPC errors come in trailers
        failed = int(after.get("failed_requests", 0.0) - before.get("failed_requests", 0.0))
        if failed:  # refused answers are not served ones (their latencies stay in; see errors)
            summary["errors"]["server-side"] = failed
            summary["requests"] = max(0, summary["requests"] - failed)
            summary["rate"] = summary["requests"] / summary["seconds"]
    answered = after.get("requests", 0.0) - before.get("requests", 0.0)
    cpu_per_request = float("nan")
    if cpu_before is not None and cpu_after is not None and answered:
        cpu_per_request = (cpu_after - cpu_before) / answered * 1000
    return ServedRow(
        api,
        concurrency,
        summary["rate"],
        summary["p50_ms"],
        summary["p90_ms"],
        summary["p99_ms"],
        _mean(before, after, "convserve_batch_size"),
        summary["generator_cpu_seconds"] / (summary["seconds"] + warmup),
        sum(summary["errors"].values()),
        _mean(before, after, "convserve_compute_duration_seconds") * 1000,
        _mean(before, after, "convserve_queue_duration_seconds") * 1000,
        cpu_per_request,
        summary["connections"],
        generator,
    )


def _python_loadgen(
    address: str,
    method: str,
    body: bytes,
    concurrency: int,
    seconds: float,
    warmup: float,
    connections: int,
    stream: bool = False,
) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".bin") as handle:
        handle.write(body)
        handle.flush()
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "service.tools.loadgen",
                "--address",
                address,
                "--method",
                method,
                "--payload",
                handle.name,
                "--concurrency",
                str(concurrency),
                "--duration",
                str(seconds),
                "--warmup",
                str(warmup),
                "--connections",
                str(connections),
                *(["--stream"] if stream else []),
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 120,
            check=True,
        )
    summary: dict[str, Any] = json.loads(result.stdout)
    summary["connections"] = max(1, min(connections, concurrency))
    return summary


def _h2load(
    address: str,
    method: str,
    body: bytes,
    concurrency: int,
    seconds: float,
    warmup: float,
    connections: int,
) -> dict[str, Any]:
    """One step with h2load, summarised as :mod:`service.tools.loadgen` does.

    Latencies come from its per-request log, which holds the measured phase only.
    """
    h2load = shutil.which("h2load")
    if h2load is None:
        raise FileNotFoundError("h2load is not installed (Debian/Ubuntu: nghttp2-client)")
    # h2load gives every connection the same number of streams: the most connections (up to
    # ``connections``) that divide the concurrency evenly.
    clients = max(d for d in range(1, min(connections, concurrency) + 1) if concurrency % d == 0)
    with tempfile.TemporaryDirectory() as folder:
        frame = Path(folder, "request")
        frame.write_bytes(b"\0" + len(body).to_bytes(4, "big") + body)  # one gRPC message
        log = Path(folder, "requests.tsv")
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(
            [
                h2load,
                f"--duration={round(seconds * 1000)}ms",
                f"--warm-up-time={round(warmup * 1000)}ms",
                f"--clients={clients}",
                f"--max-concurrent-streams={concurrency // clients}",
                "--header=content-type:application/grpc",
                "--header=te:trailers",
                f"--data={frame}",
                f"--log-file={log}",
                f"http://{address}{method}",
            ],
            capture_output=True,
            text=True,
            timeout=seconds + warmup + 120,
            check=True,
        )
        used = resource.getrusage(resource.RUSAGE_CHILDREN)
        rows = [line.split("\t") for line in log.read_text().splitlines() if line]
    answered = [int(latency) for _, status, latency, *_ in rows if status == "200"]
    latencies = np.array(answered) / 1000 if answered else np.array([np.nan])
    return {
        "connections": clients,
        "requests": len(answered),
        "errors": {"http": len(rows) - len(answered)} if len(rows) > len(answered) else {},
        "seconds": seconds,
        "rate": len(answered) / seconds,
        "p50_ms": float(np.percentile(latencies, 50)),
        "p90_ms": float(np.percentile(latencies, 90)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "generator_cpu_seconds": (used.ru_utime - children.ru_utime)
        + (used.ru_stime - children.ru_stime),
    }


def dense_comparison(address: str, model: str, repeats: int) -> dict[str, Any]:
    """Median ClassifyDense time in dense and in crops mode, alternated, on one image.

    The image is 384x384 for networks with large windows, and a strip 125 windows long for
    small ones (the demo model).
    """
    import grpc
    from PIL import Image

    from service._generated.convserve.v1 import classifier_pb2 as pb
    from service._generated.convserve.v1 import classifier_pb2_grpc as pb_grpc

    with grpc.insecure_channel(
        address,
        options=[
            ("grpc.max_send_message_length", 256 << 20),
            ("grpc.max_receive_message_length", 256 << 20),
        ],
    ) as channel:
        stub = pb_grpc.ClassifierStub(channel)  # type: ignore[no-untyped-call]
        described = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
        entry = described[model]
        window = list(entry.window)
        size = (window[0] * 125, window[1]) if window[0] < 64 else (384, 384)
        shape = (size[1], size[0], 3) if entry.channels == 3 else (size[1], size[0])
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)).save(
            buffer, format="PNG"
        )
        dense = pb.ClassifyDenseRequest(
            model=model, return_map=False, image=pb.Image(encoded=buffer.getvalue())
        )
        crops = pb.ClassifyDenseRequest()
        crops.CopyFrom(dense)
        crops.mode = pb.MODE_CROPS

        def timed(request: pb.ClassifyDenseRequest) -> float:
            started = time.perf_counter()
            stub.ClassifyDense(request, timeout=600)
            return time.perf_counter() - started

        cells = stub.ClassifyDense(dense).cells
        timed(crops)
        dense_s, crops_s = [], []
        for _ in range(repeats):
            dense_s.append(timed(dense))
            crops_s.append(timed(crops))
    dense_ms, crops_ms = statistics.median(dense_s) * 1000, statistics.median(crops_s) * 1000
    return {
        "model": model,
        "cells": cells,
        "dense_ms": dense_ms,
        "crops_ms": crops_ms,
        "crops_over_dense": crops_ms / dense_ms,
    }


def _plot(results: dict[str, Any], target: Path) -> bool:
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
        yscale="log",  # an overhead-bound model's raw limit is 10-100x its served rate
        xlabel="concurrency",
        ylabel="images/s",
        title=f"{results['model']}: throughput",
    )
    right.set(xlabel="images/s", ylabel="latency (ms)", yscale="log", title="latency vs throughput")
    left.legend()
    right.legend()
    figure.tight_layout()
    figure.savefig(target, dpi=100)
    plt.close(figure)
    return True


def _loop_name(choice: str) -> str:
    return "asyncio" if loop_factory(choice) is None else "uvloop"


def _print_report(results: dict[str, Any]) -> None:
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
    args: argparse.Namespace,
    variants: list[tuple[str, ServerProcess | _Remote, int]],
    kserve: tuple[str, bytes],
    seconds: float,
    connections: int,
) -> dict[tuple[str, int], ServedRow]:
    """Each (label, server, concurrency) step in two alternating rounds of ``seconds / 2``."""
    method, payload = kserve
    rounds: dict[tuple[str, int], list[ServedRow]] = {}
    for _ in range(2):
        for api, target, concurrency in variants:
            rounds.setdefault((api, concurrency), []).append(
                served_benchmark(
                    target.grpc_address,
                    target.metrics_url,
                    args.model,
                    api,
                    method,
                    payload,
                    concurrency,
                    seconds / 2,
                    connections,
                    _pid(target),
                    args.generator,
                )
            )
    return {key: _combined(found) for key, found in rounds.items()}


def _compare_floor(
    args: argparse.Namespace,
    server: ServerProcess | _Remote,
    kserve: tuple[str, bytes],
    level: int,
    seconds: float,
    connections: int,
) -> tuple[list[ServedRow], list[str]]:
    """KServe at concurrency 1 and ``level`` against the gRPC floor (:mod:`.grpc_floor`).

    The floor runs the model inline behind a bare grpc.aio handler, on the ONNX Runtime threads
    the measured server chose, in one process. Alternating rounds, as for batching.
    """
    threads = args.cpu_threads or _server_threads(server, args.model) or 0
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
            args,
            [
                ("kserve", server, 1),
                ("kserve-floor", floor, 1),
                ("kserve", server, level),
                ("kserve-floor", floor, level),
            ],
            kserve,
            seconds,
            connections,
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


def _compare_batching(
    args: argparse.Namespace,
    server: ServerProcess | _Remote,
    server_args: list[str],
    kserve: tuple[str, bytes],
    level: int,
    seconds: float,
    connections: int,
) -> tuple[list[ServedRow], list[str]]:
    """KServe at ``level``: batching as configured, off, and with ``--batching-window``.

    The servers run side by side and are measured in alternating rounds, so the ratios do not
    hang on one moment of a shared machine. The window is also measured at concurrency 1: what
    it costs a lone request.
    """
    # The variants warm up on other batch sizes, so they could choose other threads (see
    # Runtime.single_thread_if_cheaper): pin them to the ones the measured server chose.
    threads = _server_threads(server, args.model)
    if threads and not args.cpu_threads:
        server_args = [*server_args, "--cpu-threads", str(threads)]
    variants: list[tuple[str, ServerProcess | _Remote, int]] = [("kserve", server, level)]
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
        rows = _alternating(args, variants, kserve, seconds, connections)
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


def _ratio(over: float, under: float) -> float:
    """``over / under``, or NaN where ``under`` is 0 or NaN (a step with no answers)."""
    return over / under if under and under == under else float("nan")


def _versus(label: str, on: ServedRow, off: ServedRow) -> str:
    return (
        f"{label}: {_ratio(on.requests_per_second, off.requests_per_second):.2f}x throughput, "
        f"{_ratio(on.server_cpu_ms_per_request, off.server_cpu_ms_per_request):.2f}x server "
        "CPU per request (alternating rounds)"
    )


_LOADED = re.compile(r"loaded (\S+) v\d+ from .* (\d+) thread\(s\) each")


def _server_threads(server: ServerProcess | _Remote, model: str) -> int | None:
    """The ONNX Runtime threads a server this bench started chose for ``model`` (its log)."""
    if isinstance(server, ServerProcess):
        for line in server.lines:
            if (match := _LOADED.search(line)) and match.group(1) == model:
                return int(match.group(2))
    return None


def _pid(server: ServerProcess | _Remote) -> int | None:
    if isinstance(server, ServerProcess) and server.process is not None:
        return server.process.pid
    return None


def _averaged(before: RawRow, after: RawRow) -> RawRow:
    """The raw figures measured before and after the load, averaged."""
    return RawRow(
        before.batch,
        (before.images_per_second + after.images_per_second) / 2,
        (before.ms_per_batch + after.ms_per_batch) / 2,
        before.threads,
    )


def _ratios(served: list[ServedRow], limits: list[dict[int, RawRow]]) -> list[str]:
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


class _Remote:
    """A server someone else runs (``--server``)."""

    def __init__(self, address: str, metrics_url: str) -> None:
        self.grpc_address, self.metrics_url = address, metrics_url

    def __enter__(self) -> _Remote:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _server(args: argparse.Namespace, server_args: list[str]) -> ServerProcess | _Remote:
    if args.server:
        host = args.server.rsplit(":", 1)[0]
        return _Remote(args.server, args.metrics_url or f"http://{host}:8002/metrics")
    return ServerProcess(args.model_repository, *server_args)


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


def run(args: argparse.Namespace) -> int:
    """The ``bench`` command."""
    seconds = 1.0 if args.smoke else args.duration
    concurrency = [1, 4] if args.smoke else args.concurrency
    batches = [1, 8] if args.smoke else args.batch_sizes
    path = args.model_repository / args.model / str(args.version) / MODEL_FILE
    if problem := _refusal(args, path):
        print(f"convserve bench: error: {problem}", file=sys.stderr)
        return 1
    server_args = [
        "--device",
        args.device,
        "--workers",
        str(args.workers),
        "--event-loop",
        args.event_loop,
        *(["--cpu-threads", str(args.cpu_threads)] if args.cpu_threads else []),
    ]
    # Several workers share the port by connection, so the load needs several connections.
    connections = args.connections or (1 if args.workers == 1 else 8 * args.workers)
    if args.generator == "auto":
        args.generator = "h2load" if shutil.which("h2load") else "python"
    generator = args.generator
    limit = RawLimit(path, args.device, batches, args.cpu_threads)
    runtime = limit.runtime  # also what the payloads are built for
    results: dict[str, Any] = {
        "model": args.model,
        "device": runtime.provider,
        "workers": args.workers,
        # what the servers started here run on; unknown for --server
        "event_loop": None if args.server else _loop_name(args.event_loop),
        "connections": connections,
        "generator": generator,
        "server_threads": None,
        "raw": [],
        "served": [],
        "ratios": [],
        "dense": [],
        "batching": [],
        "floor": [],
        "raw_after": [],
        "raw_beside": [],
    }
    raw = limit.measure(batches, seconds)
    results["raw"] = [asdict(r) for r in raw]
    # The limit beside every step: the best batch size and batch 1, measured again after each
    # step, so each step's ratios stand on the limit just before and just after it.
    best = max(raw, key=lambda r: r.images_per_second).batch
    beside_batches = sorted({best, 1} & set(batches))
    beside_seconds = seconds / 4
    latest = {r.batch: r for r in raw}
    limits: list[dict[int, RawRow]] = []  # per step: the limit around it, averaged
    served: list[ServedRow] = []
    if not args.raw:
        kserve = (KSERVE_METHOD, _kserve_payload(runtime))  # also for the comparisons
        payloads = {"kserve": kserve, "stream": (STREAM_METHOD, kserve[1])}
        classify = _classify_payload(runtime)
        if classify is not None and "classify" in args.apis:
            payloads["classify"] = (CLASSIFY_METHOD, classify)
        payloads = {k: v for k, v in payloads.items() if k in args.apis}
        with _server(args, server_args) as server:
            for api, (method, payload) in payloads.items():
                for level in concurrency:
                    served.append(
                        served_benchmark(
                            server.grpc_address,
                            server.metrics_url,
                            args.model,
                            api,
                            method,
                            payload,
                            level,
                            seconds,
                            connections,
                            _pid(server),
                            generator,
                        )
                    )
                    after = limit.measure(beside_batches, beside_seconds)
                    results["raw_beside"].extend(
                        {"api": api, "concurrency": level, **asdict(r)} for r in after
                    )
                    limits.append({r.batch: _averaged(latest[r.batch], r) for r in after})
                    latest.update((r.batch, r) for r in after)
            if args.dense:
                results["dense"] = [
                    dense_comparison(server.grpc_address, args.model, 2 if args.smoke else 5)
                ]
            results["server_threads"] = _server_threads(server, args.model)
            if args.compare_batching:
                rows, lines = _compare_batching(
                    args,
                    server,
                    server_args,
                    kserve,
                    max(concurrency),
                    seconds,
                    connections,
                )
                results["batching"] = [asdict(r) for r in rows]
                results["ratios"].extend(lines)
            if args.floor:
                rows, lines = _compare_floor(
                    args, server, kserve, max(concurrency), seconds, connections
                )
                results["floor"] = [asdict(r) for r in rows]
                results["ratios"].extend(lines)
        # The limit again, after the load: on a shared machine it drifts, and the ratios
        # should not hang on one moment's luck.
        raw_after = limit.measure(batches, seconds)
        results["raw_after"] = [asdict(r) for r in raw_after]
    limit.close()
    results["served"] = [asdict(r) for r in served]
    results["ratios"] = _ratios(served, limits) + results["ratios"]
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "bench.json").write_text(json.dumps(results, indent=2))
    plotted = bool(served) and _plot(results, args.output / "bench.png")
    _print_report(results)
    print(
        f"results: {args.output / 'bench.json'}"
        + (f", plot: {args.output / 'bench.png'}" if plotted else " (no plot: no matplotlib)")
    )
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``bench``."""
    bench = commands.add_parser(
        "bench", help="served vs raw ONNX Runtime, side by side", description=__doc__
    )
    bench.add_argument("--model-repository", type=Path, default=BUNDLED_REPOSITORY)
    bench.add_argument("--model", default="digits")
    bench.add_argument("--version", type=int, default=1)
    bench.add_argument("--device", default="auto")
    bench.add_argument(
        "--server", metavar="HOST:PORT", help="load this running server instead of starting one"
    )
    bench.add_argument("--metrics-url", help="its /metrics (default: port 8002 on its host)")
    bench.add_argument(
        "--cpu-threads",
        type=int,
        default=0,
        help="ONNX Runtime threads, the same for raw and served (0: the server's)",
    )
    bench.add_argument(
        "--workers", type=int, default=1, help="server processes to start (serve --workers)"
    )
    bench.add_argument(
        "--event-loop",
        choices=CHOICES,
        default="auto",
        help="the servers' event loop, the gRPC floor's too (serve --event-loop)",
    )
    bench.add_argument(
        "--connections",
        type=int,
        default=0,
        help="TCP connections the load is spread over (0: 1, or 8 per worker with several)",
    )
    bench.add_argument(
        "--generator",
        choices=["auto", "python", "h2load"],
        default="auto",
        help="load generator: grpc.aio in Python, or nghttp2's h2load (C, far less CPU per "
        "request; Debian/Ubuntu package nghttp2-client); auto: h2load when installed",
    )
    bench.add_argument("--raw", action="store_true", help="only the in-process limit")
    bench.add_argument("--dense", action="store_true", help="also ClassifyDense vs crops")
    bench.add_argument(
        "--apis",
        nargs="+",
        choices=["kserve", "classify", "stream"],
        default=["kserve", "classify"],
        help="stream: KServe requests over ModelStreamInfer",
    )
    bench.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    bench.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    bench.add_argument("--duration", type=float, default=5.0, help="seconds per step")
    bench.add_argument(
        "--compare-batching",
        action="store_true",
        help="also run the highest concurrency with batching off",
    )
    bench.add_argument(
        "--batching-window",
        type=int,
        default=0,
        metavar="US",
        help="with --compare-batching, also a server batching with this window (microseconds)",
    )
    bench.add_argument(
        "--floor",
        action="store_true",
        help="also the gRPC floor: the model inline behind a bare grpc.aio handler (no batching, "
        "no checks), at concurrency 1 and the highest, alternating with the server",
    )
    bench.add_argument("--output", type=Path, default=Path("bench-results"))
    bench.add_argument("--smoke", action="store_true", help="everything for about a second")
    bench.set_defaults(handler=run)
