"""The ``s3`` blob store against moto's S3 over HTTP: the blob-store contract that
``disk`` passes (with and without the local cache), multipart uploads, and atomicity."""

from __future__ import annotations

import hashlib
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from rex_aws.options import S3StoreOptions
from rex_aws.s3 import S3BlobStore, create_s3_store

from rexcore.artifacts.digest import Digest, DigestFunction, digest_of
from rexcore.artifacts.disk import DiskBlobStore
from rexcore.artifacts.store import BlobStore, DigestMismatchError, StorageError
from rexcore.plugins.descriptors import ComponentContext
from rexcore.testing.contracts import (
    PersistentBlobStoreContract,
    ReopenStore,
    StoreFactory,
)

BUCKET = "rex-blobs"
_MiB = 1 << 20


def _options(endpoint_url: str, **overrides: object) -> S3StoreOptions:
    # The smallest parts S3 allows, so the contract's 5 MiB blobs go up in several parts.
    settings: dict[str, object] = {
        "bucket": BUCKET, "prefix": "test/cas/", "endpoint_url": endpoint_url,
        "multipart_threshold": 5 * _MiB, "part_size": 5 * _MiB, "concurrency": 8, "api_max_attempts": 1}
    return S3StoreOptions(**(settings | overrides))  # type: ignore[arg-type]


@pytest.fixture
def bucket(aws):
    aws.client("s3").create_bucket(Bucket=BUCKET)
    return aws


class TestS3BlobStore(PersistentBlobStoreContract):
    """The contract, on a bucket; with ``cached`` a local disk cache sits in front."""

    @pytest.fixture(params=[False, True], ids=["direct", "cached"])
    def cached(self, request: pytest.FixtureRequest) -> bool:
        return request.param

    @pytest_asyncio.fixture
    async def make_store(self, bucket, cached: bool, tmp_path: Path
                         ) -> AsyncIterator[StoreFactory]:
        self.stores: list[BlobStore] = []
        self.cached = cached

        async def make(max_size: int | None) -> BlobStore:
            store = self._open(bucket.endpoint_url, tmp_path)
            self.stores.append(store)
            return store

        yield make
        for store in self.stores:
            await store.close()

    def _open(self, endpoint_url: str, tmp_path: Path) -> S3BlobStore:
        cache = DiskBlobStore(tmp_path / "cache", max_size=64 * _MiB) if self.cached else None
        return S3BlobStore(_options(endpoint_url), cache=cache)

    @pytest_asyncio.fixture
    async def reopen_store(self, bucket, tmp_path: Path) -> AsyncIterator[ReopenStore]:
        async def reopen(store: BlobStore) -> BlobStore:
            await store.close()
            reopened = self._open(bucket.endpoint_url, tmp_path)
            self.stores.append(reopened)
            return reopened

        yield reopen


def _blob(size: int, seed: int) -> tuple[Digest, bytes]:
    data = random.Random(seed).randbytes(size)
    return digest_of(data, DigestFunction.SHA256), data


async def test_large_blob_goes_up_as_a_multipart_upload_under_its_function_prefix(bucket):
    store = S3BlobStore(_options(bucket.endpoint_url))
    digest, data = _blob(11 * _MiB + 3, 1)
    try:
        async with store.open_write(digest) as writer:
            for start in range(0, len(data), 3 * _MiB):
                await writer.write(data[start:start + 3 * _MiB])
    finally:
        await store.close()
    head = bucket.client("s3").head_object(Bucket=BUCKET, Key=f"test/cas/sha256/{digest.hash}")
    assert head["ContentLength"] == len(data)
    assert head["ETag"].strip('"').endswith("-3")  # 5 + 5 + 1 MiB: three parts


async def test_rejected_large_write_leaves_no_object_and_no_open_upload(bucket):
    store = S3BlobStore(_options(bucket.endpoint_url))
    digest, data = _blob(12 * _MiB, 2)
    bad = data[:-1] + bytes([data[-1] ^ 1])
    try:
        with pytest.raises(DigestMismatchError):
            await store.put(digest, bad)
    finally:
        await store.close()
    s3 = bucket.client("s3")
    assert s3.list_objects_v2(Bucket=BUCKET).get("KeyCount") == 0
    assert not s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads")


async def test_blob_written_elsewhere_is_found_and_read(bucket):
    """S3 is the authority: a blob another coordinator uploaded is seen without a reopen."""
    store = S3BlobStore(_options(bucket.endpoint_url))
    try:
        await store.contains(DigestFunction.SHA256.empty)  # opened before the upload
        data = b"uploaded by someone else"
        digest = digest_of(data, DigestFunction.SHA256)
        assert hashlib.sha256(data).hexdigest() == digest.hash
        bucket.client("s3").put_object(Bucket=BUCKET, Key=f"test/cas/sha256/{digest.hash}",
                                       Body=data)
        assert await store.find_missing([digest]) == []
        assert await store.get(digest) == data
    finally:
        await store.close()


async def test_object_of_the_wrong_size_does_not_count_as_the_blob(bucket):
    store = S3BlobStore(_options(bucket.endpoint_url))
    digest, data = _blob(100, 3)
    bucket.client("s3").put_object(Bucket=BUCKET, Key=store.key(digest), Body=data[:50])
    try:
        assert await store.find_missing([digest]) == [digest]
    finally:
        await store.close()


async def test_missing_bucket_fails_with_a_message_naming_it_and_the_option(aws):
    store = S3BlobStore(_options(aws.endpoint_url, bucket="no-such-bucket"))
    try:
        with pytest.raises(StorageError, match=r"s3://no-such-bucket/.*NoSuchBucket.*bucket"):
            await store.contains(digest_of(b"x"))
    finally:
        await store.close()


async def test_cached_store_serves_reads_from_disk_and_offers_a_local_path(bucket, tmp_path):
    store = create_s3_store(_options(bucket.endpoint_url, cache_dir="s3-cache"),
                            ComponentContext(data_dir=tmp_path))
    digest, data = _blob(2000, 4)
    try:
        await store.put(digest, data)
        path = store.local_path(digest)
        assert path is not None and path.is_relative_to(tmp_path / "s3-cache")
        bucket.client("s3").delete_object(Bucket=BUCKET, Key=store.key(digest))
        assert await store.get(digest) == data  # S3 no longer has it; the cache does
        assert await store.find_missing([digest]) == [digest]  # but S3 decides presence
    finally:
        await store.close()


async def test_cache_is_filled_by_a_read_of_a_blob_it_did_not_have(bucket, tmp_path):
    digest, data = _blob(3 * _MiB, 5)
    writer = S3BlobStore(_options(bucket.endpoint_url))
    await writer.put(digest, data)
    await writer.close()
    cache = DiskBlobStore(tmp_path / "cache")
    store = S3BlobStore(_options(bucket.endpoint_url), cache=cache)
    try:
        assert b"".join([c async for c in store.read(digest)]) == data
        assert store.local_path(digest) is not None
        assert await cache.get(digest) == data
    finally:
        await store.close()


def test_options_refuse_a_prefix_without_a_trailing_slash():
    with pytest.raises(ValueError, match="end with '/'"):
        S3StoreOptions(bucket="b", prefix="rex")
