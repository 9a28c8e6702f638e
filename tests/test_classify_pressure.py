"""No request monopolises the server: bounded Classifies, dense answers and passes within budgets.

Through a real server: a Classify over its image limit, a ClassifyDense answer over
``--max-response-bytes`` and a pass over ``--dense-memory-bytes`` are refused before any work
(nothing computed, the refusal counted); the map formats carry the same map; a scale's copies
in passes that fit the memory answer what one pass answers; a Classify its client leaves is
counted once as dropped. Then the quick modes of ``scripts/monopoly.py`` and
``scripts/dense_soak.py``, which check the same under load.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import grpc
import numpy as np
import pytest

from scripts.server_readings import scrape
from service import BUNDLED_REPOSITORY
from service._generated.convserve.v1 import classifier_pb2 as pb
from service._generated.convserve.v1 import classifier_pb2_grpc as pb_grpc
from service.tools.server_process import ServerProcess
from tests.apart import run_quick
from tests.classifier_server import png, probabilities

STRIP = np.random.default_rng(5).integers(0, 256, (60, 60), dtype=np.uint8)  # 27 x 27 cells


def dense(stub: pb_grpc.ClassifierStub, **options: object) -> pb.ClassifyDenseResponse:
    request = pb.ClassifyDenseRequest(model="digits", image=pb.Image(encoded=png(STRIP)))
    for name, value in options.items():
        setattr(request, name, value)
    return stub.ClassifyDense(request)


def refusal(call) -> str:
    """The details of a RESOURCE_EXHAUSTED that ``call()`` must raise."""
    with pytest.raises(grpc.RpcError) as error:
        call()
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.value.details()
    return str(error.value.details())


def metric(server: ServerProcess, name: str, **labels: str) -> float:
    return scrape(server.metrics_url).total(name, **labels)


def test_every_map_format_carries_the_same_map(classifier_stub) -> None:
    full = dense(classifier_stub, stride_divisor=2)
    assert full.map.format == pb.MAP_FORMAT_FP32 and full.map.classes == 10
    reference = probabilities(full.map)  # [10, 53, 53]
    half = dense(classifier_stub, stride_divisor=2, map_format=pb.MAP_FORMAT_FP16)
    assert list(half.map.shape) == list(full.map.shape) and not half.map.fp32_probabilities
    fp16 = np.frombuffer(half.map.fp16_probabilities, "<f2").reshape(tuple(half.map.shape))
    np.testing.assert_allclose(fp16, reference, atol=1e-3)
    top = dense(classifier_stub, stride_divisor=2, map_format=pb.MAP_FORMAT_TOP_K, top_k=3)
    assert list(top.map.shape) == [3, 53, 53] and top.map.classes == 10
    classes = np.frombuffer(top.map.top_classes, np.uint8).reshape(3, 53, 53)
    values = np.frombuffer(top.map.top_probabilities, "<f2").reshape(3, 53, 53)
    order = np.argsort(-reference, axis=0, kind="stable")[:3]
    agree = (classes == order).mean()  # fp32 near-ties may rank either way
    assert agree > 0.99, agree
    np.testing.assert_allclose(values, np.take_along_axis(reference, classes, 0), atol=1e-3)
    assert [t.index for t in top.top] == [t.index for t in full.top][:3]
    assert list(top.map.cell_starts[0].starts) == list(full.map.cell_starts[0].starts)


def test_a_classify_takes_at_most_its_models_batch_size_times_four(classifier_stub) -> None:
    image = pb.Image(encoded=png(np.zeros((8, 8), np.uint8)))
    reply = classifier_stub.Classify(pb.ClassifyRequest(model="digits", images=[image] * 128))
    assert len(reply.results) == 128
    message = refusal(
        lambda: classifier_stub.Classify(pb.ClassifyRequest(model="digits", images=[image] * 129))
    )
    assert message == (
        "the request carries 129 images; model 'digits' takes at most 128 per Classify (its "
        "max_batch_size 32 x 4; --max-images-per-request sets another): send them in several "
        "requests"
    )


@pytest.fixture(scope="module")
def budget_server():
    """The demo model with small budgets, so that small images reach them."""
    flags = ("--max-response-bytes", "20000", "--max-images-per-request", "3")
    with ServerProcess(BUNDLED_REPOSITORY, *flags, "--dense-memory-bytes", "2500000") as server:
        yield server


@pytest.fixture(scope="module")
def budget_stub(budget_server: ServerProcess):
    with grpc.insecure_channel(budget_server.grpc_address) as channel:
        yield pb_grpc.ClassifierStub(channel)


def test_an_answer_too_large_is_refused_before_any_work(budget_server, budget_stub) -> None:
    cells = metric(budget_server, "convserve_dense_cells_total")
    refused = metric(budget_server, "convserve_requests_total", code="RESOURCE_EXHAUSTED")
    message = refusal(lambda: dense(budget_stub))  # 27 x 27 x 10 x 4 bytes
    assert re.fullmatch(
        r"the answer would take up to 3\d{4} bytes \(a 27x27 map, fp32\); the server answers at "
        r"most 20000 \(--max-response-bytes, .*\): ask for a coarser stride_divisor, "
        r"return_map=false, map_format FP16 or TOP_K with a small top_k, or a smaller first "
        r"scale, or raise the client's message limit and start the server with a larger "
        r"--max-response-bytes",
        message,
    ), message
    assert metric(budget_server, "convserve_dense_cells_total") == cells  # nothing computed
    after = metric(budget_server, "convserve_requests_total", code="RESOURCE_EXHAUSTED")
    assert after == refused + 1
    for smaller in ({"map_format": pb.MAP_FORMAT_FP16}, {"return_map": False}):
        assert dense(budget_stub, **smaller).cells == 27 * 27


def test_an_explicit_image_limit_is_named(budget_stub) -> None:
    image = pb.Image(encoded=png(np.zeros((8, 8), np.uint8)))
    assert (
        len(budget_stub.Classify(pb.ClassifyRequest(model="digits", images=[image] * 3)).results)
        == 3
    )
    message = refusal(
        lambda: budget_stub.Classify(pb.ClassifyRequest(model="digits", images=[image] * 4))
    )
    assert message == (
        "the request carries 4 images; model 'digits' takes at most 3 per Classify "
        "(--max-images-per-request): send them in several requests"
    )


def test_copies_go_in_passes_that_fit_the_memory_and_answer_the_same(
    budget_server, budget_stub, classifier_stub
) -> None:
    """Four shifted copies of 60 x 60: one pass by default, one a pass within 2.5 MB."""
    options = {"stride_divisor": 2, "map_format": pb.MAP_FORMAT_TOP_K, "top_k": 1}
    passes = metric(budget_server, "convserve_batch_size_count", model="digits_dense")
    tight = dense(budget_stub, **options)
    assert metric(budget_server, "convserve_batch_size_count", model="digits_dense") == passes + 4
    roomy = dense(classifier_stub, **options)
    assert tight.map.top_classes == roomy.map.top_classes
    assert [t.index for t in tight.top] == [t.index for t in roomy.top]
    cells = metric(budget_server, "convserve_dense_cells_total")
    big = pb.Image(encoded=png(np.zeros((300, 300), np.uint8)))
    message = refusal(
        lambda: budget_stub.ClassifyDense(
            pb.ClassifyDenseRequest(model="digits", image=big, return_map=False)
        )
    )
    assert message.startswith("evaluating the image at scale 1 (300x300, dense mode")
    assert "at most 2500000 (--dense-memory-bytes" in message
    assert metric(budget_server, "convserve_dense_cells_total") == cells


def test_monopoly_quick_the_largest_classify_leaves_room_for_small_requests() -> None:
    figures = run_quick("monopoly.py")
    assert figures["largest_classify"]["images"] == 128
    assert figures["over_the_limit"]["code"] == "RESOURCE_EXHAUSTED"
    assert figures["during_largest_classify"]["count"] >= 20  # every one answered
    assert figures["small_request_errors"] == []


def test_dense_soak_quick_refuses_up_front_and_fails_nothing() -> None:
    figures = run_quick("dense_soak.py")
    assert figures["counts"]["ok"] > 0
    assert set(figures["counts"]) <= {"ok", "refused_answer_size", "refused_memory"}
    up_front = figures["up_front"]
    assert up_front["answer_size"]["outcome"] == "refused_answer_size"
    assert up_front["memory"]["outcome"] == "refused_memory"
    assert up_front["cells_computed"] == 0 and up_front["counted_by_the_server"] == 2


def test_a_classify_that_ends_while_it_decodes_is_counted_once_as_dropped() -> None:
    """Its model is known and its first chunk has run: no batcher sees it go, it counts itself.

    Once in ``convserve_dropped_requests_total`` as in ``convserve_requests_total``, however
    many of its chunks were queued, computing or not yet decoded when its client left, or when
    its deadline passed.
    """
    count, side = 1024, 1000  # a few seconds of decoding on two cores
    stripes = np.zeros((side, side), np.uint8)
    stripes[::7] = 255
    request = pb.ClassifyRequest(model="digits", images=[pb.Image(encoded=png(stripes))] * count)
    flags = ("--max-images-per-request", str(count), "--max-request-pixels", str(count * side**2))
    with (
        ServerProcess(BUNDLED_REPOSITORY, *flags) as server,
        grpc.insecure_channel(server.grpc_address) as channel,
    ):
        stub = pb_grpc.ClassifierStub(channel)
        before = scrape(server.metrics_url)
        call = stub.Classify.future(request, timeout=120)
        # Its first chunk has run: the request is read, its model known, its next chunks decode.
        until(lambda: metric(server, "convserve_batches_total", model="digits") > 0)
        assert call.cancel(), "the Classify ended before its client could leave"
        until(lambda: metric(server, "convserve_requests_total", code="CANCELLED") > 0)
        until(lambda: metric(server, "convserve_inflight_requests") == 0)
        until(lambda: metric(server, "convserve_queue_depth", model="digits") == 0)
        left = scrape(server.metrics_url)
        with pytest.raises(grpc.RpcError) as late:  # seconds of work, half a second to do it
            stub.Classify(request, timeout=0.5)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        until(lambda: metric(server, "convserve_requests_total", code="DEADLINE_EXCEEDED") > 0)
        until(lambda: metric(server, "convserve_inflight_requests") == 0)
        until(lambda: metric(server, "convserve_queue_depth", model="digits") == 0)
        expired = scrape(server.metrics_url).minus(left)
    cancelled = left.minus(before)
    assert cancelled.by("convserve_requests_total", "code") == {"CANCELLED": 1}
    assert cancelled.total("convserve_requests_total", model="digits") == 1
    assert cancelled.by("convserve_dropped_requests_total", "reason") == {"cancelled": 1}
    assert cancelled.total("convserve_dropped_requests_total", model="digits") == 1
    assert expired.by("convserve_requests_total", "code") == {"DEADLINE_EXCEEDED": 1}
    assert expired.total("convserve_requests_total", model="digits") == 1
    assert expired.by("convserve_dropped_requests_total", "reason") == {"deadline": 1}
    assert expired.total("convserve_dropped_requests_total", model="digits") == 1


def until(condition: Callable[[], bool], timeout: float = 30) -> None:
    """Wait for ``condition`` (a server's reading), polling; fail after ``timeout`` seconds."""
    give_up = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < give_up, "the server's metrics never showed it"
        time.sleep(0.01)
