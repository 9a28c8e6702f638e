"""The model-repository file format on its own: cell arithmetic and the convserve.* metadata."""

from __future__ import annotations

import json
import logging

import pytest

from model_format import (
    DENSE,
    INPUT,
    LABELS,
    PREPROCESS,
    SOURCE,
    DenseGeometry,
    ModelInfo,
    Preprocess,
    cell_counts,
    cell_starts,
    metadata_documents,
    read_documents,
    read_model_info,
)

INFO = ModelInfo(
    labels=("zero", "one", "two"),
    layout="NCHW",
    channels=1,
    window=(8, 8),
    preprocess=Preprocess("L", 1 / 255, (0.5,), (0.25,)),
    dense=DenseGeometry(
        stride=(2, 2),
        window=(8, 8),
        offset=(0, 0),
        receptive_field=(8, 8),
        exact=True,
        max_abs_dev=1e-6,
        top1_agreement=1.0,
    ),
)


def as_metadata(documents: dict[str, object]) -> dict[str, str]:
    """The documents as ONNX metadata_props hold them: JSON text per key."""
    return {key: json.dumps(value) for key, value in documents.items()}


def test_cell_counts_per_axis() -> None:
    assert cell_counts((8, 8), (8, 8), (2, 2)) == (1, 1)
    assert cell_counts((12, 20), (8, 8), (2, 4)) == (3, 4)
    assert cell_counts((13,), (8,), (2,)) == (3,)  # a partial stride left over gives no cell


def test_cell_counts_with_a_stride_divisor() -> None:
    assert cell_counts((12, 20), (8, 8), (2, 4), divisor=2) == (5, 7)
    assert cell_counts((8,), (8,), (4,), divisor=4) == (1,)


def test_cell_counts_of_an_input_smaller_than_the_window() -> None:
    assert cell_counts((6, 20), (8, 8), (2, 2)) == (0, 7)
    assert cell_counts((7,), (8,), (1,), divisor=2) == (0,)


def test_cell_starts_step_by_stride_over_divisor_from_the_offset() -> None:
    assert cell_starts((3, 2), (2, 4), 1, (0, 1)) == [[0, 2, 4], [1, 5]]
    assert cell_starts((4,), (4,), 2, (0,)) == [[0, 2, 4, 6]]


def test_cell_starts_in_the_original_images_pixels_when_scaled() -> None:
    # The pass ran on an image half the size: its pixels are two of the original's.
    assert cell_starts((3,), (2,), 1, (1,), scale=0.5) == [[2, 6, 10]]
    assert cell_starts((2,), (3,), 1, (0,), scale=2.0) == [[0, 2]]  # 1.5 rounds to 2


def test_metadata_documents_round_trip_through_read_model_info() -> None:
    documents = metadata_documents(INFO, {"model": "tests.nets:Digits"})
    assert set(documents) == {LABELS, INPUT, PREPROCESS, DENSE, SOURCE}
    assert documents[INPUT] == {"layout": "NCHW", "channels": 1, "window": [8, 8]}
    assert documents[SOURCE] == {"model": "tests.nets:Digits"}
    assert read_model_info(as_metadata(documents)) == INFO


def test_an_info_without_fields_writes_only_its_source() -> None:
    documents = metadata_documents(ModelInfo(), {"model": "m"})
    assert documents == {SOURCE: {"model": "m"}}
    assert read_model_info(as_metadata(documents)) == ModelInfo()


def test_a_file_without_metadata_has_an_empty_info() -> None:
    assert read_model_info({}) == ModelInfo()
    assert read_model_info({"producer": "pytorch"}) == ModelInfo()


def test_malformed_metadata_gives_an_empty_info_and_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metadata = as_metadata(metadata_documents(INFO, {}))
    metadata[INPUT] = json.dumps({"layout": "NCHW", "channels": 1})  # no window
    with caplog.at_level(logging.WARNING, logger="model_format"):
        assert read_model_info(metadata) == ModelInfo()
    assert "ignoring malformed convserve metadata" in caplog.text


def test_a_non_json_value_is_ignored_and_the_rest_kept(caplog: pytest.LogCaptureFixture) -> None:
    metadata = as_metadata(metadata_documents(INFO, {}))
    metadata[LABELS] = "zero, one, two"
    with caplog.at_level(logging.WARNING, logger="model_format"):
        info = read_model_info(metadata)
    assert info.labels is None
    assert info.window == (8, 8) and info.dense == INFO.dense
    assert f"ignoring metadata {LABELS}: not JSON" in caplog.text


def test_read_documents_keeps_only_convserve_keys_and_raw_text_where_not_json() -> None:
    metadata = {"producer": "pytorch", LABELS: '["a"]', SOURCE: "{not json"}
    assert read_documents(metadata) == {LABELS: ["a"], SOURCE: "{not json"}
