"""The blob store interface every backend (``disk``, ``memory``, plugins' ``s3``) satisfies.

A blob store maps a :class:`Digest` to immutable bytes. The contract, checked by
``rexcore.testing.contracts.BlobStoreContract`` for every backend:

- every write is verified against its digest: wrong bytes or a wrong size raise
  :class:`DigestMismatchError` and store nothing;
- writes are atomic: a reader sees the whole blob or no blob, also after a crash in the
  middle of a write; concurrent writers of one digest are safe;
- the empty blob is always present;
- a store with a size cap evicts least-recently-used blobs, never a pinned one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import attrs

from rexcore.artifacts.digest import Digest

__all__ = [
    "BlobNotFoundError",
    "BlobStore",
    "BlobWriter",
    "DigestMismatchError",
    "StorageError",
    "StoreFullError",
    "StoreStats",
    "put_blobs",
    "put_missing",
]


class StorageError(Exception):
    """Base of every blob-store and action-cache error."""


class BlobNotFoundError(StorageError, KeyError):
    """The store does not hold the blob."""

    def __init__(self, digest: Digest) -> None:
        super().__init__(f"blob {digest} is not in the store")
        self.digest = digest

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class DigestMismatchError(StorageError, ValueError):
    """The bytes written do not hash (or do not add up) to the digest they were sent as."""

    def __init__(self, expected: Digest, actual_hash: str, actual_size: int) -> None:
        if actual_size != expected.size:
            cause = f"{actual_size} bytes arrived, the digest says {expected.size}"
        else:
            cause = f"the bytes hash to {actual_hash}"
        super().__init__(f"blob {expected} was rejected: {cause}; nothing was stored")
        self.expected = expected
        self.actual_hash = actual_hash
        self.actual_size = actual_size


class StoreFullError(StorageError, OSError):
    """No room for the blob: the disk is full, or the cap is taken by pinned blobs."""


@attrs.frozen
class StoreStats:
    """What a store holds right now."""

    blobs: int
    bytes: int
    max_bytes: int | None
    pinned: int
    evictions: int


class BlobWriter(Protocol):
    """An in-progress write of one blob; ``commit`` verifies and publishes it atomically.

    Use as ``async with store.open_write(digest) as writer: await writer.write(chunk)``:
    leaving the block normally commits, leaving it with an exception aborts and stores
    nothing.
    """

    digest: Digest

    async def write(self, data: bytes | memoryview) -> None: ...

    async def commit(self) -> None: ...

    async def abort(self) -> None: ...

    async def __aenter__(self) -> BlobWriter: ...

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None: ...


@runtime_checkable
class BlobStore(Protocol):
    """A content-addressed blob store; built by a ``rexcore_blob_stores`` descriptor."""

    async def contains(self, digest: Digest) -> bool:
        """Whether the blob is present (and counts as a use for LRU)."""
        ...

    async def find_missing(self, digests: Iterable[Digest]) -> list[Digest]:
        """The digests among ``digests`` the store lacks, in input order, without duplicates."""
        ...

    async def get(self, digest: Digest) -> bytes:
        """The whole blob in memory; raises :class:`BlobNotFoundError`."""
        ...

    def read(
        self, digest: Digest, offset: int = 0, limit: int | None = None
    ) -> AsyncIterator[bytes]:
        """Stream the blob (or ``limit`` bytes of it from ``offset``) in chunks."""
        ...

    async def put(self, digest: Digest, data: bytes | memoryview) -> None:
        """Verify and store a whole in-memory blob."""
        ...

    def open_write(self, digest: Digest) -> BlobWriter:
        """Start a streamed write of ``digest``; see :class:`BlobWriter`."""
        ...

    def local_path(self, digest: Digest) -> Path | None:
        """A path to the blob on this host's disk (for sendfile and hardlinks), if any.

        The file at the path is immutable; it may be evicted once unpinned, so open it
        while pinned (an open file survives eviction).
        """
        ...

    def pin(self, digests: Sequence[Digest]) -> contextlib.AbstractContextManager[None]:
        """Keep ``digests`` from eviction inside the ``with`` block (pins nest)."""
        ...

    async def delete(self, digest: Digest) -> None:
        """Remove a blob if present and not pinned (for tests and administration)."""
        ...

    def stats(self) -> StoreStats: ...

    async def close(self) -> None:
        """Release files and threads; the store is unusable afterwards."""
        ...


async def put_blobs(store: BlobStore, blobs: Mapping[Digest, bytes | memoryview]) -> None:
    """Verify and store in-memory blobs in as few trips as ``store`` allows: its
    ``put_many`` where it has one (the disk store writes a few KiB in all right on the
    calling thread, more in one thread hop), else one ``put`` each, concurrently."""
    put_many = getattr(store, "put_many", None)
    if put_many is not None:
        await put_many(blobs)
    else:
        await asyncio.gather(*(store.put(digest, data) for digest, data in blobs.items()))


async def put_missing(store: BlobStore, blobs: Mapping[Digest, bytes | memoryview]) -> None:
    """:func:`put_blobs` of those ``blobs`` the store lacks (rewriting a held blob would
    still create a file, only to find the blob there)."""
    missing = await store.find_missing(blobs)
    if missing:
        await put_blobs(store, {digest: blobs[digest] for digest in missing})
