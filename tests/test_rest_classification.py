"""Classify and ClassifyDense over REST against a real server, checked against its gRPC answers.

The REST answers must be the documents ``convserve classify --json`` prints for the same image,
with the same numbers as the gRPC Classifier gives, and every bad request a clear 4xx with the
server still serving.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from service import BUNDLED_REPOSITORY
from service._generated.convserve.v1 import classifier_pb2 as pb
from service._generated.convserve.v1 import classifier_pb2_grpc as pb_grpc
from service.tools.server_process import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
FOUR = ROOT / "docs" / "images" / "digit-4.png"  # one digit: a 4
STRIP = ROOT / "docs" / "images" / "digits-31409.png"  # five digits in a row, 40x8
PROBABILITY = 1e-5  # the answers round to 6 digits


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


THREE = png(Image.open(STRIP).crop((0, 0, 8, 8)))  # the strip's first digit


@pytest.fixture(scope="module")
def server():
    with ServerProcess(BUNDLED_REPOSITORY) as running:
        yield running


@pytest.fixture(scope="module")
def limited():
    """Room for two images per Classify, and for a dense answer without its map only."""
    flags = ("--max-images-per-request", "2", "--max-response-bytes", "2048")
    with ServerProcess(BUNDLED_REPOSITORY, *flags) as running:
        yield running


@pytest.fixture(scope="module")
def stub(server: ServerProcess):
    with grpc.insecure_channel(server.grpc_address) as channel:
        yield pb_grpc.ClassifierStub(channel)


async def post(url: str, data: Any, content_type: str | None = "image/png") -> tuple[int, Any, str]:
    """Status, JSON document and Content-Type of a POST of ``data``.

    Bytes go with ``content_type`` (None: no Content-Type at all); a multipart body with its own.
    """
    headers = {} if content_type is None else {"Content-Type": content_type}
    raw = isinstance(data, bytes)
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            url, data=data, headers=headers, skip_auto_headers=["Content-Type"] if raw else ()
        ) as response,
    ):
        return response.status, json.loads(await response.read()), response.content_type


def form(*images: tuple[str, bytes]) -> aiohttp.FormData:
    """A multipart/form-data body as aiohttp writes it: one file part per image."""
    data = aiohttp.FormData()
    for name, image in images:
        data.add_field("image", image, filename=name, content_type="image/png")
    return data


def mixed(*images: bytes) -> aiohttp.MultipartWriter:
    """A multipart/mixed body: parts with a Content-Type and no names."""
    writer = aiohttp.MultipartWriter("mixed")
    for image in images:
        writer.append(image, {"Content-Type": "image/png"})
    return writer


def same_top(rest: list[dict[str, Any]], grpc_top: Any) -> None:
    """The REST labels are gRPC's: same classes in the same order, probabilities within 1e-5."""
    assert [e["index"] for e in rest] == [e.index for e in grpc_top]
    assert [e["label"] for e in rest] == [e.label for e in grpc_top]
    for entry, expected in zip(rest, grpc_top, strict=True):
        assert entry["probability"] == pytest.approx(expected.probability, abs=PROBABILITY)


def counted(server: ServerProcess, **labels: str) -> float:
    """The sum of ``convserve_requests_total`` over the samples matching ``labels``."""
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "convserve_requests_total" and labels.items() <= sample.labels.items()
    )


async def test_one_png_gets_the_grpc_top_k(server: ServerProcess, stub) -> None:
    status, documents, content_type = await post(
        f"{server.http_url}/v2/models/digits/classify?top_k=3", FOUR.read_bytes()
    )
    assert status == 200 and content_type == "application/json"
    [document] = documents
    expected = stub.Classify(
        pb.ClassifyRequest(model="digits", top_k=3, images=[pb.Image(encoded=FOUR.read_bytes())])
    )
    assert document["image"] is None
    assert (document["model"], document["version"]) == (expected.model, expected.version)
    same_top(document["top"], expected.results[0].top)
    assert document["top"][0]["label"] == "4"


