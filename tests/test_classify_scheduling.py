"""Where and when a classification request's work runs: on the event loop or the decoding
threads, in chunks through a small queue, across a reload of its model.
"""

from __future__ import annotations

import shutil
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort

from service._generated.convserve.v1 import classifier_pb2 as pb
from service._generated.convserve.v1 import classifier_pb2_grpc as pb_grpc
from service.tools.server_process import ServerProcess
from tests.apart import run_apart
from tests.classifier_server import png


def test_a_request_of_many_chunks_fits_a_small_queue(classifier_repository: Path, held_out) -> None:
    """2,209 crops are 70 chunks of 32; a queue of 8 takes them because they go 4 at a time."""
    x_test, _ = held_out
    strip = np.zeros((100, 100), np.uint8)
    strip[40:48, 40:48] = x_test[3]
    request = pb.ClassifyDenseRequest(
        model="digits", image=pb.Image(encoded=png(strip)), mode=pb.MODE_CROPS, return_map=True
    )
    with (
        ServerProcess(
            classifier_repository, "--inline-compute-microseconds", "0", "--max-queue-size", "8"
        ) as server,
        grpc.insecure_channel(server.grpc_address) as channel,
    ):
        stub = pb_grpc.ClassifierStub(channel)
        by_crops = stub.ClassifyDense(request)
        request.mode = pb.MODE_DENSE
        by_dense = stub.ClassifyDense(request)
        # three scales at once share the request's 4 places in the queue
        request.mode = pb.MODE_CROPS
        request.scales[:] = [1.0, 0.9, 0.8]
        scaled = stub.ClassifyDense(request)
    assert scaled.cells == 47 * 47 + 42 * 42 + 37 * 37
    assert by_crops.cells == 47 * 47
    np.testing.assert_allclose(
        np.frombuffer(by_crops.map.fp32_probabilities, np.float32),
        np.frombuffer(by_dense.map.fp32_probabilities, np.float32),
        atol=1e-4,
    )


INLINE_CHECK = """
import asyncio, io, json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from service import BUNDLED_REPOSITORY
from service.classification.api import Classification
from service.classification.inputs import INLINE_PIXELS, ImageInput
from service.classification.lookup import ModelRef
from service.core.errors import InvalidArgument
from service.engine.dataplane import DataPlane, Outcome
from service.engine.repository import ModelRepository
from service.engine.runtime import DeviceChoice
from service.core.settings import Settings


class CountingExecutor(ThreadPoolExecutor):  # a real thread pool that counts its work
    submitted = 0

    def submit(self, fn, /, *args, **kwargs):
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


def png(pixels):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


async def changed(*_told):  # the repository's news of served models: none is needed here
    return None


async def main():
    settings = Settings()
    report = {}
    with CountingExecutor(2) as decoders, ThreadPoolExecutor(2) as loads:
        repository = ModelRepository(
            BUNDLED_REPOSITORY, settings, DeviceChoice("cpu"), loads, changed
        )
        await repository.load_all()
        classification = Classification(DataPlane(repository), settings, decoders)
        rng = np.random.default_rng(3)
        tiny = png(rng.integers(0, 256, (8, 8), dtype=np.uint8))
        side = int(INLINE_PIXELS**0.5) + 8  # just over the limit
        large = png(rng.integers(0, 256, (side, side), dtype=np.uint8))

        async def top(images):
            _model, found = await classification.classify(
                ModelRef("digits"), [ImageInput(encoded=i) for i in images], 3, None, Outcome()
            )
            return [[(t.label, t.probability) for t in per_image] for per_image in found]

        on_loop = await top([tiny])
        report["after_tiny"] = decoders.submitted
        mixed = await top([large, tiny, large])
        report["after_mixed"] = decoders.submitted
        report["same_answer"] = mixed[1] == on_loop[0] and mixed[0] == mixed[2]
        try:
            await top([b"\\x89PNG\\r\\n\\x1a\\n broken"])
        except InvalidArgument as exc:
            report["broken"] = exc.message
        await repository.close()
    print(json.dumps(report))


asyncio.run(main())
"""


