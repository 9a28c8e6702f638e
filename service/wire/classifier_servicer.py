"""``convserve.v1.Classifier``: the application API, translating only (see classifier.proto)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias, overload

import grpc
import numpy as np

from model_format import DenseGeometry
from service._generated.convserve.v1 import classifier_pb2 as pb
from service._generated.convserve.v1 import classifier_pb2_grpc as pb_grpc
from service.classification.api import Classification
from service.classification.classify_dense import DenseResult
from service.classification.inputs import ImageInput
from service.classification.labels import Labelled
from service.classification.lookup import ModelRef
from service.classification.plan import DenseQuery
from service.core.errors import InvalidArgument
from service.engine.dataplane import Outcome
from service.engine.repository import ServedModel
from service.wire.codec import checked_frombuffer
from service.wire.rpc import deadline_of, inference_rpc, rpc

__all__ = ["ClassifierServicer", "classify_response", "dense_query", "dense_response"]

Context: TypeAlias = grpc.aio.ServicerContext
_POOLS = {pb.POOL_MEAN: "mean", pb.POOL_MAX: "max"}
_MODES = {pb.MODE_DENSE: "dense", pb.MODE_CROPS: "crops"}
_MAP_FORMATS = {
    pb.MAP_FORMAT_FP32: "fp32",
    pb.MAP_FORMAT_FP16: "fp16",
    pb.MAP_FORMAT_TOP_K: "top_k",
}
_MAP_FORMAT_NUMBERS = {name: number for number, name in _MAP_FORMATS.items()}


def _image(message: pb.Image, max_elements: int) -> ImageInput:
    source = message.WhichOneof("source")
    if source == "tensor":
        tensor = checked_frombuffer(
            "tensor", list(message.tensor.shape), "FP32", message.tensor.fp32_data, max_elements
        )
        return ImageInput(tensor=tensor)
    # None: neither is set (an empty ``encoded`` is set, and refused as an empty image).
    return ImageInput(encoded=message.encoded if source else None)


class _Images(Sequence[ImageInput]):
    """A Classify's images, each converted when it is first read.

    A request refused for its image count (checked before any image is read) then costs
    nothing per image, however many it carries.
    """

    def __init__(self, messages: Sequence[pb.Image], max_elements: int) -> None:
        self._messages = messages
        self._max_elements = max_elements
        self._converted: dict[int, ImageInput] = {}

    def __len__(self) -> int:
        return len(self._messages)

    @overload
    def __getitem__(self, index: int) -> ImageInput: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[ImageInput]: ...

    def __getitem__(self, index: int | slice) -> ImageInput | Sequence[ImageInput]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = range(len(self))[index]  # a negative index counts from the end; out of range
        if index not in self._converted:
            self._converted[index] = _image(self._messages[index], self._max_elements)
        return self._converted[index]


def _label(entry: Labelled) -> pb.Label:
    return pb.Label(label=entry.label, index=entry.index, probability=entry.probability)


def _geometry(info: DenseGeometry, stride: tuple[int, ...]) -> pb.Geometry:
    return pb.Geometry(
        stride=list(stride),
        window=list(info.window),
        offset=list(info.offset),
        receptive_field=list(info.receptive_field or ()),
        exact=info.exact,
        max_abs_dev=info.max_abs_dev,
        top1_agreement=info.top1_agreement,
    )


def classify_response(
    model: ServedModel, results: Sequence[Sequence[Labelled]]
) -> pb.ClassifyResponse:
    """The Classify answer: ``model``'s top-k labels per image, in order (gRPC's and REST's)."""
    return pb.ClassifyResponse(
        model=model.name,
        version=str(model.version),
        results=[pb.Classification(top=[_label(e) for e in top]) for top in results],
    )


def dense_query(request: pb.ClassifyDenseRequest) -> DenseQuery:
    """A ClassifyDense request's options, its enums checked (gRPC's and REST's)."""
    return DenseQuery(
        top_k=request.top_k,
        divisor=request.stride_divisor or 1,
        scales=tuple(request.scales) or (1.0,),
        pool=_known(_POOLS, request.pool, "pool", pb.Pool),
        mode=_known(_MODES, request.mode, "mode", pb.Mode),
        return_map=request.return_map if request.HasField("return_map") else True,
        map_format=_known(_MAP_FORMATS, request.map_format, "map_format", pb.MapFormat),
    )


