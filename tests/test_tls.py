"""TLS and mutual TLS on the gRPC port, with real certificates made here, and the health port.

The certificates come from a CA made by the test (tests/certificates.py); the servers are real
``convserve serve`` processes, reached by tritonclient, by grpcio and by ``convserve models``.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from service import BUNDLED_REPOSITORY
from service._generated.inference import grpc_service_pb2 as kserve_pb
from service._generated.inference import grpc_service_pb2_grpc as kserve_grpc
from service.tools.server_process import ServerProcess
from tests.certificates import Authority, Issued, serial_of

LOCAL_ONLY = {"convserve-worker-local": "1"}  # the documented header (service/wire/siblings.py)


def tls_flags(server: Issued, *more: str) -> tuple[str, ...]:
    """The serve flags that put ``server``'s certificate on the gRPC port."""
    return ("--grpc-server-cert", str(server.cert), "--grpc-server-key", str(server.key), *more)


def tls_client(
    address: str, ca: Path, client: Issued | None = None
) -> triton.InferenceServerClient:
    """A tritonclient over TLS on a connection of its own (gRPC otherwise shares one)."""
    return triton.InferenceServerClient(
        address,
        ssl=True,
        root_certificates=str(ca),
        private_key=None if client is None else str(client.key),
        certificate_chain=None if client is None else str(client.cert),
        channel_args=[("grpc.use_local_subchannel_pool", 1)],
    )


def live_status(channel: grpc.Channel) -> grpc.StatusCode:
    """The status code of ServerLive on ``channel`` (OK when it answers)."""
    stub = kserve_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
    try:
        stub.ServerLive(kserve_pb.ServerLiveRequest(), timeout=10)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def secure_channel(address: str, ca: Path, client: Issued | None = None) -> grpc.Channel:
    """A grpcio channel over TLS, presenting ``client``'s certificate when given."""
    key, chain = client.read()[::-1] if client is not None else (None, None)
    credentials = grpc.ssl_channel_credentials(ca.read_bytes(), key, chain)
    return grpc.secure_channel(address, credentials)


def peer_serial(address: str, ca: Path) -> int:
    """The serial number of the certificate the server presents to a new connection."""
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2"])
    host, port = address.rsplit(":", 1)
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        certificate = tls.getpeercert(binary_form=True)
    assert certificate is not None
    return serial_of(certificate)


