"""Server settings: declared once, typed and defaulted, each a flag and an environment variable.

``--grpc-port`` is also ``CONVSERVE_GRPC_PORT``: prefix, upper case, dashes to underscores. A flag
on the command line wins over the environment, which wins over the default.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from service import BUNDLED_REPOSITORY
from service.core.event_loop import CHOICES as EVENT_LOOPS

__all__ = [
    "ENV_PREFIX",
    "SettingError",
    "Settings",
    "add_arguments",
    "from_arguments",
    "parse_value",
]

ENV_PREFIX = "CONVSERVE_"


class SettingError(ValueError):
    """A setting out of its range, or a value it cannot take; the message names the setting."""


def _setting(default: Any, help_text: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help_text, **extra})


@dataclass(frozen=True)
class Settings:
    """Everything ``convserve serve`` can be told (see ``convserve serve --help``)."""

    model_repository: Path = _setting(BUNDLED_REPOSITORY, "model repository folder")
    host: str = _setting("0.0.0.0", "address to listen on")
    grpc_port: int = _setting(8001, "gRPC port (0 picks a free one; the chosen port is logged)")
    metrics_port: int = _setting(8002, "Prometheus /metrics port (0 picks a free one)")
    device: str = _setting("auto", "auto, cpu, cuda or cuda:N (auto: CUDA when it really runs)")
    max_message_bytes: int = _setting(64 << 20, "largest gRPC message accepted or sent")
    max_tensor_elements: int = _setting(
        1 << 26, "largest element count of one request tensor, checked before allocation"
    )
    max_image_bytes: int = _setting(16 << 20, "largest encoded image accepted (bytes)")
    max_image_pixels: int = _setting(
        50_000_000, "largest decoded image accepted (pixels), checked from the header"
    )
    max_request_pixels: int = _setting(
        200_000_000,
        "most pixels of all the encoded images in one Classify together, checked from the headers",
    )
    max_dense_pixels: int = _setting(
        1 << 22,
        "most pixels one dense pass may take, over every scale and shifted copy (its transient "
        "memory grows with them)",
    )
    max_map_cells: int = _setting(
        1 << 20, "largest score map a dense request may ask for (cells over all copies)"
    )
    max_dense_copies: int = _setting(
        64, "largest number of shifted and scaled copies one dense request may ask for"
    )
    log_format: str = _setting("text", "text or json", choices=("text", "json"))
    log_level: str = _setting(
        "info", "debug, info, warning or error", choices=("debug", "info", "warning", "error")
    )
    max_connection_age: float = _setting(
        0.0,
        "seconds; close client connections older than this (after a drain grace) so long-lived "
        "HTTP/2 clients reconnect and spread over new pods (0: never)",
    )
    drain_grace_seconds: float = _setting(
        20.0, "on SIGTERM, how long in-flight requests may take to finish"
    )
    max_batch_size: int = _setting(32, "default max_batch_size (images per batch)")
    max_queue_delay_microseconds: int = _setting(
        0, "default batching window; 0 is work-conserving (no waiting)"
    )
    preferred_batch_size: tuple[int, ...] = _setting(
        (), "default preferred batch sizes (also warmed up at load)", nargs="*"
    )
    max_queue_size: int = _setting(
        1024, "default queue bound in requests; full: RESOURCE_EXHAUSTED"
    )
    default_timeout_microseconds: int = _setting(0, "default per-request queue timeout (0: none)")
    instances: int = _setting(1, "default runtime instances per model")
    inline_compute_microseconds: int = _setting(
        1000,
        "batches that typically compute faster run on the event loop instead of the thread "
        "pool, for models whose inputs have fixed shapes (0: always the pool)",
    )
    cpu_threads: int = _setting(
        0,
        "ONNX Runtime threads per CPU instance (0: cores / (instances x workers), or 1 for a "
        "model under --inline-compute-microseconds that costs less CPU on one)",
    )
    workers: int = _setting(
        1,
        "server processes sharing the gRPC port (SO_REUSEPORT; connections are spread over "
        "them), each with its own copy of every model; they answer as one server (metrics and "
        "statistics summed, model load and unload repeated on every worker)",
    )
    event_loop: str = _setting(
        "auto",
        "asyncio event loop: uvloop, asyncio, or auto (uvloop where installed)",
        choices=EVENT_LOOPS,
    )

    def __post_init__(self) -> None:
        checks = {
            "grpc_port": 0 <= self.grpc_port <= 65535,
            "metrics_port": 0 <= self.metrics_port <= 65535,
            "max_message_bytes": self.max_message_bytes >= 1024,
            "max_tensor_elements": self.max_tensor_elements >= 1,
            "max_image_bytes": self.max_image_bytes >= 1,
            "max_image_pixels": self.max_image_pixels >= 1,
            "max_request_pixels": self.max_request_pixels >= 1,
            "max_map_cells": self.max_map_cells >= 1,
            "max_dense_pixels": self.max_dense_pixels >= 1,
            "max_dense_copies": self.max_dense_copies >= 1,
            "drain_grace_seconds": self.drain_grace_seconds >= 0,
            "max_connection_age": self.max_connection_age >= 0,
            "max_batch_size": self.max_batch_size >= 1,
            "max_queue_delay_microseconds": self.max_queue_delay_microseconds >= 0,
            "max_queue_size": self.max_queue_size >= 0,
            "default_timeout_microseconds": self.default_timeout_microseconds >= 0,
            "instances": self.instances >= 1,
            "cpu_threads": self.cpu_threads >= 0,
            "inline_compute_microseconds": self.inline_compute_microseconds >= 0,
            "workers": 1 <= self.workers <= 256,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise SettingError(f"invalid setting {bad[0]}={getattr(self, bad[0])!r}")
        if not (
            self.device in ("auto", "cpu", "cuda")
            or (
                self.device.startswith("cuda:")
                and self.device[5:].isascii()
                and self.device[5:].isdigit()
            )
        ):
            raise SettingError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    def environment(self) -> dict[str, str]:
        """Every setting as its environment variable, so a child process rebuilds the same."""
        variables = {}
        for spec in fields(self):
            value = getattr(self, spec.name)
            text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
            variables[_env_name(spec.name)] = text
        return variables


def _env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def parse_value(kind: Any, text: str) -> Any:
    """A setting's value from its environment-variable text (``"4,8"`` for a list)."""
    if kind in (int, "int"):
        return int(text)
    if kind in (float, "float"):
        return float(text)
    if kind in (Path, "Path"):
        return Path(text)
    if kind in (tuple[int, ...], "tuple[int, ...]"):
        return tuple(int(v) for v in text.replace(",", " ").split())
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting, defaulting to its environment variable, then its default.

    Raises:
        SettingError: an environment variable's text is not a value of its setting.
    """
    for spec in fields(Settings):
        env = _env_name(spec.name)
        default = spec.default
        if env in os.environ:
            try:
                default = parse_value(spec.type, os.environ[env])
            except ValueError:
                raise SettingError(
                    f"invalid setting {spec.name} from {env}={os.environ[env]!r}"
                ) from None
        options: dict[str, Any] = {
            "default": default,
            "dest": spec.name,
            "help": f"{spec.metadata['help']} [{env}; default: {_shown(spec.default)}]",
        }
        if "choices" in spec.metadata:
            options["choices"] = spec.metadata["choices"]
        if spec.metadata.get("nargs"):
            options["nargs"] = spec.metadata["nargs"]
            options["type"] = int
        elif spec.type not in (str, "str"):
            options["type"] = lambda text, kind=spec.type: parse_value(kind, text)
        parser.add_argument("--" + spec.name.replace("_", "-"), **options)


def _shown(default: object) -> str:
    """A default as --help shows it (argparse would read a bare % as a format)."""
    text = (" ".join(map(str, default)) or "none") if isinstance(default, tuple) else str(default)
    return text.replace("%", "%%")


def from_arguments(args: argparse.Namespace) -> Settings:
    """Settings from parsed flags (see :func:`add_arguments`)."""
    values = {spec.name: getattr(args, spec.name) for spec in fields(Settings)}
    values["preferred_batch_size"] = tuple(values["preferred_batch_size"])
    return Settings(**values)
