"""``convserve serve --workers N``: several real server processes on one port, one supervisor."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from service import BUNDLED_REPOSITORY
from service.tools.server_process import ServerProcess

MODEL = BUNDLED_REPOSITORY / "digits" / "1" / "model.onnx"
CONNECTIONS = 16
LOCAL_ONLY = {"convserve-worker-local": "1"}  # the documented header (service/siblings.py)


def own_connection(address: str) -> triton.InferenceServerClient:
    """A client on its own TCP connection (gRPC otherwise shares one per address)."""
    return triton.InferenceServerClient(
        address, channel_args=[("grpc.use_local_subchannel_pool", 1)]
    )


def digits_input(x: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def scrape(url: str) -> dict[str, float]:
    """Every sample as 'name{labels}' -> value (labels sorted), summed over nothing."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def worker_pids(server: ServerProcess) -> dict[int, int]:
    """Worker index -> pid of its latest start, from the supervisor's log."""
    return {
        int(index): int(pid)
        for index, pid in re.findall(r"worker (\d+) started \(pid (\d+)\)", server.log())
    }


def field(message: object, dotted: str) -> int:
    for name in dotted.split("."):
        message = getattr(message, name)
    return int(message)  # type: ignore[call-overload]


def alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def workers() -> Iterator[ServerProcess]:
    server = ServerProcess(
        BUNDLED_REPOSITORY,
        "--workers",
        "2",
        "--model-control-mode",
        "explicit",
        "--load-model",
        "*",
    ).start()
    try:
        yield server
    finally:
        server.stop()


def test_requests_spread_over_workers_and_metrics_add_up(workers: ServerProcess) -> None:
    assert len(worker_pids(workers)) == 2
    session = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(5)
    before = scrape(workers.metrics_url)
    ok = "convserve_requests_total{api=kserve,code=OK,model=digits,protocol=grpc,version=1}"
    clients = [own_connection(workers.grpc_address) for _ in range(CONNECTIONS)]
    sent = 0
    for i, client in enumerate(clients):
        for _ in range(i + 1):  # a different count per connection, to tell the workers apart
            x = rng.standard_normal((1, 1, 8, 8)).astype(np.float32)
            got = client.infer("digits", [digits_input(x)]).as_numpy("logits")
            np.testing.assert_allclose(got, session.run(None, {"input": x})[0], atol=1e-5)
            sent += 1
    # With the local-only mark, a connection sees the part of the worker that holds it: two
    # partial totals if both workers served (the same one twice if they served equally).
    parts = {}
    for client in clients:
        own = client.get_inference_statistics("digits", headers=LOCAL_ONLY)
        parts[own.model_stats[0].inference_count] = own.model_stats[0]
    assert max(parts) < sent, f"one worker took all {CONNECTIONS} connections"
    if len(parts) == 1:
        parts[-1] = next(iter(parts.values()))
    assert len(parts) == 2 and sum(p.inference_count for p in parts.values()) == sent
    # Without it, every worker answers for the whole server: its siblings' parts added up.
    for client in clients:
        whole = client.get_inference_statistics("digits").model_stats[0]
        assert whole.inference_count == sent
        summed = ("execution_count", "inference_stats.success.count", "inference_stats.queue.ns")
        for name in summed:
            assert field(whole, name) == sum(field(p, name) for p in parts.values()), name
        assert whole.last_inference == max(p.last_inference for p in parts.values())
        sizes = {b.batch_size for p in parts.values() for b in p.batch_stats}
        assert [b.batch_size for b in whole.batch_stats] == sorted(sizes)
        for batch in whole.batch_stats:
            size = batch.batch_size
            same = [b for p in parts.values() for b in p.batch_stats if b.batch_size == size]
            assert batch.compute_infer.count == sum(b.compute_infer.count for b in same)
            assert batch.compute_infer.ns == sum(b.compute_infer.ns for b in same)
    for client in clients:
        client.close()
    after = scrape(workers.metrics_url)
    assert after[ok] - before.get(ok, 0.0) == sent  # summed over both workers' files
    assert after["convserve_workers{}"] == 2
    assert {"convserve_workers{}", "convserve_worker_restarts_total{}"} <= set(after)
    assert after["convserve_model_ready{model=digits,provider=CPUExecutionProvider,version=1}"] == 1
    assert after["convserve_inflight_requests{}"] == 0


