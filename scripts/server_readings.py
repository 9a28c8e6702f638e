"""What a reliability script reads off a running server: /proc, its metrics, its log.

Figures only: CPU seconds and resident memory of the server process (Linux /proc), its
Prometheus series summed over label sets that match, latency quantiles from a histogram's
buckets, and its log lines counted by level.
"""

from __future__ import annotations

import math
import os
import re
import urllib.request
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["Scrape", "cpu_seconds", "levels", "rss_bytes", "scrape"]


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of process ``pid`` so far (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """Resident memory of process ``pid`` now."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS line for process {pid}")


_LEVEL = re.compile(r"^\S+ \S+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


def levels(lines: Iterable[str]) -> dict[str, int]:
    """Log lines by level (the text format); a traceback's lines count as ``traceback``."""
    counts: Counter[str] = Counter()
    for line in lines:
        match = _LEVEL.match(line)
        if match:
            counts[match.group(1)] += 1
        elif line.startswith("Traceback"):
            counts["traceback"] += 1
    return dict(counts)


def _matching(labels: Mapping[str, str], wanted: Mapping[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in wanted.items())


def _key(name: str, labels: Mapping[str, str]) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


@dataclass
class Scrape:
    """One reading of /metrics: every sample, by name and labels."""

    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)

    def total(self, name: str, **labels: str) -> float:
        """The sum of ``name`` over the samples whose labels include ``labels``."""
        return sum(v for n, found, v in self.samples if n == name and _matching(found, labels))

    def by(self, name: str, label: str, **labels: str) -> dict[str, float]:
        """``name`` summed per value of ``label``, over samples that match ``labels``."""
        sums: Counter[str] = Counter()
        for sample, found, value in self.samples:
            if sample == name and _matching(found, labels):
                sums[found.get(label, "")] += value
        return {key: value for key, value in sums.items() if value}

    def minus(self, before: Scrape) -> Scrape:
        """What changed since ``before``, for counters and histogram buckets."""
        earlier = {_key(name, found): value for name, found, value in before.samples}
        return Scrape(
            [
                (name, found, value - earlier.get(_key(name, found), 0.0))
                for name, found, value in self.samples
            ]
        )

    def quantile(self, name: str, q: float, **labels: str) -> float:
        """The upper bound (seconds) of the bucket where quantile ``q`` of histogram ``name`` is."""
        buckets: Counter[float] = Counter()
        for sample, found, value in self.samples:
            if sample == name + "_bucket" and _matching(found, labels):
                buckets[float(found["le"])] += value
        ordered = sorted(buckets.items())
        if not ordered or not ordered[-1][1]:
            return math.nan
        wanted = q * ordered[-1][1]
        return next(bound for bound, count in ordered if count >= wanted)


def scrape(url: str, prefix: str = "convserve_") -> Scrape:
    """Read ``url`` (a /metrics page): the samples whose names start with ``prefix``."""
    with urllib.request.urlopen(url, timeout=10) as answer:
        text = answer.read().decode()
    found = Scrape()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith(prefix):
                found.samples.append((sample.name, dict(sample.labels), float(sample.value)))
    return found
