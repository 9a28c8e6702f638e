"""The composition root: builds every part, listens, loads models, drains on SIGTERM.

Order of life, the phases of :class:`~service.engine.lifecycle.Lifecycle`: the gRPC port opens
first (liveness answers, health is NOT_SERVING), then the models that ``--model-control-mode``
loads at the start load and warm up, then the server is serving (health SERVING; a worker tells
its supervisor through its ready file; in poll mode the repository is watched from then on). On
SIGTERM or SIGINT it drains: health turns NOT_SERVING, new requests get UNAVAILABLE, in-flight
requests finish within the drain grace, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf import descriptor_pool  # type: ignore[import-untyped]
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from service._generated.convserve.v1 import classifier_pb2 as classifier_pb
from service._generated.convserve.v1 import classifier_pb2_grpc as classifier_grpc
from service._generated.inference import grpc_service_pb2 as kserve_pb
from service._generated.inference import grpc_service_pb2_grpc as kserve_grpc
from service.app.tls import CertificateFiles, TlsError, server_credentials
from service.app.workers import WorkerRole
from service.classification.api import Classification
from service.core.event_loop import describe
from service.core.ports import busy_port_message, port_is_free
from service.core.settings import Settings
from service.engine.dataplane import DataPlane
from service.engine.lifecycle import Lifecycle
from service.engine.metrics import register_gpu_metrics, serve_metrics
from service.engine.model_control import ModelControl
from service.engine.poller import RepositoryPoller
from service.engine.repository import ModelRepository
from service.engine.runtime import (
    DeviceChoice,
    available_cores,
    return_large_blocks_to_the_os,
)
from service.wire.classifier_servicer import ClassifierServicer
from service.wire.health import Health
from service.wire.kserve_servicer import KServeServicer
from service.wire.restrictions import RestrictionInterceptor
from service.wire.rpc import CALL_QUEUE_OPTIONS, register
from service.wire.siblings import EveryWorker, Siblings, socket_path

__all__ = ["run_server"]

log = logging.getLogger(__name__)


def _grpc_options(settings: Settings, role: WorkerRole | None) -> list[tuple[str, int]]:
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


def _reflection_pool() -> descriptor_pool.DescriptorPool:
    """Every served service's file in one pool, for reflection to describe.

    Our contracts live in service._generated.POOL, apart from protobuf's default pool (where
    tritonclient's same-named messages may be), and health and reflection live in the default
    pool: reflection reads a single pool, so it gets one holding all four files.
    """
    pool = descriptor_pool.DescriptorPool()
    for module in (kserve_pb, classifier_pb, health_pb2, reflection_pb2):
        pool.AddSerializedFile(module.DESCRIPTOR.serialized_pb)
    return pool


def _enable_reflection(server: grpc.aio.Server) -> None:
    reflection.enable_server_reflection(
        [
            kserve_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
            classifier_pb.DESCRIPTOR.services_by_name["Classifier"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
        pool=_reflection_pool(),
    )


def _security(settings: Settings) -> str:
    """How the gRPC port is protected, for its "listening" log line."""
    parts = ["mutual TLS" if settings.grpc_use_ssl_mutual else "TLS" if settings.tls else ""]
    parts += [f"restricted: {', '.join(sorted(r.groups))}" for r in settings.restrictions]
    parts += ["" if settings.reflection else "no reflection"]
    shown = [p for p in parts if p]
    return f" ({'; '.join(shown)})" if shown else ""


async def _watch_supervisor(role: WorkerRole, stop: asyncio.Event) -> None:
    """A worker whose supervisor died (SIGKILL, OOM) drains and exits instead of lingering."""
    while not role.orphaned():
        await asyncio.sleep(1.0)
    log.error("worker %d: the supervisor is gone; draining", role.index)
    stop.set()


def _credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials for the gRPC port (None: plaintext), re-reading rotated certificates."""
    if not settings.tls:
        return None
    files = CertificateFiles(
        Path(settings.grpc_server_cert),
        Path(settings.grpc_server_key),
        Path(settings.grpc_root_cert) if settings.grpc_use_ssl_mutual else None,
    )
    return server_credentials(files, mutual=settings.grpc_use_ssl_mutual)


