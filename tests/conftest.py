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


# The classifier tests' repository, server and stub: one of each per test module. Imported
# inside, so that tests that use none of them do not import torch or start a server.
@pytest.fixture(scope="module")
def classifier_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``digits`` and ``padded`` (see tests/classifier_server.py)."""
    from tests.classifier_server import export_repository

    return export_repository(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def classifier_server(classifier_repository: Path):
    """A server on :func:`classifier_repository` with the classifier tests' small limits."""
    from tests.classifier_server import start_server

    with start_server(classifier_repository) as process:
        yield process


@pytest.fixture(scope="module")
def classifier_stub(classifier_server):
    """A ``convserve.v1.Classifier`` stub on :func:`classifier_server`."""
    import grpc

    from service._generated.convserve.v1 import classifier_pb2_grpc as pb_grpc

    with grpc.insecure_channel(classifier_server.grpc_address) as channel:
        yield pb_grpc.ClassifierStub(channel)


@pytest.fixture(scope="module")
def held_out():
    """The demo's held-out digits: images and labels."""
    from export.demo import digits_split

    _xt, x_test, _yt, y_test = digits_split()
    return x_test, y_test
