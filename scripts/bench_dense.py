"""Dense pass versus crop-by-crop, through a real server, side by side in one run.

    python scripts/bench_dense.py [--repeats N] [--models alexnet resnet18 digits]

Exports torchvision's AlexNet and ResNet-18 at 224 (random weights) with their dense variants
into a temporary repository beside the bundled digits model, starts ``convserve serve`` in
another process, and times ClassifyDense on one 384x384 image (a 1000-pixel strip of digits for
the demo model) in the default dense mode and in ``mode=crops``, alternating the two so that
machine noise hits both alike. Prints medians and the crops/dense ratio.
"""

from __future__ import annotations

import argparse
import io
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service import BUNDLED_REPOSITORY  # noqa: E402
from service._generated.convserve.v1 import classifier_pb2 as pb  # noqa: E402
from service._generated.convserve.v1 import classifier_pb2_grpc as pb_grpc  # noqa: E402
from tests.server_process import ServerProcess  # noqa: E402


def export(name: str, repository: Path) -> None:
    """Export a torchvision classifier at 224 with its dense variant."""
    import torch
    import torchvision

    from export.model_entry import ExportSpec, Preprocess, export_entry

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)()
    export_entry(
        model,
        ExportSpec(
            source=f"torchvision.models:{name}",
            input_shape=(3, 224, 224),
            name=name,
            repository=repository,
            preprocess=Preprocess("RGB", 1 / 255, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ),
    )


def image_bytes(name: str) -> bytes:
    """A 384x384 RGB image, or for the demo model an 8x1000 strip of digits."""
    rng = np.random.default_rng(0)
    if name == "digits":
        pixels = rng.integers(0, 256, (8, 1000), dtype=np.uint8)
    else:
        pixels = rng.integers(0, 256, (384, 384, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def timed(stub: pb_grpc.ClassifierStub, request: pb.ClassifyDenseRequest) -> float:
    """Seconds one ClassifyDense call takes."""
    started = time.perf_counter()
    stub.ClassifyDense(request, timeout=600)
    return time.perf_counter() - started


def main() -> int:
    """Run the comparison and print one line per model."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=["alexnet", "resnet18", "digits"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        repository = Path(tmp)
        shutil.copytree(BUNDLED_REPOSITORY / "digits", repository / "digits")
        for name in args.models:
            if name != "digits":
                print(f"exporting {name} ...", flush=True)
                export(name, repository)
        with (
            ServerProcess(repository, "--max-message-bytes", str(64 << 20)) as server,
            grpc.insecure_channel(server.grpc_address) as channel,
        ):
            stub = pb_grpc.ClassifierStub(channel)
            print(
                f"{'model':<10} {'cells':>6} {'dense ms':>10} {'crops ms':>10} {'crops/dense':>12}"
            )
            for name in args.models:
                request = pb.ClassifyDenseRequest(
                    model=name, image=pb.Image(encoded=image_bytes(name)), return_map=False
                )
                crops = pb.ClassifyDenseRequest()
                crops.CopyFrom(request)
                crops.mode = pb.MODE_CROPS
                cells = stub.ClassifyDense(request).cells
                timed(stub, crops)  # warm both paths up
                dense_times, crop_times = [], []
                for _ in range(args.repeats):
                    dense_times.append(timed(stub, request))
                    crop_times.append(timed(stub, crops))
                dense_ms = statistics.median(dense_times) * 1000
                crops_ms = statistics.median(crop_times) * 1000
                print(
                    f"{name:<10} {cells:>6} {dense_ms:>10.1f} {crops_ms:>10.1f} "
                    f"{crops_ms / dense_ms:>11.1f}x",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
