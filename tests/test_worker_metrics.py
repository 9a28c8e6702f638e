"""The supervisor's sum of its workers' metric files: readiness a worker forgot.

Each worker is a real process writing prometheus_client's multiprocess files; the supervisor's
registry (:func:`service.engine.metrics.multiprocess_registry`) reads them in whatever order the
directory lists them; the test fixes that order both ways round.
"""

from __future__ import annotations

import glob
import subprocess
import sys
from pathlib import Path

import pytest

from service.engine.metrics import WorkerCounts, multiprocess_registry

SET_READY = "from service.engine import metrics; metrics.MODEL_READY.labels({labels}).set({value})"
FORGET = "from service.engine import metrics; metrics.forget_ready({labels})"
LABELS = "'broken', '', 'none'"


def _worker(folder: Path, code: str) -> None:
    """Run ``code`` in a process of its own writing its metrics into ``folder``."""
    env = {"PROMETHEUS_MULTIPROC_DIR": str(folder), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=Path.cwd())
    # One worker, one file, named after its process: collect its name to order the reads.
    (written,) = set(folder.glob("gauge_livemin_*.db")) - _known.setdefault(folder, set())
    _known[folder].add(written)
    _order.setdefault(folder, []).append(str(written))


_known: dict[Path, set[Path]] = {}
_order: dict[Path, list[str]] = {}


def _readiness(folder: Path) -> dict[tuple[str, ...], float]:
    registry = multiprocess_registry(str(folder), WorkerCounts())
    return {
        tuple(sample.labels[k] for k in ("model", "version", "provider")): sample.value
        for family in registry.collect()
        if family.name == "convserve_model_ready"
        for sample in family.samples
    }


@pytest.mark.parametrize("forgetter_first", [True, False])
def test_a_worker_forgetting_a_series_leaves_the_others_value(
    tmp_path: Path, forgetter_first: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_zero = SET_READY.format(labels=LABELS, value=0)
    forget = FORGET.format(labels=LABELS)
    for code in (forget, set_zero) if forgetter_first else (set_zero, forget):
        _worker(tmp_path, code)
    # The files are read in the order the workers wrote them, not the directory's.
    listed = glob.glob

    def in_written_order(pattern: str) -> list[str]:
        found = listed(pattern)
        return sorted(
            found, key=lambda f: _order[tmp_path].index(f) if f in _order[tmp_path] else -1
        )

    monkeypatch.setattr(glob, "glob", in_written_order)  # what prometheus_client lists with
    assert _readiness(tmp_path) == {("broken", "", "none"): 0.0}


def test_a_series_every_worker_forgot_is_left_out(tmp_path: Path) -> None:
    forget = FORGET.format(labels=LABELS)
    _worker(tmp_path, SET_READY.format(labels="'digits', '1', 'cpu'", value=1))
    _worker(tmp_path, forget)
    _worker(tmp_path, forget)
    assert _readiness(tmp_path) == {("digits", "1", "cpu"): 1.0}
