"""The convserve.precision document in the file format, and the inspect table it makes true."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import onnx
import pytest
import torch

from export.geometry import stored_precision
from export.half_precision import to_fp16
from export.inspection import inspect_file, render
from export.onnx_export import write_onnx
from model_format import PRECISION, PRECISIONS, ModelInfo, Precision, metadata_documents
from model_format import read_model_info as read
from service import BUNDLED_REPOSITORY
from tests import nets

MEASURED = dataclasses.replace(
    Precision.named("int8"),
    top1_agreement=0.995,
    max_abs_dev=0.25,
    evaluated_on="200 held-out images of cal",
    samples=200,
    calibration="800 images of cal",
    output_step=0.125,
)


def as_metadata(documents: dict[str, object]) -> dict[str, str]:
    return {key: json.dumps(value) for key, value in documents.items()}


def test_each_precision_names_its_bytes_per_value() -> None:
    assert PRECISIONS == {"fp32": (4, 4), "fp16": (2, 2), "int8": (1, 1)}
    assert Precision.named("fp16") == Precision("fp16", 2, 2)
    with pytest.raises(ValueError, match="precision must be one of fp32, fp16, int8"):
        Precision.named("int4")


def test_the_precision_document_round_trips() -> None:
    documents = metadata_documents(ModelInfo(precision=MEASURED), {"model": "m"})
    assert documents[PRECISION] == dataclasses.asdict(MEASURED)
    assert read(as_metadata(documents)).precision == MEASURED
    short = {PRECISION: {"name": "fp32", "weight_bytes": 4, "activation_bytes": 4}}
    assert read(as_metadata(short)).precision == Precision.named("fp32")  # the rest optional
    assert read({}).precision is None


def test_a_malformed_precision_document_leaves_the_info_empty(caplog) -> None:
    assert read({PRECISION: json.dumps({"name": "int8"})}) == ModelInfo()
    assert "ignoring malformed convserve metadata" in caplog.text
    assert read({PRECISION: "int8"}) == ModelInfo()
    assert "ignoring metadata convserve.precision: not JSON" in caplog.text


def test_the_bundled_models_say_what_they_hold() -> None:
    for name, expected in (("digits", "fp32"), ("digits_int8", "int8")):
        for file in ("model.onnx", "model.dense.onnx"):
            model = onnx.load(str(BUNDLED_REPOSITORY / name / "1" / file))
            info = read({p.key: p.value for p in model.metadata_props})
            assert info.precision is not None and info.precision.name == expected
            assert stored_precision(model) == expected


def test_inspect_of_the_bundled_int8_model_counts_in_bytes_it_holds() -> None:
    path = BUNDLED_REPOSITORY / "digits_int8" / "1" / "model.onnx"
    found, metadata = inspect_file(path)
    fp32, _ = inspect_file(BUNDLED_REPOSITORY / "digits" / "1" / "model.onnx")
    assert found.total_params == fp32.total_params == 53_002  # weights, not their scales
    assert [layer.params for layer in found.layers] == [layer.params for layer in fp32.layers]
    assert found.total_param_bytes < fp32.total_param_bytes / 3  # int8 weights, int32 biases
    text = render(found, metadata, [1])
    header = text.splitlines()[0].split()
    assert header[-1] == "int8" and "fp32" not in header
    assert "activations per image: 2,634 values (0.0 MB int8)" in text
    assert "int8 weights+activations" in text and "fp16" not in text
    assert "against fp32 on 360 held-out digits: top-1 agreement" in text


def test_inspect_without_metadata_reads_the_precision_off_the_tensors(tmp_path: Path) -> None:
    path = tmp_path / "plain.onnx"
    model = write_onnx(nets.padding_free_2d(), torch.zeros(1, 3, 16, 16), path, {0: "batch"})
    onnx.save(to_fp16(model), str(path))
    found, metadata = inspect_file(path, (3, 16, 16))
    assert found.precision == "fp16" and metadata == {}
    assert found.total_param_bytes == 2 * found.total_params == 2 * 6_197
    text = render(found, metadata, [1])
    assert "fp16 weights+activations" in text
    assert "(2 B per parameter, 2 B per activation)" in text
