"""Readiness never lies: random model changes against a real server, every answer checked.

Hypothesis drives loads, unloads, failed loads (a folder that does not load), reloads (a new
version, a version that does not load, a changed config.json) and a drain, over the API in
explicit mode and through the repository's files in poll mode. After every step the health
service's "" and per-model statuses, ServerReady, ModelReady, the served versions and the
``convserve_model_ready`` series must all say what the model of the server says (see
tests/readiness_probe.py). One server per test; a drain ends it, and a fresh one takes over.
"""

from __future__ import annotations

import shutil
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from service import BUNDLED_REPOSITORY
from service._generated.inference import grpc_service_pb2 as pb
from service._generated.inference import grpc_service_pb2_grpc as pb_grpc
from service.tools.server_process import ServerProcess
from tests import onnx_models
from tests.readiness_probe import Expected, Probe, scrape

MODELS = ("alpha", "beta")  # copies of the demo model, with a dense twin
BROKEN = "broken"  # a folder whose one version does not load
SLOW = "slow"  # served from the start in explicit mode: a request on it holds a drain open
DIGITS = BUNDLED_REPOSITORY / "digits" / "1"


class Harness:
    """The server under test, restarted after a drain, and what the runs counted."""

    def __init__(self, root: Path, mode: str, workers: int) -> None:
        self.root, self.mode, self.workers = root, mode, workers
        self.server: ServerProcess | None = None
        self.probe: Probe | None = None
        self.expected = Expected()  # the server's state outlives an example, not a restart
        self.examples = self.steps = self.idle = self.drains = 0  # idle: steps that changed nothing
        self.slow = mode == "explicit" and workers == 1  # and so the drain rule
        self.drains_left = 2 if self.slow else 0
        if self.slow:
            onnx_models.slow(root / SLOW / "1", depth=128, config={"max_batch_size": 0})

    def start(self) -> None:
        flags = ["--model-control-mode", self.mode, "--workers", str(self.workers)]
        if self.mode == "poll":
            flags += ["--repository-poll-secs", "0.2"]
        elif self.slow:
            flags += ["--load-model", SLOW, "--drain-grace-seconds", "30"]
        self.server = ServerProcess(self.root, *flags).start()
        connections = 4 if self.workers > 1 else 1  # several: every worker is asked
        self.probe = Probe(self.server.grpc_address, self.server.metrics_url, connections)
        self.expected = Expected()

    def stop(self) -> None:
        if self.probe is not None:
            self.probe.close()
        if self.server is not None:
            self.server.stop()

    @property
    def stub(self) -> pb_grpc.GRPCInferenceServiceStub:
        assert self.probe is not None
        return pb_grpc.GRPCInferenceServiceStub(self.probe.channels[0])


