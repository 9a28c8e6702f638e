"""check_request on its own: small model stand-ins, no server, no ONNX Runtime session."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from model_format import ModelInfo
from service.core.errors import InvalidArgument
from service.core.types import InferenceRequest, RequestedOutput
from service.engine.runtime import TensorSpec
from service.engine.validation import check_request


def model(
    inputs: list[TensorSpec] | None = None,
    outputs: list[TensorSpec] | None = None,
    max_batch_size: int = 4,
    dense: bool = False,
    window: tuple[int, ...] | None = None,
) -> SimpleNamespace:
    """What check_request reads of a ServedModel."""
    return SimpleNamespace(
        name="digits",
        inputs=inputs or [TensorSpec("input", "FP32", (-1, 1, 8, 8))],
        outputs=outputs or [TensorSpec("logits", "FP32", (-1, 10))],
        max_batch_size=max_batch_size,
        dense=dense,
        info=ModelInfo(window=window),
    )


def request(
    inputs: dict[str, np.ndarray] | None = None, outputs: list[RequestedOutput] | None = None
) -> InferenceRequest:
    images = np.zeros((2, 1, 8, 8), np.float32)
    return InferenceRequest("digits", "", "", inputs or {"input": images}, outputs or [])


def refused(request: InferenceRequest, served: SimpleNamespace) -> str:
    with pytest.raises(InvalidArgument) as error:
        check_request(request, served)
    return str(error.value)


def test_a_fitting_request_gives_its_images_and_shape_key() -> None:
    assert check_request(request(), model()) == (2, ((1, 8, 8),))


def test_the_key_holds_the_variable_dimensions() -> None:
    served = model([TensorSpec("input", "FP32", (-1, 1, -1, -1))], dense=True, window=(8, 8))
    wide = request({"input": np.zeros((1, 1, 8, 20), np.float32)})
    tall = request({"input": np.zeros((3, 1, 20, 8), np.float32)})
    assert check_request(wide, served) == (1, ((1, 8, 20),))
    assert check_request(tall, served) == (3, ((1, 20, 8),))


def test_missing_and_unknown_inputs_are_named() -> None:
    assert refused(request({"mask": np.zeros(1, np.float32)}), model()) == (
        "input 'input' is missing; model 'digits' takes inputs ['input']"
    )
    extra = request({"input": np.zeros((1, 1, 8, 8), np.float32), "mask": np.zeros(1)})
    assert refused(extra, model()) == (
        "input 'mask' is unknown; model 'digits' takes inputs ['input']"
    )


def test_an_unknown_output_is_named() -> None:
    message = refused(request(outputs=[RequestedOutput("probabilities")]), model())
    assert message == "output 'probabilities' is unknown; model 'digits' has outputs ['logits']"


def test_classification_needs_one_class_axis() -> None:
    served = model(outputs=[TensorSpec("logits", "FP32", (-1, 10, -1, -1))])
    message = refused(request(outputs=[RequestedOutput("logits", classification=3)]), served)
    assert message.startswith("output 'logits' is [-1, 10, -1, -1]: the classification parameter")
    ranked = model(outputs=[TensorSpec("logits", "FP32", (-1, 10, 1, 1))])
    wanted = request(outputs=[RequestedOutput("logits", classification=3)])
    assert check_request(wanted, ranked)[0] == 2


def test_datatype_rank_and_dimensions_must_match() -> None:
    wrong_type = request({"input": np.zeros((1, 1, 8, 8), np.float64)})
    assert refused(wrong_type, model()) == (
        "input 'input': datatype FP64 does not match the model's FP32"
    )
    wrong_rank = request({"input": np.zeros((1, 64), np.float32)})
    assert refused(wrong_rank, model()) == (
        "input 'input': shape [1, 64] has rank 2; the model expects rank 4 ([-1, 1, 8, 8])"
    )
    wrong_size = request({"input": np.zeros((1, 1, 8, 9), np.float32)})
    assert refused(wrong_size, model()) == (
        "input 'input': shape [1, 1, 8, 9] does not match the model's [-1, 1, 8, 8] at dimension 3"
    )


def test_a_dense_input_smaller_than_the_window_is_refused() -> None:
    spec = [TensorSpec("input", "FP32", (-1, 1, -1, -1))]
    small = request({"input": np.zeros((1, 1, 6, 20), np.float32)})
    assert refused(small, model(spec, dense=True, window=(8, 8))) == (
        "input 'input': spatial size [6, 20] is smaller than the model's window [8, 8]"
    )
    # The window bounds only a dense model's input.
    assert check_request(small, model(spec, window=(8, 8)))[0] == 1


def test_the_batch_must_be_one_size_within_max_batch_size() -> None:
    two = [TensorSpec("a", "FP32", (-1, 3)), TensorSpec("b", "FP32", (-1, 3))]
    disagree = request({"a": np.zeros((1, 3), np.float32), "b": np.zeros((2, 3), np.float32)})
    assert refused(disagree, model(two)) == "inputs disagree on the batch size: [1, 2]"
    above = request({"input": np.zeros((5, 1, 8, 8), np.float32)})
    assert refused(above, model()) == (
        "batch of 5 is outside 1..4 (max_batch_size of model 'digits')"
    )
    empty = request({"input": np.zeros((0, 1, 8, 8), np.float32)})
    assert refused(empty, model()).startswith("batch of 0 is outside 1..4")


def test_without_a_batch_axis_every_dimension_is_the_models() -> None:
    served = model([TensorSpec("input", "FP32", (3, 8))], max_batch_size=0)
    assert check_request(request({"input": np.zeros((3, 8), np.float32)}), served) == (1, ((3, 8),))
    assert refused(request({"input": np.zeros((4, 8), np.float32)}), served).endswith(
        "at dimension 0"
    )
