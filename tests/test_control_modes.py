"""Model control modes none and explicit, --load-model, --exit-on-error, load parameters."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from service import BUNDLED_REPOSITORY
from service.core.settings import SettingError, Settings
from service.tools.server_process import ServerProcess

TRITON_REFUSAL = "explicit model load / unload is not allowed if polling is enabled"


def repository(root: Path, *names: str, broken: str = "") -> Path:
    """Copies of the demo model under ``names``, and a model that does not load."""
    for name in names:
        shutil.copytree(BUNDLED_REPOSITORY / "digits", root / name)
    if broken:
        (root / broken / "1").mkdir(parents=True)
        (root / broken / "1" / "model.onnx").write_bytes(b"not onnx at all")
    return root


def infer(client: triton.InferenceServerClient, model: str = "digits") -> tuple[int, ...]:
    tensor = triton.InferInput("input", [1, 1, 8, 8], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 1, 8, 8), np.float32))
    return tuple(client.infer(model, [tensor]).as_numpy("logits").shape)


def refusal(call: object, *args: object, **kwargs: object) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as error:
        call(*args, **kwargs)  # type: ignore[operator]
    return error.value


def served(client: triton.InferenceServerClient) -> dict[str, str]:
    return {m.name: m.state for m in client.get_model_repository_index().models}


@pytest.fixture(scope="module")
def default_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(repository(tmp_path_factory.mktemp("none"), "digits")) as server:
        yield server


@pytest.fixture(scope="module")
def explicit_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("explicit")
    repository(root / "repository", "digits", "other")
    repository(root, "outside")  # a model folder beside the repository, not in it
    flags = ("--model-control-mode", "explicit", "--allow-model-upload")
    with ServerProcess(root / "repository", *flags) as server:
        yield server


def test_by_default_an_unload_is_refused_and_the_model_keeps_serving(
    default_server: ServerProcess,
) -> None:
    """The audit's first finding: any client could unload the served model."""
    client = triton.InferenceServerClient(default_server.grpc_address)
    for call in (client.unload_model, client.load_model):
        error = refusal(call, "digits")
        assert error.status() == "StatusCode.UNAVAILABLE"
        assert TRITON_REFUSAL in error.message()  # Triton's words, which clients may match
        assert "--model-control-mode explicit" in error.message()
    assert client.is_model_ready("digits") and client.is_server_ready()
    assert infer(client) == (1, 10)
    assert served(client) == {"digits": "READY", "digits_dense": "READY"}  # the index answers
    client.close()


def test_model_files_in_a_load_are_refused_without_allow_model_upload(
    default_server: ServerProcess,
) -> None:
    client = triton.InferenceServerClient(default_server.grpc_address)
    # The parameters are checked before the mode, as in Triton: the reason given is the files.
    error = refusal(client.load_model, "digits", config="{}", files={"file:1/model.onnx": b"x"})
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "'file:1/model.onnx'" in error.message()
    assert "--allow-model-upload" in error.message()
    client.close()


def test_explicit_mode_loads_nothing_at_the_start_without_load_model(
    explicit_server: ServerProcess,
) -> None:
    assert "ready: serving no models" in explicit_server.log()
    client = triton.InferenceServerClient(explicit_server.grpc_address)
    assert served(client) == {"digits": "UNAVAILABLE", "other": "UNAVAILABLE"}
    assert client.is_server_ready()  # nothing is meant to be served yet
    client.load_model("digits")
    assert infer(client) == (1, 10) and client.is_server_ready()
    client.close()


def test_uploaded_model_files_are_not_implemented_even_when_allowed(
    explicit_server: ServerProcess,
) -> None:
    client = triton.InferenceServerClient(explicit_server.grpc_address)
    error = refusal(client.load_model, "digits", config="{}", files={"file:1/model.onnx": b"x"})
    assert error.status() == "StatusCode.UNIMPLEMENTED"
    assert "place the files in the model repository" in error.message()
    error = refusal(client.load_model, "digits", config='{"max_batch_size": 4}')
    assert error.status() == "StatusCode.INVALID_ARGUMENT"  # config overrides: as before
    client.close()


@pytest.mark.parametrize(
    "name", ["../outside", "..", ".", "/tmp", "digits/../../outside", "", "outside", ".hidden"]
)
def test_a_name_outside_the_repository_is_not_found(
    explicit_server: ServerProcess, name: str
) -> None:
    client = triton.InferenceServerClient(explicit_server.grpc_address)
    error = refusal(client.load_model, name)
    assert error.status() == "StatusCode.NOT_FOUND"
    assert "outside" not in served(client)
    client.close()
    assert "loaded outside" not in explicit_server.log()


def serve_until_exit(root: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "service", "serve", "--model-repository", str(root)]
    command += ["--grpc-port", "0", "--http-port", "0", "--metrics-port", "0"]
    command += ["--host", "127.0.0.1", *flags]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def test_a_missing_startup_model_stops_the_start(tmp_path: Path) -> None:
    root = repository(tmp_path, "digits")
    result = serve_until_exit(root, "--model-control-mode", "explicit", "--load-model", "nope")
    assert result.returncode == 1, result.stderr
    assert "models failed to load: nope; shutting down" in result.stderr


def test_exit_on_error_false_serves_the_models_that_load(tmp_path: Path) -> None:
    root = repository(tmp_path, "digits", broken="broken")
    with (
        ServerProcess(root, "--exit-on-error=false") as server,
        triton.InferenceServerClient(server.grpc_address) as client,
    ):
        assert "models failed to load: broken; serving the others" in server.log()
        assert client.is_server_ready() and infer(client) == (1, 10)
        assert served(client)["broken"] == "UNAVAILABLE"
        assert not client.is_model_ready("broken")


def test_load_model_picks_the_startup_models(tmp_path: Path) -> None:
    root = repository(tmp_path, "digits", "other")
    flags = ("--model-control-mode", "explicit", "--load-model", "other")
    with (
        ServerProcess(root, *flags) as server,
        triton.InferenceServerClient(server.grpc_address) as client,
    ):
        assert served(client) == {
            "digits": "UNAVAILABLE",
            "other": "READY",
            "other_dense": "READY",
        }


def test_the_wildcard_must_be_the_only_startup_model() -> None:
    assert Settings(model_control_mode="explicit", load_model=("*",)).load_model == ("*",)
    with pytest.raises(SettingError, match="must be the only --load-model"):
        Settings(model_control_mode="explicit", load_model=("*", "digits"))
