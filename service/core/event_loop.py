"""Which asyncio event loop the server, the gRPC floor and the load generator run on.

uvloop where it is installed (a dependency on Linux and macOS), else asyncio's own loop.
grpc.aio hands every completion from its poller thread to the loop as a callback, so the loop's
own cost per callback is paid several times a request. Measured with h2load on the demo model
(2 cores, alternating rounds): about 10-18 % more requests/s at concurrency 64 and 10 % less
server CPU per request, for the bare gRPC floor and for ``convserve serve`` alike.
``--event-loop asyncio`` keeps the standard loop (to rule uvloop out when debugging).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["CHOICES", "describe", "loop_factory", "run"]

CHOICES = ("auto", "uvloop", "asyncio")

T = TypeVar("T")

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def loop_factory(choice: str) -> LoopFactory | None:
    """What makes the loop for ``choice``; None is asyncio's default.

    Raises ValueError for an unknown choice, or ``uvloop`` asked for where it is not installed.
    """
    if choice not in CHOICES:
        raise ValueError(f"--event-loop must be one of {', '.join(CHOICES)}, got {choice!r}")
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ValueError(
                "--event-loop uvloop: uvloop is not installed (pip install uvloop, or "
                "--event-loop auto to fall back to asyncio's loop)"
            ) from None
        return None
    return uvloop.new_event_loop


def run(main: Callable[[], Coroutine[Any, Any, T]], factory: LoopFactory | None) -> T:
    """Run ``main()`` to completion on a new loop from ``factory`` (see :func:`loop_factory`)."""
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())


def describe(loop: asyncio.AbstractEventLoop) -> str:
    """``uvloop 0.23.0`` or ``asyncio``: for the log."""
    if type(loop).__module__.startswith("uvloop"):
        return f"uvloop {importlib.metadata.version('uvloop')}"
    return "asyncio"
