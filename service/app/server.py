"""The composition root: builds every part, listens, loads models, drains on SIGTERM.

Order of life, the phases of :class:`~service.engine.lifecycle.Lifecycle`: the gRPC and HTTP
ports open first (liveness answers, health is NOT_SERVING), then the models that
``--model-control-mode`` loads at the start load and warm up, then the server is serving (health
SERVING; a worker tells its supervisor through its ready file; in poll mode the repository is
watched from then on). On SIGTERM or SIGINT it drains (:func:`_drain`): readiness turns
NOT_SERVING, new calls get UNAVAILABLE at the door (new REST inferences 503), streams answer what
they have read and end with UNAVAILABLE, and the server stops as soon as every call taken before
the drain has finished (within the drain grace), exiting 0. The HTTP port
(:mod:`service.wire.http`) runs on the same loop, data plane and door, and closes with the gRPC
port. A model call still running in the runtime after the drain (a wedged one) cannot be
stopped: the process then exits 1 without it instead of waiting for it forever.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2_grpc

from service._generated.convserve.v1 import classifier_pb2_grpc as classifier_grpc
from service._generated.inference import grpc_service_pb2_grpc as kserve_grpc
from service.app.listeners import (
    enable_reflection,
    forget_socket,
    grpc_options,
    http_security,
    http_socket,
    http_tls,
    listen,
    own_socket,
    security,
    start_health_port,
)
from service.app.tls import TlsError
from service.app.workers import WorkerRole
from service.classification.api import Classification
from service.core.event_loop import describe
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
from service.wire.drain_markers import KINDS, send_markers
from service.wire.health import Health
from service.wire.http.app import HttpServer, RouteSet, build_application
from service.wire.http.classification import add_classification_routes
from service.wire.http.routes import HttpParts
from service.wire.kserve_servicer import KServeServicer
from service.wire.restrictions import RestrictionInterceptor
from service.wire.rpc import register
from service.wire.siblings import EveryWorker, Siblings

__all__ = ["run_server"]

log = logging.getLogger(__name__)


async def _watch_supervisor(role: WorkerRole, stop: asyncio.Event) -> None:
    """A worker whose supervisor died (SIGKILL, OOM) drains and exits instead of lingering."""
    while not role.orphaned():
        await asyncio.sleep(1.0)
    log.error("worker %d: the supervisor is gone; draining", role.index)
    stop.set()


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
    socket: Path  # where the server listens for itself (drain markers) and its siblings
    probes: grpc.aio.Server | None = None  # the plaintext health port, when there is one
    poller: RepositoryPoller | None = None  # poll mode, in the process that polls
    http: HttpServer | None = None  # KServe v2 over HTTP/REST, unless --allow-http=false

    async def stop_ports(self, grace: float) -> None:
        """Stop the gRPC and HTTP ports (the gRPC calls still running get ``grace`` seconds)."""
        await self.server.stop(grace)
        if self.http is not None:
            await self.http.stop()


def _http(
    settings: Settings, plane: DataPlane, siblings: Siblings | None, classification: Classification
) -> HttpServer | None:
    """The REST front door on the same data plane, or None with ``--allow-http=false``."""
    if not settings.allow_http:
        return None
    parts = HttpParts(
        plane,
        ModelControl.from_settings(settings),
        siblings,
        settings.max_tensor_elements,
        settings.max_message_bytes,
        settings.http_restrictions,
    )
    # REST routes beyond KServe v2's (see wire/http/app.py)
    route_sets: list[RouteSet] = [lambda routes: add_classification_routes(routes, classification)]
    return HttpServer(build_application(parts, route_sets), _CLOSING_SECONDS)


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
    classification = Classification(plane, settings, decoders)
    classifier = ClassifierServicer(classification, settings.max_tensor_elements)
    interceptors = [RestrictionInterceptor(settings.restrictions)] if headers else []
    server = grpc.aio.server(options=grpc_options(settings, role), interceptors=interceptors)
    register(kserve_grpc.add_GRPCInferenceServiceServicer_to_server, kserve, server)
    register(classifier_grpc.add_ClassifierServicer_to_server, classifier, server)
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    if settings.reflection:
        enable_reflection(server)
    pools = (executor, decoders)
    parts = _Parts(
        settings, role, repository, lifecycle, health, siblings, server, pools, own_socket(role)
    )
    parts.http = _http(settings, plane, siblings, classification)
    return parts


async def _open_ports(parts: _Parts) -> bool:
    """Start the gRPC, HTTP and probes' health ports; False (logged) when one cannot open."""
    settings = parts.settings
    try:
        port = listen(parts.server, settings, parts.role, parts.socket)
        tls = http_tls(settings) if parts.http is not None else None
    except TlsError as exc:
        log.error("cannot serve TLS: %s", exc)
        return False
    if port == 0:
        return False
    await parts.lifecycle.listen(parts.health.update)  # "" NOT_SERVING until models load
    await parts.server.start()
    log.info("grpc listening on %s:%d%s", settings.host, port, security(settings))
    if parts.http is not None:
        sock = http_socket(settings, parts.role)
        if sock is None:
            await parts.server.stop(0)
            return False
        http_port = await parts.http.start(sock, tls)
        log.info("http listening on %s:%d%s", settings.host, http_port, http_security(settings))
    parts.probes = await start_health_port(settings, parts.health, parts.role)
    if settings.health_port >= 0 and parts.probes is None:
        await parts.stop_ports(0)
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
        await parts.stop_ports(0)
        raise
    if failed and parts.settings.exit_on_error:
        log.error("models failed to load: %s; shutting down", ", ".join(failed))
        await parts.stop_ports(0)
        parts.pools[0].shutdown(wait=False, cancel_futures=True)
        return 1
    if failed:
        log.warning("models failed to load: %s; serving the others", ", ".join(failed))
    await parts.lifecycle.serving()
    if poller is not None:
        poller.start()
        parts.poller = poller
    names = ", ".join(sorted({m.name for m in parts.repository.served()})) or "no models"
    if names == "no models" and parts.settings.model_control_mode != "explicit":
        # explicit mode starts empty on purpose (no --load-model); otherwise it is a mistake
        log.warning(
            "the model repository %s holds no models: serving nothing (point "
            "--model-repository at a folder of <name>/<version>/model.onnx)",
            parts.settings.model_repository,
        )
    if parts.role is None:
        log.info("ready: serving %s", names)
    else:
        log.info("worker %d is ready with %s", parts.role.index, names)
        parts.role.mark_ready()  # after the log line, which the supervisor's "ready" follows
    return 0


