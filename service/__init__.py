"""The convserve server: KServe v2 and classification over gRPC on ONNX Runtime."""

from pathlib import Path

BUNDLED_REPOSITORY = Path(__file__).parent / "model_repository"
"""The model repository shipped as package data (the ``digits`` demo model)."""
