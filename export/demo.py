"""The bundled demo model ``digits``: a small padding-free CNN on scikit-learn's handwritten digits.

The data ships inside scikit-learn (1,797 8x8 images, 16 grey levels), so nothing is downloaded.
Training is deterministic under a fixed seed. The network has no padding, so its dense variant is
exactly crop-equivalent: a strip of digits side by side yields a map with one cell per 2 pixels.
``digits_int8`` is the same model in int8, quantized from the fp32 files, calibrated on training
digits and measured on the held-out ones.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from model_format import INPUT_NAME, MODEL_FILE, Preprocess, read_model_info

from .calibration import Samples, normalise
from .errors import ExportError
from .model_entry import ExportReport, ExportSpec, export_entry
from .precision import PrecisionReport, PrecisionSpec, derive

__all__ = [
    "DigitsNet",
    "TrainedDigits",
    "digits_samples",
    "digits_split",
    "held_out_accuracy",
    "make_demo",
    "make_int8",
    "train_digits",
]

SEED = 0
WINDOW = 8
# scikit-learn's digits hold 0..16; an 8-bit image of one holds round(value * 255 / 16).
LEVELS = 16
EPOCHS = 60
NAME = "digits"
INT8_NAME = "digits_int8"
CALIBRATION_SAMPLES = 256
DEMO_CONFIG = {"dynamic_batching": {"max_queue_delay_microseconds": 2000}}
"""The demo's serving knobs. A model this small costs the server far more than it computes, so
requests are gathered for up to 2 ms to share one batch, which ends as soon as as many have come
as the last full window gathered (see service/engine/batcher.py; docs/benchmarks.md has the
measured gain)."""


class DigitsNet(nn.Module):
    """Two 3x3 convolutions, a 2x2 max-pool and two fully-connected layers; no padding."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(64 * 2 * 2, 128),
            nn.ReLU(),
            nn.Dropout(0.25),
            nn.Linear(128, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, 10]`` for ``[N, 1, 8, 8]`` normalised images."""
        logits: torch.Tensor = self.classifier(torch.flatten(self.features(x), 1))
        return logits


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train and held-out images (uint8 ``[N, 8, 8]``, 0..255) and labels, split 80/20, fixed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255 / LEVELS)).astype(np.uint8)
    x_train, x_test, y_train, y_test = train_test_split(
        images,
        digits.target,
        test_size=0.2,
        random_state=SEED,
        stratify=digits.target,
    )
    return x_train, x_test, y_train, y_test


@dataclass(frozen=True)
class TrainedDigits:
    """A trained :class:`DigitsNet` with its input normalisation and held-out accuracy."""

    model: DigitsNet
    mean: float
    std: float
    accuracy: float


def _shifted(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # Random translation by up to one pixel, so cells between two digits stay calm.
    dy, dx = (int(v) for v in torch.randint(-1, 2, (2,), generator=generator))
    padded = nn.functional.pad(batch, (1, 1, 1, 1))
    return padded[:, :, 1 + dy : 1 + dy + WINDOW, 1 + dx : 1 + dx + WINDOW]


def train_digits(
    epochs: int = EPOCHS, on_epoch: Callable[[int, float], None] = lambda _e, _l: None
) -> TrainedDigits:
    """Train :class:`DigitsNet` deterministically and measure it on the held-out split."""
    x_train, x_test, y_train, y_test = digits_split()
    train = torch.from_numpy(x_train).float().unsqueeze(1) / 255
    mean, std = float(train.mean()), float(train.std())
    inputs, targets = (train - mean) / std, torch.from_numpy(y_train).long()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same bits on any machine
    try:
        torch.manual_seed(SEED)
        generator = torch.Generator().manual_seed(SEED)
        model = DigitsNet()
        optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, epochs)
        for epoch in range(epochs):
            model.train()
            order = torch.randperm(len(inputs), generator=generator)
            total = 0.0
            for start in range(0, len(order), 64):
                rows = order[start : start + 64]
                optimiser.zero_grad()
                loss = nn.functional.cross_entropy(
                    model(_shifted(inputs[rows], generator)), targets[rows]
                )
                loss.backward()  # type: ignore[no-untyped-call]
                optimiser.step()
                total += loss.item() * len(rows)
            schedule.step()
            on_epoch(epoch, total / len(order))
        model.eval()
        test = (torch.from_numpy(x_test).float().unsqueeze(1) / 255 - mean) / std
        with torch.no_grad():
            predicted = model(test).argmax(1).numpy()
    finally:
        torch.set_num_threads(threads)
    return TrainedDigits(model, mean, std, float(np.mean(predicted == y_test)))


def digits_samples(preprocess: Preprocess, count: int = CALIBRATION_SAMPLES) -> Samples:
    """The first ``count`` training digits to calibrate on; the held-out split to measure on."""
    x_train, x_test, _y_train, _y_test = digits_split()
    return Samples(
        calibration=normalise(x_train[:count, None], preprocess),
        held_out=normalise(x_test[:, None], preprocess),
        calibration_source=f"{min(count, len(x_train))} training digits",
        held_out_source=f"{len(x_test)} held-out digits",
    )


def held_out_accuracy(path: Path) -> float:
    """Share of the held-out digits an exported classifier file names correctly."""
    from .onnx_export import ort_session

    metadata = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    preprocess = read_model_info(metadata).preprocess
    if preprocess is None:
        raise ExportError(f"'{path}' carries no preprocessing")
    _x_train, x_test, _y_train, y_test = digits_split()
    session: Any = ort_session(path)
    logits = session.run(None, {INPUT_NAME: normalise(x_test[:, None], preprocess)})[0]
    return float(np.mean(logits.argmax(axis=1) == y_test))


def make_int8(
    repository: Path,
    samples: int = CALIBRATION_SAMPLES,
    progress: Callable[[str], None] = lambda _s: None,
) -> PrecisionReport:
    """Quantize ``repository/digits/1`` into ``repository/digits_int8/1``, with its config.

    Raises:
        ExportError: int8 agrees with fp32 on fewer than 99 % of the held-out digits.
    """
    source = repository / NAME / "1"
    metadata = {p.key: p.value for p in onnx.load(str(source / MODEL_FILE)).metadata_props}
    preprocess = read_model_info(metadata).preprocess
    if preprocess is None:
        raise ExportError(f"'{source / MODEL_FILE}' carries no preprocessing to calibrate with")
    report = derive(
        source,
        repository / INT8_NAME / "1",
        PrecisionSpec("int8"),
        digits_samples(preprocess, samples),
        progress,
    )
    _write_config(repository / INT8_NAME)
    return report


def _write_config(folder: Path) -> None:
    (folder / "config.json").write_text(json.dumps(DEMO_CONFIG, indent=2) + "\n")


def make_demo(
    repository: Path,
    on_epoch: Callable[[int, float], None] = lambda _e, _l: None,
    progress: Callable[[str], None] = lambda _s: None,
    samples: int = CALIBRATION_SAMPLES,
) -> tuple[TrainedDigits, ExportReport, PrecisionReport]:
    """Train the digits model, export it as ``repository/digits/1`` with its dense variant.

    Also writes the entry's ``config.json`` (:data:`DEMO_CONFIG`) and ``digits_int8``
    (:func:`make_int8`, calibrated on ``samples`` training digits).
    """
    trained = train_digits(on_epoch=on_epoch)
    spec = ExportSpec(
        source="export.demo:DigitsNet",
        input_shape=(1, WINDOW, WINDOW),
        name=NAME,
        repository=repository,
        version=1,
        labels=tuple(str(d) for d in range(10)),
        preprocess=Preprocess("L", 1 / 255, (trained.mean,), (trained.std,)),
    )
    report = export_entry(trained.model, spec, progress)
    _write_config(repository / NAME)
    return trained, report, make_int8(repository, samples, progress)
