"""``convserve serve --workers N``: N server processes on one port, and their supervisor.

One Python process tops out at what its event loop's one core can do, so for small models
throughput grows only with processes. The supervisor (this module, the process that was
started) starts N ordinary ``convserve serve`` processes that each bind the gRPC port with
``SO_REUSEPORT``; the kernel spreads incoming connections (not requests) over them. It:

* reserves the port when ``--grpc-port 0`` asks for a free one (a bound, non-listening socket),
  and the HTTP and health ports alike, which the workers share the same way;
* hands every worker the same settings through the environment, plus its index and a file to
  create once it is ready; the cores are split over the workers' ONNX Runtime threads;
* serves ``/metrics`` itself: prometheus_client's multiprocess mode, every worker writing to one
  folder and the supervisor summing them as each metric declares, plus ``convserve_workers`` and
  ``convserve_worker_restarts_total``;
* restarts a worker that dies after it was ready, and gives up (stopping the others, exit 1) when
  one fails before it was ready or when they keep dying;
* on SIGTERM or SIGINT passes SIGTERM on, so every worker drains as a single server does, and
  exits 0 once they all have.

The workers answer as one server (:mod:`service.wire.siblings`; each worker also keeps a Unix socket
in the supervisor's folder): ModelStatistics adds up every worker's figures, a model load or
unload is repeated on every worker, and a replacement worker loads the models its siblings serve
now rather than every model on disk. In poll mode worker 0 alone watches the repository and
repeats what it applies on the others (:attr:`WorkerRole.polls`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from prometheus_client import multiprocess

from service.core.settings import Settings
from service.engine.metrics import (
    WorkerCounts,
    multiprocess_registry,
    register_gpu_metrics,
    serve_metrics,
)

__all__ = ["READY_FILE_ENV", "WORKER_ENV", "WorkerRole", "supervise", "worker_role"]

log = logging.getLogger(__name__)

WORKER_ENV = "CONVSERVE_INTERNAL_WORKER_INDEX"
READY_FILE_ENV = "CONVSERVE_INTERNAL_READY_FILE"
REPLACEMENT_ENV = "CONVSERVE_INTERNAL_REPLACEMENT"
RESTARTS_ALLOWED = 5
"""Restarts within RESTART_WINDOW_SECONDS before the supervisor gives up."""
RESTART_WINDOW_SECONDS = 60.0
POLL_SECONDS = 0.1


@dataclass(frozen=True)
class WorkerRole:
    """What a worker process was told by its supervisor."""

    index: int
    ready_file: Path
    parent: int
    replacement: bool = False  # started in place of a worker that died: load what siblings serve

    @property
    def folder(self) -> Path:
        """The supervisor's folder, shared by its workers (ready files, sockets, metrics)."""
        return self.ready_file.parent

    def mark_ready(self) -> None:
        """Tell the supervisor that this worker is serving: every model loaded and warm."""
        self.ready_file.touch()

    @property
    def polls(self) -> bool:
        """This worker watches the repository in poll mode (worker 0), for all of them.

        One poller decides when a copied file holds still and repeats each change it applies
        on the other workers, so every worker loads the same files at the same change;
        a poller per worker could see one copy settle at different polls and serve different
        versions meanwhile. A replacement worker 0 polls in its predecessor's place.
        """
        return self.index == 0

    def orphaned(self) -> bool:
        """True once the supervisor is gone (the worker should drain and exit)."""
        return os.getppid() != self.parent


def worker_role() -> WorkerRole | None:
    """This process's role when a supervisor started it, else None."""
    index = os.environ.get(WORKER_ENV)
    ready = os.environ.get(READY_FILE_ENV)
    if index is None or ready is None:
        return None
    replacement = os.environ.get(REPLACEMENT_ENV) == "1"
    return WorkerRole(int(index), Path(ready), os.getppid(), replacement)


@dataclass
class _Worker:
    index: int
    process: subprocess.Popen[bytes]
    ready_file: Path

    @property
    def ready(self) -> bool:
        return self.ready_file.exists()


