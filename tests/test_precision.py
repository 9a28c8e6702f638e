"""Precision as an export choice: int8 and fp16 files, pinned, measured and crop-equivalent."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from export.calibration import Samples
from export.dense_check import crop_by_crop, dense_map, output_step
from export.errors import ExportError
from export.model_entry import ExportSpec, export_entry
from export.precision import PrecisionSpec, derive
from tests import nets

CASES = {
    # name: (factory, input shape, stride)
    "sequential_2d": (nets.padding_free_2d, (3, 16, 16), (4, 4)),
    "conv1d": (nets.padding_free_1d, (2, 31), (4,)),
    # Clip's scalar bounds are no activation of any one input: calibration leaves them out.
    "relu6_2d": (nets.relu6_2d, (3, 16, 16), (4, 4)),
}


def metadata(path: Path) -> dict[str, object]:
    return {p.key: json.loads(p.value) for p in onnx.load(str(path)).metadata_props}


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def export(name: str, repository: Path, precision: PrecisionSpec) -> object:
    factory, shape, _stride = CASES[name]
    spec = ExportSpec(
        source=f"tests.nets:{name}",
        input_shape=shape,
        name=name,
        repository=repository,
        precision=precision,
    )
    return export_entry(factory(), spec)


@pytest.fixture(scope="module")
def int8(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    repository = tmp_path_factory.mktemp("int8")
    spec = PrecisionSpec("int8", random=True, samples=32)
    return {name: export(name, repository, spec) for name in CASES}


@pytest.fixture(scope="module")
def fp16(tmp_path_factory: pytest.TempPathFactory) -> object:
    return export("sequential_2d", tmp_path_factory.mktemp("fp16"), PrecisionSpec("fp16"))


def opsets(path: Path) -> tuple[int, list[int]]:
    model = onnx.load(str(path))
    return model.ir_version, [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]


@pytest.mark.parametrize("name", sorted(CASES))
def test_int8_files_are_quantized_pinned_and_say_so(name: str, int8: dict) -> None:
    report = int8[name]
    for path in (report.model_path, report.dense_path):
        assert opsets(path) == (8, [17])
        ops = {node.op_type for node in onnx.load(str(path)).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        weights = {t.name: t for t in onnx.load(str(path)).graph.initializer}
        assert any(t.data_type == onnx.TensorProto.INT8 for t in weights.values())
        record = metadata(path)["convserve.precision"]
        assert (
            record["name"] == "int8" and record["weight_bytes"] == record["activation_bytes"] == 1
        )
        assert record["evaluated_on"] == "64 random inputs" and record["samples"] == 64
        assert record["calibration"] == "32 random inputs"
        assert record["output_step"] == pytest.approx(output_step(path))
        assert 0.0 <= record["top1_agreement"] <= 1.0
    shared, calibrated = report.precision.shared_ranges
    assert shared == calibrated > 0  # every twin tensor is the classifier's
    # Clients change nothing: fp32 in, fp32 out.
    got = session(report.model_path).get_inputs()[0]
    assert got.type == "tensor(float)" and got.shape[0] == "batch"


@pytest.mark.parametrize("name", sorted(CASES))
@settings(max_examples=8, deadline=None)
@given(extra=st.lists(st.integers(min_value=0, max_value=19), min_size=2, max_size=2))
def test_every_int8_dense_cell_is_its_int8_crop_within_one_output_step(
    name: str, extra: list[int], int8: dict
) -> None:
    _factory, shape, stride = CASES[name]
    report = int8[name]
    window = shape[1:]
    size = tuple(w + e for w, e in zip(window, extra, strict=False))
    image = np.random.default_rng(sum(extra)).standard_normal((shape[0], *size))
    image = image.astype(np.float32)
    step = output_step(report.dense_path)
    assert step == output_step(report.model_path) > 0  # one set of ranges for both files
    expected = crop_by_crop(session(report.model_path), image, window, stride)
    got = dense_map(session(report.dense_path), image, window, stride)
    assert np.max(np.abs(got - expected)) <= step * (1 + 1e-5)


def test_the_int8_dense_check_is_recorded(int8: dict) -> None:
    report = int8["sequential_2d"]
    dense = metadata(report.dense_path)["convserve.dense"]
    assert dense["exact"] is True
    assert dense["max_abs_dev"] == pytest.approx(report.precision.check.max_abs_dev)
    assert report.precision.check.max_abs_dev <= report.precision.record.output_step * 1.00001


def test_fp16_keeps_fp32_inputs_and_outputs_and_agrees(fp16: object) -> None:
    for path in (fp16.model_path, fp16.dense_path):
        assert opsets(path) == (8, [17])
        model = onnx.load(str(path))
        assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
        onnx.checker.check_model(model)  # nodes in order after the casts were added
        loaded = session(path)
        assert loaded.get_inputs()[0].type == loaded.get_outputs()[0].type == "tensor(float)"
    record = metadata(fp16.model_path)["convserve.precision"]
    assert record["name"] == "fp16" and record["weight_bytes"] == 2
    assert record["top1_agreement"] >= 0.98 and record["max_abs_dev"] < 1e-2
    assert record["calibration"] is None and record["output_step"] is None
    x = np.random.default_rng(1).standard_normal((3, 3, 16, 16)).astype(np.float32)
    fp32 = export_entry(
        nets.padding_free_2d(),
        ExportSpec("tests.nets:x", (3, 16, 16), "x", fp16.model_path.parents[2], dense=False),
    )
    reference = session(fp32.model_path).run(None, {"input": x})[0]
    got = session(fp16.model_path).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, reference, atol=1e-2, rtol=0)


def test_fp32_files_record_their_precision(tmp_path: Path) -> None:
    report = export("sequential_2d", tmp_path, PrecisionSpec())
    record = metadata(report.model_path)["convserve.precision"]
    assert record == {
        "name": "fp32",
        "weight_bytes": 4,
        "activation_bytes": 4,
        "top1_agreement": None,
        "max_abs_dev": None,
        "evaluated_on": None,
        "samples": 0,
        "calibration": None,
        "output_step": None,
    }
    assert report.precision is None


def fp32_entry(tmp_path: Path) -> Path:
    report = export("sequential_2d", tmp_path / "fp32", PrecisionSpec())
    return report.model_path.parent


def test_agreement_under_the_minimum_fails_and_writes_nothing(tmp_path: Path) -> None:
    source = fp32_entry(tmp_path)
    held_out = np.random.default_rng(0).standard_normal((64, 3, 16, 16)).astype(np.float32)
    # Ranges calibrated on blank inputs: every activation collapses, the classes do not survive.
    blank = Samples(np.zeros((8, 3, 16, 16), np.float32), held_out, "8 blank", "64 normal")
    target = tmp_path / "int8" / "1"
    with pytest.raises(ExportError, match=r"int8 agrees with fp32 on .* of 64 normal \(top-1\)"):
        derive(source, target, PrecisionSpec("int8"), blank)
    assert not target.exists()
    # On random inputs the same agreement is measured and recorded, not enforced.
    report = derive(source, target, PrecisionSpec("int8"), dataclasses.replace(blank, random=True))
    assert report.record.top1_agreement < 0.99 and report.random
    assert (target / "model.onnx").is_file()


def test_agreement_in_the_files_matches_a_fresh_measurement(tmp_path: Path) -> None:
    source = fp32_entry(tmp_path)
    held_out = np.random.default_rng(2).standard_normal((40, 3, 16, 16)).astype(np.float32)
    samples = Samples(held_out[:20], held_out[20:], "20 normal", "20 normal")
    report = derive(source, tmp_path / "int8", PrecisionSpec("int8", min_top1_agreement=0), samples)
    expected = session(source / "model.onnx").run(None, {"input": held_out[20:]})[0]
    got = session(tmp_path / "int8" / "model.onnx").run(None, {"input": held_out[20:]})[0]
    assert report.record.max_abs_dev == pytest.approx(float(np.max(np.abs(got - expected))))
    agree = float(np.mean(got.argmax(1) == expected.argmax(1)))
    assert report.record.top1_agreement == pytest.approx(agree)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "int4"}, r"--precision must be one of fp32, fp16, int8"),
        ({"name": "fp32", "random": True}, r"--calibration goes with --precision fp16 or int8"),
        ({"name": "int8", "samples": 0}, r"--calibration-samples must be at least 1"),
        ({"name": "int8", "min_top1_agreement": 1.5}, r"--min-top1-agreement must be within"),
        (
            {"name": "int8", "random": True, "calibration": Path("x")},
            r"a folder of images or 'random', not both",
        ),
    ],
)
def test_bad_precision_specs_say_what_is_wrong(kwargs: dict, message: str) -> None:
    with pytest.raises(ExportError, match=message):
        PrecisionSpec(**kwargs)


def convserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", *args], capture_output=True, text=True, timeout=300
    )


def export_args(repository: Path, *extra: str) -> list[str]:
    return [
        "export",
        "tests.nets:padding_free_2d",
        "--input-shape",
        "3x16x16",
        "--name",
        "m",
        "--model-repository",
        str(repository),
        *extra,
    ]


def test_int8_without_calibration_is_refused_in_one_line(tmp_path: Path) -> None:
    result = convserve(*export_args(tmp_path, "--precision", "int8"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert re.search(r"error: --precision int8 needs --calibration DIR", result.stderr)
    assert not (tmp_path / "m").exists()


def test_int8_on_a_folder_of_images_prints_what_it_cost(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        pixels = rng.integers(0, 256, (20, 24, 3)).astype(np.uint8)  # resized to the window
        Image.fromarray(pixels).save(images / f"{i}.png")
    (images / "notes.txt").write_text("not an image")
    result = convserve(
        *export_args(tmp_path / "repo", "--precision", "int8", "--calibration", str(images)),
        "--min-top1-agreement",
        "0",
    )
    assert result.returncode == 0, result.stderr
    assert "fit for timing" not in result.stderr
    assert (
        "precision: int8 QDQ: int8 weights per output channel, uint8 activations" in result.stdout
    )
    assert f"int8 against fp32 on 2 held-out images of {images}: top-1 agreement" in result.stdout
    assert f"calibrated on 8 images of {images}" in result.stdout
    assert re.search(r"int8 dense vs int8 crop-by-crop over 15 cells: .*output step", result.stdout)
    inspected = convserve("inspect", str(tmp_path / "repo" / "m" / "1" / "model.onnx"))
    assert inspected.returncode == 0, inspected.stderr
    assert "int8 weights+activations" in inspected.stdout
    assert "(1 B per parameter, 1 B per activation)" in inspected.stdout
    assert "parameters: 6,197 (" in inspected.stdout  # every weight, as in the fp32 file


def test_random_calibration_warns_and_does_not_fail(tmp_path: Path) -> None:
    result = convserve(
        *export_args(tmp_path, "--precision", "int8", "--calibration", "random"),
        "--calibration-samples",
        "16",
        "--min-top1-agreement",
        "1",
        "--no-dense",
    )
    assert result.returncode == 0, result.stderr
    assert "fit for timing, not for accuracy" in result.stderr
    assert "int8 against fp32 on 64 random inputs: top-1 agreement" in result.stdout
    assert not (tmp_path / "m" / "1" / "model.dense.onnx").exists()


def zero_bias_net() -> torch.nn.Module:
    """Three convolutions whose zero biases the exporter shares through Identity nodes."""
    torch.manual_seed(0)
    convs = [torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 4, 3), torch.nn.Conv2d(4, 4, 3)]
    with torch.no_grad():
        for conv in convs:
            conv.bias.zero_()
    return torch.nn.Sequential(
        convs[0],
        torch.nn.ReLU(),
        convs[1],
        torch.nn.ReLU(),
        convs[2],
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 10 * 10, 3),
    ).eval()


def test_shared_zero_biases_are_unshared_so_every_convolution_runs_in_int8(tmp_path: Path) -> None:
    spec = ExportSpec(
        "tests.test_precision:zero_bias_net",
        (3, 16, 16),
        "z",
        tmp_path,
        dense=False,
        precision=PrecisionSpec("int8", random=True, samples=16),
    )
    report = export_entry(zero_bias_net(), spec)
    graph = onnx.load(str(report.model_path)).graph
    producers = {o: n.op_type for n in graph.node for o in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert len(convs) == 3 and "Identity" not in producers.values()
    assert all(producers[c.input[2]] == "DequantizeLinear" for c in convs)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(report.model_path), options, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    assert fused.count("QLinearConv") == 3 and "Conv" not in fused
