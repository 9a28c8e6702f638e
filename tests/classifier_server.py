"""The classifier tests' model repository and server, and the calls they make to it."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from export.model_entry import ExportSpec, export_entry
from service import BUNDLED_REPOSITORY
from service._generated.convserve.v1 import classifier_pb2 as pb
from service.tools.server_process import ServerProcess

# Small limits, so that the tests can reach each of them with small images.
SERVER_FLAGS = (
    "--max-image-bytes",
    "200000",
    "--max-image-pixels",
    "1000000",
    "--max-request-pixels",
    "3000000",
    "--max-map-cells",
    "5000",
    "--max-dense-copies",
    "16",
)


def png(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def padded_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 4 * 4, 3),
    ).eval()


def export_repository(root: Path) -> Path:
    """The demo model ``digits`` and ``padded``, a network whose dense map is not exact."""
    shutil.copytree(BUNDLED_REPOSITORY / "digits", root / "digits")
    export_entry(
        padded_net(),
        ExportSpec(source="tests:padded", input_shape=(1, 8, 8), name="padded", repository=root),
    )
    return root


def start_server(repository: Path) -> ServerProcess:
    """A server on ``repository`` with :data:`SERVER_FLAGS` (enter it to start it)."""
    return ServerProcess(repository, *SERVER_FLAGS)


def probabilities(reply_map: pb.ScoreMap) -> np.ndarray:
    return np.frombuffer(reply_map.fp32_probabilities, np.float32).reshape(tuple(reply_map.shape))


CLASSIFY_IMAGES = 128
"""The most images the server takes in one Classify of digits (max_batch_size 32 x 4)."""


def classify_all(stub, images: list[np.ndarray]) -> np.ndarray:
    """Full probability vectors ([N, 10]) from Classify, one image per row.

    Sent :data:`CLASSIFY_IMAGES` at a time, the most one request may carry.
    """
    out = np.zeros((len(images), 10), np.float32)
    for start in range(0, len(images), CLASSIFY_IMAGES):
        part = images[start : start + CLASSIFY_IMAGES]
        reply = stub.Classify(
            pb.ClassifyRequest(
                model="digits", top_k=10, images=[pb.Image(encoded=png(image)) for image in part]
            )
        )
        for row, result in enumerate(reply.results, start):
            for entry in result.top:
                out[row, entry.index] = entry.probability
    return out
