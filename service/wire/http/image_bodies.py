"""The images of a REST classification request: one image as the body, or several in multipart.

An image body is the encoded image itself, its Content-Type one of :data:`IMAGE_TYPES`. A
``multipart/form-data`` or ``multipart/mixed`` body carries one image per part, in order; a
part's Content-Type is one of those, ``application/octet-stream`` or absent (the decoder tells
the formats apart by their signatures either way), and the ``filename`` of its
Content-Disposition names it in the answer. The decoder checks what the bytes are, with the
limits of the gRPC API (:mod:`service.classification.images`).

The body is split into parts at once (the boundary found by a C scan), and each part's headers
are read only when its image is: a request refused for its image count costs no work per part,
as a Classify over gRPC costs none per image.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from email.parser import BytesHeaderParser
from typing import overload

from aiohttp import hdrs, web
from aiohttp.helpers import parse_mimetype

from service.classification.inputs import ImageInput
from service.core.errors import InvalidArgument
from service.wire.http.routes import read_body

__all__ = ["IMAGE_TYPES", "MULTIPART_TYPES", "ImageBody", "read_images"]

IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/bmp")
"""The Content-Types of an image body (and of a part)."""
MULTIPART_TYPES = ("multipart/form-data", "multipart/mixed")
"""The Content-Types of a body of several images."""
# Other names these formats go by (Python's mimetypes named BMP so until 3.11).
_ALIASES = ("image/jpg", "image/x-ms-bmp")
_PART_TYPES = frozenset({*IMAGE_TYPES, *_ALIASES, "application/octet-stream", ""})
_IDENTITY = frozenset({"", "binary", "8bit", "7bit"})
_WHAT_TO_SEND = (
    f"send one image as the body ({', '.join(IMAGE_TYPES)}) or several as "
    f"{' or '.join(MULTIPART_TYPES)}, one image per part"
)


class ImageBody(Sequence[ImageInput]):
    """A request's images in order, each read from its part when it is first asked for.

    Args:
        body: the request's body.
        spans: where each image (or part, headers included) lies in ``body``.
        multipart: whether each span is a part, with its headers, or an image alone.
    """

    def __init__(self, body: bytes, spans: Sequence[tuple[int, int]], multipart: bool) -> None:
        self._body = body
        self._spans = spans
        self._multipart = multipart
        self._read: dict[int, tuple[str | None, ImageInput]] = {}

    def __len__(self) -> int:
        return len(self._spans)

    @overload
    def __getitem__(self, index: int) -> ImageInput: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[ImageInput]: ...

    def __getitem__(self, index: int | slice) -> ImageInput | Sequence[ImageInput]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self._part(index)[1]

    def name(self, index: int) -> str | None:
        """What names image ``index``: its part's filename, or None."""
        return self._part(index)[0]

    def _part(self, index: int) -> tuple[str | None, ImageInput]:
        index = range(len(self))[index]  # a negative index counts from the end; out of range
        if index not in self._read:
            start, end = self._spans[index]
            if self._multipart:
                name, image = _part(memoryview(self._body)[start:end], index + 1)
            else:
                name, image = None, self._body[start:end]
            self._read[index] = name, ImageInput(encoded=image)
        return self._read[index]


async def read_images(request: web.Request, limit: int) -> ImageBody:
    """The images of ``request``'s body (at most ``limit`` bytes).

    Raises:
        InvalidArgument: no Content-Type or one that is neither an image nor multipart, an empty
            body, a multipart body without its boundary, parts or closing boundary.
        ResourceExhausted: the body is over ``limit`` (413).
    """
    header = request.headers.get(hdrs.CONTENT_TYPE)
    if header is None:
        raise InvalidArgument(f"the request has no Content-Type: {_WHAT_TO_SEND}")
    mime = parse_mimetype(header)
    kind = f"{mime.type}/{mime.subtype}".lower()
    if kind in IMAGE_TYPES or kind in _ALIASES:
        body = await read_body(request, limit)
        if not body:
            raise InvalidArgument(f"the request body is empty: {_WHAT_TO_SEND}")
        return ImageBody(body, [(0, len(body))], multipart=False)
    if kind not in MULTIPART_TYPES:
        raise InvalidArgument(f"Content-Type {kind!r} is not an image: {_WHAT_TO_SEND}")
    boundary = mime.parameters.get("boundary", "")
    if not boundary:
        raise InvalidArgument(f"Content-Type {kind} names no boundary")
    body = await read_body(request, limit)
    return ImageBody(body, _spans(body, boundary.encode("latin-1")), multipart=True)


def _spans(body: bytes, boundary: bytes) -> list[tuple[int, int]]:
    """Where each part lies in a multipart ``body``: from its boundary line's end to the next.

    A part begins after ``--boundary`` (the first at the start of the body or of a line), and
    ends at the CRLF before the next; the last boundary is followed by ``--``.
    """
    delimiter = b"\r\n--" + boundary
    if body.startswith(delimiter[2:]):
        first = 0
    elif (found := body.find(delimiter)) >= 0:
        first = found + 2  # after a preamble
    else:
        raise InvalidArgument("the multipart body holds no boundary line of its Content-Type")
    ends = [m.start() for m in re.compile(re.escape(delimiter)).finditer(body, first)]
    starts = [first + len(delimiter) - 2] + [end + len(delimiter) for end in ends]
    if not body.startswith(b"--", starts[-1]):
        raise InvalidArgument("the multipart body ends without its closing boundary")
    if not ends:
        raise InvalidArgument(f"the multipart body holds no parts: {_WHAT_TO_SEND}")
    return list(zip(starts, ends, strict=False))


def _part(part: memoryview, number: int) -> tuple[str | None, bytes]:
    """Part ``number`` (from 1): its filename, if it names one, and its image's bytes."""
    line = bytes(part[:1024]).find(b"\r\n")
    if line < 0 or bytes(part[:line]).strip(b" \t"):
        raise InvalidArgument(f"part {number}: its boundary line is malformed")
    head = bytes(part[line + 2 : line + 2 + 16384])
    if head.startswith(b"\r\n"):  # no headers
        return None, bytes(part[line + 4 :])
    blank = head.find(b"\r\n\r\n")
    if blank < 0:
        raise InvalidArgument(f"part {number}: its headers end in no blank line")
    headers = BytesHeaderParser().parsebytes(head[:blank])
    content_type = headers.get("content-type")
    kind = content_type.partition(";")[0].strip().lower() if content_type else ""
    if kind not in _PART_TYPES:
        raise InvalidArgument(
            f"part {number} has Content-Type {kind!r}; a part is an image "
            f"({', '.join(IMAGE_TYPES)}) or application/octet-stream"
        )
    encoding = str(headers.get("content-transfer-encoding", "")).strip().lower()
    if encoding not in _IDENTITY:
        raise InvalidArgument(
            f"part {number} has Content-Transfer-Encoding {encoding!r}; send the image's bytes "
            "as they are (binary)"
        )
    return headers.get_filename(), bytes(part[line + 2 + blank + 4 :])
