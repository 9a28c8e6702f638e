"""The one error type that export and inspect report to people."""

from __future__ import annotations

__all__ = ["ExportError"]


class ExportError(Exception):
    """Export or inspection cannot go on; the message says what was wrong and what to do.

    The command line prints the message alone (no traceback) and exits non-zero.
    """
