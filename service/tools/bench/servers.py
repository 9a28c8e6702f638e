"""The servers under load: one this bench starts on free ports, or one running elsewhere."""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence

from service.tools.bench.steps import Target
from service.tools.server_process import ServerProcess

__all__ = ["Remote", "Server", "open_server", "server_threads", "target_of"]


class Remote:
    """A server someone else runs (``--server``)."""

    def __init__(self, address: str, metrics_url: str) -> None:
        self.grpc_address, self.metrics_url = address, metrics_url

    def __enter__(self) -> Remote:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


Server = ServerProcess | Remote


def open_server(args: argparse.Namespace, server_args: Sequence[str]) -> Server:
    """The server ``--server`` names, or one to start with ``server_args`` (a context manager)."""
    if args.server:
        host = args.server.rsplit(":", 1)[0]
        return Remote(args.server, args.metrics_url or f"http://{host}:8002/metrics")
    return ServerProcess(args.model_repository, *server_args)


def target_of(server: Server, model: str) -> Target:
    """``server`` as a load step's target; its process id where this bench started it."""
    pid = None
    if isinstance(server, ServerProcess) and server.process is not None:
        pid = server.process.pid
    return Target(server.grpc_address, server.metrics_url, model, pid)


_LOADED = re.compile(r"loaded (\S+) v\d+ from .* (\d+) thread\(s\) each")


def server_threads(server: Server, model: str) -> int | None:
    """The ONNX Runtime threads a server this bench started chose for ``model`` (its log)."""
    if isinstance(server, ServerProcess):
        for line in server.lines:
            if (match := _LOADED.search(line)) and match.group(1) == model:
                return int(match.group(2))
    return None
