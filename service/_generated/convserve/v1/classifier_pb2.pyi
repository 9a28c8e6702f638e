from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Pool(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POOL_MEAN: _ClassVar[Pool]
    POOL_MAX: _ClassVar[Pool]

class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODE_DENSE: _ClassVar[Mode]
    MODE_CROPS: _ClassVar[Mode]

class MapFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MAP_FORMAT_FP32: _ClassVar[MapFormat]
    MAP_FORMAT_FP16: _ClassVar[MapFormat]
    MAP_FORMAT_TOP_K: _ClassVar[MapFormat]
POOL_MEAN: Pool
POOL_MAX: Pool
MODE_DENSE: Mode
MODE_CROPS: Mode
MAP_FORMAT_FP32: MapFormat
MAP_FORMAT_FP16: MapFormat
MAP_FORMAT_TOP_K: MapFormat

class Tensor(_message.Message):
    __slots__ = ("shape", "fp32_data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    FP32_DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    fp32_data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., fp32_data: _Optional[bytes] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("encoded", "tensor")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    tensor: Tensor
    def __init__(self, encoded: _Optional[bytes] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Label(_message.Message):
    __slots__ = ("label", "index", "probability")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    label: str
    index: int
    probability: float
    def __init__(self, label: _Optional[str] = ..., index: _Optional[int] = ..., probability: _Optional[float] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("model", "version", "images", "top_k")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    images: _containers.RepeatedCompositeFieldContainer[Image]
    top_k: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., top_k: _Optional[int] = ...) -> None: ...

class Classification(_message.Message):
    __slots__ = ("top",)
    TOP_FIELD_NUMBER: _ClassVar[int]
    top: _containers.RepeatedCompositeFieldContainer[Label]
    def __init__(self, top: _Optional[_Iterable[_Union[Label, _Mapping]]] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("model", "version", "results")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    results: _containers.RepeatedCompositeFieldContainer[Classification]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., results: _Optional[_Iterable[_Union[Classification, _Mapping]]] = ...) -> None: ...

class ClassifyDenseRequest(_message.Message):
    __slots__ = ("model", "version", "image", "top_k", "stride_divisor", "scales", "pool", "return_map", "mode", "map_format")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    STRIDE_DIVISOR_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    RETURN_MAP_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    MAP_FORMAT_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    image: Image
    top_k: int
    stride_divisor: int
    scales: _containers.RepeatedScalarFieldContainer[float]
    pool: Pool
    return_map: bool
    mode: Mode
    map_format: MapFormat
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., top_k: _Optional[int] = ..., stride_divisor: _Optional[int] = ..., scales: _Optional[_Iterable[float]] = ..., pool: _Optional[_Union[Pool, str]] = ..., return_map: bool = ..., mode: _Optional[_Union[Mode, str]] = ..., map_format: _Optional[_Union[MapFormat, str]] = ...) -> None: ...

class Geometry(_message.Message):
    __slots__ = ("stride", "window", "offset", "receptive_field", "exact", "max_abs_dev", "top1_agreement")
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    RECEPTIVE_FIELD_FIELD_NUMBER: _ClassVar[int]
    EXACT_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_DEV_FIELD_NUMBER: _ClassVar[int]
    TOP1_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    stride: _containers.RepeatedScalarFieldContainer[int]
    window: _containers.RepeatedScalarFieldContainer[int]
    offset: _containers.RepeatedScalarFieldContainer[int]
    receptive_field: _containers.RepeatedScalarFieldContainer[int]
    exact: bool
    max_abs_dev: float
    top1_agreement: float
    def __init__(self, stride: _Optional[_Iterable[int]] = ..., window: _Optional[_Iterable[int]] = ..., offset: _Optional[_Iterable[int]] = ..., receptive_field: _Optional[_Iterable[int]] = ..., exact: bool = ..., max_abs_dev: _Optional[float] = ..., top1_agreement: _Optional[float] = ...) -> None: ...

class ScoreMap(_message.Message):
    __slots__ = ("shape", "fp32_probabilities", "scale", "cell_starts", "format", "fp16_probabilities", "top_classes", "top_probabilities", "classes")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    FP32_PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    CELL_STARTS_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    FP16_PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    TOP_CLASSES_FIELD_NUMBER: _ClassVar[int]
    TOP_PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    fp32_probabilities: bytes
    scale: float
    cell_starts: _containers.RepeatedCompositeFieldContainer[CellStarts]
    format: MapFormat
    fp16_probabilities: bytes
    top_classes: bytes
    top_probabilities: bytes
    classes: int
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., fp32_probabilities: _Optional[bytes] = ..., scale: _Optional[float] = ..., cell_starts: _Optional[_Iterable[_Union[CellStarts, _Mapping]]] = ..., format: _Optional[_Union[MapFormat, str]] = ..., fp16_probabilities: _Optional[bytes] = ..., top_classes: _Optional[bytes] = ..., top_probabilities: _Optional[bytes] = ..., classes: _Optional[int] = ...) -> None: ...

class CellStarts(_message.Message):
    __slots__ = ("starts",)
    STARTS_FIELD_NUMBER: _ClassVar[int]
    starts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, starts: _Optional[_Iterable[int]] = ...) -> None: ...

class DenseLabel(_message.Message):
    __slots__ = ("label", "index", "probability", "best_cell", "box")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    BEST_CELL_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    label: str
    index: int
    probability: float
    best_cell: _containers.RepeatedScalarFieldContainer[int]
    box: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, label: _Optional[str] = ..., index: _Optional[int] = ..., probability: _Optional[float] = ..., best_cell: _Optional[_Iterable[int]] = ..., box: _Optional[_Iterable[int]] = ...) -> None: ...

class ClassifyDenseResponse(_message.Message):
    __slots__ = ("model", "version", "mode", "geometry", "map", "top", "pool", "scales", "cells")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    GEOMETRY_FIELD_NUMBER: _ClassVar[int]
    MAP_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    CELLS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    mode: Mode
    geometry: Geometry
    map: ScoreMap
    top: _containers.RepeatedCompositeFieldContainer[DenseLabel]
    pool: Pool
    scales: _containers.RepeatedScalarFieldContainer[float]
    cells: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., mode: _Optional[_Union[Mode, str]] = ..., geometry: _Optional[_Union[Geometry, _Mapping]] = ..., map: _Optional[_Union[ScoreMap, _Mapping]] = ..., top: _Optional[_Iterable[_Union[DenseLabel, _Mapping]]] = ..., pool: _Optional[_Union[Pool, str]] = ..., scales: _Optional[_Iterable[float]] = ..., cells: _Optional[int] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelDescription(_message.Message):
    __slots__ = ("name", "version", "labels", "window", "channels", "dense", "geometry", "precision")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    DENSE_FIELD_NUMBER: _ClassVar[int]
    GEOMETRY_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    labels: int
    window: _containers.RepeatedScalarFieldContainer[int]
    channels: int
    dense: bool
    geometry: Geometry
    precision: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., labels: _Optional[int] = ..., window: _Optional[_Iterable[int]] = ..., channels: _Optional[int] = ..., dense: bool = ..., geometry: _Optional[_Union[Geometry, _Mapping]] = ..., precision: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelDescription]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelDescription, _Mapping]]] = ...) -> None: ...