class ReadinessMachine(RuleBasedStateMachine):
    """A model of the server's models, changed at random, checked against every answer."""

    harness: ClassVar[Harness]

    def __init__(self) -> None:
        super().__init__()
        self.h = type(self).harness
        self.h.examples += 1
        self.names = [n for m in (*MODELS, BROKEN) for n in (m, m + "_dense")]
        self.expected = self.h.expected
        self.versions: dict[str, dict[int, bool]] = {}  # on disk: version -> loads
        self.config: dict[str, int] = {}  # on disk: max_batch_size in config.json
        self._reset()

    # -- the repository's files --------------------------------------------------------------
    def _create(self, name: str) -> None:
        shutil.rmtree(self.h.root / name, ignore_errors=True)
        self.versions[name] = {}
        self.config.pop(name, None)
        self._add_version(name, name != BROKEN)

    def _add_version(self, name: str, loads: bool) -> None:
        version = max(self.versions[name], default=0) + 1
        folder = self.h.root / name / str(version)
        folder.mkdir(parents=True)
        if loads:  # the dense twin first: poll mode must not see a version without it
            shutil.copy(DIGITS / "model.dense.onnx", folder / "model.dense.onnx")
            shutil.copy(DIGITS / "model.onnx", folder / "model.onnx")
        else:
            (folder / "model.onnx").write_bytes(b"not onnx")
        self.versions[name][version] = loads

    def _remove(self, name: str) -> None:
        shutil.rmtree(self.h.root / name, ignore_errors=True)
        self.versions.pop(name, None)
        self.config.pop(name, None)

    def _reset(self) -> None:
        """Every example starts with no model of MODELS or BROKEN served."""
        for name in (*MODELS, BROKEN):
            if self.h.mode == "explicit":
                self.h.stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=name))
                self._create(name)
            else:
                self._remove(name)
            self.expected.served.pop(name, None)
            self.expected.failed.discard(name)
        self.expected.dense = frozenset(MODELS)
        if self.h.slow:
            self.expected.served[SLOW] = 1

    # -- what a load does ----------------------------------------------------------------------
    def _loaded(self, name: str) -> None:
        """Expect the result of loading ``name`` as its files are now."""
        top = max(self.versions[name])
        if self.versions[name][top]:
            self.expected.served[name] = top
            self.expected.failed.discard(name)
            self.expected.batch[name] = self.config.get(name, 32)
            return
        self.expected.failures[name] += 1
        if name not in self.expected.served:
            self.expected.failed.add(name)

    def _load(self, name: str) -> None:
        """Explicit mode: load over the API, which fails where the model of it says so."""
        if self.h.mode != "explicit":
            return
        should_load = self.versions[name][max(self.versions[name])]
        try:
            self.h.stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=name))
            assert should_load, f"{name} loaded"
        except grpc.RpcError as error:
            assert not should_load, error
            assert "failed to load" in str(error.details())

    # -- rules ---------------------------------------------------------------------------------
    @rule(name=st.sampled_from(MODELS))
    def load(self, name: str) -> None:
        self.h.steps += 1
        if self.h.mode == "poll":
            if name in self.versions:
                self.h.idle += 1
                return  # in place already: nothing changes
            self._create(name)
        self._load(name)
        self._loaded(name)

    @rule(name=st.sampled_from((*MODELS, BROKEN)))
    def unload(self, name: str) -> None:
        self.h.steps += 1
        if self.h.mode == "explicit":
            self.h.stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=name))
        else:
            self._remove(name)
        self.expected.served.pop(name, None)
        self.expected.failed.discard(name)

    @rule()
    def failed_load(self) -> None:
        self.h.steps += 1
        if self.h.mode == "poll":
            if BROKEN in self.versions:
                self.h.idle += 1
                return
            self._create(BROKEN)
        self._load(BROKEN)
        self._loaded(BROKEN)

    @rule(name=st.sampled_from(MODELS), loads=st.booleans())
    def reload(self, name: str, loads: bool) -> None:
        """A new version, which loads or not."""
        self.h.steps += 1
        if name not in self.versions:  # poll mode, the folder removed: it comes back
            self._create(name)
        else:
            self._add_version(name, loads)
        self._load(name)
        self._loaded(name)

    @rule(name=st.sampled_from(MODELS), batch=st.sampled_from((4, 8, 16)))
    def change_config(self, name: str, batch: int) -> None:
        self.h.steps += 1
        if self.config.get(name) == batch:
            self.h.idle += 1
            return  # the same value again: poll mode would reload to no visible end
        if name not in self.versions:  # poll mode, the folder removed: it comes back
            self._create(name)
        self.config[name] = batch
        (self.h.root / name / "config.json").write_text(f'{{"max_batch_size": {batch}}}')
        self._load(name)
        self._loaded(name)

    @precondition(lambda self: self.h.drains_left > 0)
    @rule()
    def drain(self) -> None:
        """SIGTERM while a request holds the drain open: nothing says ready; then restart."""
        self.h.steps += 1
        self.h.drains_left -= 1
        self.h.drains += 1
        assert self.h.server is not None and self.h.probe is not None
        server, channel = self.h.server, self.h.probe.channels[0]
        served = [n for n in [SLOW, *self.names] if self.expected.ready(n)]
        health = health_pb2_grpc.HealthStub(channel)
        watches = [health.Watch(health_pb2.HealthCheckRequest(service=n)) for n in ["", *served]]
        assert all(next(w).status == health_pb2.HealthCheckResponse.SERVING for w in watches)
        answered: list[object] = []
        request = pb.ModelInferRequest(model_name=SLOW)
        request.inputs.add(name="x", datatype="FP32", shape=[32, 1024])
        request.raw_input_contents.append(np.zeros((32, 1024), np.float32).tobytes())
        held = threading.Thread(target=lambda: answered.append(self.h.stub.ModelInfer(request)))
        held.start()
        give_up = time.monotonic() + 30
        while self._inflight(server) < 1:  # in the server: the drain waits for it
            assert time.monotonic() < give_up
            time.sleep(0.005)
        server.signal(signal.SIGTERM)
        assert all(next(w).status == health_pb2.HealthCheckResponse.NOT_SERVING for w in watches)
        for watch in watches:  # an open Watch would hold the drain for its whole grace
            watch.cancel()
        ready = scrape(server.metrics_url).get("convserve_model_ready", {})
        assert ready and not any(ready.values()), ready  # no version takes new requests
        held.join(60)
        assert len(answered) == 1 and server.wait(60) == 0
        self.h.stop()
        self.h.start()
        self.expected = self.h.expected
        self._reset()

    @staticmethod
    def _inflight(server: ServerProcess) -> float:
        text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
        lines = [line for line in text.splitlines() if line.startswith("convserve_inflight")]
        return float(lines[0].split()[-1]) if lines else 0.0

    @invariant()
    def every_answer_agrees(self) -> None:
        assert self.h.probe is not None
        # poll: until the change is applied; several workers: until the supervisor's sum of
        # their metric files shows it (a worker's file is read at scrape time)
        wait = 20.0 if self.h.mode == "poll" else 2.0 if self.h.workers > 1 else 0.0
        problems = self.h.probe.settle(self.expected, [SLOW, *self.names], wait)
        assert not problems, problems


