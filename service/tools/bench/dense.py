"""Dense evaluation against crop-by-crop, through a running server."""

from __future__ import annotations

import io
import statistics
import time
from typing import Any

import numpy as np

__all__ = ["dense_comparison"]


def dense_comparison(address: str, model: str, repeats: int) -> dict[str, Any]:
    """Median ClassifyDense time in dense and in crops mode, alternated, on one image.

    The image is 384x384 for networks with large windows, and a strip 125 windows long for
    small ones (the demo model).
    """
    import grpc
    from PIL import Image

    from service._generated.convserve.v1 import classifier_pb2 as pb
    from service._generated.convserve.v1 import classifier_pb2_grpc as pb_grpc

    with grpc.insecure_channel(
        address,
        options=[
            ("grpc.max_send_message_length", 256 << 20),
            ("grpc.max_receive_message_length", 256 << 20),
        ],
    ) as channel:
        stub = pb_grpc.ClassifierStub(channel)  # type: ignore[no-untyped-call]
        described = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
        entry = described[model]
        window = list(entry.window)
        size = (window[0] * 125, window[1]) if window[0] < 64 else (384, 384)
        shape = (size[1], size[0], 3) if entry.channels == 3 else (size[1], size[0])
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)).save(
            buffer, format="PNG"
        )
        dense = pb.ClassifyDenseRequest(
            model=model, return_map=False, image=pb.Image(encoded=buffer.getvalue())
        )
        crops = pb.ClassifyDenseRequest()
        crops.CopyFrom(dense)
        crops.mode = pb.MODE_CROPS

        def timed(request: pb.ClassifyDenseRequest) -> float:
            started = time.perf_counter()
            stub.ClassifyDense(request, timeout=600)
            return time.perf_counter() - started

        cells = stub.ClassifyDense(dense).cells
        timed(crops)
        dense_s, crops_s = [], []
        for _ in range(repeats):
            dense_s.append(timed(dense))
            crops_s.append(timed(crops))
    dense_ms, crops_ms = statistics.median(dense_s) * 1000, statistics.median(crops_s) * 1000
    return {
        "model": model,
        "cells": cells,
        "dense_ms": dense_ms,
        "crops_ms": crops_ms,
        "crops_over_dense": crops_ms / dense_ms,
    }
