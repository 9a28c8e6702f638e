"""A serve that cannot start says why in one line, naming the port and the flag that moves it."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port something else is listening on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "service",
            "serve",
            "--host",
            "127.0.0.1",
            "--http-port",
            "0",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_busy_grpc_port_is_named_with_its_flag(taken_port: int) -> None:
    result = serve("--grpc-port", str(taken_port), "--metrics-port", "0")
    assert result.returncode == 2
    assert (
        f"the gRPC port {taken_port} on 127.0.0.1 is already in use (another convserve?): "
        "choose another with --grpc-port or CONVSERVE_GRPC_PORT, or 0 for a free one"
    ) in result.stderr
    assert "RuntimeError" not in result.stderr and "add_port" not in result.stderr


def test_a_busy_metrics_port_is_named_with_its_flag(taken_port: int) -> None:
    result = serve("--grpc-port", "0", "--metrics-port", str(taken_port))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"convserve serve: error: the metrics port {taken_port} on 127.0.0.1 is already in use "
        "(another convserve?): choose another with --metrics-port or CONVSERVE_METRICS_PORT, "
        "or 0 for a free one"
    )