async def test_multipart_answers_one_document_per_image_in_order(
    server: ServerProcess, stub
) -> None:
    images = [("four.png", FOUR.read_bytes()), ("strip.png", STRIP.read_bytes()), ("3.png", THREE)]
    expected = stub.Classify(
        pb.ClassifyRequest(model="digits", images=[pb.Image(encoded=i) for _, i in images])
    )
    url = f"{server.http_url}/v2/models/digits/versions/1/classify"
    status, documents, _ = await post(url, form(*images), None)
    assert status == 200, documents
    assert [d["image"] for d in documents] == ["four.png", "strip.png", "3.png"]
    for document, result in zip(documents, expected.results, strict=True):
        assert len(document["top"]) == 5  # top_k 0: the proto's default
        same_top(document["top"], result.top)
    status, unnamed, _ = await post(url, mixed(*[i for _, i in images]), None)
    assert status == 200 and [d["image"] for d in unnamed] == [None] * 3
    assert [d["top"] for d in unnamed] == [d["top"] for d in documents]


async def test_classify_dense_answers_the_cli_document(server: ServerProcess) -> None:
    cli = subprocess.run(
        [sys.executable, "-m", "service", "classify", str(STRIP), "--model", "digits", "--dense",
         "--stride-divisor", "2", "--top-k", "3", "--json", "--server", server.grpc_address],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    [expected] = json.loads(cli.stdout)
    for path in ("/v2/models/digits", "/v2/models/digits/versions/1"):
        url = f"{server.http_url}{path}/classify_dense?stride_divisor=2&top_k=3"
        status, document, _ = await post(url, STRIP.read_bytes())
        assert status == 200, document
        assert document.pop("image") is None and expected["image"] == str(STRIP)
        assert document.pop("map")["shape"] == expected["map_shape"] == [10, 1, 33]
        rest_top, cli_top = document.pop("top"), expected["top"]
        assert document == {k: v for k, v in expected.items() if k not in ("image", "top")}
        for entry, wanted in zip(rest_top, cli_top, strict=True):
            assert entry["probability"] == pytest.approx(wanted["probability"], abs=PROBABILITY)
            assert {**entry, "probability": 0} == {**wanted, "probability": 0}


def decoded(document: dict[str, Any], key: str) -> np.ndarray:
    data = base64.b64decode(document[key])
    return np.frombuffer(data, document[f"{key}_dtype"]).reshape(document["shape"])


async def test_the_map_in_each_format_is_the_grpc_map(server: ServerProcess, stub) -> None:
    def grpc_map(map_format: int) -> Any:
        return stub.ClassifyDense(
            pb.ClassifyDenseRequest(
                model="digits", image=pb.Image(encoded=STRIP.read_bytes()), top_k=2,
                stride_divisor=2, map_format=map_format,
            )
        ).map  # fmt: skip

    url = f"{server.http_url}/v2/models/digits/classify_dense?top_k=2&stride_divisor=2"
    expected = grpc_map(pb.MAP_FORMAT_FP32)
    reference = np.frombuffer(expected.fp32_probabilities, "<f4").reshape(expected.shape)
    _, document, _ = await post(url, STRIP.read_bytes())
    fp32 = document["map"]
    assert (fp32["format"], fp32["classes"], fp32["scale"]) == ("fp32", 10, 1.0)
    assert fp32["cell_starts"] == [list(axis.starts) for axis in expected.cell_starts]
    np.testing.assert_allclose(decoded(fp32, "probabilities"), reference, atol=1e-6)

    _, document, _ = await post(url + "&map_format=fp16", STRIP.read_bytes())
    fp16 = document["map"]
    assert fp16["format"] == "fp16" and fp16["probabilities_dtype"] == "<f2"
    np.testing.assert_allclose(decoded(fp16, "probabilities"), reference, atol=1e-3)

    for spelling in ("top_k", "top-k", "MAP_FORMAT_TOP_K"):
        _, document, _ = await post(f"{url}&map_format={spelling}", STRIP.read_bytes())
        top = document["map"]
        assert top["format"] == "top_k" and top["shape"] == [2, 1, 33]
        classes, values = decoded(top, "top_classes"), decoded(top, "probabilities")
        wanted = grpc_map(pb.MAP_FORMAT_TOP_K)
        wanted_classes = np.frombuffer(wanted.top_classes, "u1").reshape(wanted.shape)
        np.testing.assert_allclose(values, np.sort(reference, axis=0)[::-1][:2], atol=1e-3)
        clear = values[0] - values[1] > 1e-2  # where the top two do not nearly tie
        assert (classes[0][clear] == wanted_classes[0][clear]).all() and clear.any()

    _, document, _ = await post(url + "&return_map=false&pool=POOL_MAX", STRIP.read_bytes())
    assert "map" not in document and document["map_shape"] == [] and document["pool"] == "max"


async def test_crops_mode_and_a_second_scale(server: ServerProcess, stub) -> None:
    big = png(Image.open(STRIP).resize((80, 16), Image.Resampling.NEAREST))
    url = f"{server.http_url}/v2/models/digits/classify_dense?mode=crops&scales=0.5,1&top_k=2"
    status, document, _ = await post(url, big)
    assert status == 200, document
    expected = stub.ClassifyDense(
        pb.ClassifyDenseRequest(
            model="digits", image=pb.Image(encoded=big), top_k=2, scales=[0.5, 1],
            mode=pb.MODE_CROPS,
        )
    )  # fmt: skip
    assert document["mode"] == "crops" and document["map"]["scale"] == 0.5
    same_top(document["top"], expected.top)
    assert [e["box"] for e in document["top"]] == [list(e.box) for e in expected.top]


BAD = [
    # (query, body, Content-Type, status, what the message says)
    ("", b"not an image at all", "image/png", 400, "not a readable"),
    ("", b"", "image/png", 400, "the request body is empty"),
    ("", FOUR.read_bytes(), "text/plain", 400, "Content-Type 'text/plain' is not an image"),
    ("", FOUR.read_bytes(), None, 400, "the request has no Content-Type"),
    ("", FOUR.read_bytes(), "multipart/form-data", 400, "names no boundary"),
    ("?topk=3", FOUR.read_bytes(), "image/png", 400, "'topk' (did you mean 'top_k'?)"),
    ("?scales=1", FOUR.read_bytes(), "image/png", 400, "'scales' (a parameter of classify_dense)"),
    ("?top_k=abc", FOUR.read_bytes(), "image/png", 400, "'top_k' must be an integer"),
    ("?top_k=-1", FOUR.read_bytes(), "image/png", 400, "from 0 to 4294967295, got '-1'"),
    ("?top_k=1&top_k=2", FOUR.read_bytes(), "image/png", 400, "'top_k' is given 2 times"),
    ("?timeout=soon", FOUR.read_bytes(), "image/png", 400, "'timeout' must be an integer"),
]


@pytest.mark.parametrize(("query", "body", "content_type", "status", "message"), BAD)
async def test_a_bad_classify_is_a_clear_4xx(
    server: ServerProcess, query: str, body: bytes, content_type: str | None, status: int,
    message: str,
) -> None:  # fmt: skip
    url = f"{server.http_url}/v2/models/digits/classify{query}"
    answer = await post(url, body, content_type)
    assert answer[0] == status and message in answer[1]["error"], answer
    assert urllib.request.urlopen(f"{server.http_url}/v2/health/ready").status == 200


DENSE_BAD = [
    ("?pool=median", STRIP.read_bytes(), 400, "'pool' must be one of mean, max, got 'median'"),
    ("?scales=1,x", STRIP.read_bytes(), 400, "'scales' must be a number, got 'x'"),
    ("?return_map=maybe", STRIP.read_bytes(), 400, "'return_map' must be true or false"),
    ("?stride_divisor=9", STRIP.read_bytes(), 400, "stride_divisor must be 1..8"),
    ("?scales=0.1", STRIP.read_bytes(), 400, "smaller than the model's window"),
    ("?strid_divisor=2", STRIP.read_bytes(), 400, "did you mean 'stride_divisor'?"),
    ("", mixed(FOUR.read_bytes(), THREE), 400, "takes exactly one image; the body holds 2"),
]


@pytest.mark.parametrize(("query", "body", "status", "message"), DENSE_BAD)
async def test_a_bad_classify_dense_is_a_clear_4xx(
    server: ServerProcess, query: str, body: Any, status: int, message: str
) -> None:
    url = f"{server.http_url}/v2/models/digits/classify_dense{query}"
    content_type = None if isinstance(body, aiohttp.MultipartWriter) else "image/png"
    answer = await post(url, body, content_type)
    assert answer[0] == status and message in answer[1]["error"], answer


async def test_malformed_multipart_bodies(server: ServerProcess) -> None:
    url = f"{server.http_url}/v2/models/digits/classify"
    four = FOUR.read_bytes()
    cases = [
        (b"--b\r\nContent-Type: image/png\r\n\r\n" + four, "without its closing boundary"),
        (b"no boundary here", "holds no boundary line"),
        (b"--b--\r\n", "holds no parts"),
        (b"--b\r\nContent-Type: text/plain\r\n\r\nhello\r\n--b--", "part 1 has Content-Type"),
        (b"--b\r\nContent-Transfer-Encoding: base64\r\n\r\nAAAA\r\n--b--", "Transfer-Encoding"),
    ]
    for body, message in cases:
        status, document, _ = await post(url, body, "multipart/mixed; boundary=b")
        assert status == 400 and message in document["error"], (body[:40], document)
    # A preamble, a part without headers and an epilogue are all multipart allows.
    body = b"preamble\r\n--b\r\n\r\n" + four + b"\r\n--b--\r\nepilogue"
    status, [document], _ = await post(url, body, "multipart/mixed; boundary=b")
    assert status == 200 and document["top"][0]["label"] == "4"


async def test_the_grpc_limits_hold(limited: ServerProcess) -> None:
    url = f"{limited.http_url}/v2/models/digits"
    status, document, _ = await post(
        f"{url}/classify", mixed(FOUR.read_bytes(), THREE, FOUR.read_bytes()), None
    )
    assert status == 413 and "carries 3 images" in document["error"]
    assert "--max-images-per-request" in document["error"]
    status, document, _ = await post(f"{url}/classify_dense?stride_divisor=2", STRIP.read_bytes())
    assert status == 413 and "--max-response-bytes" in document["error"]
    status, document, _ = await post(
        f"{url}/classify_dense?stride_divisor=2&return_map=false", STRIP.read_bytes()
    )
    assert status == 200 and document["top"]
    assert counted(limited, api="dense", protocol="http", code="RESOURCE_EXHAUSTED") == 1


async def test_unknown_models_a_twin_and_an_expired_timeout(server: ServerProcess) -> None:
    four = FOUR.read_bytes()
    status, document, _ = await post(f"{server.http_url}/v2/models/nope/classify", four)
    assert status == 404 and "nope" in document["error"]
    status, document, _ = await post(
        f"{server.http_url}/v2/models/digits/versions/7/classify", four
    )
    assert status == 404
    status, document, _ = await post(f"{server.http_url}/v2/models/digits_dense/classify", four)
    assert status == 400 and "logical model name 'digits'" in document["error"]
    # One microsecond is gone before the request reaches its queue.
    status, document, _ = await post(f"{server.http_url}/v2/models/digits/classify?timeout=1", four)
    assert status == 504, document
    assert counted(server, api="classify", protocol="http", code="DEADLINE_EXCEEDED") >= 1


async def test_requests_are_counted_as_http_classify_and_dense(server: ServerProcess) -> None:
    def counts() -> tuple[float, ...]:
        return (
            counted(server, api="classify", protocol="http", model="digits", code="OK"),
            counted(server, api="classify", protocol="http", code="INVALID_ARGUMENT"),
            counted(server, api="dense", protocol="http", code="OK"),
            counted(server, api="classify", protocol="grpc"),
        )

    before = counts()
    url = f"{server.http_url}/v2/models/digits"
    for _ in range(2):
        assert (await post(f"{url}/classify", FOUR.read_bytes()))[0] == 200
    assert (await post(f"{url}/classify?top_k=x", FOUR.read_bytes()))[0] == 400
    assert (await post(f"{url}/classify_dense", STRIP.read_bytes()))[0] == 200
    after = counts()
    assert [a - b for a, b in zip(after, before, strict=True)] == [2, 1, 1, 0]
