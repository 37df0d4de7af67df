"""The ``memory`` blob store: blobs in this process's memory, LRU-evicted under a cap.

For tests, single-process deployments and as a reference for plugin authors; everything
is lost when the process ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import attrs

from rexcore.artifacts._local import IndexedBlobStore, VerifyingWriter, check_range
from rexcore.artifacts.digest import Digest, Hasher
from rexcore.config.types import ByteSize
from rexcore.plugins.descriptors import ComponentContext

__all__ = ["MemoryBlobStore", "MemoryStoreOptions", "create_memory_store"]

# Below this much data hashing inline is cheaper than a hop to a thread; above it the hop
# keeps the event loop free while hashlib/blake3 work with the GIL released.
_INLINE_HASH_MAX = 1 << 20
_READ_CHUNK = 1 << 20


@attrs.frozen
class MemoryStoreOptions:
    """Options of the ``memory`` blob store."""

    #: Bytes of blobs kept before the least recently used are evicted.
    max_size: ByteSize = attrs.field(
        default=ByteSize(1 << 30), validator=attrs.validators.gt(ByteSize(0))
    )


async def _hash(hasher: Hasher, chunks: Sequence[bytes | memoryview], size: int) -> None:
    def update() -> None:
        for chunk in chunks:
            hasher.update(chunk)

    if size > _INLINE_HASH_MAX:
        await asyncio.to_thread(update)
    else:
        update()


class _MemoryBlobWriter(VerifyingWriter):
    _store: MemoryBlobStore

    def __init__(self, digest: Digest, store: MemoryBlobStore) -> None:
        super().__init__(digest, store)
        self._chunks: list[bytes] = []
        self._unhashed: list[bytes] = []
        self._unhashed_size = 0

    async def _open(self) -> None:
        pass

    async def _consume(self, data: bytes | memoryview) -> None:
        chunk = bytes(data)  # the caller may reuse its buffer once write returns
        self._chunks.append(chunk)
        self._unhashed.append(chunk)
        self._unhashed_size += len(chunk)
        if self._unhashed_size >= _INLINE_HASH_MAX:
            await self._hash_pending()

    async def _hash_pending(self) -> None:
        pending, size = self._unhashed, self._unhashed_size
        self._unhashed, self._unhashed_size = [], 0
        await _hash(self._hasher, pending, size)

    async def _seal(self) -> str:
        await self._hash_pending()
        return self._hasher.hexdigest()

    async def _publish(self) -> None:
        chunks = self._chunks
        if len(chunks) == 1:
            blob = chunks[0]
        elif self.digest.size > _INLINE_HASH_MAX:
            blob = await asyncio.to_thread(b"".join, chunks)
        else:
            blob = b"".join(chunks)
        self._store._blobs[self.digest] = blob
        self._chunks = []

    async def _discard(self) -> None:
        self._chunks = []


class MemoryBlobStore(IndexedBlobStore):
    """A :class:`~rexcore.artifacts.store.BlobStore` in memory; ``max_size=None`` is no cap."""

    def __init__(self, max_size: int | None = 1 << 30) -> None:
        super().__init__(max_size, where="memory")
        self._blobs: dict[Digest, bytes] = {}

    async def _drop(self, digests: list[Digest]) -> None:
        for digest in digests:
            self._blobs.pop(digest, None)

    async def get(self, digest: Digest) -> bytes:
        await self._require(digest)
        return b"" if digest.is_empty else self._blobs[digest]

    async def read(
        self, digest: Digest, offset: int = 0, limit: int | None = None
    ) -> AsyncIterator[bytes]:
        await self._require(digest)
        length = check_range(digest, offset, limit)
        if not length:
            return
        blob = memoryview(self._blobs[digest])  # held: eviction cannot cut a read short
        for start in range(offset, offset + length, _READ_CHUNK):
            yield bytes(blob[start : min(start + _READ_CHUNK, offset + length)])

    def open_write(self, digest: Digest) -> _MemoryBlobWriter:
        self._check_open()
        return _MemoryBlobWriter(digest, self)

    def local_path(self, digest: Digest) -> Path | None:
        return None

    async def close(self) -> None:
        self._closed = True
        self._blobs.clear()


def create_memory_store(options: MemoryStoreOptions, context: ComponentContext) -> MemoryBlobStore:
    """The ``memory`` descriptor's factory."""
    return MemoryBlobStore(max_size=options.max_size)
