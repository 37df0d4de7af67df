"""A :class:`~rexcore.artifacts.transfer.ChunkRemote` over a blob store in this process.

Chunks are ordinary blobs of the store; manifests are kept in memory in their JSON form, as
an HTTP or REAPI remote would send them. It checks what it receives the way a server must:
chunks against their digests (the store does), a manifest by confirming every chunk is
present and that together they hash to the blob, before keeping it. For tests, benchmarks
and as the model the network remotes follow.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from rexcore.artifacts.digest import Digest
from rexcore.artifacts.manifest import (
    BlobMismatchError,
    ChunkManifest,
    CorruptChunkError,
    MissingChunksError,
)
from rexcore.artifacts.store import BlobNotFoundError, BlobStore, DigestMismatchError
from rexcore.artifacts.transfer import ChunkEncoding, ChunkPayload, decode_chunk, encode_chunk

__all__ = ["StoreChunkRemote"]

# Payloads at least this big are decoded and hashed in a thread, off the event loop.
_INLINE_MAX = 256 << 10


class StoreChunkRemote:
    """Chunks in ``store``, manifests in memory. With ``compression`` it answers
    :meth:`get_chunk` zstd-compressed when that pays, as a server would."""

    def __init__(
        self, store: BlobStore, *, compression: bool = True, compression_level: int = 3
    ) -> None:
        self.store = store
        self.compression = compression
        self.compression_level = compression_level
        #: Encoded manifests by blob digest (what a server would persist).
        self.manifests: dict[Digest, bytes] = {}
        #: Chunks stored through :meth:`put_chunk`, and their plain and encoded bytes.
        self.chunks_put = 0
        self.chunk_bytes_put = 0
        self.wire_bytes_put = 0
        #: Chunks answered through :meth:`get_chunk`.
        self.chunks_served = 0

    async def find_missing(self, digests: Sequence[Digest]) -> list[Digest]:
        return await self.store.find_missing(digests)

    async def put_chunk(self, digest: Digest, payload: ChunkPayload) -> None:
        if len(payload.data) >= _INLINE_MAX:
            data = await asyncio.to_thread(decode_chunk, digest, payload)
        else:
            data = decode_chunk(digest, payload)
        try:
            await self.store.put(digest, data)
        except DigestMismatchError as exc:
            raise CorruptChunkError(digest, str(exc)) from exc
        self.chunks_put += 1
        self.chunk_bytes_put += digest.size
        self.wire_bytes_put += len(payload.data)

    async def get_chunk(self, digest: Digest) -> ChunkPayload:
        try:
            data = await self.store.get(digest)
        except BlobNotFoundError:
            raise MissingChunksError(None, [digest], "the remote") from None
        self.chunks_served += 1
        if not self.compression:
            return ChunkPayload(ChunkEncoding.IDENTITY, data)
        return await asyncio.to_thread(encode_chunk, data, self.compression_level)

    async def put_manifest(self, manifest: ChunkManifest) -> None:
        distinct = list(dict.fromkeys(manifest.chunks))
        missing = await self.store.find_missing(distinct)
        if missing:
            raise MissingChunksError(manifest.blob, missing, "the remote")
        if len(distinct) > 1 or manifest.chunks[0] != manifest.blob:
            await self._check_assembles(manifest)
        self.manifests[manifest.blob] = manifest.to_json()

    async def get_manifest(self, blob: Digest) -> ChunkManifest | None:
        encoded = self.manifests.get(blob)
        return None if encoded is None else ChunkManifest.from_json(encoded)

    async def _check_assembles(self, manifest: ChunkManifest) -> None:
        blob = manifest.blob
        hasher = blob.function.hasher(expected_size=blob.size)
        for chunk in manifest.chunks:
            try:
                data = await self.store.get(chunk)
            except BlobNotFoundError:
                raise MissingChunksError(blob, [chunk], "the remote") from None
            if len(data) >= _INLINE_MAX:
                await asyncio.to_thread(hasher.update, data)
            else:
                hasher.update(data)
        actual = hasher.hexdigest()
        if actual != blob.hash:
            raise BlobMismatchError(
                f"the chunks of the manifest of {blob} hash to {actual} together, not to the "
                "blob; the manifest was not stored"
            )
