"""The server side of chunked transfer, over a blob store: what the native HTTP API and the
REAPI SplitBlob/SpliceBlob share, and a :class:`~rexcore.artifacts.transfer.ChunkRemote` in
this process.

Chunks are ordinary blobs of the store. A server checks what it receives: a chunk against
its digest (:func:`accept_chunk`); a blob made of chunks (:func:`splice_chunks`) by
confirming every chunk is present and the sizes add up, then streaming the chunks into a
store writer, which verifies the whole against the blob's digest before it publishes
anything. :func:`split_stored_blob` cuts a stored blob and stores its chunks, so a client
can fetch only the chunks it lacks. :class:`ManifestIndex` keeps the manifests a server has
accepted or computed, on disk.

:class:`StoreChunkRemote` is the in-process remote (for tests and benchmarks, and the model
the network remotes follow): manifests in memory in their JSON form.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from rexcore.artifacts.chunking import chunk_bytes, chunk_file
from rexcore.artifacts.digest import Digest
from rexcore.artifacts.manifest import (
    REAPI_CHUNKING,
    BlobMismatchError,
    ChunkingParams,
    ChunkManifest,
    CorruptChunkError,
    InvalidManifestError,
    MissingChunksError,
)
from rexcore.artifacts.store import BlobNotFoundError, BlobStore, DigestMismatchError
from rexcore.artifacts.transfer import (
    ChunkEncoding,
    ChunkPayload,
    decode_chunk,
    encode_chunk,
    verify_chunk,
)

__all__ = [
    "ManifestIndex",
    "StoreChunkRemote",
    "accept_chunk",
    "splice_chunks",
    "split_stored_blob",
]

# Payloads at least this big are decoded and hashed in a thread, off the event loop.
_INLINE_MAX = 256 << 10


async def accept_chunk(store: BlobStore, digest: Digest, payload: ChunkPayload) -> bool:
    """Decode, verify and store one chunk; whether it was new. Raises
    :class:`CorruptChunkError` (nothing stored) when it does not match its digest."""
    if await store.contains(digest):
        return False
    if len(payload.data) >= _INLINE_MAX:
        data = await asyncio.to_thread(_decoded_and_verified, digest, payload)
    else:
        data = _decoded_and_verified(digest, payload)
    try:
        await store.put(digest, data)
    except DigestMismatchError as exc:  # verified above; a store may still disagree
        raise CorruptChunkError(digest, str(exc)) from exc
    return True


def _decoded_and_verified(digest: Digest, payload: ChunkPayload) -> bytes:
    data = decode_chunk(digest, payload)
    verify_chunk(digest, data)
    return data


async def split_stored_blob(
    store: BlobStore, blob: Digest, params: ChunkingParams = REAPI_CHUNKING
) -> ChunkManifest:
    """Cut a stored blob with ``params`` (its own digest function), store the chunks the
    store lacks and return the manifest. Raises :class:`BlobNotFoundError`, or
    :class:`BlobMismatchError` if the stored bytes are not the blob (rot on disk)."""
    if blob.size < params.max_size:
        if not await store.contains(blob):
            raise BlobNotFoundError(blob)
        return ChunkManifest(blob, params, (blob,))
    with store.pin([blob]):
        path = store.local_path(blob)
        if path is not None:
            # Opened while pinned: an open file outlives an eviction.
            try:
                fd = await asyncio.to_thread(os.open, path, os.O_RDONLY)
            except FileNotFoundError:
                raise BlobNotFoundError(blob) from None
            try:
                manifest = await asyncio.to_thread(chunk_file, path, params, blob.function)
                _check_is(manifest, blob)
                await _store_missing(store, manifest, lambda d, o: os.pread(fd, d.size, o))
            finally:
                os.close(fd)
            return manifest
        data = await store.get(blob)
    manifest = await asyncio.to_thread(chunk_bytes, data, params, blob.function)
    _check_is(manifest, blob)
    view = memoryview(data)
    await _store_missing(store, manifest, lambda d, o: view[o : o + d.size])
    return manifest


def _check_is(manifest: ChunkManifest, blob: Digest) -> None:
    if manifest.blob != blob:
        raise BlobMismatchError(
            f"the stored bytes of {blob} hash to {manifest.blob}: the store's copy is damaged; "
            "delete it and upload the blob again"
        )


async def _store_missing(
    store: BlobStore, manifest: ChunkManifest, read: Callable[[Digest, int], bytes | memoryview]
) -> None:
    offsets: dict[Digest, int] = {}
    for offset, chunk in manifest:
        offsets.setdefault(chunk, offset)
    for chunk in await store.find_missing(list(offsets)):
        await store.put(chunk, await asyncio.to_thread(read, chunk, offsets[chunk]))


async def splice_chunks(store: BlobStore, blob: Digest, chunks: Sequence[Digest]) -> bool:
    """Store ``blob`` as the concatenation of stored ``chunks``; whether it was new.

    Nothing is stored unless every chunk is present (else :class:`MissingChunksError`
    listing them), their sizes add up to the blob's (else :class:`InvalidManifestError`)
    and the concatenation hashes to the blob's digest (else :class:`BlobMismatchError`):
    the chunks stream into a store writer, which verifies before it publishes.
    """
    foreign = [c for c in chunks if c.function is not blob.function]
    if foreign:
        raise InvalidManifestError(
            f"chunk {foreign[0]} of {blob} is not {blob.function.value}; a blob's chunks use "
            "its digest function. Nothing was stored"
        )
    total = sum(c.size for c in chunks)
    if total != blob.size:
        raise InvalidManifestError(
            f"the {len(chunks)} chunk(s) given for {blob} add up to {total} bytes, the blob has "
            f"{blob.size}; send the chunk list of this blob. Nothing was stored"
        )
    distinct = list(dict.fromkeys(chunks))
    missing = await store.find_missing(distinct)
    if missing:
        raise MissingChunksError(blob, missing, "the store")
    if await store.contains(blob):
        return False
    with store.pin(distinct):
        try:
            async with store.open_write(blob) as writer:
                for chunk in chunks:
                    await writer.write(await store.get(chunk))
        except BlobNotFoundError as exc:
            raise MissingChunksError(blob, [exc.digest], "the store") from None
        except DigestMismatchError as exc:
            raise BlobMismatchError(
                f"the chunks given for {blob} are all stored but together they are not the "
                f"blob ({exc}); send the chunk list of this blob"
            ) from None
    return True


class ManifestIndex:
    """Chunk manifests by blob digest, one small JSON file each under ``root``, written
    atomically; a server keeps here what it accepted or computed."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, blob: Digest) -> Path:
        return self.root / blob.function.value / blob.hash[:2] / f"{blob.hash}-{blob.size}.json"

    async def get(self, blob: Digest) -> ChunkManifest | None:
        """The manifest of ``blob``, or None (also for a file that no longer decodes)."""
        try:
            data = await asyncio.to_thread(self._path(blob).read_bytes)
        except FileNotFoundError:
            return None
        try:
            manifest = ChunkManifest.from_json(data)
        except InvalidManifestError:
            return None  # written by another version, say; computed again on demand
        return manifest if manifest.blob == blob else None

    async def put(self, manifest: ChunkManifest) -> None:
        await asyncio.to_thread(self._write, self._path(manifest.blob), manifest.to_json())

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".manifest-")
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
            os.replace(temp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise


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
