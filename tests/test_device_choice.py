"""A machine without an NVIDIA driver is an ordinary CPU machine: a quiet start, one INFO line."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from service.engine.runtime import DeviceChoice, nvidia_driver_present

pytestmark = pytest.mark.skipif(
    nvidia_driver_present(), reason="this machine has an NVIDIA driver (see test_gpu.py)"
)


def test_auto_without_a_driver_says_once_why_it_runs_on_the_cpu(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.INFO, logger="service.engine.runtime")
    choice = DeviceChoice("auto", driver=tmp_path / "no-driver")
    assert choice._use_cuda is False  # decided without trying CUDA
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines == [("INFO", "running every model on the CPU (no NVIDIA driver on this machine)")]


def test_cuda_asked_for_without_a_driver_fails_loudly(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="--device cuda:1: no NVIDIA driver on this machine"):
        DeviceChoice("cuda:1", driver=tmp_path / "no-driver")


def test_a_driver_is_seen_from_its_proc_entry(tmp_path: Path) -> None:
    version = tmp_path / "version"
    version.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.00\n")
    assert nvidia_driver_present(version)
    assert not nvidia_driver_present(tmp_path / "missing")


def test_a_cpu_start_prints_no_cuda_library_noise() -> None:
    from service import BUNDLED_REPOSITORY
    from service.tools.server_process import ServerProcess

    with ServerProcess(BUNDLED_REPOSITORY) as server:
        log = server.log()
    assert "running every model on the CPU (no NVIDIA driver on this machine)" in log
    for noise in ("libcublas", "libcudnn", "Failed to load", "CUDA not used", "WARNING"):
        assert noise not in log, noise
