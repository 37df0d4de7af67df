"""What the built-in blob stores (``memory``, ``disk``) share: the index and the writer.

The index (what is held, recency, pins, the cap) lives on the event loop thread only, so
it needs no lock; the stores do their I/O in threads and update the index before and after.
"""

from __future__ import annotations

import abc
import contextlib
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from typing import Self

from rexcore.artifacts.digest import Digest
from rexcore.artifacts.store import (
    BlobNotFoundError,
    DigestMismatchError,
    StorageError,
    StoreFullError,
    StoreStats,
)

__all__ = ["CAP_OPTION", "BlobIndex", "IndexedBlobStore", "VerifyingWriter", "check_range"]

#: The config key users raise when a store's cap is too small.
CAP_OPTION = "storage.blob_store.options.max_size"


class BlobIndex:
    """Blobs in least- to most-recently-used order, with a byte cap and pin counts.

    Room for a write is *reserved* before its bytes arrive, so concurrent writers cannot
    overshoot the cap together; the reservation becomes an entry on commit or is released
    on abort.
    """

    def __init__(self, max_bytes: int | None, where: str) -> None:
        self.max_bytes = max_bytes
        self.where = where
        self.entries: OrderedDict[Digest, None] = OrderedDict()
        self.bytes = 0
        self.reserved = 0
        self.evictions = 0
        self._pins: Counter[Digest] = Counter()

    def __contains__(self, digest: Digest) -> bool:
        return digest in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def touch(self, digest: Digest) -> bool:
        """Mark a use; whether the blob is held."""
        if digest in self.entries:
            self.entries.move_to_end(digest)
            return True
        return False

    def add(self, digest: Digest) -> bool:
        """Record a stored blob as most recently used; whether it was new."""
        if digest in self.entries:
            self.entries.move_to_end(digest)
            return False
        self.entries[digest] = None
        self.bytes += digest.size
        return True

    def load(self, digests: Iterable[Digest]) -> None:
        """Fill an empty index, least recently used first (as found on disk)."""
        for digest in digests:
            self.add(digest)

    def discard(self, digest: Digest) -> bool:
        if digest not in self.entries:
            return False
        del self.entries[digest]
        self.bytes -= digest.size
        return True

    def is_pinned(self, digest: Digest) -> bool:
        return digest in self._pins

    @contextlib.contextmanager
    def pin(self, digests: Sequence[Digest]) -> Iterator[None]:
        pinned = list(digests)
        self._pins.update(pinned)
        try:
            yield
        finally:
            self._pins.subtract(pinned)
            for digest in pinned:
                if self._pins[digest] <= 0:
                    del self._pins[digest]

    def reserve(self, digest: Digest) -> list[Digest]:
        """Make room for ``digest`` by evicting unpinned blobs, oldest first.

        Returns the evicted digests (already out of the index; the caller deletes their
        bytes). Raises :class:`StoreFullError` without evicting anything when the cap
        cannot be met.
        """
        size = digest.size
        if self.max_bytes is None:
            self.reserved += size
            return []
        if size > self.max_bytes:
            raise StoreFullError(
                f"blob {digest} ({size} bytes) is larger than the cap of the blob store at "
                f"{self.where} ({self.max_bytes} bytes); raise {CAP_OPTION} above {size}"
            )
        victims = self._victims(self.bytes + self.reserved + size - self.max_bytes)
        if victims is None:
            raise self._full_of_pins(digest)
        self._evict(victims)
        self.reserved += size
        return victims

    def trim(self) -> list[Digest]:
        """Evict unpinned blobs, oldest first, until the cap holds (after it was lowered)."""
        if self.max_bytes is None:
            return []
        victims = self._victims(self.bytes + self.reserved - self.max_bytes)
        if victims is None:  # pins hold the rest; writes will say so
            victims = [d for d in self.entries if d not in self._pins]
        self._evict(victims)
        return victims

    def _victims(self, excess: int) -> list[Digest] | None:
        """The oldest unpinned blobs that free ``excess`` bytes; None if pins forbid it."""
        victims: list[Digest] = []
        if excess <= 0:
            return victims
        for candidate in self.entries:
            if candidate in self._pins:
                continue
            victims.append(candidate)
            excess -= candidate.size
            if excess <= 0:
                return victims
        return None

    def _evict(self, victims: list[Digest]) -> None:
        for victim in victims:
            self.discard(victim)
        self.evictions += len(victims)

    def release(self, digest: Digest) -> None:
        """Give back a reservation made by :meth:`reserve`."""
        self.reserved -= digest.size

    def _full_of_pins(self, digest: Digest) -> StoreFullError:
        pinned = sum(d.size for d in self.entries if d in self._pins)
        return StoreFullError(
            f"the blob store at {self.where} is full: blob {digest} needs {digest.size} bytes, "
            f"but of its {self.max_bytes}-byte cap {pinned} bytes are pinned by running "
            f"actions and {self.reserved} bytes are reserved by writes in progress; "
            f"raise {CAP_OPTION} or run fewer actions at once"
        )

    def stats(self) -> StoreStats:
        return StoreStats(
            blobs=len(self.entries),
            bytes=self.bytes,
            max_bytes=self.max_bytes,
            pinned=len(self._pins),
            evictions=self.evictions,
        )


