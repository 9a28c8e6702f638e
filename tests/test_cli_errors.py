"""Bad input to export and inspect ends with one clear line and a non-zero exit, no traceback."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import nets


def convserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def assert_clean_failure(result: subprocess.CompletedProcess[str], pattern: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1, result.stderr

    assert re.search(pattern, error_lines[0]), error_lines[0]


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    return tmp_path / "repo"


def test_unknown_module(repo: Path) -> None:
    result = convserve(
        "export",
        "no_such_pkg.nets:Net",
        "--input-shape",
        "3x8x8",
        "--name",
        "x",
        "--model-repository",
        str(repo),
    )
    assert_clean_failure(result, r"cannot import module 'no_such_pkg.nets'")


def test_unknown_attribute(repo: Path) -> None:
    result = convserve(
        "export",
        "tests.nets:nothing_here",
        "--input-shape",
        "3x16x16",
        "--name",
        "x",
        "--model-repository",
        str(repo),
    )
    assert_clean_failure(result, r"module 'tests.nets' has no attribute 'nothing_here'")


def test_not_an_import_path(repo: Path) -> None:
    result = convserve(
        "export",
        "tests.nets",
        "--input-shape",
        "3x16x16",
        "--name",
        "x",
        "--model-repository",
        str(repo),
    )
    assert_clean_failure(result, r"not an import path: write package.module:callable")


def test_weights_that_do_not_match(repo: Path, tmp_path: Path) -> None:
    weights = tmp_path / "other.pth"
    torch.save(nets.padding_free_1d().state_dict(), weights)
    result = convserve(
        "export",
        "tests.nets:padding_free_2d",
        "--input-shape",
        "3x16x16",
        "--name",
        "x",
        "--model-repository",
        str(repo),
        "--weights",
        str(weights),
    )
    assert_clean_failure(result, r"weights in '.*other.pth' do not match Sequential")


def test_missing_weights_file(repo: Path, tmp_path: Path) -> None:
    result = convserve(
        "export",
        "tests.nets:padding_free_2d",
        "--input-shape",
        "3x16x16",
        "--name",
        "x",
        "--model-repository",
        str(repo),
        "--weights",
        str(tmp_path / "absent.pth"),
    )
    assert_clean_failure(result, r"weights file '.*absent.pth' does not exist")


@pytest.mark.parametrize(
    ("shape", "pattern"),
    [
        ("3x4x4", r"does not run on a 3x4x4 input"),
        ("3xAx4", r"must be CxHxW or CxL in whole numbers"),
        ("3x0x16", r"must be CxHxW or CxL, all positive"),
        ("1x2x3x4", r"must be CxHxW or CxL"),
    ],
)
def test_impossible_input_shape(repo: Path, shape: str, pattern: str) -> None:
    result = convserve(
        "export",
        "tests.nets:padding_free_2d",
        "--input-shape",
        shape,
        "--name",
        "x",
        "--model-repository",
        str(repo),
    )
    assert_clean_failure(result, pattern)


def test_unconvertible_head(repo: Path) -> None:
    result = convserve(
        "export",
        "tests.nets:LayerNormHead",
        "--input-shape",
        "1x8x8",
        "--name",
        "x",
        "--model-repository",
        str(repo),
    )
    assert_clean_failure(result, r"layer 'norm' \(LayerNorm\) follows the flatten")


def test_unconvertible_head_exports_with_no_dense(repo: Path) -> None:
    result = convserve(
        "export",
        "tests.nets:LayerNormHead",
        "--input-shape",
        "1x8x8",
        "--name",
        "x",
        "--model-repository",
        str(repo),
        "--no-dense",
    )
    assert result.returncode == 0, result.stderr
    assert (repo / "x" / "1" / "model.onnx").is_file()
    assert not (repo / "x" / "1" / "model.dense.onnx").exists()


def test_labels_count_must_match(repo: Path, tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n")
    result = convserve(
        "export",
        "tests.nets:padding_free_2d",
        "--input-shape",
        "3x16x16",
        "--name",
        "x",
        "--model-repository",
        str(repo),
        "--labels",
        str(labels),
    )
    assert_clean_failure(result, r"labels file has 2 labels; the model has 5 classes")


def test_mean_must_match_channels(repo: Path) -> None:
    result = convserve(
        "export",
        "tests.nets:padding_free_2d",
        "--input-shape",
        "3x16x16",
        "--name",
        "x",
        "--model-repository",
        str(repo),
        "--mean",
        "0.5",
        "--std",
        "0.2",
    )
    assert_clean_failure(result, r"--mean/--std have 1 values but the input has 3 channels")


def test_inspect_missing_file(tmp_path: Path) -> None:
    assert_clean_failure(
        convserve("inspect", str(tmp_path / "nope.onnx")),
        r"model file '.*nope.onnx' does not exist",
    )


def test_inspect_not_onnx(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.onnx"
    bogus.write_bytes(b"\x00not a model at all\xff" * 10)
    assert_clean_failure(convserve("inspect", str(bogus)), r"is not a readable ONNX model")


def test_whole_saved_module_as_weights(repo: Path, tmp_path: Path) -> None:
    model = nets.padding_free_2d()
    with torch.no_grad():
        model[0].bias.fill_(0.5)  # differs from what the factory builds
    saved = tmp_path / "whole.pt"
    torch.save(model, saved)
    result = convserve(
        "export",
        "tests.nets:padding_free_2d",
        "--input-shape",
        "3x16x16",
        "--name",
        "whole",
        "--model-repository",
        str(repo),
        "--weights",
        str(saved),
    )
    assert result.returncode == 0, result.stderr
    import onnxruntime as ort

    session = ort.InferenceSession(
        str(repo / "whole" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x).numpy()
    got = session.run(None, {"input": x.numpy()})[0]
    assert abs(got - expected).max() < 1e-4  # the saved module's weights, not the factory's


def test_export_fails_above_the_parity_tolerance(repo: Path) -> None:
    result = convserve(
        "export",
        "tests.nets:padding_free_2d",
        "--input-shape",
        "3x16x16",
        "--name",
        "strict",
        "--model-repository",
        str(repo),
        "--parity-tolerance",
        "1e-30",
    )
    assert_clean_failure(result, r"model.onnx differs from PyTorch by .* \(tolerance 1e-30\)")
