"""Logging set-up: plain text for people, one JSON object per line for log collectors.

Under load the server refuses requests by the thousand, and clients give up on theirs: those
are counted (:class:`RefusalSummary`) and logged as one line every few seconds, so that a
fault of the server itself stays in sight.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections import Counter

__all__ = ["RefusalSummary", "configure_logging"]


# Request context that servicers attach to log records (``extra=``); never payloads.
_CONTEXT = ("model", "request_id", "api", "status", "duration_seconds", "refused")


class _JsonFormatter(logging.Formatter):
    def __init__(self, worker: int | None) -> None:
        super().__init__()
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self._worker is not None:
            entry["worker"] = self._worker
        for key in _CONTEXT:
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class _TextFormatter(logging.Formatter):
    """One line per record, but for tracebacks.

    A line break in a message (a client's model name, say) is escaped, so that nobody can
    write a line of their own into the log.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        return super().formatMessage(record).replace("\r", "\\r").replace("\n", "\\n")


def configure_logging(log_format: str, level: str, worker: int | None = None) -> None:
    """Send every log line to stderr in ``log_format`` ("text" or "json").

    A worker process of ``serve --workers`` marks its lines with its index.
    """
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(_JsonFormatter(worker))
    else:
        tag = "" if worker is None else f"worker-{worker} "
        handler.setFormatter(
            _TextFormatter(f"%(asctime)s %(levelname)s {tag}%(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class RefusalSummary:
    """Counts refused and abandoned requests by reason; logs them as one line per ``interval``.

    The line comes ``interval`` seconds after the first refusal of a quiet spell and sums up
    every one since (``refused 297 requests in the last 5 s: queue_full 290, deadline 7``), at
    WARNING; in JSON the counts are the record's ``refused`` object. Without an event loop to
    time it, the line is written by the first refusal after ``interval`` has passed.

    Args:
        logger: where the line goes.
        interval: seconds between two lines, at least.
    """

    def __init__(self, logger: logging.Logger, interval: float = 5.0) -> None:
        self._log = logger
        self.interval = interval
        self._counts: Counter[str] = Counter()
        self._since = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def count(self, reason: str) -> None:
        """One more request ended before compute for ``reason``."""
        now = time.monotonic()
        if not self._counts:
            self._since = now
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is not None:
                self._timer = loop.call_later(self.interval, self.flush)
        elif self._timer is None and now - self._since >= self.interval:
            self.flush()
            self.count(reason)
            return
        self._counts[reason] += 1

    def flush(self) -> None:
        """Log what was counted since the last line, if anything (at shutdown, say)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._counts:
            return
        counts, self._counts = self._counts, Counter()
        reasons = ", ".join(f"{reason} {n}" for reason, n in counts.most_common())
        seconds = round(max(self.interval, time.monotonic() - self._since), 1)
        self._log.warning(
            "refused %d requests in the last %g s: %s",
            sum(counts.values()),
            seconds,
            reasons,
            extra={"refused": dict(counts)},
        )
