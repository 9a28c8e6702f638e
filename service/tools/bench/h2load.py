"""One load step driven by nghttp2's h2load, summarised as :mod:`service.tools.loadgen` does."""

from __future__ import annotations

import resource
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from service.tools.bench.steps import Step

__all__ = ["h2load"]


def h2load(address: str, step: Step, body: bytes, warmup: float) -> dict[str, Any]:
    """Send ``body`` to ``address`` as ``step`` says, after ``warmup`` seconds unmeasured.

    Latencies come from h2load's per-request log, which holds the measured phase only. It sees
    HTTP statuses only (gRPC errors travel in trailers), so a request the server refused counts
    as answered here.

    Raises:
        FileNotFoundError: h2load is not installed.
    """
    program = shutil.which("h2load")
    if program is None:
        raise FileNotFoundError("h2load is not installed (Debian/Ubuntu: nghttp2-client)")
    concurrency, seconds = step.concurrency, step.seconds
    # h2load gives every connection the same number of streams: the most connections (up to
    # ``connections``) that divide the concurrency evenly.
    clients = max(
        d for d in range(1, min(step.connections, concurrency) + 1) if concurrency % d == 0
    )
    with tempfile.TemporaryDirectory() as folder:
        frame = Path(folder, "request")
        frame.write_bytes(b"\0" + len(body).to_bytes(4, "big") + body)  # one gRPC message
        log = Path(folder, "requests.tsv")
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(
            [
                program,
                f"--duration={round(seconds * 1000)}ms",
                f"--warm-up-time={round(warmup * 1000)}ms",
                f"--clients={clients}",
                f"--max-concurrent-streams={concurrency // clients}",
                "--header=content-type:application/grpc",
                "--header=te:trailers",
                f"--data={frame}",
                f"--log-file={log}",
                f"http://{address}{step.method}",
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
