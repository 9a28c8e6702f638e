"""ListModels, and the convserve client commands (classify, classify --dense, models)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from service._generated.convserve.v1 import classifier_pb2 as pb
from service.tools.server_process import ServerProcess
from tests.classifier_server import png


def test_list_models(classifier_stub) -> None:
    models = {m.name: m for m in classifier_stub.ListModels(pb.ListModelsRequest()).models}
    assert set(models) == {"digits", "padded"}
    digits = models["digits"]
    assert (digits.version, digits.labels, list(digits.window), digits.channels, digits.dense) == (
        "1",
        10,
        [8, 8],
        1,
        True,
    )
    assert list(digits.geometry.stride) == [2, 2] and digits.geometry.exact


def test_client_commands(classifier_server: ServerProcess, held_out, tmp_path: Path) -> None:
    x_test, y_test = held_out
    one = tmp_path / "one.png"
    one.write_bytes(png(x_test[7]))
    strip = tmp_path / "strip.png"
    strip.write_bytes(png(np.concatenate([x_test[i] for i in range(5)], axis=1)))

    def convserve(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "service", *args, "--server", classifier_server.grpc_address],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    result = convserve("classify", str(one), "--model", "digits", "--json")
    assert result.returncode == 0, result.stderr
    [document] = json.loads(result.stdout)
    assert document["image"] == str(one) and document["model"] == "digits"
    assert document["top"][0]["index"] == y_test[7]
    assert set(document["top"][0]) == {"label", "index", "probability"}

    heatmap = tmp_path / "heat.png"
    result = convserve(
        "classify", str(strip), "--model", "digits", "--dense", "--json", "--heatmap", str(heatmap)
    )
    assert result.returncode == 0, result.stderr
    [document] = json.loads(result.stdout)
    assert document["map_shape"] == [10, 1, 17] and document["stride"] == [2, 2]
    assert document["window"] == [8, 8] and document["exact"] is True
    assert set(document) == {
        "image",
        "model",
        "version",
        "mode",
        "map_shape",
        "stride",
        "window",
        "offset",
        "exact",
        "pool",
        "top",
    }
    assert set(document["top"][0]) == {"label", "index", "probability", "best_cell", "box"}
    # enlarged 13x (at least 512 px on the long side), a 64 px legend below
    assert Image.open(heatmap).size == (520, 104 + 64) and f"heat-map of {strip}" in result.stderr

    result = convserve("models", "--json")
    assert result.returncode == 0, result.stderr
    models = {m["name"]: m for m in json.loads(result.stdout)}
    assert models["digits"] == {
        "name": "digits",
        "version": "1",
        "channels": 1,
        "window": [8, 8],
        "labels": 10,
        "dense": True,
        "stride": [2, 2],
        "exact": True,
        "precision": "fp32",
    }
    table = convserve("models")
    assert "digits" in table.stdout and "padded" in table.stdout

    failed = convserve("classify", str(one), "--model", "nope")
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert "error: NOT_FOUND: model 'nope' is not served" in failed.stderr
