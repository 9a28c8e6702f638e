"""The runtime on the CPU: provider choice, thread sizing, padding to batch buckets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service import BUNDLED_REPOSITORY
from service.engine.runtime import (
    DeviceChoice,
    Runtime,
    _cgroup_quota,
    available_cores,
    return_large_blocks_to_the_os,
)

MODEL = BUNDLED_REPOSITORY / "digits" / "1" / "model.onnx"


def test_cpu_runtime_describes_the_model() -> None:
    runtime = Runtime(MODEL, DeviceChoice("cpu"), instances=2, cpu_threads=0, dynamic_shapes=False)
    assert runtime.provider == "CPUExecutionProvider" and len(runtime.sessions) == 2
    assert runtime.threads == max(1, available_cores() // 2)
    assert [(t.name, t.datatype, t.shape) for t in runtime.inputs] == [
        ("input", "FP32", (-1, 1, 8, 8))
    ]
    assert "convserve.labels" in runtime.metadata


def test_padding_to_a_bucket_keeps_each_row_its_own() -> None:
    runtime = Runtime(MODEL, DeviceChoice("cpu"), 1, 0, dynamic_shapes=False)
    runtime.buckets = (1, 4, 8)
    x = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    padded, rows = runtime._bucketed({"input": x})
    assert rows == 3 and padded["input"].shape == (4, 1, 8, 8)
    assert not padded["input"][3].any()
    exact, none = runtime._bucketed({"input": x[:1]})
    assert none is None and exact["input"].shape == (1, 1, 8, 8)


def test_explicit_cuda_without_a_gpu_fails_loudly(monkeypatch) -> None:
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(RuntimeError, match="--device cuda: this onnxruntime build has no CUDA"):
        DeviceChoice("cuda")


@pytest.mark.parametrize(
    ("single_wall", "single_cpu", "switched"),
    [
        (2.5e-5, 1e-5, True),  # cheaper, a little slower on the clock: one thread
        (2.5e-5, 3e-5, False),  # clearly dearer
        (4e-5, 1e-5, False),  # cheaper, but twice as slow on the clock
    ],
)
def test_a_tiny_model_takes_one_thread_only_when_that_costs_less_cpu(
    monkeypatch: pytest.MonkeyPatch, single_wall: float, single_cpu: float, switched: bool
) -> None:
    import service.engine.runtime as runtime_module

    runtime = Runtime(MODEL, DeviceChoice("cpu"), 2, cpu_threads=2, dynamic_shapes=False)
    x = np.random.default_rng(1).standard_normal((4, 1, 8, 8)).astype(np.float32)
    expected = runtime.run({"input": x})[0]
    samples = [{"input": x}]
    before = list(runtime.sessions)
    # A budget no pass meets (a real model): timed once, left alone.
    assert not runtime.single_thread_if_cheaper(samples, below_seconds=0.0)
    assert runtime.threads == 2 and runtime.sessions == before

    # (wall, CPU) seconds of a pass, for the current sessions and for one-thread ones.
    def cost(session: object, *_: object) -> tuple[float, float]:
        return (2e-5, 2e-5) if session in before else (single_wall, single_cpu)

    monkeypatch.setattr(runtime_module, "_pass_cost", cost)
    assert runtime.single_thread_if_cheaper(samples, below_seconds=1e-3) is switched
    assert runtime.threads == (1 if switched else 2) and len(runtime.sessions) == 2
    assert (runtime.sessions != before) is switched
    for instance in range(2):  # every instance answers as before, whichever it kept
        np.testing.assert_allclose(runtime.run({"input": x}, instance)[0], expected, atol=1e-6)


async def test_the_operators_thread_count_is_kept_and_real_models_keep_theirs() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from service.core.settings import Settings
    from service.engine.repository import ModelRepository

    async def health(names: object) -> None:
        return None

    async def threads_of(settings: Settings, name: str = "digits") -> int:
        with ThreadPoolExecutor(2) as executor:
            repository = ModelRepository(
                BUNDLED_REPOSITORY, settings, DeviceChoice("cpu"), executor, health
            )
            await repository.load_all()
            try:
                # Only fixed input shapes may run on the loop: one dense image far larger than
                # the average so far would stall it.
                assert repository.get("digits", "").batcher.may_run_inline == bool(
                    settings.inline_compute_microseconds
                )
                assert not repository.get("digits_dense", "").batcher.may_run_inline
                return repository.get(name, "").runtime.threads
            finally:
                await repository.close()

    cores = max(1, available_cores())
    # Told the threads: kept, though the model is tiny.
    assert await threads_of(Settings(cpu_threads=2)) == 2
    # Nothing counts as tiny (no inline compute): the cores, as for any real model.
    assert await threads_of(Settings(inline_compute_microseconds=0)) == cores
    # The dense twin serves whole images, far larger than the one window it is warmed up with:
    # never judged tiny by that.
    assert await threads_of(Settings(), "digits_dense") == cores


@pytest.mark.parametrize(
    ("files", "quota"),
    [
        ({"cpu.max": "150000 100000\n"}, 1.5),  # v2
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "250000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.5),  # v1
        (
            {"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
            None,
        ),
        ({"cpu.max": "garbage\n"}, None),
        ({}, None),
    ],
)
def test_the_cgroup_cpu_limit_caps_the_cores(
    tmp_path: Path, files: dict[str, str], quota: float | None
) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert _cgroup_quota(tmp_path) == quota
    unlimited = available_cores(tmp_path / "nowhere")
    expected = unlimited if quota is None else min(unlimited, max(1, int(quota)))
    assert available_cores(tmp_path) == expected


def _resident_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no /proc/self/status")


def test_a_dense_pass_far_above_the_usual_gives_its_memory_back() -> None:
    # With ONNX Runtime's CPU arena, the memory of a 1536x1536 pass of the demo's dense twin
    # stays with the process for good; the server turns the arena off for dense twins and has
    # malloc return large blocks.
    assert return_large_blocks_to_the_os()  # glibc on this machine kind
    dense = BUNDLED_REPOSITORY / "digits" / "1" / "model.dense.onnx"
    runtime = Runtime(dense, DeviceChoice("cpu"), 1, 0, dynamic_shapes=True)
    rng = np.random.default_rng(0)
    usual = {"input": rng.standard_normal((1, 1, 384, 384)).astype(np.float32)}
    for _ in range(3):
        runtime.run(usual)
    before = _resident_mb()
    huge = runtime.run({"input": rng.standard_normal((1, 1, 1536, 1536)).astype(np.float32)})
    assert huge[0].shape[2:] == (765, 765)  # it did run at that size
    del huge
    assert _resident_mb() - before < 100
    after_usual = runtime.run(usual)[0]  # and the usual size runs on as before
    assert after_usual.shape[2:] == (189, 189)
    runtime.close()


def test_a_mix_of_sizes_does_not_grow_the_process() -> None:
    # Sizes that keep changing fragmented the arena: memory grew with every new size.
    assert return_large_blocks_to_the_os()
    dense = BUNDLED_REPOSITORY / "digits" / "1" / "model.dense.onnx"
    runtime = Runtime(dense, DeviceChoice("cpu"), 1, 0, dynamic_shapes=True)
    rng = np.random.default_rng(1)
    for side in rng.integers(64, 200, size=4):  # small images first
        runtime.run({"input": rng.standard_normal((1, 1, side, side)).astype(np.float32)})
    settled = _resident_mb()
    for side in rng.integers(200, 768, size=20):  # then a mix of larger ones, each left behind
        runtime.run({"input": rng.standard_normal((1, 1, side, side)).astype(np.float32)})
    assert _resident_mb() - settled < 60
    runtime.close()
