"""The other workers of one ``serve --workers N`` supervisor, asked over their own sockets.

The shared port cannot reach a chosen worker (the kernel gives each connection to one of them),
so every worker also listens on a Unix socket of its own in the supervisor's folder. A request
that concerns the whole server is handled by whichever worker it reaches, which then asks each
sibling, marked :data:`LOCAL_ONLY` so the sibling does not ask in turn:

* ModelStatistics: each sibling's own figures, merged into the server's;
* a model load or unload: repeated on each sibling after it succeeded on this worker (over the
  API in explicit mode, or found by the polling worker in poll mode, :func:`from_sibling`);
* a replacement worker's start: one sibling's repository index, whose state it takes.

A client may send the same mark to confine a call to the worker holding its connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import grpc

from service._generated.inference import grpc_service_pb2 as pb
from service._generated.inference import grpc_service_pb2_grpc as pb_grpc
from service.core.errors import SiblingFailed, Unavailable
from service.engine.repository import ModelRepository

__all__ = [
    "LOCAL_ONLY",
    "EveryWorker",
    "Siblings",
    "from_sibling",
    "socket_path",
    "wants_local_only",
]

LOCAL_ONLY = ("convserve-worker-local", "1")
"""Request metadata: this worker alone (its own figures, its own models), siblings not asked."""
FRESH = (("grpc.use_local_subchannel_pool", 1),)
"""Channel option: a connection of the channel's own (the process-wide pool would hand a new
channel the connection that failed while a sibling was down, backing off for seconds)."""
ASK_SECONDS = 5.0
"""How long a sibling may take to answer when the client set no (shorter) deadline."""


def socket_path(folder: Path, index: int) -> Path:
    """Where worker ``index`` of the supervisor owning ``folder`` listens for its siblings."""
    return folder / f"worker-{index}.sock"


def wants_local_only(context: grpc.aio.ServicerContext) -> bool:
    """True when the caller asked for this worker's own figures (:data:`LOCAL_ONLY`)."""
    return any((key, value) == LOCAL_ONLY for key, value in context.invocation_metadata() or ())


def from_sibling(context: grpc.aio.ServicerContext) -> bool:
    """True when another worker made the call: marked :data:`LOCAL_ONLY`, over a Unix socket.

    The mark alone is a client's to send; the sockets are reached only by this machine's
    processes that may open the supervisor's private folder. In poll mode this is what lets
    the polling worker's repeat of a load through, where a client's load is refused.
    """
    return wants_local_only(context) and (context.peer() or "").startswith("unix:")


