"""Where the bytes of updates, chunks and staged adapters live, when not in Redis.

A round holds every update's payload until it commits (a crashed finaliser's replacement reads them all back),
and Redis holding them makes Redis memory what limits a round: 80 updates of a 1.3B model at rank 200 are tens of
GB. A payload store keeps those bytes instead, and the Redis round store keeps a marker of a few dozen bytes
where the bytes were (aggregator.stores.redis): records, fences, leases and the exactly-once guard stay in Redis,
atomic as before; only the bytes move.

The contract is small because the round store's bookkeeping already makes every location write-once in effect:
a location is written with one content only (an update's names its sha256, a chunk's its transfer signature and
index, a staged adapter's a fresh token), so writing it again — a redelivery — is harmless, and a reader never
sees a part-written one. `file://` keeps them in a directory (on a mount every aggregator of the federation
shares: any aggregator may finalise any round); `memory://` in this process, for tests. bench/payload_backends.py
measured the choice against Redis and a RabbitMQ stream (docs/experiments.md).
"""

from __future__ import annotations

import abc
import contextlib
import os
import re
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

# What a location's segments may hold: the characters of client ids, update ids, digests and tokens.
_SEGMENT = re.compile(r"^(?!\.)[A-Za-z0-9_.\-]+$")  # no leading dot: temporary files have one
_MKDIR_TRIES = 3  # a folder pruned by a concurrent delete between making it and opening a file in it is made again


class PayloadUnavailable(OSError):
    """A payload the round store names is not in the payload store this process was given. An OSError: the
    service retries (and another aggregator may finalise the round) instead of dropping an accepted update."""


class PayloadStoreMismatch(RuntimeError):
    """This process's payload store is not the one the federation's payloads are in: an aggregator must not
    start (it could not read the others' updates, nor they its own), so it says why and exits."""


def check_location(location: str) -> str:
    parts = location.split("/")
    if not all(_SEGMENT.match(p) for p in parts):
        raise ValueError(f"payload location {location!r}: /-separated segments of [A-Za-z0-9_.-], none starting '.'")
    return location


class PayloadStore(abc.ABC):
    """Bytes by location ("updates/<client>/<update>/<sha256>", …), for one federation."""

    @abc.abstractmethod
    def put(self, location: str, data: bytes | bytearray | memoryview) -> None:
        """Keep `data` at `location`, atomically (a reader sees all of it or nothing) and durably enough that an
        acked update survives the aggregator that wrote it. Writing a location again replaces it."""

    @abc.abstractmethod
    def get(self, location: str) -> bytes | None:
        """The bytes at `location`, or None if there are none."""

    @abc.abstractmethod
    def delete(self, locations: Iterable[str]) -> int:
        """Forget these locations (those absent are skipped); returns how many went."""

    @abc.abstractmethod
    def older_than(self, age_s: float, now: float | None = None) -> Iterator[str]:
        """Every location written more than `age_s` seconds ago (the round store's sweep of orphans)."""

    @abc.abstractmethod
    def wipe(self) -> int:
        """Forget everything of the federation; returns how many locations went."""

    @abc.abstractmethod
    def usage(self) -> tuple[int, int]:
        """(locations, bytes) held now."""


class MemoryPayloads(PayloadStore):
    """In this process only: for tests, and to run the spilled path of the Redis store without a disk."""

    def __init__(self) -> None:
        self._items: dict[str, tuple[bytes, float]] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"memory:// (process {os.getpid()})"

    def put(self, location: str, data: bytes | bytearray | memoryview) -> None:
        check_location(location)
        with self._lock:
            self._items[location] = (bytes(data), time.time())

    def get(self, location: str) -> bytes | None:
        with self._lock:
            item = self._items.get(location)
        return None if item is None else item[0]

    def delete(self, locations: Iterable[str]) -> int:
        with self._lock:
            return sum(self._items.pop(loc, None) is not None for loc in locations)

    def older_than(self, age_s: float, now: float | None = None) -> Iterator[str]:
        cutoff = (time.time() if now is None else now) - age_s
        with self._lock:
            doomed = [loc for loc, (_, at) in self._items.items() if at < cutoff]
        return iter(doomed)

    def wipe(self) -> int:
        with self._lock:
            n = len(self._items)
            self._items.clear()
        return n

    def usage(self) -> tuple[int, int]:
        with self._lock:
            return len(self._items), sum(len(data) for data, _ in self._items.values())


