"""The sentences export and inspect both print, worded and formatted once.

Standard library only, so the command line can import it without loading ONNX or torch.
"""

from __future__ import annotations

__all__ = ["dense_agreement", "uneven_summary"]


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
