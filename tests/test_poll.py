"""``--model-control-mode poll``: the poller's rules alone, then hot reload on real servers."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from service import BUNDLED_REPOSITORY
from service.core.errors import ModelLoadFailed
from service.engine.poller import RepositoryPoller, fingerprint
from service.tools.server_process import ServerProcess

DIGITS = BUNDLED_REPOSITORY / "digits" / "1"
POLL = ("--model-control-mode", "poll", "--repository-poll-secs", "0.2")


class Folders:
    """A repository the poller watches, recording what it was asked to do."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.done: list[str] = []
        self.failing: set[str] = set()

    def on_disk(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())

    async def load(self, name: str) -> None:
        self.done.append(f"load {name}")
        if name in self.failing:
            raise ModelLoadFailed(name, "injected")

    async def unload(self, name: str) -> None:
        self.done.append(f"unload {name}")

    def take(self) -> list[str]:
        done, self.done = self.done, []
        return done


def touch(path: Path, data: bytes = b"x", age: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    stamp = time.time_ns() + age  # distinct times even on a coarse clock
    os.utime(path, ns=(stamp, stamp))


@pytest.fixture()
def folders(tmp_path: Path) -> Folders:
    touch(tmp_path / "a" / "1" / "model.onnx")
    touch(tmp_path / "a" / "config.json", b"{}")
    return Folders(tmp_path)


async def test_a_new_folder_loads_once_it_held_still_for_one_poll(folders: Folders) -> None:
    poller = RepositoryPoller(folders, 1.0)
    await poller.baseline()
    await poller.poll()
    assert folders.take() == []  # nothing changed since the startup load
    touch(folders.root / "b" / "1" / "model.onnx")
    await poller.poll()
    assert folders.take() == []  # seen once: it may still be copied
    await poller.poll()
    assert folders.take() == ["load b"]  # within two polls
    await poller.poll()
    assert folders.take() == [] and poller.polls == 4


async def test_a_file_still_growing_is_not_loaded_until_it_stops(folders: Folders) -> None:
    poller = RepositoryPoller(folders, 1.0)
    await poller.baseline()
    target = folders.root / "a" / "3" / "model.onnx"
    for size in range(1, 6):  # a copy in progress: bigger at every poll
        touch(target, b"x" * size, age=size)
        await poller.poll()
        assert folders.take() == [], size
    await poller.poll()
    assert folders.take() == ["load a"]


@pytest.mark.parametrize(
    "change",
    [
        lambda root: touch(root / "a" / "2" / "model.onnx"),  # a new version
        lambda root: touch(root / "a" / "config.json", b'{"max_batch_size": 4}', age=5),
        lambda root: shutil.rmtree(root / "a" / "1"),  # a version removed
    ],
    ids=["new-version", "config", "version-removed"],
)
async def test_a_changed_folder_is_reloaded(
    folders: Folders, change: Callable[[Path], None]
) -> None:
    poller = RepositoryPoller(folders, 1.0)
    await poller.baseline()
    change(folders.root)
    await poller.poll()
    await poller.poll()
    assert folders.take() == ["load a"]


async def test_a_removed_folder_is_unloaded_within_two_polls(folders: Folders) -> None:
    poller = RepositoryPoller(folders, 1.0)
    await poller.baseline()
    shutil.rmtree(folders.root / "a")
    await poller.poll()
    assert folders.take() == []
    await poller.poll()
    assert folders.take() == ["unload a"]
    await poller.poll()
    assert folders.take() == []


async def test_a_failed_load_is_tried_again_only_when_the_files_change(folders: Folders) -> None:
    poller = RepositoryPoller(folders, 1.0)
    await poller.baseline()
    folders.failing.add("b")
    touch(folders.root / "b" / "1" / "model.onnx", b"junk")
    for _ in range(4):
        await poller.poll()
    assert folders.take() == ["load b"]  # once, not at every poll
    folders.failing.clear()
    touch(folders.root / "b" / "1" / "model.onnx", b"mended", age=7)
    await poller.poll()
    await poller.poll()
    assert folders.take() == ["load b"]


async def test_hidden_files_are_not_looked_at(folders: Folders) -> None:
    poller = RepositoryPoller(folders, 1.0)
    await poller.baseline()
    before = fingerprint(folders.root / "a")
    touch(folders.root / "a" / "1" / ".model.onnx.partial", b"half")  # rsync's way of copying
    touch(folders.root / "a" / ".staging" / "model.onnx")
    assert fingerprint(folders.root / "a") == before
    await poller.poll()
    await poller.poll()
    assert folders.take() == []


async def test_without_a_baseline_every_folder_loads_again(folders: Folders) -> None:
    poller = RepositoryPoller(folders, 1.0)  # a replacement worker 0 knows no baseline
    await poller.poll()
    await poller.poll()
    assert folders.take() == ["load a"]


async def test_polling_runs_until_stopped(folders: Folders) -> None:
    poller = RepositoryPoller(folders, 0.01)
    await poller.baseline()
    poller.start()
    touch(folders.root / "b" / "1" / "model.onnx")
    give_up = time.monotonic() + 10
    while "load b" not in folders.done and time.monotonic() < give_up:
        await asyncio.sleep(0.01)
    await poller.stop()
    polls = poller.polls
    await asyncio.sleep(0.05)
    assert "load b" in folders.done and poller.polls == polls


# -- real servers ----------------------------------------------------------------------------
def samples(server: ServerProcess, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


def digits_only(root: Path) -> Path:
    """``digits`` version 1 without its dense twin: one file per version to drop in."""
    (root / "digits" / "1").mkdir(parents=True)
    shutil.copy(DIGITS / "model.onnx", root / "digits" / "1" / "model.onnx")
    return root


def copy_slowly(source: Path, target: Path, seconds: float) -> None:
    """Write ``target`` in chunks over ``seconds``, as a copy to a slow volume does."""
    data = source.read_bytes()
    chunks = 20
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("wb") as out:
        for i in range(chunks):
            out.write(data[i * len(data) // chunks : (i + 1) * len(data) // chunks])
            out.flush()
            time.sleep(seconds / chunks)


def test_hot_reload_under_load_fails_no_request(tmp_path: Path) -> None:
    """An operator drops ``3/model.onnx`` while clients send requests: version 3 serves."""
    with ServerProcess(digits_only(tmp_path), *POLL) as server:
        stop = threading.Event()
        versions: list[str] = []
        errors: list[Exception] = []
        image = np.zeros((1, 1, 8, 8), np.float32)

        def traffic() -> None:
            with triton.InferenceServerClient(server.grpc_address) as own:
                while not stop.is_set():
                    tensor = triton.InferInput("input", [1, 1, 8, 8], "FP32")
                    tensor.set_data_from_numpy(image)
                    try:
                        versions.append(own.infer("digits", [tensor]).get_response().model_version)
                    except InferenceServerException as exc:
                        errors.append(exc)

        senders = [threading.Thread(target=traffic) for _ in range(3)]
        for sender in senders:
            sender.start()
        time.sleep(0.5)
        # Copied over 1.5 s, longer than two polls: it changes at every poll until done.
        copy_slowly(DIGITS / "model.onnx", tmp_path / "digits" / "3" / "model.onnx", 1.5)
        done = time.monotonic()
        with triton.InferenceServerClient(server.grpc_address) as client:
            while not client.is_model_ready("digits", "3") and time.monotonic() < done + 30:
                time.sleep(0.02)
            served_after = time.monotonic() - done
            time.sleep(0.5)
            stop.set()
            for sender in senders:
                sender.join(30)
            assert client.get_model_metadata("digits").versions == ["3"]
            assert client.is_model_ready("digits", "3") and not client.is_model_ready("digits", "1")
            assert client.is_server_ready()
        print(
            f"hot reload: {len(versions) + len(errors)} requests, {len(errors)} failed; "
            f"version 3 served {served_after:.2f} s after the copy ended"
        )
        assert not errors, errors[:3]
        assert versions[0] == "1" and versions[-1] == "3" and len(versions) > 50
        assert served_after < 10
        # The half-written file was never loaded: no failure, one load of the folder.
        assert not samples(server, "convserve_model_load_failures_total")
        assert server.log().count("poll: loaded digits") == 1
        server.log_with("drained digits version 1")


def test_poll_mode_applies_each_kind_of_change(tmp_path: Path) -> None:
    with (
        ServerProcess(digits_only(tmp_path), *POLL) as server,
        triton.InferenceServerClient(server.grpc_address) as client,
    ):

        def settle(condition: Callable[[], bool]) -> None:
            give_up = time.monotonic() + 20
            while not condition():
                assert time.monotonic() < give_up, server.log()
                time.sleep(0.05)

        # Load and unload requests are refused; the index answers.
        with pytest.raises(InferenceServerException) as refused:
            client.load_model("digits")
        assert refused.value.status() == "StatusCode.UNAVAILABLE"
        assert "explicit model load / unload is not allowed" in refused.value.message()
        # A new folder loads; a broken one is UNAVAILABLE and the server stays ready.
        shutil.copytree(tmp_path / "digits", tmp_path / "other")
        (tmp_path / "broken" / "1").mkdir(parents=True)
        (tmp_path / "broken" / "1" / "model.onnx").write_bytes(b"not onnx")
        settle(lambda: client.is_model_ready("other"))

        def index() -> dict[str, tuple[str, str]]:
            models = client.get_model_repository_index().models
            return {m.name: (m.version, m.state) for m in models}

        settle(lambda: index().get("broken", ("", ""))[1] == "UNAVAILABLE")
        assert index() == {
            "broken": ("", "UNAVAILABLE"),
            "digits": ("1", "READY"),
            "other": ("1", "READY"),
        }
        assert client.is_server_ready()
        failures = "convserve_model_load_failures_total"
        settle(lambda: samples(server, failures).get((("model", "broken"),)) == 1)
        # A version that fails leaves the served one serving, and is counted.
        (tmp_path / "digits" / "2").mkdir()
        (tmp_path / "digits" / "2" / "model.onnx").write_bytes(b"half a file")
        settle(lambda: samples(server, failures).get((("model", "digits"),)) == 1)
        assert client.is_model_ready("digits", "1") and client.is_server_ready()
        # A changed config.json is applied.
        (tmp_path / "other" / "config.json").write_text('{"max_batch_size": 4}')
        settle(lambda: client.get_model_config("other").config.max_batch_size == 4)
        # A removed folder is unloaded, its readiness series gone.
        shutil.rmtree(tmp_path / "other")
        shutil.rmtree(tmp_path / "broken")
        settle(lambda: set(index()) == {"digits"})
        settle(lambda: not client.is_model_ready("other"))
        ready = samples(server, "convserve_model_ready")
        assert {(dict(k)["model"], dict(k)["version"]) for k in ready} == {("digits", "1")}
        assert client.is_server_ready()


def test_with_workers_one_polls_and_every_worker_serves_the_new_version(tmp_path: Path) -> None:
    with ServerProcess(digits_only(tmp_path), "--workers", "2", *POLL) as server:
        shutil.copytree(tmp_path / "digits" / "1", tmp_path / "digits" / "2")
        address = server.grpc_address
        give_up = time.monotonic() + 30
        while "worker-1 service.engine.model_loader: loaded digits v2" not in server.log():
            assert time.monotonic() < give_up, server.log()
            time.sleep(0.05)
        for _ in range(8):  # connections reach both workers: each serves version 2 alone
            client = triton.InferenceServerClient(
                address, channel_args=[("grpc.use_local_subchannel_pool", 1)]
            )
            assert client.get_model_metadata("digits").versions == ["2"]
            # The workers' own mark does not let a client through: only a worker's socket does.
            for headers in (None, {"convserve-worker-local": "1"}):
                with pytest.raises(InferenceServerException) as refused:
                    client.unload_model("digits", headers=headers)
                assert refused.value.status() == "StatusCode.UNAVAILABLE"
            client.close()
        assert server.log().count("poll: loaded digits") == 1  # one worker polls
        ready = samples(server, "convserve_model_ready")
        assert {dict(k)["version"] for k in ready} == {"2"}