def check_range(digest: Digest, offset: int, limit: int | None) -> int:
    """Validate a read range; the number of bytes it covers."""
    if offset < 0 or offset > digest.size:
        raise ValueError(f"read offset {offset} is outside blob {digest} (0..{digest.size})")
    if limit is not None and limit < 0:
        raise ValueError(f"read limit must not be negative, got {limit} for blob {digest}")
    available = digest.size - offset
    return available if limit is None else min(limit, available)


class IndexedBlobStore(abc.ABC):
    """The parts of a built-in store that only consult the index."""

    def __init__(self, max_bytes: int | None, where: str) -> None:
        self._index = BlobIndex(max_bytes, where)
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError(
                f"the blob store at {self._index.where} is closed; create a new one to use it"
            )

    async def _ready(self) -> None:
        """Raise if closed; a store that loads lazily loads here."""
        self._check_open()

    def _touch(self, digest: Digest) -> bool:
        return self._index.touch(digest)

    async def _require(self, digest: Digest) -> None:
        await self._ready()
        if not digest.is_empty and not self._touch(digest):
            raise BlobNotFoundError(digest)

    async def _make_room(self, digest: Digest) -> None:
        """Reserve ``digest.size`` bytes for a write, evicting as needed."""
        victims = self._index.reserve(digest)
        if victims:
            await self._drop(victims)

    @abc.abstractmethod
    async def _drop(self, digests: list[Digest]) -> None:
        """Delete the bytes of blobs already removed from the index."""

    async def contains(self, digest: Digest) -> bool:
        await self._ready()
        return digest.is_empty or self._touch(digest)

    async def find_missing(self, digests: Iterable[Digest]) -> list[Digest]:
        await self._ready()
        seen: set[Digest] = set()
        missing: list[Digest] = []
        for digest in digests:
            if digest in seen:
                continue
            seen.add(digest)
            if not digest.is_empty and not self._touch(digest):
                missing.append(digest)
        return missing

    def pin(self, digests: Sequence[Digest]) -> contextlib.AbstractContextManager[None]:
        return self._index.pin(digests)

    async def put(self, digest: Digest, data: bytes | memoryview) -> None:
        async with self.open_write(digest) as writer:
            await writer.write(data)

    @abc.abstractmethod
    def open_write(self, digest: Digest) -> VerifyingWriter: ...

    async def delete(self, digest: Digest) -> None:
        await self._ready()
        if self._index.is_pinned(digest) or not self._index.discard(digest):
            return
        await self._drop([digest])

    def stats(self) -> StoreStats:
        return self._index.stats()


class VerifyingWriter(abc.ABC):
    """A blob write as a state machine: reserve room on first use, take bytes while
    hashing them, and on commit publish only what hashes and adds up to the digest.

    Subclasses say where bytes go (``_open``, ``_consume``, ``_seal``, ``_publish``,
    ``_discard``); every failure path here discards and releases the reservation.
    """

    _NEW, _OPEN, _DONE = "new", "open", "done"

    def __init__(self, digest: Digest, store: IndexedBlobStore) -> None:
        self.digest = digest
        self._store = store
        self._hasher = digest.function.hasher(expected_size=digest.size)
        self._received = 0
        self._state = self._NEW
        self._reserved = False

    @abc.abstractmethod
    async def _open(self) -> None: ...

    @abc.abstractmethod
    async def _consume(self, data: bytes | memoryview) -> None: ...

    @abc.abstractmethod
    async def _seal(self) -> str:
        """Take in every byte still buffered; the hex hash of all of them."""

    @abc.abstractmethod
    async def _publish(self) -> None: ...

    @abc.abstractmethod
    async def _discard(self) -> None: ...

    async def _start(self) -> None:
        await self._store._ready()
        if self.digest.size:
            # Rewriting a blob the store holds needs no room, even when pins fill the cap.
            if self.digest not in self._store._index:
                await self._store._make_room(self.digest)
                self._reserved = True
            try:
                await self._open()
            except BaseException:
                self._release()
                self._state = self._DONE
                raise
        self._state = self._OPEN

    def _release(self) -> None:
        if self._reserved:
            self._reserved = False
            self._store._index.release(self.digest)

    async def _fail(self) -> None:
        was_open, self._state = self._state == self._OPEN, self._DONE
        self._release()
        if was_open and self.digest.size:
            await self._discard()

    def _check_unfinished(self) -> None:
        if self._state == self._DONE:
            raise StorageError(
                f"the write of blob {self.digest} has already been committed or aborted; "
                "open a new writer to write it again"
            )

    async def write(self, data: bytes | memoryview) -> None:
        self._check_unfinished()
        if not len(data):
            return
        received = self._received + len(data)
        if received > self.digest.size:
            await self._fail()
            raise DigestMismatchError(self.digest, "", received)
        if self._state == self._NEW:
            await self._start()
        self._received = received
        try:
            await self._consume(data)
        except BaseException:
            await self._fail()
            raise

    async def commit(self) -> None:
        self._check_unfinished()
        if self._received != self.digest.size:  # no need to touch the disk to know
            await self._fail()
            raise DigestMismatchError(self.digest, "", self._received)
        if self._state == self._NEW:
            await self._start()
        try:
            actual = await self._seal()
            if actual != self.digest.hash:
                raise DigestMismatchError(self.digest, actual, self._received)
            if self.digest.size:
                await self._publish()
        except BaseException:
            await self._fail()
            raise
        self._release()
        if self.digest.size:
            self._store._index.add(self.digest)
        self._state = self._DONE

    async def abort(self) -> None:
        await self._fail()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            await self.commit()
        else:
            await self.abort()
