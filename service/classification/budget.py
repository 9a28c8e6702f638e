"""What one ClassifyDense request costs, from its plan alone: its answer's size and peak memory.

Both follow from the geometry, the image's size and the query, so a request over either limit is
refused before anything is decoded further, resized or run:

- The answer: the map in the requested format (:mod:`model_format.map_size`), its cell starts,
  the labels and a fixed allowance for the rest of the message, an upper bound. Over
  ``--max-response-bytes`` (by default what gRPC clients accept) it would fail on the client
  after all the work, so it is refused with the ways to a smaller one.
- The memory: the request's own arrays at their peak (the decoded image, the scaled tensor, the
  shifted copies of one runtime pass, the twin's raw output and the map, the answer) plus the
  activations of the largest pass it hands the runtime, ``rows x pixels x bytes per pixel``.
  The copies of a scale go to the runtime in passes of as many rows as fit in
  ``--dense-memory-bytes``, and no more than make :data:`PASS_PIXELS` when the copies are
  larger; if one copy alone does not fit, the request is refused. A row costs what
  :func:`~service.engine.batch.dense_row_bytes` says, the estimate by which the twin's batcher
  also keeps a batch that joins several requests' passes within ``--dense-memory-bytes``.

Activations per pixel of a dense pass: ``--dense-bytes-per-pixel``, or
:data:`~model_format.map_size.ESTIMATED_BYTES_PER_PIXEL`.
The crops of crops mode go through the classifier, whose fixed-size batches were warmed up at
load, so its activations are held by the model already and count nothing here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from model_format.map_size import ESTIMATED_BYTES_PER_PIXEL, map_bytes
from service.classification.chunks import CHUNKS_IN_FLIGHT
from service.core.errors import ResourceExhausted
from service.engine.batch import dense_row_bytes

if TYPE_CHECKING:
    from service.classification.plan import DenseLimits, DenseQuery, DenseTarget, ScalePass

__all__ = [
    "ESTIMATED_BYTES_PER_PIXEL",
    "PASS_PIXELS",
    "answer_bytes",
    "bytes_per_pixel",
    "check_answer",
    "runtime_rows",
]

PASS_PIXELS = 1 << 18
"""Copies of an image join one pass only up to these pixels together (one copy always goes):
a pass of a large image is all arithmetic, so several copies in one pass would save nothing
and only hold their activations at once."""

ANSWER_ALLOWANCE = 1024
"""Bytes for the answer's fixed fields: names, version, geometry, scales, pool, mode, cells."""

LABEL_ALLOWANCE = 64
"""Bytes of one located label besides its text: index, probability, best cell and box."""

VARINT_BYTES = 5
"""At most the bytes of one cell start (a non-negative int32) on the wire."""

ANSWER_COPIES = 3
"""The answer's map is held as arrays, as bytes, and in the serialized message."""


def bytes_per_pixel(limits: DenseLimits) -> int:
    """Activation bytes per input pixel of a dense pass (see the module)."""
    return limits.bytes_per_pixel or ESTIMATED_BYTES_PER_PIXEL


def answer_bytes(target: DenseTarget, query: DenseQuery, first: ScalePass, k: int) -> int:
    """An upper bound of the ClassifyDense answer's size, in bytes.

    ``k`` is the labels answered (the query's top_k, or its default).
    """
    labels = min(k, target.classes or k) * (target.label_bytes + LABEL_ALLOWANCE)
    fixed = ANSWER_ALLOWANCE + VARINT_BYTES * len(query.scales) + labels
    if not query.return_map:
        return fixed
    starts = sum(VARINT_BYTES * c + 2 * VARINT_BYTES for c in first.counts)
    return fixed + starts + map_bytes(first.counts, target.classes, query.map_format, k)


