"""FC-as-conv on torchvision's AlexNet, VGG, ResNet, MobileNet, ShuffleNet, ConvNeXt (untrained)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision

from export.fc_to_conv import to_dense
from export.inspection import inspect_file, render
from export.model_entry import ExportSpec, export_entry
from export.onnx_export import write_onnx
from tests.test_fc_to_conv import crop_oracle

# The suite runs them (CI too); `pytest -m "not slow"` leaves them out of a quick loop.
pytestmark = pytest.mark.slow

FAMILIES = ["alexnet", "resnet18", "mobilenet_v2", "mobilenet_v3_small"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tv")


@pytest.fixture(scope="module")
def reports(repo: Path) -> dict[str, object]:
    out = {}
    for name in FAMILIES:
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)()
        spec = ExportSpec(
            source=f"torchvision.models:{name}",
            input_shape=(3, 224, 224),
            name=name,
            repository=repo,
        )
        out[name] = export_entry(model, spec)
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_family_exports_with_dense_variant(name: str, reports: dict) -> None:
    report = reports[name]
    assert report.parity_max_abs_diff < 1e-3
    assert report.dense_parity_max_abs_diff < 1e-3
    assert report.geometry.stride == (32, 32)
    assert report.geometry.window == (224, 224)
    assert report.geometry.exact is False  # zero padding: reported, not hidden
    assert report.check.cells == 15
    # The recorded deviation, against an independent measurement: PyTorch's own model on each
    # crop of another random input against the dense ONNX file in ONNX Runtime.
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    image = np.random.default_rng(11).standard_normal((3, 224, 288)).astype(np.float32)
    oracle = crop_oracle(model, image, (224, 224), (32, 32))  # [1000, 1, 3]
    session = ort.InferenceSession(str(report.dense_path), providers=["CPUExecutionProvider"])
    dense = session.run(None, {"input": image[None]})[0][0][:, :1, :3]
    measured = float(np.abs(dense - oracle).max())
    # Elsewhere both figures are the zero padding's effect, on two different inputs: they agree
    # within a factor. The untrained MobileNets answer nearly the same for any input, so for
    # them both figures are float noise and only need to be that small.
    if report.check.max_abs_dev < 1e-6:
        assert measured < 1e-6
    else:
        assert report.check.max_abs_dev / 4 < measured < report.check.max_abs_dev * 4
    meta = {p.key: json.loads(p.value) for p in onnx.load(str(report.dense_path)).metadata_props}
    assert meta["convserve.dense"]["max_abs_dev"] == pytest.approx(report.check.max_abs_dev)
    assert meta["convserve.dense"]["exact"] is False


def test_alexnet_at_384_gives_a_6x6_map(reports: dict) -> None:
    session = ort.InferenceSession(
        str(reports["alexnet"].dense_path), providers=["CPUExecutionProvider"]
    )
    out = session.run(None, {"input": np.zeros((1, 3, 384, 384), np.float32)})[0]
    assert out.shape == (1, 1000, 6, 6)


def test_alexnet_first_conv_is_flagged(reports: dict) -> None:
    uneven = reports["alexnet"].uneven
    assert len(uneven) == 1
    assert uneven[0].startswith("/features/features.0/Conv")
    assert "at 224x224; the last 1x1 px of its input (1x1 px of the image)" in uneven[0]


def test_mobilenet_v3_squeeze_excitation_stays_global(reports: dict) -> None:
    report = reports["mobilenet_v3_small"]
    assert report.global_pools  # SE blocks pool the whole input: approximate, and said so
    assert report.geometry.receptive_field is None


def test_vgg16_converts_and_matches_the_cs231n_table(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torchvision.models.vgg16().eval()
    path = tmp_path / "vgg16.onnx"
    write_onnx(model, torch.zeros(1, 3, 224, 224), path, {0: "batch"})
    found, _meta = inspect_file(path, (3, 224, 224))
    assert found.total_params == 138_357_544
    assert found.total_activations == 15_237_608
    text = render(found, {})
    assert "parameters: 138,357,544" in text and "15,237,608 values (61.0 MB fp32" in text
    # The conversion itself, in PyTorch: at the window the map is one cell equal to the
    # classifier's output; at 256x256 it is a 2x2 map, one cell per 32-px step.
    dense = to_dense(model, (3, 224, 224)).module
    image = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        window = image[:, :, :224, :224]
        torch.testing.assert_close(dense(window)[:, :, 0, 0], model(window), atol=1e-4, rtol=0)
        assert dense(image).shape == (2, 1000, 2, 2)


@pytest.mark.parametrize(
    ("name", "converted"),
    [
        ("shufflenet_v2_x0_5", "(mean over [7, 7]) -> AvgPool2d"),  # pooling and flatten in one
        ("convnext_tiny", "'avgpool' (AdaptiveAvgPool2d) -> AvgPool2d"),  # channels-last blocks
    ],
)
def test_mean_and_channels_last_heads_convert_and_one_cell_is_the_classifier(
    name: str, converted: str
) -> None:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    dense = to_dense(model, (3, 224, 224))
    assert any(converted in line for line in dense.converted), dense.converted
    image = torch.from_numpy(np.random.default_rng(3).standard_normal((1, 3, 224, 224)))
    with torch.no_grad():
        one_cell = dense.module(image.float())
        expected = model(image.float())
        assert dense.module(torch.zeros(1, 3, 288, 256)).shape == (1, 1000, 3, 2)
    assert one_cell.shape == (1, 1000, 1, 1)
    torch.testing.assert_close(one_cell[:, :, 0, 0], expected, atol=1e-5, rtol=0)