def dense_response(result: DenseResult, query: DenseQuery) -> pb.ClassifyDenseResponse:
    """The ClassifyDense answer of ``result`` (gRPC's and REST's)."""
    response = pb.ClassifyDenseResponse(
        model=result.model.name.removesuffix("_dense"),
        version=str(result.model.version),
        mode=pb.MODE_CROPS if query.mode == "crops" else pb.MODE_DENSE,
        geometry=_geometry(result.geometry, result.stride),
        pool=pb.POOL_MAX if query.pool == "max" else pb.POOL_MEAN,
        scales=list(result.scales),
        cells=result.cells,
    )
    for entry in result.top:
        response.top.add(
            label=entry.label,
            index=entry.index,
            probability=entry.probability,
            best_cell=list(entry.best_cell),
            box=list(entry.box),
        )
    if result.probabilities is not None:
        _score_map(response.map, result)
    return response


def _score_map(score_map: pb.ScoreMap, result: DenseResult) -> None:
    """The map in its format; every array little-endian, as classifier.proto says."""
    assert result.probabilities is not None
    score_map.shape.extend(result.probabilities.shape)
    score_map.format = _MAP_FORMAT_NUMBERS[result.map_format]
    score_map.classes = result.classes
    score_map.scale = result.scales[0]
    if result.map_format == "fp32":
        score_map.fp32_probabilities = _little_endian(result.probabilities, "<f4")
    elif result.map_format == "fp16":
        score_map.fp16_probabilities = _little_endian(result.probabilities, "<f2")
    else:
        assert result.top_classes is not None
        index_type = "u1" if result.top_classes.dtype.itemsize == 1 else "<u2"
        score_map.top_classes = _little_endian(result.top_classes, index_type)
        score_map.top_probabilities = _little_endian(result.probabilities, "<f2")
    for starts in result.starts:
        score_map.cell_starts.add(starts=starts)


def _little_endian(values: np.ndarray, dtype: str) -> bytes:
    return np.ascontiguousarray(values, np.dtype(dtype)).tobytes()


class ClassifierServicer(pb_grpc.ClassifierServicer):
    """See the module docstring."""

    def __init__(self, classification: Classification, max_elements: int) -> None:
        self.lifecycle = classification.lifecycle
        self._classification = classification
        self._max_elements = max_elements

    @inference_rpc("classify")
    async def Classify(
        self, request: pb.ClassifyRequest, context: Context, outcome: Outcome
    ) -> pb.ClassifyResponse:
        model, results = await self._classification.classify(
            ModelRef(request.model, request.version),
            _Images(request.images, self._max_elements),
            request.top_k,
            deadline_of(context),
            outcome,
        )
        return classify_response(model, results)

    @inference_rpc("dense")
    async def ClassifyDense(
        self, request: pb.ClassifyDenseRequest, context: Context, outcome: Outcome
    ) -> pb.ClassifyDenseResponse:
        query = dense_query(request)
        image = _image(request.image, self._max_elements)
        result = await self._classification.classify_dense(
            ModelRef(request.model, request.version), image, query, deadline_of(context), outcome
        )
        return dense_response(result, query)

    @rpc
    async def ListModels(
        self, request: pb.ListModelsRequest, context: Context
    ) -> pb.ListModelsResponse:
        response = pb.ListModelsResponse()
        for model, twin in self._classification.models_with_twins():
            info = model.info
            classes = model.outputs[0].shape[1] if len(model.outputs[0].shape) > 1 else 0
            entry = response.models.add(
                name=model.name,
                version=str(model.version),
                labels=len(info.labels) if info.labels else max(classes, 0),
                window=list(info.window or model.inputs[0].shape[2:]),
                channels=info.channels or max(model.inputs[0].shape[1], 0),
                dense=twin is not None,
                precision=model.precision,
            )
            geometry = (twin.info.dense or info.dense) if twin else None
            if geometry is not None:
                entry.geometry.CopyFrom(_geometry(geometry, geometry.stride))
        return response


def _known(table: Mapping[Any, str], value: int, field: str, enum: Any) -> str:
    """An enum field's meaning, refusing a number the proto does not define.

    Such a number (from a newer or a hand-written client) is not taken for the default.
    """
    if value not in table:
        names = ", ".join(f"{enum.Name(v)} ({v})" for v in sorted(table))
        raise InvalidArgument(f"{field} {value} is not one of {names}")
    return table[value]
