"""``--grpc-restricted-protocol`` on real servers: Triton's API groups, header and refusal."""

from __future__ import annotations

import io
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from service import BUNDLED_REPOSITORY
from service._generated.convserve.v1 import classifier_pb2 as classifier_pb
from service._generated.convserve.v1 import classifier_pb2_grpc as classifier_grpc
from service._generated.inference import grpc_service_pb2 as kserve_pb
from service._generated.inference import grpc_service_pb2_grpc as kserve_grpc
from service.tools.server_process import ServerProcess

HEADER = "triton-grpc-protocol-admin"
ADMIN = {HEADER: "s3cret"}
REFUSAL = f"This protocol is restricted, expecting header '{HEADER}'"
CONNECTIONS = 16


def refusals(server: ServerProcess, group: str) -> float:
    """convserve_restricted_refusals_total{group} from the server's /metrics (0 when absent)."""
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "convserve_restricted_refusals_total" and sample.labels == {
                "group": group
            }:
                return float(sample.value)
    return 0.0


def refused(call: Callable[[], object]) -> grpc.RpcError:
    """The error of ``call()``, which must fail."""
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value


def own_connection(address: str) -> triton.InferenceServerClient:
    """A client on its own TCP connection, so on either worker."""
    return triton.InferenceServerClient(
        address, channel_args=[("grpc.use_local_subchannel_pool", 1)]
    )


def infer_request() -> kserve_pb.ModelInferRequest:
    tensor = kserve_pb.ModelInferRequest.InferInputTensor(
        name="input", datatype="FP32", shape=[1, 1, 8, 8]
    )
    return kserve_pb.ModelInferRequest(
        model_name="digits",
        inputs=[tensor],
        raw_input_contents=[np.zeros((1, 1, 8, 8), np.float32).tobytes()],
    )


def png_file(folder: Path) -> Path:
    path = folder / "digit.png"
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())
    return path


@pytest.fixture(scope="module")
def repository_restricted() -> Iterator[ServerProcess]:
    """Two workers whose model-repository group needs the admin header."""
    flags = (
        "--workers",
        "2",
        "--model-control-mode",
        "explicit",
        "--load-model",
        "*",
        "--grpc-restricted-protocol",
        "model-repository:admin=s3cret",
    )
    with ServerProcess(BUNDLED_REPOSITORY, *flags) as server:
        yield server


@pytest.fixture(scope="module")
def inference_restricted() -> Iterator[ServerProcess]:
    """One server whose inference group needs the admin header."""
    flags = ("--grpc-restricted-protocol", "inference:admin=s3cret")
    with ServerProcess(BUNDLED_REPOSITORY, *flags) as server:
        yield server


def test_repository_calls_without_the_header_are_refused_and_counted(
    repository_restricted: ServerProcess,
) -> None:
    assert "restricted: model-repository" in repository_restricted.log_with("grpc listening")
    before = refusals(repository_restricted, "model-repository")
    with grpc.insecure_channel(repository_restricted.grpc_address) as channel:
        stub = kserve_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        calls = [
            (stub.RepositoryIndex, kserve_pb.RepositoryIndexRequest(), ()),
            (stub.RepositoryIndex, kserve_pb.RepositoryIndexRequest(), ((HEADER, "wrong"),)),
            (stub.RepositoryModelLoad, kserve_pb.RepositoryModelLoadRequest(model_name="x"), ()),
            (
                stub.RepositoryModelUnload,
                kserve_pb.RepositoryModelUnloadRequest(model_name="digits"),
                (),
            ),
        ]
        for method, request, metadata in calls:
            with pytest.raises(grpc.RpcError) as refusal:
                method(request, metadata=metadata, timeout=10)
            error = refusal.value
            assert (error.code(), error.details()) == (grpc.StatusCode.UNAVAILABLE, REFUSAL)
        index = stub.RepositoryIndex(
            kserve_pb.RepositoryIndexRequest(), metadata=tuple(ADMIN.items()), timeout=10
        )
        assert {m.name for m in index.models} >= {"digits"}
    assert refusals(repository_restricted, "model-repository") == before + len(calls)
    # Every other group stays open: health, metadata, inference.
    client = own_connection(repository_restricted.grpc_address)
    assert client.is_server_ready() and client.get_model_metadata("digits").name == "digits"
    tensor = triton.InferInput("input", [1, 1, 8, 8], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 1, 8, 8), np.float32))
    assert client.infer("digits", [tensor]).as_numpy("logits").shape == (1, 10)
    client.close()
    listed = convserve("models", "--server", repository_restricted.grpc_address)
    assert listed.returncode == 0 and "digits" in listed.stdout, listed.stderr


