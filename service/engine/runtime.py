"""ONNX Runtime sessions: provider choice, thread sizing, I/O binding and warm-up.

The only module that imports onnxruntime. ``--device auto`` uses CUDA only when a CUDA session
really runs: onnxruntime falls back to the CPU silently when CUDA or cuDNN cannot load, so the
session's providers are checked, and the fallback is logged once with its reason.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

__all__ = [
    "DeviceChoice",
    "Runtime",
    "TensorSpec",
    "available_cores",
    "return_large_blocks_to_the_os",
]

from service.core.types import NUMPY_TYPES

log = logging.getLogger(__name__)

# ONNX Runtime's element types to the KServe v2 datatype names, and on to numpy.
DATATYPES = {
    "tensor(float)": "FP32",
    "tensor(float16)": "FP16",
    "tensor(double)": "FP64",
    "tensor(uint8)": "UINT8",
    "tensor(int8)": "INT8",
    "tensor(uint16)": "UINT16",
    "tensor(int16)": "INT16",
    "tensor(uint32)": "UINT32",
    "tensor(int32)": "INT32",
    "tensor(uint64)": "UINT64",
    "tensor(int64)": "INT64",
    "tensor(bool)": "BOOL",
}


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: KServe datatype and shape (-1 for a variable dimension)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype[Any]:
        """The numpy dtype of this tensor."""
        return NUMPY_TYPES[self.datatype]


def available_cores(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """CPU cores this process may use: affinity, then the cgroup CPU quota (a pod's CPU limit).

    cgroup v2 (``cpu.max``) or v1 (``cpu/cpu.cfs_quota_us`` over ``cpu.cfs_period_us``, still
    the layout of older nodes); a quota below one core counts as one.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    quota = _cgroup_quota(cgroup)
    return cores if quota is None else min(cores, max(1, int(quota)))


def _cgroup_quota(cgroup: Path) -> float | None:
    """The CPU quota in cores, or None where there is none (or no cgroup file says)."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for folder in ("cpu", "cpu,cpuacct"):
        try:
            v1_quota = int((cgroup / folder / "cpu.cfs_quota_us").read_text())
            v1_period = int((cgroup / folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if v1_quota <= 0 or v1_period <= 0 else v1_quota / v1_period
    return None


class DeviceChoice:
    """Resolves ``--device`` once per process and remembers the outcome.

    ``auto`` tries CUDA with the first model and keeps CPU for all if that session does not
    really run on CUDA; ``cuda``/``cuda:N`` fail loudly instead of falling back.
    """

    def __init__(self, device: str, driver: Path | None = None) -> None:
        self.requested = device
        self.device_id = int(device.split(":")[1]) if device.startswith("cuda:") else 0
        self._use_cuda: bool | None = None if device != "cpu" else False
        self._lock = threading.Lock()
        if self._use_cuda is None and "CUDAExecutionProvider" not in ort.get_available_providers():
            self._fallback("this onnxruntime build has no CUDA execution provider")
        elif self._use_cuda is None and not nvidia_driver_present(driver or NVIDIA_DRIVER):
            # Trying CUDA without a driver prints pages of library errors that look like a
            # failure; a machine without one is an ordinary CPU machine.
            self._fallback("no NVIDIA driver on this machine", expected=True)

    def _fallback(self, reason: str, expected: bool = False) -> None:
        if self.requested != "auto":
            raise RuntimeError(f"--device {self.requested}: {reason}")
        if expected:
            log.info("running every model on the CPU (%s)", reason)
        else:
            log.warning("CUDA not used (%s); running every model on the CPU", reason)
        self._use_cuda = False

    def session(
        self, path: Path, options: ort.SessionOptions, cuda_options: Mapping[str, str]
    ) -> ort.InferenceSession:
        """Create a session on the chosen device (deciding it on first use)."""
        with self._lock:
            if self._use_cuda is not False:
                cuda = ("CUDAExecutionProvider", {"device_id": str(self.device_id), **cuda_options})
                if self._use_cuda is None:
                    _preload_cuda_libraries()
                ort.set_default_logger_severity(4)  # a failed provider is noisy; we log one line
                try:
                    session = ort.InferenceSession(
                        str(path), options, providers=[cuda, "CPUExecutionProvider"]
                    )
                finally:
                    ort.set_default_logger_severity(3)
                if session.get_providers()[0] == "CUDAExecutionProvider":
                    if self._use_cuda is None:
                        log.info("running on CUDA device %d", self.device_id)
                    self._use_cuda = True
                    return session
                self._fallback(
                    "the CUDA provider did not initialise: no GPU visible, or the "
                    "CUDA 13 / cuDNN 9 libraries failed to load"
                )
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


NVIDIA_DRIVER = Path("/proc/driver/nvidia/version")
"""What the NVIDIA kernel driver creates when it is loaded (containers given a GPU see it too)."""


def nvidia_driver_present(driver: Path = NVIDIA_DRIVER) -> bool:
    """Whether an NVIDIA driver is loaded here: its /proc entry or a /dev/nvidiaN device."""
    return driver.exists() or any(Path("/dev").glob("nvidia[0-9]*"))


M_MMAP_THRESHOLD = -3
"""glibc's mallopt parameter for the size from which an allocation is its own mapping."""


def return_large_blocks_to_the_os(threshold: int = 128 << 10) -> bool:
    """Make glibc give every block of ``threshold`` bytes or more back to the system when freed.

    glibc raises its mapping threshold each time a mapped block is freed, so after one large
    pass the large buffers of later passes come from the heap, which keeps their pages: the
    process's idle memory creeps up under varied dense traffic. A fixed threshold keeps large
    blocks mapped and returned. True where it was set (glibc), False elsewhere.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


def _preload_cuda_libraries() -> None:
    # CUDA 13 / cuDNN 9 shipped as Python packages (e.g. beside PyTorch) are not on the loader's
    # path; onnxruntime can load them first. Harmless where the libraries are system-wide.
    try:
        ort.preload_dlls()
    except Exception as exc:  # preload is best effort; the provider check decides
        log.debug("onnxruntime.preload_dlls() failed: %s", exc)


def _specs(values: Sequence[ort.NodeArg]) -> list[TensorSpec]:
    specs = []
    for value in values:
        if value.type not in DATATYPES:
            raise ValueError(f"tensor '{value.name}' has unsupported type {value.type}")
        shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in value.shape)
        specs.append(TensorSpec(value.name, DATATYPES[value.type], shape))
    return specs


def _pass_cost(
    session: ort.InferenceSession, samples: Sequence[Mapping[str, np.ndarray]], passes: int
) -> tuple[float, float]:
    """Best wall-clock and best process CPU seconds (all threads) of ``passes`` runs of all."""
    wall = cpu = float("inf")
    for _ in range(passes):
        started, cpu_started = time.perf_counter(), time.process_time()
        for feeds in samples:
            session.run(None, dict(feeds))
        wall = min(wall, time.perf_counter() - started)
        cpu = min(cpu, time.process_time() - cpu_started)
    return wall, cpu


class Runtime:
    """One model file loaded into ``instances`` ONNX Runtime sessions.

    Each instance runs one batch at a time; the batcher gives each of its workers one instance.
    ``run`` releases the GIL inside ONNX Runtime, so it is called from a thread pool.
    """

    def __init__(
        self,
        path: Path,
        device: DeviceChoice,
        instances: int,
        cpu_threads: int,
        dynamic_shapes: bool,
        processes: int = 1,
    ) -> None:
        # 0 threads: the cores split over every instance of every process holding this model
        # (each `serve --workers` process holds its own instances).
        threads = cpu_threads or max(1, available_cores() // (instances * processes))
        self._path, self._device = path, device
        self._dynamic = dynamic_shapes
        self._cuda_options = {
            "do_copy_in_default_stream": "1",
            "arena_extend_strategy": "kSameAsRequested" if dynamic_shapes else "kNextPowerOfTwo",
            "cudnn_conv_algo_search": "HEURISTIC" if dynamic_shapes else "EXHAUSTIVE",
            # TF32 convolutions drift ~1e-3 from fp32 on logits; serve what was exported.
            "use_tf32": "0",
        }
        self.sessions = self._sessions(instances, threads)
        # One thread per instance, always the same: CUDA keeps per-thread state (streams, cuDNN
        # and cuBLAS handles) that costs tens of ms to build on a thread's first run.
        self.executors = [
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"instance-{i}")
            for i in range(instances)
        ]
        self.device_id = device.device_id
        first = self.sessions[0]
        self.provider = first.get_providers()[0]
        self.on_cuda = self.provider == "CUDAExecutionProvider"
        self.threads = threads
        self.inputs = _specs(first.get_inputs())
        self.outputs = _specs(first.get_outputs())
        self.output_names = [o.name for o in self.outputs]
        self.metadata: dict[str, str] = dict(first.get_modelmeta().custom_metadata_map)
        self.buckets: tuple[int, ...] = ()  # batch sizes to pad up to on CUDA (set by the owner)

    def _sessions(self, instances: int, threads: int) -> list[ort.InferenceSession]:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        options.intra_op_num_threads = threads
        # Inputs of any size (a dense twin): ONNX Runtime's CPU arena would keep the largest
        # pass's peak, and a mix of sizes fragments it, so memory under varied traffic only
        # grows. Without it each pass's buffers go back when it ends (with the process's malloc
        # returning large blocks, see return_large_blocks_to_the_os); docs/benchmarks.md has
        # the soak and timing figures behind this.
        options.enable_cpu_mem_arena = not self._dynamic
        options.inter_op_num_threads = 1
        # Spinning threads would steal the cores the gRPC event loop needs between batches.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return [
            self._device.session(self._path, options, self._cuda_options) for _ in range(instances)
        ]

    def single_thread_if_cheaper(
        self, samples: Sequence[Mapping[str, np.ndarray]], below_seconds: float
    ) -> bool:
        """Switch a tiny CPU model to one intra-op thread when that costs less CPU.

        Where a batch takes a fraction of a millisecond, waking another intra-op thread for each
        operator costs more than it saves (docs/benchmarks.md has the demo model's figures). Such
        a model runs on the event loop, which is
        then the bottleneck, and every CPU microsecond its threads burn is taken from the gRPC
        threads on a small machine. So when the (warmed-up) samples take under ``below_seconds``
        each on average, one-thread sessions are timed on the same samples and kept unless they
        cost clearly (10 %) more process CPU time: more threads never save CPU, so a near tie is
        noise (a large sample such as batch 32 can make one), and it goes to the thread that
        leaves the other cores to gRPC; but not when one thread stops being tiny, or is 1.5x
        slower on the clock. A reload under traffic blurs the timing; either choice gives the same
        answers. True when the runtime switched.
        """
        budget = below_seconds * len(samples)
        if self.on_cuda or self.threads == 1 or not samples:
            return False
        if _pass_cost(self.sessions[0], samples, 1)[0] > budget:
            return False  # a real model: one pass says so, without timing it over and over
        single = self._sessions(len(self.sessions), 1)
        _pass_cost(single[0], samples, 1)  # its own warm-up
        wall = cpu = single_wall = single_cpu = float("inf")
        for _ in range(20):  # alternating, so a noisy moment hits both
            now_wall, now_cpu = _pass_cost(self.sessions[0], samples, 1)
            wall, cpu = min(wall, now_wall), min(cpu, now_cpu)
            now_wall, now_cpu = _pass_cost(single[0], samples, 1)
            single_wall, single_cpu = min(single_wall, now_wall), min(single_cpu, now_cpu)
        if wall > budget or single_cpu > 1.1 * cpu:
            return False
        if single_wall > budget or single_wall > 1.5 * wall:
            return False  # cheaper, but not tiny any more, or much slower on the clock
        self.sessions, self.threads = single, 1
        return True

    def run(self, feeds: Mapping[str, np.ndarray], instance: int = 0) -> list[np.ndarray]:
        """Run one batch on one instance; returns every output, in the model's order."""
        session = self.sessions[instance]
        if not self.on_cuda:
            return session.run(self.output_names, dict(feeds))  # type: ignore[no-any-return]
        feeds, rows = self._bucketed(feeds)
        binding = session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self.output_names:
            binding.bind_output(name, "cuda", self.device_id)
        session.run_with_iobinding(binding)
        outputs: list[np.ndarray] = binding.copy_outputs_to_cpu()
        return outputs if rows is None else [o[:rows] for o in outputs]

    def _bucketed(
        self, feeds: Mapping[str, np.ndarray]
    ) -> tuple[Mapping[str, np.ndarray], int | None]:
        # Every new batch size costs cuDNN an algorithm search (seconds, with EXHAUSTIVE) and the
        # arena a new block: pad up to the next warmed-up size instead, then cut the rows off.
        if not self.buckets:
            return feeds, None
        rows = next(iter(feeds.values())).shape[0]
        size = next((b for b in self.buckets if b >= rows), rows)
        if size == rows:
            return feeds, None
        padded = {
            name: np.concatenate([value, np.zeros((size - rows, *value.shape[1:]), value.dtype)])
            for name, value in feeds.items()
        }
        return padded, rows

    def warm_up(self, samples: Sequence[Mapping[str, np.ndarray]]) -> None:
        """Run each instance, on its own thread, once per sample (allocation, algorithm search)."""
        for instance, executor in enumerate(self.executors):
            for feeds in samples:
                executor.submit(self.run, feeds, instance).result()

    def close(self) -> None:
        """Stop the instance threads (after the batcher has drained)."""
        for executor in self.executors:
            executor.shutdown(wait=True)