class Siblings:
    """The other workers' sockets.

    Each question opens fresh channels with connections of their own: connecting over a Unix
    socket costs next to nothing, and a kept connection to a sibling that died would sit in
    reconnect backoff for seconds after its replacement is listening.
    """

    def __init__(
        self, folder: Path, own: int, workers: int, headers: Sequence[tuple[str, str]] = ()
    ) -> None:
        self._sockets = {
            index: socket_path(folder, index) for index in range(workers) if index != own
        }
        # The restricted API groups' headers: a sibling is asked as a trusted caller.
        self._metadata = (LOCAL_ONLY, *headers)

    async def _ask(
        self, method: str, request: object, timeout: float | None
    ) -> dict[int, object | grpc.aio.AioRpcError]:
        """Every sibling's answer to ``method`` (marked LOCAL_ONLY), or its error, by worker."""
        channels = {
            index: grpc.aio.insecure_channel(f"unix:{path}", options=FRESH)
            for index, path in self._sockets.items()
        }
        try:
            answers = await asyncio.gather(
                *(
                    getattr(pb_grpc.GRPCInferenceServiceStub(channel), method)(  # type: ignore[no-untyped-call]
                        request, metadata=self._metadata, timeout=timeout
                    )
                    for channel in channels.values()
                ),
                return_exceptions=True,
            )
        finally:
            await asyncio.gather(*(channel.close() for channel in channels.values()))
        found: dict[int, object | grpc.aio.AioRpcError] = {}
        for index, answer in zip(channels, answers, strict=True):
            if isinstance(answer, BaseException) and not isinstance(answer, grpc.aio.AioRpcError):
                raise answer
            found[index] = answer
        return found

    async def statistics(
        self, request: pb.ModelStatisticsRequest, remaining: float | None
    ) -> list[pb.ModelStatisticsResponse]:
        """Every sibling's own ModelStatistics for ``request``.

        Raises:
            Unavailable: a sibling did not answer (it may be restarting); the totals would be
                short, so none are given.
        """
        timeout = ASK_SECONDS if remaining is None else min(ASK_SECONDS, remaining)
        parts = []
        for index, answer in (await self._ask("ModelStatistics", request, timeout)).items():
            if isinstance(answer, grpc.aio.AioRpcError):
                raise Unavailable(
                    f"worker {index} did not report its statistics ({answer.code().name}: "
                    f"{answer.details()}); the server's totals need every worker's, retry"
                )
            assert isinstance(answer, pb.ModelStatisticsResponse)
            parts.append(answer)
        return parts

    async def repeat(self, method: str, request: object, remaining: float | None) -> None:
        """Have every sibling do what this worker has just done (model load or unload).

        Without a client deadline this waits as long as the siblings' loads take, as the
        worker's own load did.

        Raises:
            SiblingFailed: with the first failing sibling's status; the message names each
                failing worker and its reason (the others, this one included, went ahead).
        """
        answers = await self._ask(method, request, remaining)
        failed = {
            index: answer
            for index, answer in answers.items()
            if isinstance(answer, grpc.aio.AioRpcError)
        }
        if failed:
            reasons = "; ".join(
                f"worker {index}: {error.code().name}: {error.details()}"
                for index, error in sorted(failed.items())
            )
            raise SiblingFailed(
                failed[min(failed)].code(),
                f"{method} failed on {len(failed)} of {len(answers) + 1} workers ({reasons}); "
                "the other workers went ahead",
            )

    async def repeat_change(self, load: bool, name: str) -> None:
        """Have every sibling load (or unload) model ``name``, as the polling worker just did.

        Raises:
            SiblingFailed: see :meth:`repeat`.
        """
        if load:
            await self.repeat(
                "RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name=name), None
            )
        else:
            await self.repeat(
                "RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name=name), None
            )

    async def index(self) -> list[tuple[str, str, str]] | None:
        """A sibling's repository index as (name, state, reason); None if no sibling answers.

        For a replacement worker, which takes the state of its siblings.
        """
        request = pb.RepositoryIndexRequest()
        for answer in (await self._ask("RepositoryIndex", request, ASK_SECONDS)).values():
            if isinstance(answer, pb.RepositoryIndexResponse):
                return [(model.name, model.state, model.reason) for model in answer.models]
        return None


class EveryWorker:
    """The model repository as the polling worker changes it: its own, then each sibling's.

    With ``--workers N`` in poll mode one worker polls and repeats each change it applied on
    the others, the way a load over the API is repeated; a load that fails on it goes no
    further (the siblings keep serving what they serve, as it does).
    """

    def __init__(self, repository: ModelRepository, siblings: Siblings) -> None:
        self._repository = repository
        self._siblings = siblings

    @property
    def root(self) -> Path:
        """The repository folder."""
        return self._repository.root

    def on_disk(self) -> list[str]:
        """The model folders in the repository."""
        return self._repository.on_disk()

    async def load(self, name: str) -> None:
        """Load ``name`` here, then on every sibling."""
        await self._repository.load(name)
        await self._siblings.repeat_change(True, name)

    async def unload(self, name: str) -> None:
        """Unload ``name`` here, then on every sibling."""
        await self._repository.unload(name)
        await self._siblings.repeat_change(False, name)