def test_load_and_unload_with_the_header_reach_every_worker(
    repository_restricted: ServerProcess,
) -> None:
    client = own_connection(repository_restricted.grpc_address)
    client.unload_model("digits", headers=ADMIN)  # one worker, which asks the other
    try:
        for _ in range(CONNECTIONS):  # whichever worker a connection reaches
            other = own_connection(repository_restricted.grpc_address)
            assert not other.is_model_ready("digits")
            other.close()
    finally:
        client.load_model("digits", headers=ADMIN)
    for _ in range(CONNECTIONS):
        other = own_connection(repository_restricted.grpc_address)
        assert other.is_model_ready("digits")
        other.close()
    client.close()


def test_a_restricted_inference_group_refuses_every_inference_call(
    inference_restricted: ServerProcess, tmp_path: Path
) -> None:
    image = classifier_pb.Image(encoded=png_file(tmp_path).read_bytes())
    before = refusals(inference_restricted, "inference")
    with grpc.insecure_channel(inference_restricted.grpc_address) as channel:
        kserve = kserve_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        classifier = classifier_grpc.ClassifierStub(channel)  # type: ignore[no-untyped-call]
        calls = [
            lambda: kserve.ModelInfer(infer_request(), timeout=10),
            # A stream fails as it is read: the call ends with the refusal.
            lambda: list(kserve.ModelStreamInfer(iter([infer_request()]), timeout=10)),
            lambda: classifier.Classify(
                classifier_pb.ClassifyRequest(model="digits", images=[image]), timeout=10
            ),
            lambda: classifier.ClassifyDense(
                classifier_pb.ClassifyDenseRequest(model="digits", image=image), timeout=10
            ),
        ]
        for call in calls:
            error = refused(call)
            assert (error.code(), error.details()) == (grpc.StatusCode.UNAVAILABLE, REFUSAL)
        assert refusals(inference_restricted, "inference") == before + len(calls)
        metadata = tuple(ADMIN.items())
        assert kserve.ModelInfer(infer_request(), metadata=metadata, timeout=10).outputs
        [answer] = kserve.ModelStreamInfer(iter([infer_request()]), metadata=metadata, timeout=10)
        assert not answer.error_message and answer.infer_response.outputs
        request = classifier_pb.ClassifyRequest(model="digits", images=[image])
        assert classifier.Classify(request, metadata=metadata, timeout=10).results
        # Metadata stays open.
        assert classifier.ListModels(classifier_pb.ListModelsRequest(), timeout=10).models


def test_the_cli_sends_the_header(inference_restricted: ServerProcess, tmp_path: Path) -> None:
    image = str(png_file(tmp_path))
    server = ("--server", inference_restricted.grpc_address)
    without = convserve("classify", image, "--model", "digits", *server)
    assert without.returncode == 1
    assert without.stderr == f"convserve classify: error: UNAVAILABLE: {REFUSAL}\n"
    wrong = convserve("classify", image, "--model", "digits", "--header", f"{HEADER}=nope", *server)
    assert wrong.returncode == 1 and REFUSAL in wrong.stderr
    for dense in ((), ("--dense",)):
        with_header = convserve(
            "classify", image, "--model", "digits", "--json",
            "--header", f"{HEADER.upper()}=s3cret", *dense, *server,
        )  # fmt: skip
        assert with_header.returncode == 0, with_header.stderr
        assert '"model": "digits"' in with_header.stdout


def convserve(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the ``convserve`` command line."""
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