_CLOSING_SECONDS = 1.0
"""Once the calls taken before the drain have finished: how long the calls refused meanwhile get
to send their UNAVAILABLE, and the runtime to stop, before the server stops without them."""
_QUIET_SECONDS = 0.05
"""Clients told UNAVAILABLE stop calling within this; the server stops once they have."""


async def _drain(parts: _Parts) -> bool:
    """Refuse new calls, finish those taken before, stop; False when model calls still run.

    The server keeps picking calls up while it drains, so that a call gRPC holds for it is
    refused with UNAVAILABLE (retried elsewhere) rather than cancelled by the stop; it stops
    once no call taken before the drain is left, or when the grace ends (cancelling the rest).
    """
    grace = parts.settings.drain_grace_seconds
    lifecycle = parts.lifecycle
    ends = time.monotonic() + grace

    def left() -> float:
        return max(0.0, ends - time.monotonic())

    log.info(
        "draining: finishing in-flight requests (%d calls; grace %.1f s)",
        lifecycle.in_flight,
        grace,
    )
    if parts.poller is not None:  # no model changes while the server drains
        await parts.poller.stop()
    parts.repository.draining()  # convserve_model_ready 0: no version takes new requests
    await lifecycle.draining(KINDS)  # readiness NOT_SERVING, streams end, new calls refused
    headers = [(r.header, r.value) for r in parts.settings.restrictions]
    if not await send_markers(parts.socket, headers, max(grace, 0.1)):
        for kind in KINDS:
            lifecycle.caught_up(kind)
    finished = await lifecycle.finished(left())
    if finished:
        log.info("drained in %.2f s: every call taken before it finished", grace - left())
        await lifecycle.quiet(_QUIET_SECONDS, min(_CLOSING_SECONDS, left()))
    else:
        log.warning("the drain grace ended; cancelling %d calls", lifecycle.in_flight)
    await parts.stop_ports(min(_CLOSING_SECONDS, left()) if finished else 0)
    forget_socket(parts.socket, parts.role)
    if parts.probes is not None:
        await parts.probes.stop(0)
    try:  # the batchers finish what they run; a wedged model call never does
        await asyncio.wait_for(parts.repository.close(), max(left(), _CLOSING_SECONDS))
    except TimeoutError:
        log.error("model calls are still running in the runtime; exiting without them")
        return False
    for pool in parts.pools:
        pool.shutdown(wait=True)
    await lifecycle.stopped()
    return True


def _exit_without_runtime_threads() -> None:
    """End the process now: a thread that never returns would hold the interpreter's exit."""
    logging.shutdown()
    sys.stderr.flush()
    os._exit(1)


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
    wedge = loop.create_task(
        parts.lifecycle.watch(parts.repository.running_since, settings.max_inference_seconds),
        name="wedge-watch",
    )
    await stop.wait()
    if watcher is not None:
        watcher.cancel()
    stopped = await _drain(parts)
    wedge.cancel()
    if not stopped:
        _exit_without_runtime_threads()
    log.info("stopped")
    return 0
