"""The bundled digits models, fp32 and int8: accurate, self-describing, loadable by ORT-gpu 1.31."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from export.demo import digits_split
from export.dense_check import crop_by_crop, dense_map, output_step
from export.onnx_export import IR_VERSION
from service import BUNDLED_REPOSITORY

INT8 = BUNDLED_REPOSITORY / "digits_int8" / "1"
INT8_FILES = (INT8 / "model.onnx", INT8 / "model.dense.onnx")


def metadata(path: Path) -> dict[str, object]:
    return {p.key: json.loads(p.value) for p in onnx.load(str(path)).metadata_props}


def normalise(images: np.ndarray, meta: dict) -> np.ndarray:
    pre = meta["convserve.preprocess"]
    x = images.astype(np.float32)[:, None] * pre["scale"]
    return ((x - pre["mean"][0]) / pre["std"][0]).astype(np.float32)


def held_out_accuracy(path: Path) -> float:
    _xt, x_test, _yt, y_test = digits_split()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": normalise(x_test, metadata(path))})[0]
    return float(np.mean(logits.argmax(1) == y_test))


def test_accuracy_from_the_committed_file(digits_files: tuple[Path, Path]) -> None:
    assert held_out_accuracy(digits_files[0]) >= 0.97


@pytest.mark.parametrize("which", [0, 1, 2, 3])
def test_ir_version_and_opset_are_pinned(digits_files: tuple[Path, Path], which: int) -> None:
    model = onnx.load(str((*digits_files, *INT8_FILES)[which]))
    # pinned to the exporter's IR_VERSION (8), under the 13 onnxruntime-gpu 1.31 loads at most
    assert model.ir_version == IR_VERSION == 8
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]


def test_int8_held_out_accuracy_is_within_a_point_of_fp32(digits_files: tuple[Path, Path]) -> None:
    fp32, int8 = held_out_accuracy(digits_files[0]), held_out_accuracy(INT8_FILES[0])
    assert abs(int8 - fp32) <= 0.01 and int8 >= 0.97
    record = metadata(INT8_FILES[0])["convserve.precision"]
    assert record["name"] == "int8" and record["top1_agreement"] >= 0.99
    assert record["evaluated_on"] == "360 held-out digits"
    assert record["top1_agreement"] == held_out_agreement(INT8_FILES[0], digits_files[0])


def test_int8_twin_cells_are_int8_crops_within_one_output_step() -> None:
    """A strip of held-out digits: every int8 dense cell against the int8 classifier on its crop."""
    _xt, x_test, _yt, _y = digits_split()
    strip = normalise(np.concatenate(list(x_test[:6]), axis=1)[None], metadata(INT8_FILES[0]))[0]
    classifier, dense = (
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in INT8_FILES
    )
    expected = crop_by_crop(classifier, strip, (8, 8), (2, 2))
    got = dense_map(dense, strip, (8, 8), (2, 2))
    assert got.shape == expected.shape == (10, 1, 21)
    assert np.max(np.abs(got - expected)) <= output_step(INT8_FILES[1]) * (1 + 1e-5)


def test_each_file_describes_itself(digits_files: tuple[Path, Path]) -> None:
    for path in (*digits_files, *INT8_FILES):
        meta = metadata(path)
        assert meta["convserve.labels"] == [str(d) for d in range(10)]
        assert meta["convserve.input"] == {"layout": "NCHW", "channels": 1, "window": [8, 8]}
        assert meta["convserve.preprocess"]["color"] == "L"
        dense = meta["convserve.dense"]
        assert dense["stride"] == [2, 2] and dense["window"] == [8, 8]
        assert dense["offset"] == [0, 0] and dense["receptive_field"] == [8, 8]
        assert dense["exact"] is True and dense["max_abs_dev"] < 1e-4
        source = meta["convserve.source"]
        assert source["model"] == "export.demo:DigitsNet"
        assert source["parity_max_abs_diff"] < 1e-4


def test_dynamic_axes(digits_files: tuple[Path, Path]) -> None:
    classifier = ort.InferenceSession(str(digits_files[0]), providers=["CPUExecutionProvider"])
    dense = ort.InferenceSession(str(digits_files[1]), providers=["CPUExecutionProvider"])
    assert classifier.run(None, {"input": np.zeros((5, 1, 8, 8), np.float32)})[0].shape == (5, 10)
    out = dense.run(None, {"input": np.zeros((2, 1, 8, 40), np.float32)})[0]
    assert out.shape == (2, 10, 1, 17)  # (40 - 8) // 2 + 1


def test_strip_of_digits_names_each_digit(digits_files: tuple[Path, Path]) -> None:
    """Five held-out digits side by side: the best cell over each digit names it."""
    _xt, x_test, _yt, y_test = digits_split()
    picks = [int(np.flatnonzero(y_test == d)[3]) for d in (3, 1, 4, 0, 9)]
    strip = np.concatenate([x_test[i] for i in picks], axis=1)  # 8 x 40
    meta = metadata(digits_files[1])
    dense = ort.InferenceSession(str(digits_files[1]), providers=["CPUExecutionProvider"])
    scores = dense.run(None, {"input": normalise(strip[None], meta)})[0][0, :, 0, :]
    for k, index in enumerate(picks):
        cell = 4 * k  # digit k starts at 8k px; stride 2
        assert scores[:, cell].argmax() == y_test[index]


def test_demo_recreates_the_bundled_model(tmp_path: Path, digits_files: tuple[Path, Path]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service", "demo", "--model-repository", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "held-out accuracy" in result.stdout
    assert "training digits" in result.stderr  # the progress bar
    bundled_config = BUNDLED_REPOSITORY / "digits" / "config.json"
    assert (tmp_path / "digits" / "config.json").read_text() == bundled_config.read_text()
    fresh = tmp_path / "digits" / "1"
    # Training is deterministic on one CPU, not across instruction sets: oneDNN and BLAS pick other
    # kernels on AVX2 and AVX-512 machines, and the trained logits differ between them. What holds
    # everywhere: the same architecture and metadata, the same held-out accuracy within a point or
    # two, and the same answer on nearly every held-out digit.
    for name in ("model.onnx", "model.dense.onnx"):
        ours, theirs = metadata(fresh / name), metadata(digits_files[name == "model.dense.onnx"])
        ours["convserve.source"].pop("exported_at", None)
        theirs["convserve.source"].pop("exported_at", None)
        assert ours.keys() == theirs.keys()
        for key in ("convserve.labels", "convserve.input", "convserve.preprocess"):
            assert ours[key] == theirs[key], key
        for key in ("stride", "window", "offset", "receptive_field", "exact"):
            assert ours["convserve.dense"][key] == theirs["convserve.dense"][key], key
        assert layer_kinds(fresh / name) == layer_kinds(digits_files[name == "model.dense.onnx"])
    fresh_accuracy = held_out_accuracy(fresh / "model.onnx")
    assert abs(fresh_accuracy - held_out_accuracy(digits_files[0])) <= 0.02
    assert held_out_agreement(fresh / "model.onnx", digits_files[0]) >= 0.95
    # digits_int8, quantized from the fresh fp32 files: the same structure and metadata keys as
    # the bundled one, within a point of its own fp32 model.
    assert "digits_int8: held-out accuracy" in result.stdout
    int8 = tmp_path / "digits_int8"
    assert (int8 / "config.json").read_text() == bundled_config.read_text()
    for name, bundled in zip(("model.onnx", "model.dense.onnx"), INT8_FILES, strict=True):
        assert metadata(int8 / "1" / name).keys() == metadata(bundled).keys()
        assert layer_kinds(int8 / "1" / name) == layer_kinds(bundled)
    assert abs(held_out_accuracy(int8 / "1" / "model.onnx") - fresh_accuracy) <= 0.01


def layer_kinds(path: Path) -> list[tuple[str, list[list[int]]]]:
    """Each node's operator and the shapes of its weights: the architecture, not the values."""
    model = onnx.load(str(path))
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    return [
        (node.op_type, [shapes[i] for i in node.input if i in shapes]) for node in model.graph.node
    ]


def held_out_agreement(first: Path, second: Path) -> float:
    """Share of the held-out digits on which two models give the same top-1 class."""
    _xt, x_test, _yt, _y = digits_split()
    x = normalise(x_test, metadata(first))
    top1 = [
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        .run(None, {"input": x})[0]
        .argmax(1)
        for p in (first, second)
    ]
    return float(np.mean(top1[0] == top1[1]))
