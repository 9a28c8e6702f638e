"""Export and inspect word the same figures the same way; uneven layers are one summary line."""

from __future__ import annotations

from pathlib import Path

import pytest

from export.cli import _print_report
from export.model_entry import ExportReport
from export.summaries import dense_agreement, uneven_summary


def test_dense_agreement_is_formatted_once() -> None:
    assert dense_agreement(False, 1.5748348236083984, 1.0) == (
        "approximate (padding or global pooling), max abs deviation 1.57, top-1 agreement 100.0%"
    )
    assert dense_agreement(True, 1.9e-06, 0.98765).startswith("exact (padding-free)")
    assert dense_agreement(True, 1.9e-06, 0.98765).endswith("top-1 agreement 98.8%")


def test_export_prints_uneven_layers_as_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    report = ExportReport(Path("repo/resnet18/1/model.onnx"), None, 1000, 1.2e-6)
    report.uneven = [f"/layer{i}/Conv: drops 1 px" for i in range(8)]
    _print_report(report)
    out = capsys.readouterr().out
    assert out.count("\n") == 4  # wrote, parity, the uneven summary, done
    assert uneven_summary(8, "repo/resnet18/1/model.onnx") in out
    assert "8 layers whose geometry does not divide evenly" in out
    assert "convserve inspect repo/resnet18/1/model.onnx lists them" in out
