"""Each served model's precision, read from its file's metadata, where the server reports it.

ModelConfig's parameters (tritonclient), ListModels (our stub and ``convserve models``), the
``loaded`` log line, and ``convserve_model_info`` over an HTTP scrape, with one worker and with
two; an fp16 file on the CPU is warned about once, at load.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
import tritonclient.grpc as triton
from prometheus_client.parser import text_string_to_metric_families

from model_format import MODEL_FILE, PRECISION, ModelInfo
from service import BUNDLED_REPOSITORY
from service._generated.convserve.v1 import classifier_pb2 as pb
from service._generated.convserve.v1 import classifier_pb2_grpc as pb_grpc
from service.tools.server_process import ServerProcess

CPU = "CPUExecutionProvider"
SERVED = {
    # served name: the precision its file says
    "digits": "fp32",
    "digits_dense": "fp32",
    "digits_int8": "int8",
    "digits_int8_dense": "int8",
    "half": "fp16",
    "half_dense": "fp16",
    "unmarked": "fp32",
}
FP16_WARNING = "half v1 is fp16 and runs on CPUExecutionProvider"
INFO = "convserve_model_info"


def unmarked(folder: Path) -> None:
    """The demo classifier without its precision document, as exports without one are."""
    folder.mkdir(parents=True)
    model = onnx.load(str(BUNDLED_REPOSITORY / "digits" / "1" / MODEL_FILE))
    kept = [p for p in model.metadata_props if p.key != PRECISION]
    assert len(kept) < len(model.metadata_props)
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.save(model, str(folder / MODEL_FILE))


def half_precision(repository: Path) -> None:
    """A small network exported in fp16, classifier and dense twin (about 4 s)."""
    from export.model_entry import ExportSpec, export_entry
    from export.precision import PrecisionSpec
    from tests import nets

    spec = ExportSpec(
        source="tests.nets:padding_free_2d",
        input_shape=(3, 16, 16),
        name="half",
        repository=repository,
        precision=PrecisionSpec("fp16"),
    )
    export_entry(nets.padding_free_2d(), spec)


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    for name in ("digits", "digits_int8"):
        shutil.copytree(BUNDLED_REPOSITORY / name, root / name)
    unmarked(root / "unmarked" / "1")
    half_precision(root)
    return root


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[ServerProcess]:
    flags = ("--device", "cpu", "--model-control-mode", "explicit", "--load-model", "*")
    with ServerProcess(repository, *flags) as process:
        yield process


def info_series(url: str) -> dict[tuple[str, ...], float]:
    """``convserve_model_info`` as (model, version, precision, provider) -> value."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {
        tuple(s.labels[k] for k in ("model", "version", "precision", "provider")): s.value
        for family in text_string_to_metric_families(text)
        if family.name == INFO
        for s in family.samples
    }


def ready_labels(url: str) -> set[tuple[str, ...]]:
    """The label names of every ``convserve_model_ready`` sample."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {
        tuple(sorted(s.labels))
        for family in text_string_to_metric_families(text)
        if family.name == "convserve_model_ready"
        for s in family.samples
    }


def test_a_file_without_a_precision_document_is_fp32() -> None:
    assert ModelInfo().precision_name == "fp32"


def test_model_config_parameters_name_the_precision(server: ServerProcess) -> None:
    with triton.InferenceServerClient(server.grpc_address) as client:
        for name, precision in SERVED.items():
            config = client.get_model_config(name, as_json=True)["config"]
            assert config["parameters"]["precision"] == {"string_value": precision}, name
        dense = client.get_model_config("digits_int8_dense", as_json=True)["config"]
        assert set(dense["parameters"]) == {"precision", "dense_stride", "dense_window"}


def test_list_models_and_the_client_report_the_precision(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.grpc_address) as channel:
        listed = pb_grpc.ClassifierStub(channel).ListModels(pb.ListModelsRequest(), timeout=10)
    logical = {k: v for k, v in SERVED.items() if not k.endswith("_dense")}
    assert {m.name: m.precision for m in listed.models} == logical

    def convserve(*args: str) -> str:
        command = [sys.executable, "-m", "service", "models", *args]
        result = subprocess.run(
            [*command, "--server", server.grpc_address],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert {m["name"]: m["precision"] for m in json.loads(convserve("--json"))} == logical
    table = convserve().splitlines()
    assert table[0].split()[4] == "precision"
    rows = {line.split()[0]: line.split()[4] for line in table[1:]}
    assert rows == logical


def test_the_loaded_line_names_precision_and_provider(server: ServerProcess) -> None:
    for name, precision in SERVED.items():
        line = rf"model_loader: loaded {name} v1 from \S+ \({precision}\) on {CPU} \("
        assert re.search(line, server.log()), (name, server.log())


def test_the_info_metric_has_one_series_per_served_version(server: ServerProcess) -> None:
    assert info_series(server.metrics_url) == {
        (name, "1", precision, CPU): 1.0 for name, precision in SERVED.items()
    }
    assert ready_labels(server.metrics_url) == {("model", "provider", "version")}


def test_fp16_on_the_cpu_is_warned_about_once_at_load(server: ServerProcess) -> None:
    warnings = [line for line in server.log().splitlines() if FP16_WARNING in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0], server.log()
    assert "answers are correct" in warnings[0] and "meant for CUDA" in warnings[0]
    with triton.InferenceServerClient(server.grpc_address) as client:
        for _ in range(3):
            tensor = triton.InferInput("input", [2, 3, 16, 16], "FP32")
            tensor.set_data_from_numpy(np.ones((2, 3, 16, 16), np.float32))
            assert client.infer("half", [tensor]).as_numpy("logits").shape == (2, 5)
    assert server.log().count(FP16_WARNING) == 1  # answers do not repeat it
    assert "fp16 and runs on" not in server.log().replace(FP16_WARNING, "")


def test_an_unloaded_model_leaves_no_info_series(server: ServerProcess) -> None:
    with triton.InferenceServerClient(server.grpc_address) as client:
        client.unload_model("digits_int8")
        series = info_series(server.metrics_url)
        assert {m for m, *_ in series} == set(SERVED) - {"digits_int8", "digits_int8_dense"}
        client.load_model("digits_int8")
    assert info_series(server.metrics_url)[("digits_int8", "1", "int8", CPU)] == 1


def test_two_workers_show_each_series_once_and_drop_it_on_unload(repository: Path) -> None:
    flags = ("--workers", "2", "--model-control-mode", "explicit", "--load-model", "digits_int8")
    with ServerProcess(repository, "--device", "cpu", *flags) as workers:
        expected = {(n, "1", "int8", CPU): 1.0 for n in ("digits_int8", "digits_int8_dense")}
        assert info_series(workers.metrics_url) == expected  # not summed to 2
        start = len(workers.log())
        with triton.InferenceServerClient(workers.grpc_address) as client:
            client.unload_model("digits_int8")  # the worker it reaches repeats it on the other
        unloaded = (f"worker-{i} service.engine.repository: unloaded digits_int8" for i in (0, 1))
        workers.log_with(*unloaded, start=start)
        assert info_series(workers.metrics_url) == {}