def test_tiny_images_decode_on_the_loop_and_large_ones_on_decoding_threads() -> None:
    # A process of its own: the data plane's KServe stubs and tritonclient's cannot share one.
    report = run_apart(INLINE_CHECK)
    assert report["after_tiny"] == 0  # decoded on the loop: the hop would cost more
    assert report["after_mixed"] == 2  # only the two large images went to the threads
    assert report["same_answer"]  # wherever an image was decoded, the answer is the same
    # A header that cannot be read says nothing of the size: it is refused as unreadable.
    assert "not a readable" in report["broken"]


def _samples(server: ServerProcess, name: str, model: str) -> list[tuple[dict[str, str], float]]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and sample.labels.get("model") == model
    ]


def _ready_versions(server: ServerProcess, model: str) -> set[str]:
    return {
        labels["version"]
        for labels, value in _samples(server, "convserve_model_ready", model)
        if value == 1
    }


def _batches(server: ServerProcess, model: str) -> float:
    return sum(value for _, value in _samples(server, "convserve_batch_size_count", model))


def test_a_reload_in_the_middle_of_a_classify_lets_all_its_chunks_run(tmp_path: Path) -> None:
    """A Classify of 256 chunks of a slow model, 4 at a time; version 2 is swapped in meanwhile.

    The chunks queued after the swap still go to version 1, which closes only once the request
    that held it is done (a closed batcher would answer UNAVAILABLE); the load itself returns
    as soon as version 2 serves, without waiting for that request.
    """
    # tritonclient's KServe stubs: ours and its cannot share one process (the same proto file).
    import tritonclient.grpc as triton

    from tests import onnx_models

    path = onnx_models.slow(tmp_path / "slow" / "1", depth=64, config={"max_batch_size": 4})
    rows = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
    request = pb.ClassifyRequest(
        model="slow",
        top_k=1,
        images=[pb.Image(tensor=pb.Tensor(shape=[1024], fp32_data=row.tobytes())) for row in rows],
    )
    with (
        ServerProcess(
            tmp_path,
            "--model-control-mode",
            "explicit",
            "--load-model",
            "*",
            "--max-images-per-request",  # 256 chunks: room for the reload to land among them
            "1024",
        ) as server,
        grpc.insecure_channel(server.grpc_address) as channel,
        triton.InferenceServerClient(server.grpc_address) as control,
        ThreadPoolExecutor(2) as pool,
    ):
        stub = pb_grpc.ClassifierStub(channel)
        classify = pool.submit(stub.Classify, request, timeout=120)
        give_up = time.monotonic() + 60
        while _batches(server, "slow") < 2 and time.monotonic() < give_up:
            time.sleep(0.005)
        shutil.copytree(tmp_path / "slow" / "1", tmp_path / "slow" / "2")
        loading = pool.submit(control.load_model, "slow", client_timeout=120)
        while "2" not in _ready_versions(server, "slow") and time.monotonic() < give_up:
            time.sleep(0.005)
        early = classify.done()
        loading.result()  # returns once version 2 serves; version 1 drains in the background
        loaded_first = not classify.done()
        # A further load waits for that drain: no third generation while the first still holds.
        control.load_model("slow", client_timeout=120)
        assert classify.done()
        reply = classify.result()
        assert not early, "the Classify ended before the swap: the test tests nothing"
        assert loaded_first, "the load waited for the Classify holding version 1"
        assert _ready_versions(server, "slow") == {"2"}
        assert reply.version == "1"
        server.log_with("drained slow version 1")
    # Every image answered, in order (first and last chunks checked against ONNX Runtime).
    assert len(reply.results) == len(rows)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ends = np.concatenate([rows[:8], rows[-8:]])
    (scores,) = session.run(None, {"x": ends})
    top = [r.top[0].index for r in [*reply.results[:8], *reply.results[-8:]]]
    assert top == scores.argmax(axis=1).tolist()
