"""Server settings: declared once, typed and defaulted, each a flag and an environment variable.

``--grpc-port`` is also ``CONVSERVE_GRPC_PORT``: prefix, upper case, dashes to underscores. How
they become flags: :mod:`service.core.flags`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from service import BUNDLED_REPOSITORY
from service.core.event_loop import CHOICES as EVENT_LOOPS

__all__ = [
    "ENV_PREFIX",
    "GRPC_HEADER_PREFIX",
    "RESTRICTED_GROUPS",
    "Restriction",
    "SettingError",
    "Settings",
    "env_name",
    "parse_restriction",
]

ENV_PREFIX = "CONVSERVE_"


class SettingError(ValueError):
    """A setting out of its range, or a value it cannot take; the message names the setting."""


RESTRICTED_GROUPS = (
    "health",
    "metadata",
    "inference",
    "shared-memory",
    "model-config",
    "model-repository",
    "statistics",
    "trace",
    "logging",
)
"""Triton's API group names for ``--grpc-restricted-protocol`` and ``--http-restricted-api``."""

GRPC_HEADER_PREFIX = "triton-grpc-protocol-"
"""What a gRPC restriction's key is prefixed with in its header; an HTTP one's is the key."""


def _setting(default: Any, help_text: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help_text, **extra})


@dataclass(frozen=True)
class Restriction:
    """API groups whose calls need a header ``<prefix><key>`` set to ``value``.

    On the gRPC port (Triton's ``--grpc-restricted-protocol``) the header is
    ``triton-grpc-protocol-<key>``; on the HTTP port (``--http-restricted-api``) it is ``<key>``.
    """

    groups: frozenset[str]
    key: str
    value: str
    prefix: str = GRPC_HEADER_PREFIX

    @property
    def header(self) -> str:
        """The request header (gRPC metadata key, HTTP header name) a caller must send."""
        return self.prefix + self.key


def parse_restriction(
    text: str, flag: str = "--grpc-restricted-protocol", prefix: str = GRPC_HEADER_PREFIX
) -> Restriction:
    """``health,metadata:admin-key=secret`` as a :class:`Restriction`.

    ``flag`` names the setting in error messages; ``prefix`` goes before the key in the header.

    Raises:
        SettingError: the text is not ``<groups>:<key>=<value>`` or names an unknown group.
    """
    groups_text, colon, header = text.partition(":")
    key, equals, value = header.partition("=")
    if not colon or not equals or not groups_text.strip() or not key.strip():
        raise SettingError(f"{flag} must be <groups>:<key>=<value>, got {text!r}")
    groups = frozenset(g.strip() for g in groups_text.split(","))
    unknown = sorted(groups - set(RESTRICTED_GROUPS))
    if unknown:
        raise SettingError(
            f"{flag} names unknown group(s) {', '.join(unknown)}; "
            f"the groups are {', '.join(RESTRICTED_GROUPS)}"
        )
    # gRPC metadata keys travel in lower case; HTTP header names are matched in any case
    return Restriction(groups, key.strip().lower(), value, prefix)