class _Supervisor:
    def __init__(self, settings: Settings, port: int, folder: Path) -> None:
        self._settings = settings
        self._port = port
        self._folder = folder
        self._metrics_folder = folder / "metrics"
        self._metrics_folder.mkdir()
        self.counts = WorkerCounts()
        self._restarts: deque[float] = deque()
        self._workers: dict[int, _Worker] = {}
        self.stopping = False

    def registry_folder(self) -> str:
        return str(self._metrics_folder)

    def start(self, index: int, replacement: bool = False) -> None:
        ready_file = self._folder / f"ready-{index}"
        ready_file.unlink(missing_ok=True)
        env = {
            **os.environ,
            **self._settings.environment(),
            "CONVSERVE_GRPC_PORT": str(self._port),
            "PROMETHEUS_MULTIPROC_DIR": str(self._metrics_folder),
            WORKER_ENV: str(index),
            READY_FILE_ENV: str(ready_file),
            REPLACEMENT_ENV: "1" if replacement else "0",
        }
        process = subprocess.Popen([sys.executable, "-m", "service", "serve"], env=env)
        self._workers[index] = _Worker(index, process, ready_file)
        log.info("worker %d started (pid %d)", index, process.pid)

    def run(self) -> int:
        """Watch the workers until told to stop or until one cannot be kept running."""
        for index in range(self._settings.workers):
            self.start(index)
        announced = False
        while not self.stopping:
            time.sleep(POLL_SECONDS)
            self.counts.live = sum(w.process.poll() is None for w in self._workers.values())
            for worker in list(self._workers.values()):
                code = worker.process.poll()
                if code is None or self.stopping:
                    continue
                multiprocess.mark_process_dead(  # type: ignore[no-untyped-call]
                    worker.process.pid, self.registry_folder()
                )
                if not worker.ready:
                    log.error(
                        "worker %d exited with code %d before it was ready; stopping",
                        worker.index,
                        code,
                    )
                    self.stop()
                    return code or 1
                if not self._may_restart():
                    log.error(
                        "workers exited %d times within %.0f s; stopping",
                        len(self._restarts),
                        RESTART_WINDOW_SECONDS,
                    )
                    self.stop()
                    return 1
                log.error("worker %d exited with code %d; restarting it", worker.index, code)
                self.counts.restarts += 1
                self.start(worker.index, replacement=True)
            if not announced and all(w.ready for w in self._workers.values()):
                announced = True
                log.info(
                    "ready: serving on port %d with %d workers", self._port, len(self._workers)
                )
        return self.stop()

    def _may_restart(self) -> bool:
        now = time.monotonic()
        self._restarts.append(now)
        while self._restarts and now - self._restarts[0] > RESTART_WINDOW_SECONDS:
            self._restarts.popleft()
        return len(self._restarts) <= RESTARTS_ALLOWED

    def stop(self) -> int:
        """SIGTERM every worker, wait out their drain, kill stragglers; 0 when all exit 0."""
        self.stopping = True
        for worker in self._workers.values():
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self._settings.drain_grace_seconds + 30
        failed = False
        for worker in self._workers.values():
            try:
                code = worker.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker %d did not stop in time; killing it", worker.index)
                worker.process.kill()
                code = worker.process.wait()
            failed |= code != 0
        self.counts.live = 0
        return 1 if failed else 0


def _reserve_port(host: str, port: int) -> tuple[socket.socket, int]:
    """Reserve the port for the workers: bound with SO_REUSEPORT, never listening.

    Refuses a port that something already answers on (SO_REUSEPORT would otherwise share it).
    """
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    if port:
        probe = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
        try:
            with socket.create_connection((probe, port), timeout=0.5):
                raise OSError(f"port {port} is already in use")
        except (ConnectionRefusedError, TimeoutError):
            pass
    reserved = socket.socket(family, socket.SOCK_STREAM)
    reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    reserved.bind((host, port))
    return reserved, int(reserved.getsockname()[1])


def _reserve_another(host: str, port: int, held: list[socket.socket]) -> int:
    """Reserve one more port (see :func:`_reserve_port`), kept in ``held``; the port.

    Raises:
        OSError: naming the address that cannot be reserved.
    """
    try:
        reserved, chosen = _reserve_port(host, port)
    except OSError as exc:
        raise OSError(f"{host}:{port}: {exc}") from exc
    held.append(reserved)
    return chosen


def supervise(settings: Settings) -> int:
    """Run ``settings.workers`` server processes on one port until SIGTERM/SIGINT."""
    if not settings.model_repository.is_dir():
        log.error("model repository %s does not exist", settings.model_repository)
        return 2
    try:
        reserved, port = _reserve_port(settings.host, settings.grpc_port)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", settings.host, settings.grpc_port, exc)
        return 2
    others: list[socket.socket] = []  # the HTTP and the probes' ports, shared by the workers
    try:
        if settings.allow_http:
            settings = dataclasses.replace(
                settings, http_port=_reserve_another(settings.host, settings.http_port, others)
            )
        if settings.health_port >= 0:
            settings = dataclasses.replace(
                settings, health_port=_reserve_another(settings.host, settings.health_port, others)
            )
    except OSError as exc:
        log.error("cannot listen on %s", exc)
        for held in (reserved, *others):
            held.close()
        return 2
    folder = Path(tempfile.mkdtemp(prefix="convserve-workers-"))
    try:
        supervisor = _Supervisor(settings, port, folder)

        def on_signal(signum: int, frame: FrameType | None) -> None:
            supervisor.stopping = True

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        registry = multiprocess_registry(supervisor.registry_folder(), supervisor.counts)
        register_gpu_metrics(registry)
        metrics_host = settings.metrics_host or settings.host
        metrics_port = serve_metrics(metrics_host, settings.metrics_port, registry)
        log.info("metrics listening on %s:%d (all workers)", metrics_host, metrics_port)
        log.info("grpc listening on %s:%d (%d workers)", settings.host, port, settings.workers)
        if settings.allow_http:
            log.info(
                "http listening on %s:%d (%d workers)",
                settings.host,
                settings.http_port,
                settings.workers,
            )
        code = supervisor.run()
        log.info("stopped")
        return code
    finally:
        for held in (reserved, *others):
            held.close()
        shutil.rmtree(folder, ignore_errors=True)