def _listen(server: grpc.aio.Server, settings: Settings, role: WorkerRole | None) -> int:
    """Bind the gRPC port, and a worker's own socket; the port, or 0 (logged) on failure.

    The socket is where the other workers reach this one (see :mod:`service.wire.siblings`); a
    restarted worker finds its predecessor's socket file there. It stays plaintext: only this
    machine's processes reach a Unix socket.

    Raises:
        TlsError: a certificate file cannot be read.
    """
    address = f"{settings.host}:{settings.grpc_port}"
    # Checked first: gRPC would print its own low-level error and raise a bare RuntimeError.
    if role is None and not port_is_free(settings.host, settings.grpc_port):
        log.error(busy_port_message("gRPC", settings.host, settings.grpc_port, "grpc_port"))
        return 0
    credentials = _credentials(settings)
    if credentials is None:
        port = int(server.add_insecure_port(address))
    else:
        port = int(server.add_secure_port(address, credentials))
    if port == 0:
        log.error("cannot listen on %s:%d", settings.host, settings.grpc_port)
        return 0
    if role is not None:
        private = socket_path(role.folder, role.index)
        private.unlink(missing_ok=True)
        if not server.add_insecure_port(f"unix:{private}"):
            log.error("cannot listen on unix:%s", private)
            return 0
    return port


