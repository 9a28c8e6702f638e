"""``convserve classify`` and ``convserve models``: the command-line client of Classifier.

Tables for people, ``--json`` for scripts; errors end as one line and a non-zero exit. gRPC,
numpy and the stubs are imported when a command runs, so building the ``convserve`` parser
stays quick.

A server with ``--grpc-use-ssl`` is reached with ``--tls-ca`` (the CA that signed its certificate),
one with ``--grpc-use-ssl-mutual`` with ``--tls-cert`` and ``--tls-key`` as well; any ``--tls-*``
flag turns TLS on (without ``--tls-ca`` the system's CAs verify the server). ``--header`` sends a
request header on every call, such as the ``triton-grpc-protocol-<key>=<value>`` that a server's
``--grpc-restricted-protocol`` asks for.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import grpc

    from service._generated.convserve.v1 import classifier_pb2_grpc as pb_grpc

__all__ = ["add_commands"]

DEFAULT_SERVER = "localhost:8001"
# gRPC metadata keys are lower case; "-bin" keys carry bytes, which a command line cannot give.
_HEADER_KEY = re.compile(r"[0-9a-z_.-]+")
_HEADER_VALUE = re.compile(r"[\x20-\x7e]*")


class ClientError(Exception):
    """A failure to report as one line."""


def add_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``classify`` and ``models``."""
    classify = commands.add_parser("classify", help="classify images with a running server")
    classify.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    _add_connection(classify)
    classify.add_argument("--model", default="", help="may be omitted when one model is served")
    classify.add_argument("--top-k", type=int, default=5)
    classify.add_argument("--dense", action="store_true", help="evaluate the class-score map")
    classify.add_argument("--mode", choices=["dense", "crops"], default="dense")
    classify.add_argument("--stride-divisor", type=int, default=1)
    classify.add_argument("--scales", type=float, nargs="+", default=[1.0])
    classify.add_argument("--pool", choices=["mean", "max"], default="mean")
    classify.add_argument(
        "--heatmap",
        type=Path,
        metavar="OUT.png",
        help="with --dense: draw a class's map over the image (a PNG of at least 512 px)",
    )
    classify.add_argument(
        "--heatmap-class",
        metavar="LABEL",
        help="the class --heatmap draws: a label among the pooled top-k, or a class index "
        "(default: the top pooled class)",
    )
    classify.add_argument("--timeout", type=float, default=30.0, help="seconds")
    classify.add_argument("--json", action="store_true")
    classify.set_defaults(handler=_classify)
    models = commands.add_parser("models", help="list the models a server serves")
    _add_connection(models)
    models.add_argument("--timeout", type=float, default=30.0)
    models.add_argument("--json", action="store_true")
    models.set_defaults(handler=_models)


def _add_connection(parser: argparse.ArgumentParser) -> None:
    """The flags that say where the server is and how to reach it."""
    parser.add_argument("--server", default=DEFAULT_SERVER, metavar="HOST:PORT")
    parser.add_argument(
        "--tls-ca", type=Path, metavar="FILE", help="TLS: PEM CA bundle that verifies the server"
    )
    parser.add_argument(
        "--tls-cert", type=Path, metavar="FILE", help="mutual TLS: PEM client certificate chain"
    )
    parser.add_argument(
        "--tls-key", type=Path, metavar="FILE", help="mutual TLS: PEM key of --tls-cert"
    )
    parser.add_argument(
        "--header",
        type=_header,
        action="append",
        default=[],
        dest="headers",
        metavar="KEY=VALUE",
        help="request header sent on every call (repeatable), "
        "e.g. triton-grpc-protocol-admin=secret",
    )


