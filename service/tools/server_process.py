"""Start a real ``convserve serve`` process on free ports and stop it (tests, benchmarks)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

_GRPC = re.compile(r"grpc listening on [^:]+:(\d+)")
_HTTP = re.compile(r"http listening on [^:]+:(\d+)")
_METRICS = re.compile(r"metrics listening on [^:]+:(\d+)")
_HEALTH = re.compile(r"health listening on [^:]+:(\d+)")


SERVE = ("service", "serve")


class ServerProcess:
    """A server subprocess; ``grpc_address``, ``http_url`` and ``metrics_url`` once started.

    ``convserve serve`` gets free ports for gRPC, HTTP and metrics (``http_port`` stays 0 with
    ``--allow-http=false``).
    """

    def __init__(
        self,
        repository: Path,
        *args: str,
        env: dict[str, str] | None = None,
        module: tuple[str, ...] = SERVE,
    ) -> None:
        # ``module``: what ``python -m`` runs; anything that takes these flags and logs the same
        # listening and ready lines (``service.tools.grpc_floor`` for the benchmark, which
        # serves no HTTP port).
        http = ["--http-port", "0"] if module == SERVE else []
        self.command = [
            sys.executable,
            "-m",
            *module,
            "--host",
            "127.0.0.1",
            "--grpc-port",
            "0",
            *http,
            "--metrics-port",
            "0",
            "--model-repository",
            str(repository),
            *args,
        ]
        self.env = {**os.environ, **(env or {})}
        self.lines: list[str] = []
        self.grpc_port = 0
        self.http_port = 0
        self.metrics_port = 0
        self.health_port = 0  # with --health-port: the probes' plaintext port
        self._ready = threading.Event()
        self.process: subprocess.Popen[str] | None = None
        self._reader = threading.Thread()

    @property
    def grpc_address(self) -> str:
        """host:port of the gRPC listener."""
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_address(self) -> str:
        """host:port of the KServe v2 HTTP/REST listener (what tritonclient.http takes)."""
        return f"127.0.0.1:{self.http_port}"

    @property
    def http_url(self) -> str:
        """Base URL of the KServe v2 HTTP/REST listener (``http_url + "/v2/health/ready"``)."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def health_address(self) -> str:
        """host:port of the plaintext health port (``--health-port``)."""
        return f"127.0.0.1:{self.health_port}"

    @property
    def metrics_url(self) -> str:
        """URL of /metrics."""
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self, timeout: float = 90) -> ServerProcess:
        """Start and wait until the server logs that it is ready.

        Raises:
            RuntimeError: it exited or did not become ready in time (its log is in the message).
        """
        self.process = subprocess.Popen(
            self.command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=self.env
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise RuntimeError("server did not become ready:\n" + "".join(self.lines))
        if not self.grpc_port:
            raise RuntimeError("server exited:\n" + "".join(self.lines))
        return self

    def _read(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        with self.process.stderr:  # closed at the end of the output, not left to the collector
            for line in self.process.stderr:
                self.lines.append(line)
                if match := _GRPC.search(line):
                    self.grpc_port = int(match.group(1))
                if match := _HTTP.search(line):
                    self.http_port = int(match.group(1))
                if match := _METRICS.search(line):
                    self.metrics_port = int(match.group(1))
                if match := _HEALTH.search(line):
                    self.health_port = int(match.group(1))
                if "ready: serving" in line:
                    self._ready.set()
        self._ready.set()

    def log(self) -> str:
        """Everything the server has written to stderr so far."""
        return "".join(self.lines)

    def log_with(self, *texts: str, start: int = 0, timeout: float = 10) -> str:
        """The log from ``start`` (characters) once it holds every one of ``texts``.

        A line the server logs while answering reaches this reader after the answer reaches
        the client. Raises AssertionError, with the log, after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            log = self.log()[start:]
            if all(text in log for text in texts):
                return log
            assert time.monotonic() < deadline, log
            time.sleep(0.02)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        """Send a signal to the server process."""
        assert self.process is not None
        self.process.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        """Wait for the process to exit; returns its exit code."""
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after 30 s; returns the exit code once its output is read."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._reader.join(10)  # it closes the pipe at the end of the output
        return self.process.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