def convserve(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the ``convserve`` command line."""
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> Authority:
    return Authority(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def client_cert(authority: Authority) -> Issued:
    return authority.issue("client", server=False)


@pytest.fixture(scope="module")
def server_cert(authority: Authority) -> Issued:
    return authority.issue("server", server=True)


@pytest.fixture(scope="module")
def tls_server(server_cert: Issued) -> Iterator[ServerProcess]:
    """``--grpc-use-ssl`` with a plaintext ``--health-port``."""
    flags = tls_flags(server_cert, "--grpc-use-ssl", "--health-port", "0")
    with ServerProcess(BUNDLED_REPOSITORY, *flags) as server:
        yield server


@pytest.fixture(scope="module")
def mutual_server(authority: Authority) -> Iterator[ServerProcess]:
    """``--grpc-use-ssl-mutual``: clients need a certificate from ``authority``."""
    flags = tls_flags(
        authority.issue("mutual-server", server=True),
        "--grpc-use-ssl-mutual",
        "--grpc-root-cert",
        str(authority.cert),
    )
    with ServerProcess(BUNDLED_REPOSITORY, *flags) as server:
        yield server


def test_tritonclient_and_the_cli_over_tls(tls_server: ServerProcess, authority: Authority) -> None:
    assert "(TLS)" in tls_server.log_with("grpc listening on")
    client = tls_client(tls_server.grpc_address, authority.cert)
    assert client.is_server_ready()
    x = np.zeros((1, 1, 8, 8), np.float32)
    tensor = triton.InferInput("input", [1, 1, 8, 8], "FP32")
    tensor.set_data_from_numpy(x)
    assert client.infer("digits", [tensor]).as_numpy("logits").shape == (1, 10)
    client.close()
    listed = convserve(
        "models", "--json", "--server", tls_server.grpc_address, "--tls-ca", str(authority.cert)
    )
    assert listed.returncode == 0, listed.stderr
    assert {m["name"] for m in json.loads(listed.stdout)} == {"digits", "digits_int8"}


def test_a_plaintext_client_gets_nothing_from_a_tls_port(tls_server: ServerProcess) -> None:
    with grpc.insecure_channel(tls_server.grpc_address) as channel:
        assert live_status(channel) == grpc.StatusCode.UNAVAILABLE
    plain = convserve("models", "--server", tls_server.grpc_address, "--timeout", "5")
    assert plain.returncode == 1 and "error: UNAVAILABLE" in plain.stderr


def test_the_health_port_is_plaintext_and_serves_health_only(tls_server: ServerProcess) -> None:
    assert tls_server.health_port not in (0, tls_server.grpc_port)
    with grpc.insecure_channel(tls_server.health_address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "digits"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert live_status(channel) == grpc.StatusCode.UNIMPLEMENTED


def test_a_rotated_certificate_serves_new_connections_and_keeps_open_ones(
    tls_server: ServerProcess, authority: Authority, server_cert: Issued
) -> None:
    address = tls_server.grpc_address
    before = peer_serial(address, authority.cert)
    assert before == serial_of(server_cert.cert.read_bytes())
    states: list[grpc.ChannelConnectivity] = []
    changed = threading.Condition()

    def seen(state: grpc.ChannelConnectivity) -> None:
        with changed:
            states.append(state)
            changed.notify_all()

    with secure_channel(address, authority.cert) as opened:
        assert live_status(opened) == grpc.StatusCode.OK
        opened.subscribe(seen)
        with changed:
            changed.wait_for(lambda: grpc.ChannelConnectivity.READY in states, timeout=10)
        new_cert, new_key = authority.issue("rotated", server=True).read()
        # Replaced in place, the certificate first: until its key follows, the pair does not
        # match, and new connections keep getting the served certificate.
        server_cert.cert.write_bytes(new_cert)
        assert peer_serial(address, authority.cert) == before
        server_cert.key.write_bytes(new_key)
        after = peer_serial(address, authority.cert)
        print(f"serial before rotation {before:#x}, after {after:#x}")
        assert after == serial_of(new_cert) != before
        assert tls_client(address, authority.cert).is_server_ready()  # a new connection
        for _ in range(3):
            assert live_status(opened) == grpc.StatusCode.OK
        opened.unsubscribe(seen)
    # The connection opened before the change stayed up: it never left READY.
    assert states[states.index(grpc.ChannelConnectivity.READY) :] == [
        grpc.ChannelConnectivity.READY
    ], states
    tls_server.log_with("TLS certificate files changed; new connections get the new certificate")
    assert "cannot be used yet" in tls_server.log()  # the half-done rotation, logged


def test_mutual_tls_takes_a_certificate_from_its_ca(
    mutual_server: ServerProcess, authority: Authority, client_cert: Issued
) -> None:
    assert "(mutual TLS)" in mutual_server.log_with("grpc listening on")
    client = tls_client(mutual_server.grpc_address, authority.cert, client_cert)
    assert client.is_server_ready() and client.is_model_ready("digits")
    client.close()
    listed = convserve(
        "models",
        "--server",
        mutual_server.grpc_address,
        "--tls-ca",
        str(authority.cert),
        "--tls-cert",
        str(client_cert.cert),
        "--tls-key",
        str(client_cert.key),
    )
    assert listed.returncode == 0, listed.stderr
    assert "digits" in listed.stdout and "dense" in listed.stdout


def test_mutual_tls_refuses_other_clients(
    mutual_server: ServerProcess, authority: Authority, tmp_path: Path
) -> None:
    stranger = Authority(tmp_path / "other", name="another CA").issue("stranger", server=False)
    for client in (None, stranger):
        with secure_channel(mutual_server.grpc_address, authority.cert, client) as channel:
            assert live_status(channel) == grpc.StatusCode.UNAVAILABLE, client
        with pytest.raises(InferenceServerException) as refused:
            tls_client(mutual_server.grpc_address, authority.cert, client).is_server_live()
        assert refused.value.status() == "StatusCode.UNAVAILABLE"
    no_certificate = convserve(
        "models",
        "--server",
        mutual_server.grpc_address,
        "--tls-ca",
        str(authority.cert),
        "--timeout",
        "5",
    )
    assert no_certificate.returncode == 1 and "error: UNAVAILABLE" in no_certificate.stderr


def test_two_workers_both_serve_tls(authority: Authority, tmp_path: Path) -> None:
    flags = tls_flags(
        authority.issue("workers-server", server=True),
        "--grpc-use-ssl",
        "--workers",
        "2",
        "--health-port",
        "0",
    )
    with ServerProcess(BUNDLED_REPOSITORY, *flags) as server:
        for index in (0, 1):
            assert f"worker-{index} service.app.server: grpc listening on" in server.log()
        x = np.zeros((1, 1, 8, 8), np.float32)
        tensor = triton.InferInput("input", [1, 1, 8, 8], "FP32")
        tensor.set_data_from_numpy(x)
        connections = 16
        counts = []
        for _ in range(connections):  # each a new TLS connection, to whichever worker
            client = tls_client(server.grpc_address, authority.cert)
            assert client.infer("digits", [tensor]).as_numpy("logits").shape == (1, 10)
            own = client.get_inference_statistics("digits", headers=LOCAL_ONLY)
            counts.append(own.model_stats[0].inference_count)
            client.close()
        # One worker alone would count 1, 2, ..., 16: both served when its count stays lower.
        assert max(counts) < connections, f"one worker took all {connections} connections"
        with grpc.insecure_channel(server.health_address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_client_flag_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from service.__main__ import main

    absent = str(tmp_path / "absent.pem")
    for flags, error in [
        (["--tls-ca", absent], f"cannot read {absent}: No such file or directory"),
        (["--tls-ca", __file__], f"{__file__} holds no PEM data"),
        (["--tls-cert", absent], "--tls-cert and --tls-key go together"),
    ]:
        assert main(["models", "--server", "127.0.0.1:1", *flags]) == 1
        assert capsys.readouterr().err == f"convserve models: error: {error}\n"
    for header, error in [
        ("no-equals", "expected KEY=VALUE"),
        ("bad key=1", "expected KEY=VALUE"),
        ("X-Bin=1", "header 'x-bin' cannot be sent as text"),
        ("key=caf\u00e9", "header 'key': the value must be printable ASCII"),
    ]:
        with pytest.raises(SystemExit) as exited:
            main(["models", "--header", header])
        assert exited.value.code == 2
        assert f"argument --header: {error}" in capsys.readouterr().err
