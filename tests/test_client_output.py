"""What the command-line client prints for people: headed tables, class names, helpful errors."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service import BUNDLED_REPOSITORY
from service.tools.server_process import ServerProcess


@pytest.fixture(scope="module")
def server() -> ServerProcess:
    with ServerProcess(BUNDLED_REPOSITORY) as running:
        yield running


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from export.demo import digits_split

    _x, x_test, _y, y_test = digits_split()
    picks = [int(np.flatnonzero(y_test == d)[3]) for d in (3, 1, 4, 0, 9)]
    folder = tmp_path_factory.mktemp("images")
    one, strip = folder / "four.png", folder / "strip.png"
    one.write_bytes(png(x_test[picks[2]]))
    strip.write_bytes(png(np.concatenate([x_test[i] for i in picks], axis=1)))
    return one, strip


def convserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_classify_prints_a_headed_table(server: ServerProcess, images: tuple[Path, Path]) -> None:
    result = convserve(
        "classify", str(images[0]), "--model", "digits", "--server", server.grpc_address,
        "--top-k", "3",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"{images[0]} (digits v1)"
    assert lines[1].split() == ["rank", "probability", "class"]
    assert lines[2].split()[0] == "1" and lines[2].split()[2:] == ["class", "4"]
    assert len(lines) == 5 and all(line == line.rstrip() for line in lines)


def test_a_dense_table_says_what_cell_and_box_mean(
    server: ServerProcess, images: tuple[Path, Path], tmp_path: Path
) -> None:
    heatmap = tmp_path / "four.png"
    result = convserve(
        "classify", str(images[1]), "--model", "digits", "--server", server.grpc_address, "--dense",
        "--heatmap", str(heatmap), "--heatmap-class", "4",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    header = result.stdout.splitlines()[1]
    assert "best cell [row, col]" in header and "box [x0, y0, x1, y1]" in header
    assert f"heat-map of {images[1]} (class 4): {heatmap}" in result.stderr
    assert Image.open(heatmap).size == (520, 168)


def test_a_heatmap_needs_a_dense_map(images: tuple[Path, Path]) -> None:
    result = convserve("classify", str(images[0]), "--heatmap", "out.png")
    assert result.returncode == 1
    assert "--heatmap and --heatmap-class need --dense" in result.stderr


def test_a_class_the_reply_does_not_hold_is_named(
    server: ServerProcess, images: tuple[Path, Path], tmp_path: Path
) -> None:
    result = convserve(
        "classify", str(images[1]), "--model", "digits", "--server", server.grpc_address, "--dense",
        "--heatmap", str(tmp_path / "x.png"), "--heatmap-class", "zebra",
    )  # fmt: skip
    assert result.returncode == 1
    assert "--heatmap-class 'zebra' is not among the 5 pooled classes" in result.stderr


def test_a_refused_connection_suggests_the_server_may_not_be_running() -> None:
    result = convserve("models", "--server", "127.0.0.1:1", "--timeout", "5")
    assert result.returncode == 1
    assert "is a convserve server running at 127.0.0.1:1?" in result.stderr
