"""Shared fixtures: small real networks, and one export of the demo model per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from service import BUNDLED_REPOSITORY

DIGITS = BUNDLED_REPOSITORY / "digits" / "1"


@pytest.fixture(scope="session")
def digits_files() -> tuple[Path, Path]:
    """The committed demo model's two files."""
    return DIGITS / "model.onnx", DIGITS / "model.dense.onnx"


@pytest.fixture()
def rng() -> Iterator[np.random.Generator]:
    yield np.random.default_rng(1234)
