"""TLS and mutual TLS for the gRPC port, with certificates re-read when their files change.

cert-manager and Kubernetes secret updates rotate certificates in place: the mounted files are
replaced while the pod runs. gRPC asks :meth:`CertificateFiles.fetch` before every new
connection's handshake; it compares the files' identity (inode, size, modification time) with
what it last read and re-reads them only when one changed, so the next connection gets the new
certificate while connections in flight keep theirs.

The HTTP port serves the same files through Python's ``ssl`` (:func:`http_ssl_context`): the
same comparison runs at each new connection's handshake, and a changed pair is served from that
connection on.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

__all__ = ["CertificateFiles", "TlsError", "http_ssl_context", "server_credentials"]

log = logging.getLogger(__name__)


class TlsError(Exception):
    """The TLS settings cannot be used: a file is missing or unreadable, or a pair is incomplete."""


@dataclass(frozen=True)
class _Identity:
    inode: int
    size: int
    mtime_ns: int


class CertificateFiles:
    """The server's key and certificate chain, and the CA that signs client certificates.

    Args:
        cert: PEM certificate chain of the server.
        key: PEM private key of the server.
        root: PEM CA bundle that client certificates must chain to (mutual TLS), or None.
    """

    def __init__(self, cert: Path, key: Path, root: Path | None) -> None:
        self._paths = tuple(p for p in (cert, key, root) if p is not None)
        self.paths = self._paths
        """The certificate, the key and (mutual TLS) the root CA bundle."""
        self._lock = threading.Lock()
        self._seen = self._identities()
        self._config = self._read()

    @property
    def initial(self) -> grpc.ServerCertificateConfiguration:
        """The configuration read at start."""
        return self._config

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """A new configuration when a file changed since the last read, else None (no change).

        A file caught half-written (a key without its certificate, unreadable PEM) is logged and
        the served certificate kept; the next connection tries again.
        """
        with self._lock:
            try:
                now = self._identities()
            except TlsError as exc:
                log.warning("TLS files unreadable, keeping the served certificate: %s", exc)
                return None
            if now == self._seen:
                return None
            try:
                config = self._read()
                if self._identities() != now:  # written to while read: the next look reads it
                    return None
            except TlsError as exc:
                log.warning("TLS files changed but cannot be used yet: %s", exc)
                return None
            self._seen, self._config = now, config
            log.info("TLS certificate files changed; new connections get the new certificate")
            return config

    def _identities(self) -> tuple[_Identity, ...]:
        try:
            stats = [os.stat(p) for p in self._paths]
        except OSError as exc:
            raise TlsError(f"cannot read '{exc.filename}': {exc.strerror}") from exc
        return tuple(_Identity(s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)

    def _read(self) -> grpc.ServerCertificateConfiguration:
        contents = []
        for path in self._paths:
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise TlsError(f"cannot read '{path}': {exc.strerror}") from exc
            if b"-----BEGIN" not in data:
                raise TlsError(f"'{path}' holds no PEM data")
            contents.append(data)
        cert, key, *root = contents
        _check_pair(self._paths[0], self._paths[1])
        return grpc.ssl_server_certificate_configuration(
            [(key, cert)], root_certificates=root[0] if root else None
        )


def _check_pair(cert: Path, key: Path) -> None:
    """Raise TlsError unless ``key`` is the private key of ``cert``'s first certificate.

    gRPC takes any pair and fails each handshake with it: a rotation that has replaced the
    certificate but not yet its key must keep the served pair instead.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # An encrypted key gets an empty password and fails here, as it would in gRPC.
        context.load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as exc:
        raise TlsError(f"'{key}' is not the private key of '{cert}' ({exc.reason})") from exc
    except OSError as exc:
        raise TlsError(f"cannot read '{exc.filename}': {exc.strerror}") from exc


def server_credentials(files: CertificateFiles, mutual: bool) -> grpc.ServerCredentials:
    """Credentials that serve ``files`` and pick up their rotation on the next connection.

    Args:
        files: the certificate files.
        mutual: require a client certificate that chains to ``files``' root CA.
    """
    return grpc.dynamic_ssl_server_credentials(
        files.initial, files.fetch, require_client_authentication=mutual
    )


class _SslFiles:
    """The HTTP port's TLS context, switched to freshly read files when they change."""

    def __init__(self, paths: tuple[Path, ...], mutual: bool) -> None:
        self._paths = paths
        self._mutual = mutual
        self._seen = self._identities()
        self._current = self.context = self._read()
        self.context.sni_callback = self._handshake

    def _identities(self) -> tuple[_Identity, ...]:
        try:
            stats = [os.stat(p) for p in self._paths]
        except OSError as exc:
            raise TlsError(f"cannot read '{exc.filename}': {exc.strerror}") from exc
        return tuple(_Identity(s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)

    def _read(self) -> ssl.SSLContext:
        cert, key, *root = self._paths
        _check_pair(cert, key)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(cert, key, password=lambda: b"")
        if self._mutual:
            try:
                context.load_verify_locations(root[0])
            except (OSError, ssl.SSLError) as exc:
                raise TlsError(f"cannot use '{root[0]}' as a CA bundle: {exc}") from exc
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def _handshake(self, connection: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
        """Before each handshake: serve the files as they are now (read again if changed)."""
        try:
            now = self._identities()
            if now != self._seen:
                fresh = self._read()
                if self._identities() == now:  # not written to while read
                    self._seen, self._current = now, fresh
                    log.info("TLS certificate files changed; new HTTP connections get them")
        except TlsError as exc:
            log.warning("TLS files changed but cannot be used yet: %s", exc)
        if self._current is not self.context:
            connection.context = self._current


def http_ssl_context(files: CertificateFiles, mutual: bool) -> ssl.SSLContext:
    """A TLS context for the HTTP port serving ``files``, picking up their rotation.

    Raises:
        TlsError: a file cannot be read or the key is not the certificate's.
    """
    return _SslFiles(files.paths, mutual).context
