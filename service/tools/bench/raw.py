"""The limit: the model run in-process by ONNX Runtime, as the server would run it."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.core.settings import Settings
from service.engine.runtime import DeviceChoice, Runtime

__all__ = ["RawLimit", "RawRow", "averaged", "raw_benchmark"]


@dataclass(frozen=True)
class RawRow:
    """In-process ONNX Runtime at one batch size."""

    batch: int
    images_per_second: float
    ms_per_batch: float
    threads: int


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


def averaged(before: RawRow, after: RawRow) -> RawRow:
    """The raw figures measured before and after the load, averaged."""
    return RawRow(
        before.batch,
        (before.images_per_second + after.images_per_second) / 2,
        (before.ms_per_batch + after.ms_per_batch) / 2,
        before.threads,
    )
