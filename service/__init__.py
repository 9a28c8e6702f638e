"""The convserve server: KServe v2 and classification over gRPC on ONNX Runtime."""

from importlib import metadata as _metadata
from pathlib import Path

BUNDLED_REPOSITORY = Path(__file__).parent / "model_repository"
"""The model repository shipped as package data (the ``digits`` demo model)."""

try:
    __version__ = _metadata.version("convserve")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
