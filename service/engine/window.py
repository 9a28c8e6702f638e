"""When a batch waits for company, and when its window may end early: the batcher's policy.

Pure bookkeeping (no clock, no event loop): the batcher asks before each batch and reports what
the batch gathered.

* A window is skipped where it cannot pay: after :data:`LONE_WINDOWS` windows in a row that
  gathered nobody but their first request, batches run without waiting, except that every
  :data:`PROBE_EVERY`-th one waits the window again to see whether company has come. Any batch
  of more than one request brings the window back.
* A window ends once as many requests have queued as the last window that ran its whole length
  gathered, if that was two or more: with that many clients, more are unlikely to come. Every
  :data:`REMEASURE_EVERY`-th window runs in full again, to see more come.
"""

from __future__ import annotations

__all__ = ["LONE_WINDOWS", "PROBE_EVERY", "REMEASURE_EVERY", "WindowPolicy"]

LONE_WINDOWS = 3
"""Windows in a row that gathered only their first request, after which the window is skipped."""

REMEASURE_EVERY = 32
"""While windows end early at the company the last full window gathered, every this-many-th one
runs its whole length again, so that more company is seen (less shows at once: the count is not
reached, and the window runs out)."""

PROBE_EVERY = 256
"""While the window is skipped, every this-many-th batch waits it again: rare enough that a lone
client's tail latency stays clear of the window, often enough that under load the window comes
back soon after company arrives."""


class WindowPolicy:
    """Decides whether the next batch waits its window, and how much company ends it early.

    Args:
        delay_seconds: the window (``max_queue_delay_microseconds``); 0 never waits.
    """

    def __init__(self, delay_seconds: float) -> None:
        self._delay = delay_seconds
        self._lone = 0  # windows in a row that gathered only their first request
        self._company = 0  # requests the last window that ran its whole length gathered
        self._since_full = 0  # windows since the last one that had to run its whole length
        self._since_probe = 0

    @property
    def delay(self) -> float:
        """The window's length in seconds (0: no window)."""
        return self._delay

    def waits(self) -> bool:
        """Whether the next batch waits the window; a skipped window counts towards a probe."""
        if not self._delay:
            return False
        if self._lone < LONE_WINDOWS:
            return True
        self._since_probe += 1
        if self._since_probe < PROBE_EVERY:
            return False
        self._since_probe = 0
        return True

    def target(self) -> int:
        """Called as a window starts: queued requests that end it early (0: run it in full).

        The company of the last window that ran its whole length, where that was two or more,
        except on every :data:`REMEASURE_EVERY`-th window, which runs in full to measure again.
        """
        if self._company < 2:
            return 0
        self._since_full += 1
        return self._company if self._since_full < REMEASURE_EVERY else 0

    def record(self, requests: int, *, waited: bool, full: bool) -> None:
        """Report a batch: its request count, whether it waited the window, and ran it in full.

        A window that ran in full with nobody to collect (another instance took the requests)
        measures nothing.
        """
        if full and requests:
            self._company, self._since_full = requests, 0
        if waited and requests == 1:
            self._lone += 1
        elif requests > 1:
            self._lone = 0
