"""An empty repository is a likely mistake: the server says so at start, and still serves."""

from __future__ import annotations

from pathlib import Path

from service.tools.server_process import ServerProcess


def test_an_empty_repository_warns_at_start(tmp_path: Path) -> None:
    with ServerProcess(tmp_path) as server:
        log = server.log()
    assert f"WARNING service.app.server: the model repository {tmp_path} holds no models" in log
    assert "ready: serving no models" in log


def test_explicit_mode_starting_empty_does_not_warn(tmp_path: Path) -> None:
    with ServerProcess(tmp_path, "--model-control-mode", "explicit") as server:
        log = server.log()
    assert "holds no models" not in log and "ready: serving no models" in log
