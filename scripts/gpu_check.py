"""The prepared GPU check (../shared/GPU.md): run once on a borrowed GPU machine.

    python scripts/gpu_check.py MODEL.onnx

1. the gpu-marked tests (CUDA really runs; GPU equals CPU);
2. raw ONNX Runtime on CUDA vs CPU for MODEL.onnx at several batch sizes;
3. the same model served by convserve on CUDA, loaded by tritonclient at concurrency 1 and 16,
   reported as ratios to the raw figures measured in the same run, with the card's name.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def raw(path: Path, providers: list[str], batch: int, seconds: float = 3.0) -> tuple[float, float]:
    """(images/s, ms per batch) for one session."""
    session = ort.InferenceSession(str(path), providers=providers)
    spec = session.get_inputs()[0]
    x = np.random.default_rng(0).standard_normal((batch, *spec.shape[1:])).astype(np.float32)
    for _ in range(5):
        session.run(None, {spec.name: x})
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        session.run(None, {spec.name: x})
        runs += 1
    elapsed = time.perf_counter() - started
    return runs * batch / elapsed, elapsed / runs * 1000


def served(
    address: str, shape: list[int], concurrency: int, seconds: float = 5.0
) -> tuple[float, float, float]:
    """(requests/s, p50 ms, p99 ms) with ``concurrency`` clients sending one image each."""
    import tritonclient.grpc as triton

    latencies: list[float] = []
    stop = time.perf_counter() + seconds
    lock = threading.Lock()

    def worker() -> None:
        with triton.InferenceServerClient(address) as client:
            tensor = triton.InferInput("input", [1, *shape], "FP32")
            tensor.set_data_from_numpy(np.zeros([1, *shape], np.float32))
            while time.perf_counter() < stop:
                started = time.perf_counter()
                client.infer("model", [tensor])
                with lock:
                    latencies.append(time.perf_counter() - started)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    values = np.array(latencies) * 1000
    return len(values) / seconds, float(np.percentile(values, 50)), float(np.percentile(values, 99))


def main() -> int:
    """Run the three parts and print the figures."""
    model = Path(sys.argv[1])
    card = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    print(f"card: {card}; onnxruntime {ort.__version__}; providers {ort.get_available_providers()}")
    ort.preload_dlls()
    tests = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-m",
            "gpu",
            "-v",
            "-p",
            "no:cacheprovider",
            "tests/test_gpu.py",
        ],
        cwd=ROOT,
        check=False,
    )
    cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    rows = {}
    for batch in (1, 8, 32):
        rows[batch] = raw(model, cuda, batch)
        cpu = raw(model, ["CPUExecutionProvider"], batch, 2.0)
        print(
            f"raw batch {batch:>3}: CUDA {rows[batch][0]:9.1f} img/s ({rows[batch][1]:.2f} ms)"
            f" | CPU {cpu[0]:8.1f} img/s | CUDA/CPU {rows[batch][0] / cpu[0]:.1f}x"
        )
    best = max(r[0] for r in rows.values())
    from service.server_process import ServerProcess

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "model" / "1").mkdir(parents=True)
        shutil.copy(model, Path(tmp) / "model" / "1" / "model.onnx")
        shape = list(
            ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
            .get_inputs()[0]
            .shape[1:]
        )
        with ServerProcess(
            Path(tmp), "--device", "cuda", "--preferred-batch-size", "8", "16", "32"
        ) as server:
            for concurrency in (1, 16):
                rps, p50, p99 = served(server.grpc_address, shape, concurrency)
                print(
                    f"served on CUDA, concurrency {concurrency:>2}: {rps:8.1f} img/s, p50 "
                    f"{p50:.2f} ms, p99 {p99:.2f} ms | served/raw-best {rps / best:.2f} | "
                    f"p50 - raw batch-1 {p50 - rows[1][1]:+.2f} ms"
                )
    return tests.returncode


if __name__ == "__main__":
    sys.exit(main())
