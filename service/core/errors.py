"""Domain errors that carry their gRPC status: one place decides what a client is told.

Servicers catch :class:`ServingError` and abort with its code and message; anything else becomes
INTERNAL with a generic message and a logged traceback, never a leaked ``str(exc)``.
"""

from __future__ import annotations

import grpc

__all__ = [
    "DeadlineExceeded",
    "InvalidArgument",
    "ModelLoadFailed",
    "ModelNotFound",
    "ResourceExhausted",
    "ServingError",
    "SiblingFailed",
    "Unavailable",
    "Unimplemented",
]


MAX_MESSAGE_CHARACTERS = 1024
"""Longer messages are cut: they may quote what a client sent (a name, a list of scales), and a
status message travels in a header that gRPC limits (16 KiB; the client would get a transport
error instead of the reason), and into the log."""


class ServingError(Exception):
    """A request failed for a reason the client should be told about."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        if len(message) > MAX_MESSAGE_CHARACTERS:
            cut = len(message) - MAX_MESSAGE_CHARACTERS
            message = f"{message[:MAX_MESSAGE_CHARACTERS]}... ({cut} more characters)"
        super().__init__(message)
        self.message = message


class InvalidArgument(ServingError):
    """The request is malformed or does not fit the model; the message names what and why."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFound(ServingError):
    """No such model, or no such version of it, is served."""

    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, name: str, version: str = "") -> None:
        where = f"model '{name}' version '{version}'" if version else f"model '{name}'"
        super().__init__(f"{where} is not served")


class ResourceExhausted(ServingError):
    """The server cannot take the request now (full queue) or at all (too large)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(ServingError):
    """The request's deadline passed before its result was ready."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(ServingError):
    """The server is draining, or the model version is being replaced; retry elsewhere."""

    code = grpc.StatusCode.UNAVAILABLE


class Unimplemented(ServingError):
    """The request asks for something this server does not do; the message says what instead."""

    code = grpc.StatusCode.UNIMPLEMENTED


class SiblingFailed(ServingError):
    """Another worker of ``serve --workers`` refused what this one did; its status is passed on."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class ModelLoadFailed(ServingError):
    """A model's files or config could not be loaded; the message says which and why."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"model '{name}' failed to load: {reason}")