@dataclass(frozen=True)
class Settings:
    """Everything ``convserve serve`` can be told (see ``convserve serve --help``)."""

    model_repository: Path = _setting(BUNDLED_REPOSITORY, "model repository folder")
    host: str = _setting("0.0.0.0", "address to listen on")
    grpc_port: int = _setting(8001, "gRPC port (0 picks a free one; the chosen port is logged)")
    http_port: int = _setting(
        8000, "KServe v2 HTTP/REST port (0 picks a free one; the chosen port is logged)"
    )
    allow_http: bool = _setting(
        True, "serve KServe v2 over HTTP/REST on --http-port (false: no HTTP port)"
    )
    metrics_port: int = _setting(8002, "Prometheus /metrics port (0 picks a free one)")
    device: str = _setting("auto", "auto, cpu, cuda or cuda:N (auto: CUDA when it really runs)")
    max_message_bytes: int = _setting(
        64 << 20, "largest gRPC message accepted or sent, and largest HTTP request body"
    )
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
        0,
        "most pixels one dense request may take, over every scale and shifted copy (0: no fixed "
        "cap; the pixels of one pass follow from --dense-memory-bytes)",
    )
    dense_memory_bytes: int = _setting(
        1 << 30,
        "most memory one dense request may take at its peak (its arrays and the model's "
        "activations of the largest pass it hands the runtime); its shifted copies go to the "
        "runtime in passes of as many as fit, a single copy that does not fit is refused",
    )
    dense_bytes_per_pixel: int = _setting(
        0,
        "runtime memory (activations) one input pixel of a dense twin's pass takes (0: an "
        "estimate that covers 64 float32 channels at full resolution)",
    )
    max_response_bytes: int = _setting(
        4 << 20,
        "largest ClassifyDense answer, sized from the geometry before any compute (gRPC and "
        "tritonclient clients accept 4 MiB unless told more); --max-message-bytes stays the "
        "transport's limit",
    )
    max_images_per_request: int = _setting(
        0,
        "most images one Classify may carry (0: the model's max_batch_size x 4, one full round "
        "of the chunks a request keeps in flight)",
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
        20.0,
        "on SIGTERM, how long the requests taken before it may take to finish (new ones are "
        "refused with UNAVAILABLE; the server exits as soon as they are done)",
    )
    max_inference_seconds: float = _setting(
        60.0,
        "a model call (one batch in the runtime) still running after this long means the server "
        "is wedged: liveness (health service 'liveness', ServerLive) turns NOT_SERVING so that "
        "it is restarted (0: never)",
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
    model_control_mode: str = _setting(
        "none",
        "none: every model in the repository loads at start and load/unload requests are "
        "refused; explicit: load/unload requests are served and --load-model picks what loads "
        "at start; poll: the repository is watched and its changes applied",
        choices=("none", "explicit", "poll"),
    )
    load_model: tuple[str, ...] = _setting(
        (),
        "with --model-control-mode explicit: a model to load at start (repeatable; * loads "
        "every model; the variable takes a comma-separated list)",
        separator=",",
    )
    exit_on_error: bool = _setting(
        True,
        "a model that fails to load at start stops the start with exit 1 (false: serve the rest)",
    )
    repository_poll_secs: float = _setting(
        15.0, "with --model-control-mode poll: seconds between two looks at the repository"
    )
    model_load_timeout_seconds: float = _setting(
        300.0, "a model load that takes longer is abandoned and reported as failed"
    )
    allow_model_upload: bool = _setting(
        False, "accept model files carried by a load request (Triton's file: parameters)"
    )
    metrics_host: str = _setting("", "address of the /metrics endpoint (empty: the --host value)")
    reflection: bool = _setting(True, "gRPC server reflection (what grpcurl list/describe read)")
    health_port: int = _setting(
        -1,
        "a plaintext port that serves grpc.health.v1 only, for Kubernetes probes when the gRPC "
        "port uses TLS (-1: none; 0 picks a free one)",
    )
    grpc_restricted_protocol: tuple[str, ...] = _setting(
        (),
        "<groups>:<key>=<value>: calls in these API groups need the request header "
        "triton-grpc-protocol-<key> set to <value> (repeatable; the variable separates entries "
        "with ;)",
        separator=";",
    )
    http_restricted_api: tuple[str, ...] = _setting(
        (),
        "<groups>:<key>=<value>: HTTP requests in these API groups need the header <key> set "
        "to <value>, else 403 (repeatable; the variable separates entries with ;)",
        separator=";",
    )
    grpc_use_ssl: bool = _setting(
        False,
        "TLS on the gRPC port (with --grpc-server-cert and --grpc-server-key), and on the HTTP "
        "port with the same files",
    )
    grpc_use_ssl_mutual: bool = _setting(
        False,
        "mutual TLS on the gRPC and HTTP ports: clients need a certificate that chains to "
        "--grpc-root-cert (implies --grpc-use-ssl)",
    )
    grpc_server_cert: str = _setting(
        "", "PEM certificate chain of the server (re-read when the file changes)"
    )
    grpc_server_key: str = _setting("", "PEM private key of the server (re-read when it changes)")
    grpc_root_cert: str = _setting(
        "", "PEM CA bundle that client certificates must chain to (mutual TLS)"
    )

    def __post_init__(self) -> None:
        checks = {
            "grpc_port": 0 <= self.grpc_port <= 65535,
            "http_port": 0 <= self.http_port <= 65535,
            "metrics_port": 0 <= self.metrics_port <= 65535,
            "max_message_bytes": self.max_message_bytes >= 1024,
            "max_tensor_elements": self.max_tensor_elements >= 1,
            "max_image_bytes": self.max_image_bytes >= 1,
            "max_image_pixels": self.max_image_pixels >= 1,
            "max_request_pixels": self.max_request_pixels >= 1,
            "max_map_cells": self.max_map_cells >= 1,
            "max_dense_pixels": self.max_dense_pixels >= 0,
            "dense_memory_bytes": self.dense_memory_bytes >= 1 << 20,
            "dense_bytes_per_pixel": self.dense_bytes_per_pixel >= 0,
            "max_response_bytes": self.max_response_bytes >= 1024,
            "max_images_per_request": self.max_images_per_request >= 0,
            "max_dense_copies": self.max_dense_copies >= 1,
            "drain_grace_seconds": self.drain_grace_seconds >= 0,
            "max_inference_seconds": self.max_inference_seconds >= 0,
            "max_connection_age": self.max_connection_age >= 0,
            "max_batch_size": self.max_batch_size >= 1,
            "max_queue_delay_microseconds": self.max_queue_delay_microseconds >= 0,
            "max_queue_size": self.max_queue_size >= 0,
            "default_timeout_microseconds": self.default_timeout_microseconds >= 0,
            "instances": self.instances >= 1,
            "cpu_threads": self.cpu_threads >= 0,
            "inline_compute_microseconds": self.inline_compute_microseconds >= 0,
            "workers": 1 <= self.workers <= 256,
            "repository_poll_secs": self.repository_poll_secs > 0,
            "model_load_timeout_seconds": self.model_load_timeout_seconds > 0,
            "health_port": -1 <= self.health_port <= 65535,
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
        self._check_control_and_tls()

    def _check_control_and_tls(self) -> None:
        if self.load_model and self.model_control_mode != "explicit":
            raise SettingError("--load-model requires --model-control-mode explicit")
        if "*" in self.load_model and len(set(self.load_model)) > 1:
            raise SettingError("--load-model '*' (every model) must be the only --load-model")
        if self.tls:
            missing = [
                flag
                for flag, value in (
                    ("--grpc-server-cert", self.grpc_server_cert),
                    ("--grpc-server-key", self.grpc_server_key),
                    ("--grpc-root-cert", self.grpc_root_cert if self.grpc_use_ssl_mutual else "-"),
                )
                if not value
            ]
            if missing:
                raise SettingError(f"TLS on the gRPC port needs {' and '.join(missing)}")
        for text in self.grpc_restricted_protocol:
            parse_restriction(text)
        for text in self.http_restricted_api:
            parse_restriction(text, "--http-restricted-api", "")

    @property
    def tls(self) -> bool:
        """Whether the gRPC port speaks TLS (mutual TLS implies it, as in Triton)."""
        return self.grpc_use_ssl or self.grpc_use_ssl_mutual

    @property
    def restrictions(self) -> tuple[Restriction, ...]:
        """The parsed ``--grpc-restricted-protocol`` entries."""
        return tuple(parse_restriction(text) for text in self.grpc_restricted_protocol)

    @property
    def http_restrictions(self) -> tuple[Restriction, ...]:
        """The parsed ``--http-restricted-api`` entries (headers named by their key alone)."""
        return tuple(
            parse_restriction(text, "--http-restricted-api", "")
            for text in self.http_restricted_api
        )

    def environment(self) -> dict[str, str]:
        """Every setting as its environment variable, so a child process rebuilds the same."""
        variables = {}
        for spec in fields(self):
            value = getattr(self, spec.name)
            if isinstance(value, tuple):
                text = spec.metadata.get("separator", ",").join(map(str, value))
            elif isinstance(value, bool):
                text = "true" if value else "false"
            else:
                text = str(value)
            variables[env_name(spec.name)] = text
        return variables


def env_name(name: str) -> str:
    """The environment variable of setting ``name``."""
    return ENV_PREFIX + name.upper()