def _header(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` as gRPC metadata: the key in lower case, the value as given.

    Raises:
        argparse.ArgumentTypeError: no ``=``, an empty key, or characters gRPC cannot send.
    """
    key, equals, value = text.partition("=")
    key = key.strip().lower()
    if not equals or not _HEADER_KEY.fullmatch(key):
        raise argparse.ArgumentTypeError(
            f"expected KEY=VALUE with a key of letters, digits, '-', '_' or '.', got {text!r}"
        )
    if key.endswith("-bin") or key.startswith("grpc-"):
        raise argparse.ArgumentTypeError(f"header {key!r} cannot be sent as text")
    if not _HEADER_VALUE.fullmatch(value):
        raise argparse.ArgumentTypeError(f"header {key!r}: the value must be printable ASCII")
    return key, value


@dataclass(frozen=True)
class _Connection:
    """A channel to the server, its Classifier stub, and what every call carries."""

    channel: grpc.Channel
    stub: pb_grpc.ClassifierStub
    metadata: tuple[tuple[str, str], ...]
    timeout: float
    address: str

    def call(self, method: str, request: Any) -> Any:
        """Call the stub's ``method``; a failure becomes a :class:`ClientError`."""
        import grpc

        try:
            return getattr(self.stub, method)(request, timeout=self.timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            message = f"{exc.code().name}: {exc.details()}"
            if exc.code() == grpc.StatusCode.UNAVAILABLE and "failed to connect" in (
                exc.details() or ""
            ):
                message += (
                    f" (is a convserve server running at {self.address}? start one with "
                    "`convserve serve`, or point --server at it)"
                )
            raise ClientError(message) from None


def _credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    """TLS credentials when a ``--tls-*`` flag is given, else None (plaintext)."""
    import grpc

    if (args.tls_cert is None) != (args.tls_key is None):
        raise ClientError("--tls-cert and --tls-key go together")
    if args.tls_ca is None and args.tls_cert is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_pem(args.tls_ca),
        private_key=_pem(args.tls_key),
        certificate_chain=_pem(args.tls_cert),
    )


def _pem(path: Path | None) -> bytes | None:
    """A PEM file's bytes, checked here: gRPC would fail later, at the handshake, saying less."""
    if path is None:
        return None
    data = _read(path)
    if b"-----BEGIN" not in data:
        raise ClientError(f"{path} holds no PEM data")
    return data


def _connect(args: argparse.Namespace) -> _Connection:
    import grpc

    from service._generated.convserve.v1 import classifier_pb2_grpc as pb_grpc

    options = [
        ("grpc.max_receive_message_length", 256 << 20),
        ("grpc.max_send_message_length", 256 << 20),
    ]
    credentials = _credentials(args)
    channel = (
        grpc.insecure_channel(args.server, options=options)
        if credentials is None
        else grpc.secure_channel(args.server, credentials, options=options)
    )
    stub = pb_grpc.ClassifierStub(channel)  # type: ignore[no-untyped-call]
    return _Connection(channel, stub, tuple(args.headers), args.timeout, args.server)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ClientError(f"cannot read {path}: {exc.strerror}") from None


def _classify(args: argparse.Namespace) -> int:
    from service._generated.convserve.v1 import classifier_pb2 as pb
    from service.core.classifier_documents import classify_documents

    if not args.dense and (args.heatmap is not None or args.heatmap_class is not None):
        raise ClientError("--heatmap and --heatmap-class need --dense (they draw the dense map)")
    connection = _connect(args)
    with connection.channel:
        if args.dense:
            documents = [_dense_one(connection, path, args) for path in args.images]
        else:
            request = pb.ClassifyRequest(
                model=args.model,
                top_k=args.top_k,
                images=[pb.Image(encoded=_read(path)) for path in args.images],
            )
            reply = connection.call("Classify", request)
            documents = classify_documents(reply, [str(path) for path in args.images])
    if args.json:
        print(json.dumps(documents))
    else:
        _print_tables(documents)
    return 0


def _dense_one(connection: _Connection, path: Path, args: argparse.Namespace) -> dict[str, Any]:
    from service._generated.convserve.v1 import classifier_pb2 as pb
    from service.core.classifier_documents import dense_document
    from service.tools.dense_reply import ReplyError, write_heatmap

    request = pb.ClassifyDenseRequest(
        model=args.model,
        image=pb.Image(encoded=_read(path)),
        top_k=args.top_k,
        stride_divisor=args.stride_divisor,
        scales=args.scales,
        pool=pb.POOL_MAX if args.pool == "max" else pb.POOL_MEAN,
        mode=pb.MODE_CROPS if args.mode == "crops" else pb.MODE_DENSE,
    )
    reply = connection.call("ClassifyDense", request)
    if args.heatmap is not None and reply.top:
        target = (
            args.heatmap
            if len(args.images) == 1
            else args.heatmap.with_name(f"{args.heatmap.stem}-{path.stem}{args.heatmap.suffix}")
        )
        try:
            shown = write_heatmap(_read(path), reply, target, args.heatmap_class)
        except ReplyError as exc:
            raise ClientError(str(exc)) from None
        # Not in the JSON document, whose shape is fixed: said on stderr instead.
        print(f"heat-map of {path} ({shown}): {target}", file=sys.stderr)
    return dense_document(reply, str(path))


def _print_tables(documents: Sequence[dict[str, Any]]) -> None:
    from service.tools.dense_reply import class_name

    for document in documents:
        where = f"{document['model']} v{document['version']}"
        if "map_shape" in document:
            where += (
                f", {document['mode']} map {document['map_shape']}, stride "
                f"{document['stride']}, {'exact' if document['exact'] else 'approximate'}"
                f", {document['pool']}-pooled"
            )
        print(f"{document['image']} ({where})")
        dense = "box" in next(iter(document["top"]), {})
        where_columns = f"  {'best cell [row, col]':<20}  box [x0, y0, x1, y1]" if dense else ""
        print(f"  {'rank':>4}  {'probability':>11}  {'class':<20}{where_columns}".rstrip())
        for rank, entry in enumerate(document["top"], 1):
            cell = f"  {entry['best_cell']!s:<20}  {entry['box']}" if dense else ""
            name = class_name(entry["label"], entry["index"])
            line = f"  {rank:>4}  {entry['probability']:>11.2%}  {name:<20}{cell}"
            print(line.rstrip())


def _models(args: argparse.Namespace) -> int:
    from service._generated.convserve.v1 import classifier_pb2 as pb

    connection = _connect(args)
    with connection.channel:
        reply = connection.call("ListModels", pb.ListModelsRequest())
    documents = [
        {
            "name": m.name,
            "version": m.version,
            "channels": m.channels,
            "window": list(m.window),
            "labels": m.labels,
            "dense": m.dense,
            "stride": list(m.geometry.stride) if m.dense else None,
            "exact": m.geometry.exact if m.dense else None,
            "precision": m.precision or None,
        }
        for m in reply.models
    ]
    if args.json:
        print(json.dumps(documents))
        return 0
    print(
        f"{'name':<24} {'version':>7} {'input':>12} {'labels':>7} {'precision':>9} {'dense':>6} "
        f"{'stride':>8} exact"
    )
    for d in documents:
        shape = "x".join(map(str, [d["channels"], *d["window"]]))
        stride = "x".join(map(str, d["stride"])) if d["stride"] else "-"
        print(
            f"{d['name']:<24} {d['version']:>7} {shape:>12} {d['labels']:>7} "
            f"{d['precision'] or '-':>9} {'yes' if d['dense'] else 'no':>6} {stride:>8} "
            f"{'-' if d['exact'] is None else d['exact']}"
        )
    return 0
