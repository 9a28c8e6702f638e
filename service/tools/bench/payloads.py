"""The requests the served steps send, built for the model the raw limit loaded."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np

from model_format import read_model_info
from service.tools.bench.steps import KSERVE_METHOD, STREAM_METHOD

if TYPE_CHECKING:
    from service.engine.runtime import Runtime

__all__ = ["classify_payload", "kserve_payload", "with_model"]


def kserve_payload(runtime: Runtime) -> bytes:
    """A serialised KServe ``ModelInferRequest`` of one input of the model's shape, batch 1."""
    from service._generated.inference import grpc_service_pb2 as pb

    spec = runtime.inputs[0]
    shape = [1, *spec.shape[1:]]
    request = pb.ModelInferRequest(
        model_name="",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name=spec.name, datatype=spec.datatype, shape=shape
            )
        ],
    )
    # The same kind of values as the raw run's (zeros could take faster paths in some kernels).
    values = np.random.default_rng(0).standard_normal(shape).astype(spec.dtype)
    request.raw_input_contents.append(values.tobytes())
    return bytes(request.SerializeToString())


def classify_payload(runtime: Runtime) -> bytes | None:
    """A serialised ``ClassifyRequest`` of one PNG of the model's window, or None.

    None where the model cannot classify images: no preprocessing recorded, or not 2-D.
    """
    from PIL import Image

    from service._generated.convserve.v1 import classifier_pb2 as pb

    info = read_model_info(runtime.metadata)
    if info.preprocess is None or info.window is None or len(info.window) != 2:
        return None
    mode = "RGB" if info.preprocess.color == "RGB" else "L"
    shape = (*info.window, 3) if mode == "RGB" else info.window
    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode).save(buffer, format="PNG")
    request = pb.ClassifyRequest(images=[pb.Image(encoded=buffer.getvalue())])
    return bytes(request.SerializeToString())


def with_model(payload: bytes, method: str, model: str) -> bytes:
    """``payload``, a serialised request for ``method``, asking for ``model``."""
    from service._generated.convserve.v1 import classifier_pb2
    from service._generated.inference import grpc_service_pb2

    if method in (KSERVE_METHOD, STREAM_METHOD):
        kserve = grpc_service_pb2.ModelInferRequest.FromString(payload)
        kserve.model_name = model
        return bytes(kserve.SerializeToString())
    classify = classifier_pb2.ClassifyRequest.FromString(payload)
    classify.model = model
    return bytes(classify.SerializeToString())