def logged_after(server: ServerProcess, start: int, *lines: str) -> str:
    """The server's log from ``start`` (characters) once it holds every line (10 s at most)."""
    return server.log_with(*lines, start=start)


def test_model_control_reaches_every_worker(workers: ServerProcess) -> None:
    client = own_connection(workers.grpc_address)
    start = len(workers.log())
    client.unload_model("digits")  # one connection, one worker: it repeats the call to the other
    logged_after(
        workers, start, *(f"worker-{i} service.engine.repository: unloaded digits" for i in (0, 1))
    )
    for _ in range(CONNECTIONS):  # whichever worker a connection reaches
        other = own_connection(workers.grpc_address)
        assert not other.is_model_ready("digits")
        other.close()
    # Unloaded on both: its readiness series is gone from the summed metrics, not left at 1
    # (a worker cannot remove a series from its file; it marks it, and the sum leaves it out).
    ready = "convserve_model_ready{model=digits,provider=CPUExecutionProvider,version=1}"
    gone = scrape(workers.metrics_url)
    assert ready not in gone and not any(math.isnan(v) for v in gone.values()), gone
    start = len(workers.log())
    client.load_model("digits")
    logged_after(
        workers,
        start,
        *(f"worker-{i} service.engine.model_loader: loaded digits v1" for i in (0, 1)),
    )
    assert scrape(workers.metrics_url)[ready] == 1
    x = np.zeros((1, 1, 8, 8), np.float32)
    for _ in range(CONNECTIONS):
        other = own_connection(workers.grpc_address)
        assert other.infer("digits", [digits_input(x)]).as_numpy("logits").shape == (1, 10)
        other.close()
    # A model no worker has fails on the first one, with its own status.
    with pytest.raises(InferenceServerException) as error:
        client.load_model("no_such_model")
    assert error.value.status() == "StatusCode.NOT_FOUND"
    client.close()


def test_a_dead_worker_is_replaced_and_service_goes_on(workers: ServerProcess) -> None:
    # Unloaded over gRPC before the death: the replacement must not bring it back from disk.
    client = own_connection(workers.grpc_address)
    client.unload_model("digits")
    client.unload_model("digits_int8")
    client.close()
    pid = worker_pids(workers)[0]
    os.kill(pid, signal.SIGKILL)
    while alive(pid):
        time.sleep(0.05)
    # Until it is back, the server's statistics cannot be whole: the survivor says so rather
    # than answer with its own part (its replacement takes seconds to load the models).
    refusals = []
    for _ in range(10):  # a connection that raced the dead listener is reset: try another
        client = own_connection(workers.grpc_address)
        with pytest.raises(InferenceServerException) as error:
            client.get_inference_statistics()  # every model served (none here, but ask)
        client.close()
        assert error.value.status() == "StatusCode.UNAVAILABLE"
        refusals.append(error.value.message())
        if "worker 0 did not report its statistics" in refusals[-1]:
            break
    assert "worker 0 did not report its statistics" in refusals[-1], refusals
    restarting = "worker 0 exited with code -9; restarting it"
    deadline = time.monotonic() + 60
    while (
        restarting not in workers.log()
        or "worker 0 is ready" not in workers.log().split(restarting)[-1]
    ):
        assert time.monotonic() < deadline, workers.log()
        time.sleep(0.2)
    assert worker_pids(workers)[0] != pid and not alive(pid)
    assert "worker 0 is ready with no models" in workers.log().split(restarting)[-1]
    client = own_connection(workers.grpc_address)
    client.unload_model("digits")  # it took its siblings' state: unloaded, not unknown
    client.load_model("digits")  # on both workers, the replacement included
    client.load_model("digits_int8")
    client.close()
    samples = scrape(workers.metrics_url)
    assert samples["convserve_worker_restarts_total{}"] == 1
    assert samples["convserve_workers{}"] == 2
    x = np.zeros((1, 1, 8, 8), np.float32)
    for _ in range(CONNECTIONS):  # new connections reach both workers, the new one included
        client = own_connection(workers.grpc_address)
        assert client.infer("digits", [digits_input(x)]).as_numpy("logits").shape == (1, 10)
        # The replacement answers its siblings again; its own figures start from zero.
        assert client.get_inference_statistics("digits").model_stats[0].inference_count > 0
        client.close()


