"""FC-as-conv conversion on custom networks: every dense cell equals the classifier on its crop."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from export.errors import ExportError
from export.fc_to_conv import ConversionError, to_dense
from export.model_entry import ExportSpec, export_entry
from tests import nets

CASES = {
    # name: (factory, input shape, expected stride)
    "sequential_2d": (nets.padding_free_2d, (3, 16, 16), (4, 4)),
    "conv1d": (nets.padding_free_1d, (2, 31), (4,)),
    "pooled_head": (nets.PooledHead, (1, 15, 15), (2, 2)),
    "mean_head": (nets.MeanHead, (3, 13, 13), (2, 2)),
    "fully_convolutional": (nets.FullyConvolutional, (1, 8, 8), (1, 1)),
    "channels_last": (nets.ChannelsLastBlocks, (3, 12, 12), (2, 2)),
    "channels_last_1d": (nets.ChannelsLast1d, (2, 9), (1,)),
}


def crop_oracle(
    model: torch.nn.Module, image: np.ndarray, window: tuple[int, ...], stride: tuple[int, ...]
) -> np.ndarray:
    """The classifier run by PyTorch on each crop, laid out as [K, *cells]."""
    cells = [(s - w) // st + 1 for s, w, st in zip(image.shape[1:], window, stride, strict=True)]
    scores = {}
    for pos in itertools.product(*(range(c) for c in cells)):
        index = (
            slice(None),
            *(slice(p * st, p * st + w) for p, st, w in zip(pos, stride, window, strict=True)),
        )
        with torch.no_grad():
            scores[pos] = model(torch.from_numpy(image[index][None].copy()))[0].numpy()
    classes = next(iter(scores.values())).shape[0]
    out = np.zeros((classes, *cells), dtype=np.float32)
    for pos, value in scores.items():
        out[(slice(None), *pos)] = value
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, object]]:
    repo = tmp_path_factory.mktemp("repo")
    result = {}
    for name, (factory, shape, _stride) in CASES.items():
        report = export_entry(
            factory(),
            ExportSpec(source=f"tests.nets:{name}", input_shape=shape, name=name, repository=repo),
        )
        result[name] = (report.dense_path, report)
    return result


@pytest.mark.parametrize("name", sorted(CASES))
def test_geometry_is_computed_and_exact(name: str, exported: dict) -> None:
    _factory, shape, stride = CASES[name]
    path, report = exported[name]
    assert report.geometry.stride == stride
    assert report.geometry.window == shape[1:]
    assert report.geometry.offset == (0,) * len(stride)
    assert report.geometry.exact is True
    assert report.check.max_abs_dev < 1e-4
    assert report.check.top1_agreement == 1.0
    meta = {p.key: json.loads(p.value) for p in onnx.load(str(path)).metadata_props}
    assert meta["convserve.dense"]["stride"] == list(stride)
    assert meta["convserve.dense"]["exact"] is True
    assert meta["convserve.input"]["layout"] == ("NCHW" if len(shape) == 3 else "NCL")


@pytest.mark.parametrize("name", sorted(CASES))
@settings(max_examples=12, deadline=None)
@given(extra=st.lists(st.integers(min_value=0, max_value=23), min_size=2, max_size=2))
def test_every_dense_cell_equals_its_crop(name: str, extra: list[int], exported: dict) -> None:
    factory, shape, stride = CASES[name]
    path, _report = exported[name]
    window = shape[1:]
    size = tuple(w + e for w, e in zip(window, extra, strict=False))
    image = np.random.default_rng(sum(extra)).standard_normal((shape[0], *size))
    image = image.astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    dense = session.run(None, {"input": image[None]})[0][0]
    expected = crop_oracle(factory(), image, window, stride)
    cells = expected.shape[1:]
    assert all(d >= c for d, c in zip(dense.shape[1:], cells, strict=True))
    got = dense[(slice(None), *(slice(0, c) for c in cells))]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_a_mean_over_the_spatial_axes_is_pooling_and_flatten_in_one() -> None:
    dense = to_dense(nets.MeanHead(), (3, 13, 13))
    assert any(
        "(mean over [5, 5]) -> AvgPool2d(kernel=[5, 5], stride=1)" in line
        for line in dense.converted
    )
    assert any("'fc1' (Linear 16->12) -> Conv2d(kernel=[1, 1]" in line for line in dense.converted)
    assert dense.module(torch.zeros(1, 3, 17, 15)).shape == (1, 4, 3, 2)


def test_per_position_linear_layers_keep_the_receptive_field(exported: dict) -> None:
    # Kept as MatMul nodes over the last axis, they reach no further than a 1x1 convolution.
    assert exported["channels_last"][1].geometry.receptive_field == (12, 12)


def test_dilated_head_keeps_feature_stride() -> None:
    dense = to_dense(nets.PooledHead(), (1, 15, 15))
    assert any("AvgPool2d(kernel=[3, 3], stride=1)" in line for line in dense.converted)
    assert any("dilation=[3, 3]" in line for line in dense.converted)
    assert any("BatchNorm1d" in line for line in dense.converted)


@pytest.mark.parametrize(
    ("factory", "shape", "message"),
    [
        (nets.LayerNormHead, (1, 8, 8), r"'norm' \(LayerNorm\) follows the flatten"),
        (nets.NoHead, (1, 8, 8), r"no fully-connected head.*--no-dense"),
        (nets.UnevenPool, (1, 7, 7), r"'pool' .* pools a 5-wide feature map to 2"),
        (nets.LinearOverWidth, (1, 8, 8), r"'mix' \(Linear\) is applied to an unflattened"),
        (
            nets.ChannelsLastFlatten,
            (1, 8, 8),
            r"'flatten' \(tensor.flatten\) flattens a channels-last",
        ),
        (nets.LinearOverLength, (1, 8), r"'mix' \(Linear\) is applied to an unflattened"),
        (nets.ChannelsLastMean, (1, 8, 8), r"'fc' \(Linear\) is applied to an unflattened"),
    ],
)
def test_unconvertible_heads_name_the_layer(factory, shape, message) -> None:
    with pytest.raises(ConversionError, match=message):
        to_dense(factory(), shape)
    assert issubclass(ConversionError, ExportError)
