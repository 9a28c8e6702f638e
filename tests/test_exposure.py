"""What a server exposes besides its API: ``--metrics-host`` and ``--no-reflection``.

The servers listen for gRPC on every address (``--host 0.0.0.0``) and for /metrics on the
loopback address only; 127.0.0.2, another loopback address on Linux, tells the two apart.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from service import BUNDLED_REPOSITORY
from service.tools.server_process import ServerProcess

SERVICES = {
    "inference.GRPCInferenceService",
    "convserve.v1.Classifier",
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
}


def grpcurl_list(address: str) -> subprocess.CompletedProcess[str]:
    """``grpcurl -plaintext ADDRESS list``: the services that reflection describes."""
    return subprocess.run(
        [str(Path(sys.executable).parent / "grpcurl"), "-plaintext", address, "list"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def answers(host: str, port: int) -> bool:
    """Whether a TCP connection to host:port is accepted."""
    try:
        with socket.create_connection((host, port), timeout=5):
            return True
    except ConnectionRefusedError:
        return False


def check_metrics_on_loopback_only(server: ServerProcess, suffix: str = "") -> None:
    """/metrics answers on 127.0.0.1 and nowhere else; gRPC answers on every address."""
    server.log_with(f"metrics listening on 127.0.0.1:{server.metrics_port}{suffix}")
    server.log_with(f"grpc listening on 0.0.0.0:{server.grpc_port}")
    with urllib.request.urlopen(server.metrics_url, timeout=10) as reply:
        assert reply.status == 200 and b"convserve_" in reply.read()
    assert not answers("127.0.0.2", server.metrics_port)
    assert answers("127.0.0.2", server.grpc_port)


def test_metrics_host_and_no_reflection() -> None:
    flags = ("--host", "0.0.0.0", "--metrics-host", "127.0.0.1", "--no-reflection")
    with ServerProcess(BUNDLED_REPOSITORY, *flags) as server:
        assert "(no reflection)" in server.log_with("grpc listening")
        check_metrics_on_loopback_only(server)
        listed = grpcurl_list(server.grpc_address)
        assert listed.returncode != 0 and listed.stdout == ""
        assert "does not support the reflection API" in listed.stderr, listed.stderr


def test_workers_take_the_metrics_host_and_reflect_every_service() -> None:
    flags = ("--workers", "2", "--host", "0.0.0.0", "--metrics-host", "127.0.0.1")
    with ServerProcess(BUNDLED_REPOSITORY, *flags) as server:
        check_metrics_on_loopback_only(server, " (all workers)")
        for _ in range(4):  # new connections, to either worker
            listed = grpcurl_list(server.grpc_address)
            assert listed.returncode == 0, listed.stderr
            assert set(listed.stdout.split()) == SERVICES
