"""The sentences export and inspect both print, worded and formatted once.

Standard library only, so the command line can import it without loading ONNX or torch.
"""

from __future__ import annotations

from model_format import Precision

__all__ = [
    "RANDOM_WARNING",
    "dense_agreement",
    "precision_cost",
    "precision_kind",
    "uneven_summary",
]

RANDOM_WARNING = (
    "warning: --calibration random: int8 ranges calibrated on random inputs are fit for timing, "
    "not for accuracy; the agreement with fp32 is measured on random inputs too, and printed, "
    "not enforced"
)
_KINDS = {
    "fp32": "fp32",
    "fp16": "fp16 weights and computation, fp32 input and output",
    "int8": "int8 QDQ: int8 weights per output channel, uint8 activations, fp32 input and output",
}


def dense_agreement(exact: bool, max_abs_dev: float, top1_agreement: float) -> str:
    """How the dense map agrees with crop-by-crop evaluation, as export and inspect print it."""
    kind = "exact (padding-free)" if exact else "approximate (padding or global pooling)"
    return f"{kind}, max abs deviation {max_abs_dev:.3g}, top-1 agreement {top1_agreement:.1%}"


def uneven_summary(count: int, where: str) -> str:
    """One line for the layers whose geometry does not divide evenly (details: ``inspect``)."""
    return (
        f"{count} layer{'s' if count != 1 else ''} whose geometry does not divide evenly at the "
        f"window (PyTorch floors; some edge pixels never reach the output; cells still align "
        f"with crops): convserve inspect {where} lists them"
    )


def precision_kind(precision: Precision) -> str:
    """What a precision stores, with its bytes per parameter and per activation."""
    kind = _KINDS.get(precision.name, precision.name)
    return (
        f"{kind} ({precision.weight_bytes} B per parameter, "
        f"{precision.activation_bytes} B per activation)"
    )


def precision_cost(precision: Precision) -> str:
    """What a reduced precision measured against fp32, as export and inspect print it."""
    if precision.top1_agreement is None or precision.max_abs_dev is None:
        return "the reference precision: nothing measured against it"
    cost = (
        f"against fp32 on {precision.evaluated_on}: top-1 agreement "
        f"{precision.top1_agreement:.1%}, max abs deviation {precision.max_abs_dev:.3g}"
    )
    if precision.calibration:
        cost += f"; calibrated on {precision.calibration}"
    if precision.output_step:
        cost += f"; output quantisation step {precision.output_step:.3g}"
    return cost
