"""The ``s3`` blob store: blobs as objects ``<prefix><function>/<hash>`` in one bucket.

Every write is hashed as it streams and published only once size and hash match: a small
blob by one PutObject of the verified bytes, a large one by a multipart upload whose
parts go up while the bytes arrive and which is completed (the moment S3 makes the object
visible, all at once) only after the check, or aborted. So a reader never sees a partial
or wrong blob, and concurrent writers of one digest each publish the same bytes.

S3 is the authority on what exists (``contains``/``find_missing`` ask it with concurrent
HEADs, so blobs other coordinators wrote or a lifecycle rule expired are seen); the
optional local ``disk`` cache only holds bytes. ``stats`` counts what this store has seen
of its prefix (listed on open unless ``index_on_open`` is off). boto3 blocks, so every call
runs in the store's own bounded thread pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Self

from rex_aws._aws import AwsCaller, error_code, error_text, make_client
from rex_aws.options import S3StoreOptions
from rexcore.artifacts.digest import Digest, DigestFunction, InvalidDigestError
from rexcore.artifacts.disk import DiskBlobStore
from rexcore.artifacts.store import (
    BlobNotFoundError,
    DigestMismatchError,
    StorageError,
    StoreStats,
)
from rexcore.plugins.descriptors import ComponentContext

__all__ = ["S3BlobStore", "create_s3_store"]

log = logging.getLogger(__name__)

_READ_CHUNK = 1 << 20
# Hashing this much inline is cheaper than a thread hop; above it the hop frees the loop.
_INLINE_HASH_MAX = 1 << 20
_HEADS_PER_BATCH = 1000
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}


def _check_range(digest: Digest, offset: int, limit: int | None) -> int:
    if offset < 0 or offset > digest.size:
        raise ValueError(f"read offset {offset} is outside blob {digest} (0..{digest.size})")
    if limit is not None and limit < 0:
        raise ValueError(f"read limit must not be negative, got {limit} for blob {digest}")
    return digest.size - offset if limit is None else min(limit, digest.size - offset)


class S3BlobStore:
    """A :class:`~rexcore.artifacts.store.BlobStore` on an S3 bucket."""

    def __init__(self, options: S3StoreOptions, *, cache: DiskBlobStore | None = None) -> None:
        self.options = options
        self.cache = cache
        self._where = f"s3://{options.bucket}/{options.prefix}"
        self._call = AwsCaller(options.concurrency, "rex-s3")
        self._client: Any = None
        self._ready_lock = asyncio.Lock()
        self._known: dict[Digest, None] = {}
        self._bytes = 0
        self._pins: Counter[Digest] = Counter()
        #: Digests being published by a writer of this store, and whether that worked.
        self._publishing: dict[Digest, asyncio.Future[bool]] = {}
        self._closed = False

    # -- plumbing ------------------------------------------------------------------

    def key(self, digest: Digest) -> str:
        return f"{self.options.prefix}{digest.function.value}/{digest.hash}"

    def _error(self, exc: Exception, doing: str) -> StorageError:
        code = error_code(exc)
        if code in ("NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            hint = ("check storage.blob_store.options.bucket/region and that the credentials "
                    "of the boto3 chain may use the bucket (see docs/aws.md for the IAM policy)")
        else:
            hint = "check the endpoint and network; the request may be retried"
        return StorageError(f"the s3 blob store at {self._where} failed {doing}: "
                            f"{error_text(exc)}; {hint}")

    async def _ready(self) -> Any:
        if self._closed:
            raise StorageError(f"the s3 blob store at {self._where} is closed; create a new "
                               "one to use it")
        if self._client is not None:
            return self._client
        async with self._ready_lock:
            if self._client is None:
                options = self.options
                try:
                    client = await self._call(
                        make_client, "s3", region=options.region,
                        endpoint_url=options.endpoint_url,
                        max_attempts=options.api_max_attempts,
                        max_connections=options.concurrency)
                except Exception as exc:  # no region, a malformed endpoint_url...
                    raise self._error(exc, "creating its S3 client") from exc
                if options.index_on_open:
                    found = await self._list(client)
                    for digest in found:
                        self._remember(digest)
                self._client = client
        return self._client

    async def _list(self, client: Any) -> list[Digest]:
        def scan() -> list[Digest]:
            found = []
            pages = client.get_paginator("list_objects_v2").paginate(
                Bucket=self.options.bucket, Prefix=self.options.prefix)
            for page in pages:
                for item in page.get("Contents", ()):
                    function, _, hash_ = item["Key"][len(self.options.prefix):].partition("/")
                    try:
                        found.append(Digest(DigestFunction(function), hash_, item["Size"]))
                    except (ValueError, InvalidDigestError):
                        continue  # not a blob of ours: leave it alone
            return found

        try:
            return await self._call(scan)
        except Exception as exc:
            raise self._error(exc, "listing its prefix on open") from exc

    def _remember(self, digest: Digest) -> None:
        if digest not in self._known:
            self._known[digest] = None
            self._bytes += digest.size

    def _forget(self, digest: Digest) -> None:
        if self._known.pop(digest, 0) is None:
            self._bytes -= digest.size

    async def _head(self, digest: Digest) -> bool:
        client = await self._ready()
        try:
            response = await self._call(client.head_object, Bucket=self.options.bucket,
                                        Key=self.key(digest))
        except Exception as exc:
            if error_code(exc) in _NOT_FOUND:
                self._forget(digest)
                return False
            raise self._error(exc, f"checking blob {digest}") from exc
        if response.get("ContentLength") != digest.size:
            return False  # same hash, another size: not this digest's blob
        self._remember(digest)
        return True

    # -- reading -------------------------------------------------------------------

    async def contains(self, digest: Digest) -> bool:
        await self._ready()
        return digest.is_empty or await self._head(digest)

    async def find_missing(self, digests: Iterable[Digest]) -> list[Digest]:
        await self._ready()
        wanted = [d for d in dict.fromkeys(digests) if not d.is_empty]
        missing: list[Digest] = []
        for start in range(0, len(wanted), _HEADS_PER_BATCH):
            batch = wanted[start:start + _HEADS_PER_BATCH]
            present = await asyncio.gather(*(self._head(d) for d in batch))
            missing += [d for d, there in zip(batch, present) if not there]
        return missing

    async def _get_object(self, digest: Digest, byte_range: str | None = None) -> Any:
        client = await self._ready()
        extra = {"Range": byte_range} if byte_range else {}
        try:
            return await self._call(client.get_object, Bucket=self.options.bucket,
                                    Key=self.key(digest), **extra)
        except Exception as exc:
            if error_code(exc) in _NOT_FOUND:
                self._forget(digest)
                raise BlobNotFoundError(digest) from None
            raise self._error(exc, f"reading blob {digest}") from exc

    async def _cached(self, digest: Digest) -> bool:
        return self.cache is not None and await self.cache.contains(digest)

    async def get(self, digest: Digest) -> bytes:
        await self._ready()
        if digest.is_empty:
            return b""
        if await self._cached(digest):
            assert self.cache is not None
            with contextlib.suppress(BlobNotFoundError):
                return await self.cache.get(digest)
        response = await self._get_object(digest)
        try:
            data = await self._call(response["Body"].read)
        except Exception as exc:
            raise self._error(exc, f"reading blob {digest}") from exc
        if len(data) != digest.size:
            raise StorageError(f"blob {digest} in {self._where} holds {len(data)} bytes, not "
                               f"{digest.size}; delete the object so it is uploaded again")
        await self._fill_cache(digest, [data])
        return data

    async def _fill_cache(self, digest: Digest, chunks: Sequence[bytes]) -> None:
        if self.cache is None:
            return
        try:  # the cache verifies the bytes again: a corrupt object never lands there
            async with self.cache.open_write(digest) as writer:
                for chunk in chunks:
                    await writer.write(chunk)
        except StorageError as exc:
            log.warning("s3 store: could not cache blob %s locally: %s", digest, exc)

    async def read(
        self, digest: Digest, offset: int = 0, limit: int | None = None
    ) -> AsyncIterator[bytes]:
        await self._ready()
        length = _check_range(digest, offset, limit)
        if digest.is_empty:
            return
        if await self._cached(digest):
            assert self.cache is not None
            with self.cache.pin([digest]):  # not evicted between the check and the read
                async for chunk in self.cache.read(digest, offset, limit):
                    yield chunk
            return
        if not length:
            if not await self._head(digest):
                raise BlobNotFoundError(digest)
            return
        response = await self._get_object(digest, f"bytes={offset}-{offset + length - 1}")
        body = response["Body"]
        whole = self.cache is not None and length == digest.size
        chunks: list[bytes] = []
        try:
            while length:
                try:
                    chunk = await self._call(body.read, min(length, _READ_CHUNK))
                except Exception as exc:
                    raise self._error(exc, f"reading blob {digest}") from exc
                if not chunk:
                    raise StorageError(f"blob {digest} in {self._where} is shorter than its "
                                       "digest says; delete the object so it is uploaded again")
                length -= len(chunk)
                if whole:
                    chunks.append(chunk)
                yield chunk
        finally:
            body.close()
        if whole:
            await self._fill_cache(digest, chunks)

    def local_path(self, digest: Digest) -> Path | None:
        return None if self.cache is None else self.cache.local_path(digest)

    # -- writing -------------------------------------------------------------------

    async def put(self, digest: Digest, data: bytes | memoryview) -> None:
        async with self.open_write(digest) as writer:
            await writer.write(data)

    def open_write(self, digest: Digest) -> _S3BlobWriter:
        if self._closed:
            raise StorageError(f"the s3 blob store at {self._where} is closed; create a new "
                               "one to use it")
        return _S3BlobWriter(digest, self)

    # -- administration ------------------------------------------------------------

    @contextlib.contextmanager
    def pin(self, digests: Sequence[Digest]) -> Iterator[None]:
        """S3 evicts nothing itself; a pin keeps :meth:`delete` (and the cache) off."""
        pinned = list(digests)
        self._pins.update(pinned)
        try:
            with self.cache.pin(pinned) if self.cache is not None else contextlib.nullcontext():
                yield
        finally:
            self._pins.subtract(pinned)
            for digest in pinned:
                if self._pins[digest] <= 0:
                    del self._pins[digest]

    async def delete(self, digest: Digest) -> None:
        client = await self._ready()
        if digest.is_empty or digest in self._pins:
            return
        try:
            await self._call(client.delete_object, Bucket=self.options.bucket,
                             Key=self.key(digest))
        except Exception as exc:
            raise self._error(exc, f"deleting blob {digest}") from exc
        self._forget(digest)
        if self.cache is not None:
            await self.cache.delete(digest)

    def stats(self) -> StoreStats:
        return StoreStats(blobs=len(self._known), bytes=self._bytes, max_bytes=None,
                          pinned=len(self._pins), evictions=0)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.cache is not None:
            await self.cache.close()
        await self._call.close()
        if self._client is not None:
            await asyncio.to_thread(self._client.close)


class _S3BlobWriter:
    """One blob's upload; see the module docstring for why it is atomic."""

    def __init__(self, digest: Digest, store: S3BlobStore) -> None:
        self.digest = digest
        self._store = store
        self._hasher = digest.function.hasher(expected_size=digest.size)
        self._received = 0
        self._done = False
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._multipart = digest.size >= store.options.multipart_threshold
        self._upload_id: str | None = None
        self._parts: list[asyncio.Task[dict[str, Any]]] = []
        self._in_flight = asyncio.Semaphore(max(1, store.options.concurrency // 2))
        self._cache_writer: Any = None
        if store.cache is not None and digest.size:
            self._cache_writer = store.cache.open_write(digest)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            await self.commit()
        else:
            await self.abort()

    def _check_unfinished(self) -> None:
        if self._done:
            raise StorageError(f"the write of blob {self.digest} has already been committed "
                               "or aborted; open a new writer to write it again")

    async def write(self, data: bytes | memoryview) -> None:
        self._check_unfinished()
        if not len(data):
            return
        received = self._received + len(data)
        if received > self.digest.size:
            await self.abort()
            raise DigestMismatchError(self.digest, "", received)
        self._received = received
        chunk = bytes(data)  # the caller may reuse its buffer once we return
        try:
            if len(chunk) > _INLINE_HASH_MAX:
                await asyncio.to_thread(self._hasher.update, chunk)
            else:
                self._hasher.update(chunk)
            self._buffer.append(chunk)
            self._buffered += len(chunk)
            if self._multipart:
                await self._send_full_parts()
            await self._tee(chunk)
        except BaseException:
            await self.abort()
            raise

    async def _tee(self, chunk: bytes) -> None:
        if self._cache_writer is None:
            return
        try:
            await self._cache_writer.write(chunk)
        except StorageError as exc:  # a full cache must never fail the upload
            log.warning("s3 store: not caching blob %s locally: %s", self.digest, exc)
            self._cache_writer = None

    def _take(self, size: int) -> bytes:
        joined = b"".join(self._buffer)
        part, rest = joined[:size], joined[size:]
        self._buffer, self._buffered = ([rest] if rest else []), len(rest)
        return part

    async def _send_full_parts(self) -> None:
        part_size = self._store.options.part_size
        while self._buffered >= part_size:
            await self._send_part(self._take(part_size))

    async def _send_part(self, part: bytes) -> None:
        store = self._store
        client = await store._ready()
        if self._upload_id is None:
            try:
                created = await store._call(client.create_multipart_upload,
                                            Bucket=store.options.bucket,
                                            Key=store.key(self.digest))
            except Exception as exc:
                raise store._error(exc, f"starting the upload of blob {self.digest}") from exc
            self._upload_id = created["UploadId"]
        number = len(self._parts) + 1
        await self._in_flight.acquire()  # bounds the memory parts in flight may take

        async def upload() -> dict[str, Any]:
            try:
                response = await store._call(
                    client.upload_part, Bucket=store.options.bucket, Key=store.key(self.digest),
                    UploadId=self._upload_id, PartNumber=number, Body=part)
            except Exception as exc:
                raise store._error(exc, f"uploading part {number} of blob {self.digest}") from exc
            finally:
                self._in_flight.release()
            return {"PartNumber": number, "ETag": response["ETag"]}

        self._parts.append(asyncio.ensure_future(upload()))

    async def commit(self) -> None:
        self._check_unfinished()
        store, digest = self._store, self.digest
        try:
            if self._received != digest.size:
                raise DigestMismatchError(digest, "", self._received)
            actual = self._hasher.hexdigest()
            if actual != digest.hash:
                raise DigestMismatchError(digest, actual, self._received)
            if digest.size:
                await self._publish()
        except BaseException:
            await self.abort()
            raise
        self._done = True
        store._remember(digest)
        if self._cache_writer is not None:
            try:
                await self._cache_writer.commit()
            except StorageError as exc:
                log.warning("s3 store: not caching blob %s locally: %s", digest, exc)

    async def _publish(self) -> None:
        """Upload the verified bytes, unless a write of this very digest by this store is
        publishing them now: then its outcome is ours (the bytes are the same), and on its
        failure we upload ourselves."""
        publishing = self._store._publishing
        while (other := publishing.get(self.digest)) is not None:
            if await asyncio.shield(other):
                await self._abandon_upload()
                return
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        publishing[self.digest] = done
        published = False
        try:
            if self._multipart:
                await self._complete()
            else:
                await self._put_whole()
            published = True
        finally:
            del publishing[self.digest]
            done.set_result(published)

    async def _put_whole(self) -> None:
        store = self._store
        client = await store._ready()
        body = self._buffer[0] if len(self._buffer) == 1 else b"".join(self._buffer)
        try:
            await store._call(client.put_object, Bucket=store.options.bucket,
                              Key=store.key(self.digest), Body=body)
        except Exception as exc:
            raise store._error(exc, f"storing blob {self.digest}") from exc

    async def _complete(self) -> None:
        if self._buffered:
            await self._send_part(self._take(self._buffered))
        parts = await asyncio.gather(*self._parts)
        store = self._store
        try:
            await store._call(store._client.complete_multipart_upload,
                              Bucket=store.options.bucket, Key=store.key(self.digest),
                              UploadId=self._upload_id, MultipartUpload={"Parts": parts})
        except Exception as exc:
            raise store._error(exc, f"completing the upload of blob {self.digest}") from exc
        self._upload_id = None

    async def abort(self) -> None:
        if self._done:
            return
        self._done = True
        self._buffer, self._buffered = [], 0
        await self._abandon_upload()
        if self._cache_writer is not None:
            await self._cache_writer.abort()
            self._cache_writer = None

    async def _abandon_upload(self) -> None:
        for task in self._parts:
            task.cancel()
        await asyncio.gather(*self._parts, return_exceptions=True)
        store = self._store
        if self._upload_id is not None:
            try:  # nothing was published; this frees the parts S3 holds
                await store._call(store._client.abort_multipart_upload,
                                  Bucket=store.options.bucket, Key=store.key(self.digest),
                                  UploadId=self._upload_id)
            except Exception as exc:  # noqa: BLE001 (best effort: a failed abort leaks no blob)
                log.warning("s3 store: could not abort the upload of blob %s (%s); a bucket "
                            "lifecycle rule for incomplete uploads cleans it up",
                            self.digest, error_text(exc))
            self._upload_id = None


def create_s3_store(options: S3StoreOptions, context: ComponentContext) -> S3BlobStore:
    """The ``s3`` descriptor's factory; a relative ``cache_dir`` is under the data dir."""
    cache = None
    if options.cache_dir:
        root = context.data_dir / Path(options.cache_dir).expanduser()
        cache = DiskBlobStore(root, max_size=options.cache_size)
    return S3BlobStore(options, cache=cache)
