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

# This docstring is the command's --help description. Only the argument definitions live here,
# so that building the ``convserve`` parser imports neither ONNX Runtime nor the bench itself.

from __future__ import annotations

import argparse
from pathlib import Path

from service import BUNDLED_REPOSITORY
from service.core.event_loop import CHOICES

__all__ = ["add_commands"]


def _run(args: argparse.Namespace) -> int:
    from service.tools.bench.command import run

    return run(args)


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
    bench.add_argument(
        "--protocol",
        choices=["grpc", "http", "both"],
        default="grpc",
        help="the KServe requests over gRPC, over HTTP/REST (JSON and binary tensors; port 8000 "
        "of a --server), or both: the gRPC sweep plus all three side by side in alternating "
        "rounds at every concurrency (service/tools/bench/http.py)",
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
    precision = bench.add_argument_group("precision (service/tools/bench/precision.py)")
    precision.add_argument(
        "--compare-precision",
        action="store_true",
        help="instead of the sweep: fp32 against int8 (and fp16 on CUDA), in-process at batch "
        "1 and 8, served at 16 clients, dense twin at 384x384, for --precision-models",
    )
    precision.add_argument(
        "--precision-models",
        nargs="+",
        default=["resnet18", "mobilenet_v2"],
        metavar="NAME",
        help="entries of --work-dir (NAME, NAME_int8, NAME_fp16); one missing is exported from "
        "torchvision.models:NAME, random weights and int8 calibrated on random inputs: timing "
        "only",
    )
    precision.add_argument(
        "--precisions",
        nargs="+",
        choices=["fp32", "fp16", "int8"],
        help="the precisions compared with fp32 (default: int8, and fp16 on CUDA)",
    )
    precision.add_argument(
        "--work-dir",
        type=Path,
        default=Path("bench-results/precision-models"),
        help="the model repository --compare-precision exports into, so a rerun reuses them",
    )
    bench.add_argument("--smoke", action="store_true", help="everything for about a second")
    bench.set_defaults(handler=_run)
