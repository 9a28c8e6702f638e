"""TLS on the HTTP port: the gRPC port's certificate files and mode, rotation included."""

from __future__ import annotations

import http.client
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import tritonclient.http as triton

from service import BUNDLED_REPOSITORY
from service.tools.server_process import ServerProcess
from tests.certificates import Authority, Issued, serial_of
from tests.test_tls import tls_flags


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> Authority:
    return Authority(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def server_cert(authority: Authority) -> Issued:
    return authority.issue("server", server=True)


@pytest.fixture(scope="module")
def tls_server(server_cert: Issued) -> Iterator[ServerProcess]:
    with ServerProcess(BUNDLED_REPOSITORY, *tls_flags(server_cert, "--grpc-use-ssl")) as server:
        yield server


def context(ca: Path, client: Issued | None = None) -> ssl.SSLContext:
    made = ssl.create_default_context(cafile=str(ca))
    if client is not None:
        made.load_cert_chain(client.cert, client.key)
    return made


def ready(server: ServerProcess, tls: ssl.SSLContext) -> int:
    """GET /v2/health/ready over a new TLS connection; its status."""
    connection = http.client.HTTPSConnection("127.0.0.1", server.http_port, timeout=10, context=tls)
    try:
        connection.request("GET", "/v2/health/ready")
        return connection.getresponse().status
    finally:
        connection.close()


def peer_serial(server: ServerProcess, ca: Path) -> int:
    with (
        socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as raw,
        context(ca).wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        certificate = tls.getpeercert(binary_form=True)
    assert certificate is not None
    return serial_of(certificate)


def test_https_with_the_grpc_port_files(tls_server: ServerProcess, authority: Authority) -> None:
    assert "http listening on 127.0.0.1" in tls_server.log_with("(TLS)")
    assert ready(tls_server, context(authority.cert)) == 200
    client = triton.InferenceServerClient(
        tls_server.http_address, ssl=True, ssl_options={"ca_certs": str(authority.cert)}
    )
    try:
        assert client.is_server_ready()
        assert client.get_model_metadata("digits")["name"] == "digits"
    finally:
        client.close()


def test_plaintext_gets_no_answer(tls_server: ServerProcess, authority: Authority) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", tls_server.http_port, timeout=10)
    try:
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            connection.request("GET", "/v2/health/ready")
            connection.getresponse()
    finally:
        connection.close()
    assert ready(tls_server, context(authority.cert)) == 200


def test_a_rotated_certificate_serves_new_connections(
    tls_server: ServerProcess, authority: Authority, server_cert: Issued
) -> None:
    before = peer_serial(tls_server, authority.cert)
    assert before == serial_of(server_cert.cert.read_bytes())
    new_cert, new_key = authority.issue("rotated", server=True).read()
    server_cert.cert.write_bytes(new_cert)  # the key does not match yet: the served pair stays
    assert peer_serial(tls_server, authority.cert) == before
    server_cert.key.write_bytes(new_key)
    assert peer_serial(tls_server, authority.cert) == serial_of(new_cert) != before
    assert ready(tls_server, context(authority.cert)) == 200
    tls_server.log_with("TLS certificate files changed; new HTTP connections get them")


def test_mutual_tls_needs_a_client_certificate(authority: Authority) -> None:
    flags = tls_flags(
        authority.issue("mutual-server", server=True),
        "--grpc-use-ssl-mutual",
        "--grpc-root-cert",
        str(authority.cert),
    )
    with ServerProcess(BUNDLED_REPOSITORY, *flags) as server:
        client = authority.issue("client", server=False)
        assert ready(server, context(authority.cert, client)) == 200
        with pytest.raises((ssl.SSLError, ConnectionError)):
            ready(server, context(authority.cert))
        stranger = Authority(authority.folder / "other", name="another CA")
        with pytest.raises((ssl.SSLError, ConnectionError)):
            ready(server, context(authority.cert, stranger.issue("stranger", server=False)))