class FilePayloads(PayloadStore):
    """One file per location under `root` (the federation's own directory). A write goes to a temporary name
    and is renamed into place, so a reader or a crash never leaves a part-written payload under its name; with
    `fsync` the bytes reach the disk before the update is acked (a power loss keeps them too)."""

    _TMP = ".tmp-"

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root, self.fsync = root, fsync
        root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"file://{self.root}"

    def _path(self, location: str) -> Path:
        return self.root / check_location(location)

    def put(self, location: str, data: bytes | bytearray | memoryview) -> None:
        path = self._path(location)
        tmp = path.with_name(f"{self._TMP}{uuid.uuid4().hex}-{path.name}")
        for attempt in range(_MKDIR_TRIES):
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    if self.fsync:
                        f.flush()
                        os.fsync(f.fileno())
                break
            except FileNotFoundError:  # a delete (another thread or process) pruned the folder, empty, just now
                if attempt == _MKDIR_TRIES - 1:
                    raise
        os.replace(tmp, path)

    def get(self, location: str) -> bytes | None:
        try:
            return self._path(location).read_bytes()
        except FileNotFoundError:
            return None

    def delete(self, locations: Iterable[str]) -> int:
        gone = 0
        for location in locations:
            path = self._path(location)
            try:
                path.unlink()
                gone += 1
            except FileNotFoundError:
                continue
            self._prune_dirs(path.parent)
        return gone

    def _prune_dirs(self, folder: Path) -> None:
        """Remove folders left empty up to the root (a round's clients leave one each)."""
        while folder != self.root and self.root in folder.parents:
            try:
                folder.rmdir()
            except OSError:  # not empty, or gone: either way done
                return
            folder = folder.parent

    def older_than(self, age_s: float, now: float | None = None) -> Iterator[str]:
        cutoff = (time.time() if now is None else now) - age_s
        for folder, _, files in os.walk(self.root):
            for name in files:
                path = Path(folder, name)
                try:
                    if path.stat().st_mtime >= cutoff:
                        continue
                except FileNotFoundError:
                    continue
                if name.startswith(self._TMP):  # a write that died half-way: never named, never read
                    path.unlink(missing_ok=True)
                    continue
                yield path.relative_to(self.root).as_posix()

    def wipe(self) -> int:
        """Delete the federation's files and its folder (made again by the next `put`)."""
        gone = 0
        for folder, dirs, files in os.walk(self.root, topdown=False):
            for name in files:
                Path(folder, name).unlink(missing_ok=True)
                gone += not name.startswith(self._TMP)
            for name in dirs:
                Path(folder, name).rmdir()
        with contextlib.suppress(OSError):  # gone already, or written into again since: either way, done
            self.root.rmdir()
        return gone

    def usage(self) -> tuple[int, int]:
        count = size = 0
        for folder, _, files in os.walk(self.root):
            for name in files:
                if not name.startswith(self._TMP):
                    count += 1
                    size += Path(folder, name).stat().st_size
        return count, size


def check_payload_url(url: str) -> str:
    """`url` if it names a payload store (settings check it without opening one); ValueError if not."""
    if url == "redis" or url.startswith("memory://"):
        return url
    if url.startswith("file://"):
        if not url[len("file://") :].startswith("/"):
            raise ValueError(f"a file:// payload store needs an absolute path (file:///srv/payloads), got {url!r}")
        return url
    raise ValueError(f"no payload store for {url!r}; give one of redis, file:///<dir>, memory://")


def open_payloads(url: str, federation: str, *, fsync: bool = True) -> PayloadStore | None:
    """The payload store at `url` for `federation`: "redis" (None: Redis keeps the bytes, as it keeps the rest),
    `file:///dir` (the federation's bytes under dir/<federation>), or `memory://` (this process)."""
    check_payload_url(url)
    if url == "redis":
        return None
    if url.startswith("memory://"):
        return MemoryPayloads()
    return FilePayloads(Path(url[len("file://") :]) / check_location(federation), fsync=fsync)