def run(tmp_path: Path, mode: str, workers: int, examples: int, steps: int) -> Harness:
    harness = Harness(tmp_path, mode, workers)
    harness.start()
    try:
        ReadinessMachine.harness = harness
        run_state_machine_as_test(
            ReadinessMachine,
            settings=settings(
                max_examples=examples,
                stateful_step_count=steps,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            ),
        )
    finally:
        harness.stop()
    return harness


@pytest.fixture()
def report(capsys: pytest.CaptureFixture[str]) -> Iterator[list[str]]:
    lines: list[str] = []
    yield lines
    with capsys.disabled():
        print("\n" + "\n".join(lines))


@pytest.mark.parametrize(
    ("mode", "workers", "examples", "steps"),
    [
        ("explicit", 1, 10, 8),
        ("poll", 1, 6, 8),
        # Two workers: the supervisor's minimum must keep a failed load's 0 whichever worker's
        # file it reads first, the other worker having forgotten the series.
        ("explicit", 2, 5, 8),
    ],
    ids=["explicit", "poll", "explicit-2-workers"],
)
def test_readiness_agrees_after_every_step(
    tmp_path: Path, report: list[str], mode: str, workers: int, examples: int, steps: int
) -> None:
    harness = run(tmp_path, mode, workers, examples, steps)
    report.append(
        f"stateful readiness ({mode}, {workers} worker(s)): {harness.examples} examples, "
        f"{harness.steps} steps ({harness.idle} of them changing nothing), {harness.drains} drains"
    )
    assert harness.examples >= 1 and harness.steps >= harness.examples