async def _start_health_port(
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


async def _load_models(parts: _Parts) -> list[str]:
    """Load the models the start asks for; returns the names that failed.

    By ``--model-control-mode``: every model on disk (none, poll), or the ``--load-model``
    names (explicit: none without it, every model for ``*``), as in Triton. A replacement worker
    instead loads what its siblings serve now and marks what they unloaded as unloaded, so a
    load or unload since the start holds for it too.
    """
    repository, role, siblings = parts.repository, parts.role, parts.siblings
    if role is not None and siblings is not None and role.replacement:
        index = await siblings.index()
        if index is not None:
            ready = {repository.logical_name(name) for name, state, _ in index if state == "READY"}
            unloaded = {name for name, _, reason in index if reason == "unloaded"} - ready
            repository.mark_unloaded(sorted(unloaded))
            return await repository.load_all(sorted(ready))
        log.warning("no other worker said what it serves; loading what a start loads")
    settings = parts.settings
    if settings.model_control_mode == "explicit" and "*" not in settings.load_model:
        return await repository.load_all(sorted(set(settings.load_model)))
    return await repository.load_all()


def _poller(parts: _Parts) -> RepositoryPoller | None:
    """The repository's poller, when this process is the one that polls (poll mode)."""
    settings = parts.settings
    if settings.model_control_mode != "poll" or (parts.role is not None and not parts.role.polls):
        return None
    siblings = parts.siblings
    watched = parts.repository if siblings is None else EveryWorker(parts.repository, siblings)
    return RepositoryPoller(watched, settings.repository_poll_secs)


@dataclass
class _Parts:
    """Everything one server process is built from, composed once by :func:`_build`."""

    settings: Settings
    role: WorkerRole | None
    repository: ModelRepository
    lifecycle: Lifecycle
    health: Health
    siblings: Siblings | None
    server: grpc.aio.Server
    pools: tuple[ThreadPoolExecutor, ThreadPoolExecutor]  # inference, decoding
    probes: grpc.aio.Server | None = None  # the plaintext health port, when there is one
    poller: RepositoryPoller | None = None  # poll mode, in the process that polls


def _build(settings: Settings, role: WorkerRole | None) -> _Parts:
    executor = ThreadPoolExecutor(
        max_workers=max(4, available_cores() * 2), thread_name_prefix="inference"
    )
    # The repository reports its changes to the lifecycle, which reads the models' states back.
    repository = ModelRepository(
        settings.model_repository,
        settings,
        DeviceChoice(settings.device),
        executor,
        lambda names: lifecycle.models_changed(names),
    )
    lifecycle = Lifecycle(repository)
    health = Health(lifecycle)
    plane = DataPlane(repository, lifecycle)
    headers = [(r.header, r.value) for r in settings.restrictions]
    siblings = (
        None if role is None else Siblings(role.folder, role.index, settings.workers, headers)
    )
    kserve = KServeServicer(
        plane, settings.max_tensor_elements, siblings, ModelControl.from_settings(settings)
    )
    decoders = ThreadPoolExecutor(max_workers=available_cores(), thread_name_prefix="decode")
    classifier = ClassifierServicer(
        Classification(plane, settings, decoders), settings.max_tensor_elements
    )
    interceptors = [RestrictionInterceptor(settings.restrictions)] if headers else []
    server = grpc.aio.server(options=_grpc_options(settings, role), interceptors=interceptors)
    register(kserve_grpc.add_GRPCInferenceServiceServicer_to_server, kserve, server)
    register(classifier_grpc.add_ClassifierServicer_to_server, classifier, server)
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    if settings.reflection:
        _enable_reflection(server)
    return _Parts(
        settings, role, repository, lifecycle, health, siblings, server, (executor, decoders)
    )


async def _open_ports(parts: _Parts) -> bool:
    """Start the gRPC port and the probes' health port; False (logged) when one cannot open."""
    settings = parts.settings
    try:
        port = _listen(parts.server, settings, parts.role)
    except TlsError as exc:
        log.error("cannot serve TLS: %s", exc)
        return False
    if port == 0:
        return False
    await parts.lifecycle.listen(parts.health.update)  # "" NOT_SERVING until models load
    await parts.server.start()
    log.info("grpc listening on %s:%d%s", settings.host, port, _security(settings))
    parts.probes = await _start_health_port(settings, parts.health, parts.role)
    if settings.health_port >= 0 and parts.probes is None:
        await parts.server.stop(0)
        return False
    return True


async def _load(parts: _Parts) -> int:
    """Load the models and report ready; a non-zero exit code when the start must stop.

    A model that fails stops the start (exit 1), as Triton's ``--exit-on-error`` does;
    with ``--exit-on-error=false`` the others serve. In poll mode, polling starts once ready.
    """
    poller = _poller(parts)
    try:
        if poller is not None and not (parts.role is not None and parts.role.replacement):
            await poller.baseline()  # before the load reads the files
        failed = await _load_models(parts)
    except BaseException:
        await parts.server.stop(0)
        raise
    if failed and parts.settings.exit_on_error:
        log.error("models failed to load: %s; shutting down", ", ".join(failed))
        await parts.server.stop(0)
        parts.pools[0].shutdown(wait=False, cancel_futures=True)
        return 1
    if failed:
        log.warning("models failed to load: %s; serving the others", ", ".join(failed))
    await parts.lifecycle.serving()
    if poller is not None:
        poller.start()
        parts.poller = poller
    names = ", ".join(sorted({m.name for m in parts.repository.served()})) or "no models"
    if parts.role is None:
        log.info("ready: serving %s", names)
    else:
        log.info("worker %d is ready with %s", parts.role.index, names)
        parts.role.mark_ready()  # after the log line, which the supervisor's "ready" follows
    return 0


async def _drain(parts: _Parts) -> None:
    grace = parts.settings.drain_grace_seconds
    log.info("draining: finishing in-flight requests (grace %.1f s)", grace)
    if parts.poller is not None:  # no model changes while the server drains
        await parts.poller.stop()
    parts.repository.draining()  # convserve_model_ready 0: no version takes new requests
    await parts.lifecycle.draining()  # health NOT_SERVING everywhere, new requests UNAVAILABLE
    await parts.server.stop(grace)
    if parts.probes is not None:
        await parts.probes.stop(0)
    await parts.repository.close()
    for pool in parts.pools:
        pool.shutdown(wait=True)
    await parts.lifecycle.stopped()


async def run_server(settings: Settings, role: WorkerRole | None = None) -> int:
    """Serve until SIGTERM/SIGINT; returns the process exit code.

    ``role`` is set when a ``--workers`` supervisor started this process.
    """
    if not settings.model_repository.is_dir():
        log.error("model repository %s does not exist", settings.model_repository)
        return 2
    # The inference threads need the GIL back the moment ONNX Runtime returns; Python's default
    # 5 ms switch interval would let the busy event loop keep it that long.
    sys.setswitchinterval(0.0005)
    return_large_blocks_to_the_os()  # dense passes of varied sizes: idle memory stays flat
    loop = asyncio.get_running_loop()
    log.info("event loop: %s", describe(loop))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watcher: asyncio.Task[None] | None = None
    register_gpu_metrics()
    if role is None:
        metrics_host = settings.metrics_host or settings.host
        metrics_port = serve_metrics(metrics_host, settings.metrics_port)
        log.info("metrics listening on %s:%d", metrics_host, metrics_port)
    else:  # the supervisor serves every worker's metrics
        watcher = loop.create_task(_watch_supervisor(role, stop), name="watch-supervisor")

    parts = _build(settings, role)
    if not await _open_ports(parts):
        return 2
    code = await _load(parts)
    if code:
        return code
    await stop.wait()
    if watcher is not None:
        watcher.cancel()
    await _drain(parts)
    log.info("stopped")
    return 0