def test_sigterm_drains_every_worker_and_exits_zero() -> None:
    server = ServerProcess(BUNDLED_REPOSITORY, "--workers", "2").start()
    pids = list(worker_pids(server).values())
    assert len(pids) == 2 and all(alive(p) for p in pids)
    server.signal(signal.SIGTERM)
    assert server.wait(60) == 0
    assert not any(alive(p) for p in pids)
    assert server.log().count("draining: finishing in-flight requests") == 2
    for index in (0, 1):  # every worker's lines say which worker wrote them
        assert f"INFO worker-{index} service.app.server: draining" in server.log()


def test_a_worker_that_cannot_start_stops_the_supervisor(tmp_path: Path) -> None:
    (tmp_path / "broken" / "1").mkdir(parents=True)
    (tmp_path / "broken" / "1" / "model.onnx").write_bytes(b"not onnx at all")
    command = [sys.executable, "-m", "service", "serve", "--workers", "2"]
    command += ["--model-repository", str(tmp_path), "--grpc-port", "0", "--metrics-port", "0"]
    command += ["--http-port", "0", "--host", "127.0.0.1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1, result.stderr
    assert "model 'broken' failed to load: " in result.stderr
    assert "before it was ready; stopping" in result.stderr
    assert "Traceback" not in result.stderr


SIBLING = """
import asyncio, sys, tempfile
from pathlib import Path

import grpc

from service._generated.inference import grpc_service_pb2 as pb
from service._generated.inference import grpc_service_pb2_grpc as pb_grpc
from service.core.errors import SiblingFailed, Unavailable
from service.wire.siblings import Siblings, socket_path


class Refusing(pb_grpc.GRPCInferenceServiceServicer):
    async def RepositoryModelLoad(self, request, context):
        marked = dict(context.invocation_metadata()).get("convserve-worker-local")
        await context.abort(grpc.StatusCode.NOT_FOUND, f"no {request.model_name} here ({marked})")


async def main():
    folder = Path(tempfile.mkdtemp())
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Refusing(), server)
    server.add_insecure_port(f"unix:{socket_path(folder, 1)}")  # worker 1; worker 2 never starts
    await server.start()
    siblings = Siblings(folder, 0, 3)
    request = pb.RepositoryModelLoadRequest(model_name="lenet")
    try:
        await siblings.repeat("RepositoryModelLoad", request, 5.0)
    except SiblingFailed as exc:
        print(exc.code.name, exc.message)
    try:
        await siblings.statistics(pb.ModelStatisticsRequest(), 5.0)
    except Unavailable as exc:
        print("UNAVAILABLE", exc.message)
    print(await siblings.index())
    await server.stop(0)


asyncio.run(main())
"""


def test_a_sibling_refusal_comes_back_with_its_status() -> None:
    # A real gRPC server on a worker's socket that refuses loads, and a worker with no socket.
    result = subprocess.run(
        [sys.executable, "-c", SIBLING], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    refused, unavailable, serving = result.stdout.splitlines()
    # The first failing worker's status; the message names each failing worker and why.
    assert refused.startswith("NOT_FOUND RepositoryModelLoad failed on 2 of 3 workers")
    assert "worker 1: NOT_FOUND: no lenet here (1)" in refused  # asked with the local-only mark
    assert "worker 2: UNAVAILABLE" in refused
    assert unavailable.startswith("UNAVAILABLE worker 1 did not report its statistics")
    assert serving == "None"  # nobody said what it serves
