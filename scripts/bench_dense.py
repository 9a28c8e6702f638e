"""Dense pass versus crop-by-crop for torchvision networks, through a real server, in one run.

    python scripts/bench_dense.py [--repeats N] [--models alexnet resnet18 digits]

Exports torchvision's AlexNet and ResNet-18 at 224 (random weights) with their dense variants
into a temporary repository beside the bundled digits model, starts ``convserve serve`` in
another process, and times ClassifyDense in dense mode and in ``mode=crops`` on one 384x384
image (a strip 125 windows long for the demo model), alternating the two so machine noise hits
both alike (``service.tools.bench.dense.dense_comparison``; ``convserve bench --dense`` does the
same for a model already in a repository). Needs the ``export`` extra.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service import BUNDLED_REPOSITORY  # noqa: E402
from service.tools.bench.dense import dense_comparison  # noqa: E402
from service.tools.server_process import ServerProcess  # noqa: E402


def export(name: str, repository: Path) -> None:
    """Export a torchvision classifier at 224 with its dense variant."""
    import torch
    import torchvision

    from export.model_entry import ExportSpec, export_entry
    from model_format import Preprocess

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)()
    preprocess = Preprocess("RGB", 1 / 255, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    export_entry(
        model,
        ExportSpec(
            source=f"torchvision.models:{name}",
            input_shape=(3, 224, 224),
            name=name,
            repository=repository,
            preprocess=preprocess,
        ),
    )


def main() -> int:
    """Export, serve, compare; one line per model."""
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
        with ServerProcess(repository, "--max-message-bytes", str(64 << 20)) as server:
            print(
                f"{'model':<10} {'cells':>6} {'dense ms':>10} {'crops ms':>10} {'crops/dense':>12}"
            )
            for name in args.models:
                row = dense_comparison(server.grpc_address, name, args.repeats)
                print(
                    f"{name:<10} {row['cells']:>6} {row['dense_ms']:>10.1f} "
                    f"{row['crops_ms']:>10.1f} {row['crops_over_dense']:>11.1f}x",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
