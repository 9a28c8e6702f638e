"""Stand-ins for the batcher's tests: a recording runtime, a counting observer, inputs, knobs."""

from __future__ import annotations

import threading

import numpy as np

from service.engine.model_config import BatchingPolicy


class Recorder:
    """Runs 'the model' (rows times two plus one) and records batch sizes; can be gated."""

    def __init__(self, fail_when=None) -> None:  # type: ignore[no-untyped-def]
        self.sizes: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail_when = fail_when

    def __call__(self, feeds, instance):  # type: ignore[no-untyped-def]
        x = feeds["x"]
        self.entered.set()
        self.gate.wait(10)
        self.sizes.append(int(x.shape[0]))
        if self.fail_when is not None and self.fail_when(x):
            raise RuntimeError("the model failed on this batch")
        return [x * 2 + 1]


class Counting:
    """An observer that counts queue waits and batches."""

    def __init__(self) -> None:
        self.waits: list[float] = []
        self.batches: list[tuple[int, int]] = []

    def batch_done(self, images, requests, input_s, compute_s, output_s) -> None:  # type: ignore[no-untyped-def]
        self.batches.append((images, requests))

    def queued(self, waited_seconds: float) -> None:
        self.waits.append(waited_seconds)

    def dropped(self, reason: str) -> None:
        pass

    def depth(self, images: int) -> None:
        pass


def rows(n: int, start: float) -> np.ndarray:
    return np.arange(start, start + n * 3, dtype=np.float32).reshape(n, 3)


def policy(
    max_batch_size: int,
    *,
    max_queue_delay_microseconds: int = 0,
    preferred_batch_size: tuple[int, ...] | list[int] = (),
    max_queue_size: int = 0,
) -> BatchingPolicy:
    """Batching knobs in Triton's vocabulary; no default queue timeout."""
    return BatchingPolicy(
        max_batch_size,
        max_queue_delay_microseconds,
        tuple(preferred_batch_size),
        max_queue_size,
        default_timeout_microseconds=0,
    )
