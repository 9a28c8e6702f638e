"""Per-model serving knobs from ``<repository>/<model>/config.json``, in Triton's vocabulary.

Recognised fields (all optional; defaults come from the server's settings)::

    {
      "max_batch_size": 32,
      "dynamic_batching": {
        "max_queue_delay_microseconds": 0,
        "preferred_batch_size": [8, 16],
        "default_queue_policy": {"max_queue_size": 1024, "default_timeout_microseconds": 0}
      },
      "instance_group": [{"count": 1}],
      "version_policy": {"latest": {"num_versions": 1}}   # or {"all": {}},
                                                          # or {"specific": {"versions": [1, 3]}}
    }

``max_batch_size`` 0 turns batching off: the model's first dimension is then not a batch axis.
Unknown fields are an error, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.core.settings import Settings

__all__ = ["BatchingPolicy", "ConfigError", "ModelConfig", "VersionPolicy", "load_model_config"]


class ConfigError(ValueError):
    """``config.json`` is unreadable or holds a field or value convserve does not accept."""


@dataclass(frozen=True)
class BatchingPolicy:
    """Triton's dynamic-batching knobs for one model.

    Attributes:
        max_batch_size: images per batch; 0 disables batching (first dim is not a batch axis).
        max_queue_delay_microseconds: window measured from a batch's first request; 0 means
            work-conserving (a batch starts as soon as an instance is free).
        preferred_batch_size: batch sizes to cut at when more images wait; warmed up at load.
        max_queue_size: requests allowed to wait; beyond it RESOURCE_EXHAUSTED (0: unbounded).
        default_timeout_microseconds: queue timeout for requests that set none (0: none).
    """

    max_batch_size: int
    max_queue_delay_microseconds: int
    preferred_batch_size: tuple[int, ...]
    max_queue_size: int
    default_timeout_microseconds: int

    def __post_init__(self) -> None:
        if self.max_batch_size < 0:
            raise ConfigError(f"max_batch_size must be >= 0, got {self.max_batch_size}")
        if self.max_queue_delay_microseconds < 0 or self.max_queue_size < 0:
            raise ConfigError("max_queue_delay_microseconds and max_queue_size must be >= 0")
        if self.default_timeout_microseconds < 0:
            raise ConfigError("default_timeout_microseconds must be >= 0")
        too_big = [
            p
            for p in self.preferred_batch_size
            if p < 1 or (self.max_batch_size and p > self.max_batch_size)
        ]
        if too_big:
            raise ConfigError(
                f"preferred_batch_size {too_big[0]} is outside 1..{self.max_batch_size}"
            )


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions to serve: the latest N, all, or specific ones."""

    kind: str = "latest"
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    def select(self, available: list[int]) -> list[int]:
        """The versions to serve out of those on disk, highest first."""
        ordered = sorted(available, reverse=True)
        if self.kind == "all":
            return ordered
        if self.kind == "specific":
            return [v for v in ordered if v in self.versions]
        return ordered[: self.num_versions]


@dataclass(frozen=True)
class ModelConfig:
    """Serving knobs of one model."""

    batching: BatchingPolicy
    instances: int
    versions: VersionPolicy


def _take(document: dict[str, Any], key: str, kind: type, default: Any, where: str) -> Any:
    value = document.pop(key, default)
    if kind is int and isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)  # Triton's JSON writer quotes 64-bit integers
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise ConfigError(f"{where}{key} must be {kind.__name__}, got {value!r}")
    return value


def _no_leftovers(document: dict[str, Any], where: str) -> None:
    if document:
        raise ConfigError(f"unknown field {where}{sorted(document)[0]}")


def _batching(document: dict[str, Any], defaults: Settings) -> BatchingPolicy:
    max_batch = _take(document, "max_batch_size", int, defaults.max_batch_size, "")
    dynamic = dict(_take(document, "dynamic_batching", dict, {}, ""))
    where = "dynamic_batching."
    delay = _take(
        dynamic, "max_queue_delay_microseconds", int, defaults.max_queue_delay_microseconds, where
    )
    preferred = _take(
        dynamic, "preferred_batch_size", list, list(defaults.preferred_batch_size), where
    )
    queue = dict(_take(dynamic, "default_queue_policy", dict, {}, where))
    where_q = where + "default_queue_policy."
    size = _take(queue, "max_queue_size", int, defaults.max_queue_size, where_q)
    timeout = _take(
        queue, "default_timeout_microseconds", int, defaults.default_timeout_microseconds, where_q
    )
    _no_leftovers(queue, where_q)
    _no_leftovers(dynamic, where)
    if not all(isinstance(p, int) for p in preferred):
        raise ConfigError(f"{where}preferred_batch_size must be a list of integers")
    return BatchingPolicy(max_batch, delay, tuple(sorted(set(preferred))), size, timeout)


def _versions(document: dict[str, Any]) -> VersionPolicy:
    policy = dict(_take(document, "version_policy", dict, {}, ""))
    if not policy:
        return VersionPolicy()
    if len(policy) != 1 or next(iter(policy)) not in ("latest", "all", "specific"):
        raise ConfigError("version_policy must hold one of latest, all, specific")
    kind, body = next(iter(policy.items()))
    body = dict(body or {})
    where = f"version_policy.{kind}."
    if kind == "latest":
        count = _take(body, "num_versions", int, 1, where)
        _no_leftovers(body, where)
        if count < 1:
            raise ConfigError(f"{where}num_versions must be >= 1")
        return VersionPolicy("latest", num_versions=count)
    if kind == "specific":
        versions = _take(body, "versions", list, [], where)
        _no_leftovers(body, where)
        if not versions or not all(isinstance(v, int) and v > 0 for v in versions):
            raise ConfigError(f"{where}versions must be a list of positive integers")
        return VersionPolicy("specific", versions=tuple(versions))
    _no_leftovers(body, where)
    return VersionPolicy("all")


def load_model_config(path: Path, defaults: Settings) -> ModelConfig:
    """Read ``path`` if it exists, else the server-wide defaults.

    Raises:
        ConfigError: the file is not valid JSON or holds an unknown or invalid field.
    """
    document: dict[str, Any] = {}
    if path.is_file():
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        document = dict(loaded)
    document.pop("name", None)  # Triton configs repeat the model's name; it must match anyway
    document.pop("platform", None)
    document.pop("backend", None)
    batching = _batching(document, defaults)
    groups = _take(document, "instance_group", list, [{"count": defaults.instances}], "")
    if len(groups) != 1 or not isinstance(groups[0], dict):
        raise ConfigError("instance_group must hold exactly one group")
    group = dict(groups[0])
    group.pop("kind", None)  # the device comes from --device
    count = _take(group, "count", int, defaults.instances, "instance_group[0].")
    _no_leftovers(group, "instance_group[0].")
    if count < 1:
        raise ConfigError("instance_group[0].count must be >= 1")
    versions = _versions(document)
    _no_leftovers(document, "")
    return ModelConfig(batching, count, versions)
