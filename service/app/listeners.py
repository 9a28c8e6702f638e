"""What the server listens on: the gRPC and HTTP ports, a worker's own socket, the health port.

The gRPC port's options, TLS credentials (re-read when rotated) and reflection; the HTTP port's
socket and TLS (the gRPC port's files); the log lines that say how each is protected.
"""

from __future__ import annotations

import logging
import shutil
import socket
import ssl
import tempfile
from pathlib import Path

import grpc
from google.protobuf import descriptor_pool  # type: ignore[import-untyped]
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from service._generated.convserve.v1 import classifier_pb2 as classifier_pb
from service._generated.inference import grpc_service_pb2 as kserve_pb
from service.app.tls import CertificateFiles, http_ssl_context, server_credentials
from service.app.workers import WorkerRole
from service.core.ports import busy_port_message, port_is_free
from service.core.settings import Settings
from service.wire.health import Health
from service.wire.rpc import CALL_QUEUE_OPTIONS
from service.wire.siblings import socket_path

__all__ = [
    "credentials",
    "enable_reflection",
    "forget_socket",
    "grpc_options",
    "http_security",
    "http_socket",
    "http_tls",
    "listen",
    "own_socket",
    "reflection_pool",
    "security",
    "start_health_port",
]

log = logging.getLogger(__name__)


def grpc_options(settings: Settings, role: WorkerRole | None) -> list[tuple[str, int]]:
    """The gRPC server's options: message sizes, port sharing, call queue, connection age."""
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # Shared only among the workers of one supervisor; a lone server must own its port.
        ("grpc.so_reuseport", 1 if role else 0),
        *CALL_QUEUE_OPTIONS,  # every call reaches the server to be counted, or refused by it
    ]
    if settings.max_connection_age:
        # GOAWAY after this age; in-flight calls get the drain grace to finish.
        options += [
            ("grpc.max_connection_age_ms", int(settings.max_connection_age * 1000)),
            ("grpc.max_connection_age_grace_ms", int(settings.drain_grace_seconds * 1000)),
        ]
    return options


def reflection_pool() -> descriptor_pool.DescriptorPool:
    """Every served service's file in one pool, for reflection to describe.

    Our contracts live in service._generated.POOL, apart from protobuf's default pool (where
    tritonclient's same-named messages may be), and health and reflection live in the default
    pool: reflection reads a single pool, so it gets one holding all four files.
    """
    pool = descriptor_pool.DescriptorPool()
    for module in (kserve_pb, classifier_pb, health_pb2, reflection_pb2):
        pool.AddSerializedFile(module.DESCRIPTOR.serialized_pb)
    return pool