def check_answer(size: int, first: ScalePass, query: DenseQuery, limits: DenseLimits) -> None:
    """Refuse an answer over ``--max-response-bytes``, naming its size and the ways out.

    Raises:
        ResourceExhausted: ``size`` exceeds the limit.
    """
    if size <= limits.response_bytes:
        return
    cells = "x".join(map(str, reversed(first.counts)))
    raise ResourceExhausted(
        f"the answer would take up to {size} bytes (a {cells} map, {query.map_format}); the "
        f"server answers at most {limits.response_bytes} (--max-response-bytes, what clients "
        "accept by default): ask for a coarser stride_divisor, return_map=false, map_format "
        "FP16 or TOP_K with a small top_k, or a smaller first scale, or raise the client's "
        "message limit and start the server with a larger --max-response-bytes"
    )


def _arrays(target: DenseTarget, query: DenseQuery, size: Sequence[int], scale: ScalePass) -> int:
    """The request's own arrays while it evaluates ``scale``, without the pass's copies."""
    channels, classes = target.channels, max(target.classes, 1)
    decoded = channels * math.prod(size)
    pixels = math.prod(scale.size)
    scaled = 5 * channels * pixels if scale.scale != 1.0 else 4 * channels * pixels
    divisor = query.divisor
    raw = 4 * classes * math.prod(-(-c // divisor) * divisor for c in scale.counts)
    if query.mode == "crops":  # the crops of the chunks in flight, then the scores
        window = math.prod(target.geometry.window)
        crops = 4 * channels * window * CHUNKS_IN_FLIGHT * max(target.batch, 1)
        return decoded + scaled + crops + 2 * 4 * classes * scale.cells
    return decoded + scaled + raw + 4 * classes * scale.cells


def runtime_rows(
    target: DenseTarget,
    query: DenseQuery,
    size: Sequence[int],
    passes: Sequence[ScalePass],
    answer: int,
    limits: DenseLimits,
) -> tuple[int, ...]:
    """Per scale, the shifted copies one runtime pass takes, within ``--dense-memory-bytes``.

    Raises:
        ResourceExhausted: one copy of a scale does not fit with the request's arrays.
    """
    per_pixel = bytes_per_pixel(limits) if query.mode == "dense" else 0
    copies = query.divisor ** len(target.geometry.stride)
    kept = 4 * max(target.classes, 1) * passes[0].cells if len(passes) > 1 else 0
    rows = []
    for scale in passes:
        pixels = math.prod(scale.size)
        fixed = _arrays(target, query, size, scale) + kept + ANSWER_COPIES * answer
        if query.mode == "dense":  # a row: a shifted copy, the batch's copy of it, the pass
            per_row = dense_row_bytes((target.channels, *scale.size), per_pixel)
            fit = (limits.memory_bytes - fixed) // per_row
        else:
            per_row, fit = 0, copies if fixed <= limits.memory_bytes else 0
        if fit < 1:
            _refuse(scale, query, fixed + per_row, limits.memory_bytes, per_pixel)
        rows.append(int(min(fit, copies, max(target.batch, 1), max(1, PASS_PIXELS // pixels))))
    return tuple(rows)


def _refuse(scale: ScalePass, query: DenseQuery, need: int, memory: int, per_pixel: int) -> None:
    """Refuse a scale that takes ``need`` bytes, over ``memory``, naming the way out."""
    shown = "x".join(map(str, reversed(scale.size)))
    if query.mode == "dense":
        how = f"{query.mode} mode, one shifted copy at a time"
        flag = f"--dense-memory-bytes, {per_pixel} bytes a pixel of a dense pass"
        way_out = "send a smaller image or scale, or use mode=crops"
    else:
        how, flag, way_out = f"{query.mode} mode", "--dense-memory-bytes", "send a smaller image"
    raise ResourceExhausted(
        f"evaluating the image at scale {scale.scale:g} ({shown}, {how}) would take about {need} "
        f"bytes; the server gives one dense request at most {memory} ({flag}): {way_out}"
    )
