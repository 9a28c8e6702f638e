"""``--model-control-mode poll``: watch the model repository and apply what changed.

Every ``--repository-poll-secs`` the poller takes a fingerprint of each model folder: the size
and modification time of every file in it and in its version folders (hidden names, such as a
copy tool's temporary files, left out). A folder is applied only once its fingerprint is the
same in two consecutive polls, so a file still being copied is never loaded half-written; a new
version therefore serves within two polls of its last write (plus its load).

* a new folder, or a changed one (a new or removed version folder, a rewritten model file, a
  changed ``config.json``): loaded (a reload: the served version goes on until the new one
  replaces it, and goes on for good if the new one fails);
* a removed folder (absent in two consecutive polls): unloaded.

A load that fails is logged and counted (by the repository) and not tried again until the
folder's files change. Only the files' sizes and times are compared, not their contents: a
writer that pauses for two polls in the middle of a file would be read as done. Copying the
file under a hidden name and renaming it at the end avoids that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import Protocol

from service.core.errors import ServingError

__all__ = ["Fingerprint", "PolledRepository", "RepositoryPoller", "fingerprint"]

log = logging.getLogger(__name__)

Fingerprint = tuple[tuple[str, int, int], ...] | None
"""(path in the folder, size, modification time in ns) of every file, sorted; None when a file
vanished while it was read (never the same twice: the folder is changing)."""


class PolledRepository(Protocol):
    """What the poller needs of the model repository."""

    @property
    def root(self) -> Path:
        """The repository folder."""
        ...

    def on_disk(self) -> list[str]:
        """The model folders in the repository."""
        ...

    async def load(self, name: str) -> None:
        """(Re)load model folder ``name``; raises ServingError when it cannot."""
        ...

    async def unload(self, name: str) -> None:
        """Stop serving model folder ``name``."""
        ...


def fingerprint(folder: Path) -> Fingerprint:
    """The sizes and modification times of a model folder's files and its subfolders' files."""
    found = []
    try:
        for entry in os.scandir(folder):
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                for inner in os.scandir(entry.path):
                    if not inner.name.startswith(".") and inner.is_file():
                        found.append(_stat(f"{entry.name}/{inner.name}", inner))
            elif entry.is_file():
                found.append(_stat(entry.name, entry))
    except OSError:  # removed or replaced while read: compare again at the next poll
        return None
    return tuple(sorted(found))


def _stat(name: str, entry: os.DirEntry[str]) -> tuple[str, int, int]:
    info = entry.stat()  # follows symbolic links, as a load reads the file they point to
    return name, info.st_size, info.st_mtime_ns


class RepositoryPoller:
    """See the module docstring."""

    def __init__(self, repository: PolledRepository, interval: float) -> None:
        self._repository = repository
        self._interval = interval
        self._previous: dict[str, Fingerprint] = {}  # the last poll's fingerprints
        self._applied: dict[str, Fingerprint] = {}  # what the last load of each folder read
        self._task: asyncio.Task[None] | None = None
        self.polls = 0

    async def baseline(self) -> None:
        """Record the repository as the startup load is about to read it.

        Without a baseline, the first stable poll loads every folder again (a replacement
        worker does that: it cannot know what its predecessor last applied).
        """
        self._previous = await asyncio.to_thread(self._snapshot)
        self._applied = dict(self._previous)

    def _snapshot(self) -> dict[str, Fingerprint]:
        return {
            name: fingerprint(self._repository.root / name) for name in self._repository.on_disk()
        }

    async def poll(self) -> None:
        """Look at the repository once and apply the folders that changed and then held still."""
        current = await asyncio.to_thread(self._snapshot)
        previous, self._previous = self._previous, current
        self.polls += 1
        for name, files in sorted(current.items()):
            if files is None or name not in previous or previous[name] != files:
                continue  # new or changing: wait until it holds still for a poll
            if name in self._applied and self._applied[name] == files:
                continue
            self._applied[name] = files
            await self._apply(name, load=True)
        for name in sorted(set(self._applied) - set(current) - set(previous)):
            del self._applied[name]
            await self._apply(name, load=False)

    async def _apply(self, name: str, load: bool) -> None:
        action = "load" if load else "unload"
        try:
            if load:
                await self._repository.load(name)
            else:
                await self._repository.unload(name)
        except ServingError as exc:
            log.error("poll: %s of %s failed: %s", action, name, exc.message)
        else:
            log.info("poll: %sed %s", action, name)

    def start(self) -> None:
        """Poll every interval from now on, until :meth:`stop`."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="repository-poll")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.poll()
            except Exception:  # one bad poll must not end polling for good
                log.exception("failed to poll model repository")

    async def stop(self) -> None:
        """Stop polling (a load in progress is cancelled: the server is draining)."""
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