def enable_reflection(server: grpc.aio.Server) -> None:
    """Serve gRPC reflection of every served service (what grpcurl list and describe read)."""
    reflection.enable_server_reflection(
        [
            kserve_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
            classifier_pb.DESCRIPTOR.services_by_name["Classifier"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
        pool=reflection_pool(),
    )


def security(settings: Settings) -> str:
    """How the gRPC port is protected, for its "listening" log line."""
    parts = ["mutual TLS" if settings.grpc_use_ssl_mutual else "TLS" if settings.tls else ""]
    parts += [f"restricted: {', '.join(sorted(r.groups))}" for r in settings.restrictions]
    parts += ["" if settings.reflection else "no reflection"]
    shown = [p for p in parts if p]
    return f" ({'; '.join(shown)})" if shown else ""


def http_security(settings: Settings) -> str:
    """How the HTTP port is protected, for its "listening" log line."""
    parts = ["mutual TLS" if settings.grpc_use_ssl_mutual else "TLS" if settings.tls else ""]
    parts += [f"restricted: {', '.join(sorted(r.groups))}" for r in settings.http_restrictions]
    shown = [p for p in parts if p]
    return f" ({'; '.join(shown)})" if shown else ""


def _certificate_files(settings: Settings) -> CertificateFiles:
    return CertificateFiles(
        Path(settings.grpc_server_cert),
        Path(settings.grpc_server_key),
        Path(settings.grpc_root_cert) if settings.grpc_use_ssl_mutual else None,
    )


def credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials for the gRPC port (None: plaintext), re-reading rotated certificates."""
    if not settings.tls:
        return None
    return server_credentials(_certificate_files(settings), mutual=settings.grpc_use_ssl_mutual)


def http_tls(settings: Settings) -> ssl.SSLContext | None:
    """The HTTP port's TLS: the gRPC port's files and mode (None: plaintext, as gRPC is).

    Raises:
        TlsError: a certificate file cannot be read.
    """
    if not settings.tls:
        return None
    return http_ssl_context(_certificate_files(settings), mutual=settings.grpc_use_ssl_mutual)


def http_socket(settings: Settings, role: WorkerRole | None) -> socket.socket | None:
    """The HTTP port's socket, bound and not yet listening; None (logged) when it cannot bind.

    A worker's is shared with its siblings (``SO_REUSEPORT``; the supervisor reserved the port);
    a lone server's must be its own.
    """
    host, port = settings.host, settings.http_port
    if role is None and not port_is_free(host, port):
        log.error(busy_port_message("HTTP", host, port, "http_port"))
        return None
    family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if role is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        log.error("cannot listen on %s:%d (--http-port): %s", host, port, exc.strerror)
        return None
    sock.setblocking(False)
    return sock


def own_socket(role: WorkerRole | None) -> Path:
    """Where this server listens for itself (and, a worker, for its siblings): a Unix socket.

    A worker's is in its supervisor's folder, where the other workers find it (see
    :mod:`service.wire.siblings`); a lone server's in a folder of its own that only its user
    may enter, removed by :func:`forget_socket`.
    """
    if role is not None:
        return socket_path(role.folder, role.index)
    return Path(tempfile.mkdtemp(prefix="convserve-")) / "server.sock"


def forget_socket(socket: Path, role: WorkerRole | None) -> None:
    """Remove a lone server's socket folder (a worker's goes with its supervisor's)."""
    if role is None:
        shutil.rmtree(socket.parent, ignore_errors=True)


def listen(
    server: grpc.aio.Server, settings: Settings, role: WorkerRole | None, socket: Path
) -> int:
    """Bind the gRPC port and the server's own socket; the port, or 0 (logged) on failure.

    The socket (:func:`own_socket`) carries the server's drain markers to itself (see
    :mod:`service.wire.drain_markers`) and, for a worker, the other workers' calls; a restarted
    worker finds its predecessor's socket file there. It stays plaintext: only this machine's
    processes reach a Unix socket.

    Raises:
        TlsError: a certificate file cannot be read.
    """
    address = f"{settings.host}:{settings.grpc_port}"
    # Checked first: gRPC would print its own low-level error and raise a bare RuntimeError.
    if role is None and not port_is_free(settings.host, settings.grpc_port):
        log.error(busy_port_message("gRPC", settings.host, settings.grpc_port, "grpc_port"))
        return 0
    protection = credentials(settings)
    if protection is None:
        port = int(server.add_insecure_port(address))
    else:
        port = int(server.add_secure_port(address, protection))
    if port == 0:
        log.error("cannot listen on %s:%d", settings.host, settings.grpc_port)
        return 0
    socket.unlink(missing_ok=True)
    if not server.add_insecure_port(f"unix:{socket}"):
        log.error("cannot listen on unix:%s", socket)
        return 0
    return port


async def start_health_port(
    settings: Settings, health: Health, role: WorkerRole | None
) -> grpc.aio.Server | None:
    """The plaintext listener that serves grpc.health.v1 only, for probes that cannot speak TLS.

    It carries nothing but health statuses, so it weakens neither the TLS of the gRPC port nor
    its restricted groups; None when ``--health-port`` is -1, or when it cannot bind (logged).
    """
    if settings.health_port < 0:
        return None
    if role is None and not port_is_free(settings.host, settings.health_port):
        log.error(busy_port_message("health", settings.host, settings.health_port, "health_port"))
        return None
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1 if role else 0)])
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    port = server.add_insecure_port(f"{settings.host}:{settings.health_port}")
    if port == 0:
        log.error("cannot listen on %s:%d (--health-port)", settings.host, settings.health_port)
        return None
    await server.start()
    log.info("health listening on %s:%d (plaintext, grpc.health.v1 only)", settings.host, port)
    return server
