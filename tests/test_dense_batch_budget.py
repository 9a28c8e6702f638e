"""A dense twin's batch stays within ``--dense-memory-bytes``, whichever requests its rows are from.

The real repository, batcher and ONNX Runtime (the demo model's dense twin), in this process:
requests submitted in one turn of the event loop are all queued when the twin's worker next
looks, so they share a batch unless their rows together are over the budget.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from service import BUNDLED_REPOSITORY
from service.core.settings import Settings
from service.core.types import InferenceRequest
from service.engine.batch import DenseRows
from service.engine.dataplane import DataPlane, Outcome
from service.engine.repository import ModelRepository, ServedModel
from service.engine.runtime import DeviceChoice

BUDGET = 1 << 20
"""The smallest --dense-memory-bytes the server takes: a few rows of a small image fill it."""


async def _unheard(_names: Sequence[str]) -> None:
    """The repository's news of changed models: nothing here listens."""


@pytest.fixture()
async def plane(tmp_path: Path) -> AsyncIterator[DataPlane]:
    shutil.copytree(BUNDLED_REPOSITORY / "digits", tmp_path / "digits")
    settings = Settings(dense_memory_bytes=BUDGET)
    with ThreadPoolExecutor(1) as loads:
        repository = ModelRepository(tmp_path, settings, DeviceChoice("cpu"), loads, _unheard)
        assert await repository.load_all() == []
        try:
            yield DataPlane(repository)
        finally:
            await repository.close()


def images(rows: int, side: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 1, side, side)).astype(np.float32)


def executions(twin: ServedModel) -> dict[int, int]:
    """Batches the twin ran so far, by their rows."""
    return {rows: d.compute_infer.count for rows, d in twin.stats.batches.items()}


async def together(plane: DataPlane, twin: ServedModel, passes: list[np.ndarray]) -> dict[int, int]:
    """Run ``passes`` as concurrent requests; the batches they took, by rows.

    Each request's rows are checked against the twin's answer for them alone.
    """
    before = executions(twin)
    requests = [InferenceRequest(twin.name, "", "", {"input": p}) for p in passes]
    answers = await asyncio.gather(*(plane.infer(r, None, Outcome()) for r in requests))
    for batch, (_model, rows) in zip(passes, answers, strict=True):
        alone = twin.runtime.run({"input": batch}, 0)[0]
        np.testing.assert_allclose(rows[0], alone, rtol=1e-4, atol=1e-5)
    after = executions(twin)
    return {n: after[n] - before.get(n, 0) for n in after if after[n] != before.get(n, 0)}


async def test_passes_of_two_requests_share_a_batch_only_within_the_budget(
    plane: DataPlane,
) -> None:
    twin = plane.repository.get("digits_dense")
    # The estimate these sizes were picked by: two rows of 28 x 28 fit, three do not, and one
    # row of 40 x 40 fills the budget.
    rows = DenseRows(BUDGET)
    assert rows(((1, 28, 28),)) == 2 and rows(((1, 40, 40),)) == 1
    assert twin.max_batch_size >= 4  # the model's own bound would take all of them

    # Two passes of one row that fit together: one batch of two.
    assert await together(plane, twin, [images(1, 28, 0), images(1, 28, 1)]) == {2: 1}
    # Two passes of one row each over half the budget: a batch each.
    assert await together(plane, twin, [images(1, 40, 2), images(1, 40, 3)]) == {1: 2}
    # Two passes of two rows, each within the budget, four rows over it: a batch each.
    assert await together(plane, twin, [images(2, 28, 4), images(2, 28, 5)]) == {2: 2}
    # A request over the budget by itself is not refused here (the plan refuses ClassifyDense
    # passes that do not fit): it runs alone.
    assert await together(plane, twin, [images(3, 28, 6)]) == {3: 1}
