"""Contract suites: the behaviour every backend of an interface must show, as pytest tests.

A blob store plugin proves itself by running :class:`BlobStoreContract` against its
store. Subclass it in a test module and override the ``make_store`` fixture with one that
returns a factory ``async (max_size: int | None) -> BlobStore`` (``None`` means no cap);
the fixture closes what it made::

    import pytest
    from rexcore.testing.contracts import BlobStoreContract

    class TestS3BlobStore(BlobStoreContract):
        @pytest.fixture
        async def make_store(self, s3_bucket):
            stores = []

            async def make(max_size):
                store = S3BlobStore(bucket=s3_bucket, max_size=max_size)
                stores.append(store)
                return store

            yield make
            for store in stores:
                await store.close()


A store that honours ``max_size`` also runs :class:`CappedBlobStoreContract` (eviction,
pins, refusing when full); one that keeps blobs across a restart runs
:class:`PersistentBlobStoreContract` and overrides ``reopen_store`` with a fixture
returning ``async (store) -> BlobStore`` that closes ``store`` and opens a new one on the
same data and cap::

    class TestS3BlobStore(CappedBlobStoreContract, PersistentBlobStoreContract): ...

The fixtures above are async: with pytest-asyncio in strict mode declare them with
``@pytest_asyncio.fixture`` (the contract's own tests carry the ``asyncio`` mark).
A capped store must count ``max_size`` in blob bytes, evict least recently used first
(``contains``, ``get``, ``read`` and ``find_missing`` count as uses) and never evict a
pinned blob; a read starting past a blob's end raises ``ValueError``. Each test's name
says the behaviour it checks.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import pytest_asyncio

from rexcore.artifacts.digest import Digest, DigestFunction, digest_of
from rexcore.artifacts.store import (
    BlobNotFoundError,
    BlobStore,
    DigestMismatchError,
    StoreFullError,
)

__all__ = [
    "BlobStoreContract",
    "CappedBlobStoreContract",
    "PersistentBlobStoreContract",
    "ReopenStore",
    "StoreFactory",
]

#: ``make_store``'s result: build a store with this cap in bytes (``None``: no cap).
StoreFactory = Callable[[int | None], Awaitable[BlobStore]]
#: ``reopen_store``'s result: close a store and open it again on the same data and cap.
ReopenStore = Callable[[BlobStore], Awaitable[BlobStore]]

_MiB = 1 << 20
_FUNCTIONS = pytest.mark.parametrize("function", list(DigestFunction), ids=lambda f: f.value)


def _blob(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _blobs(
    count: int, size: int, function: DigestFunction = DigestFunction.SHA256
) -> list[tuple[Digest, bytes]]:
    datas = [_blob(size, seed) for seed in range(count)]
    return [(digest_of(data, function), data) for data in datas]


async def _read_all(
    store: BlobStore, digest: Digest, offset: int = 0, limit: int | None = None
) -> bytes:
    return b"".join([chunk async for chunk in store.read(digest, offset, limit)])


async def _use(store: BlobStore, digest: Digest, how: str) -> None:
    if how == "contains":
        assert await store.contains(digest)
    elif how == "get":
        await store.get(digest)
    elif how == "read":
        await _read_all(store, digest)
    else:
        assert await store.find_missing([digest]) == []


@pytest.mark.asyncio
class BlobStoreContract:
    """The blob store contract (see the module docstring for how to run it)."""

    @pytest_asyncio.fixture
    async def make_store(self) -> AsyncIterator[StoreFactory]:
        pytest.fail(
            f"{type(self).__name__} must override the make_store fixture with one that "
            "returns `async (max_size: int | None) -> BlobStore`; see rexcore.testing.contracts"
        )
        yield

    # -- round trips -----------------------------------------------------------------

    @_FUNCTIONS
    async def test_put_then_get_and_read_return_the_same_bytes(
        self, make_store: StoreFactory, function: DigestFunction
    ) -> None:
        store = await make_store(None)
        data = _blob(100_000, 1)
        digest = digest_of(data, function)
        assert not await store.contains(digest)
        await store.put(digest, data)
        assert await store.contains(digest)
        assert await store.get(digest) == data
        assert await _read_all(store, digest) == data

    async def test_same_bytes_under_both_functions_are_two_blobs(
        self, make_store: StoreFactory
    ) -> None:
        store = await make_store(None)
        data = _blob(1000, 2)
        sha256, blake3 = (digest_of(data, f) for f in DigestFunction)
        await store.put(sha256, data)
        assert await store.find_missing([sha256, blake3]) == [blake3]
        await store.put(blake3, data)
        assert await store.get(blake3) == data

    @_FUNCTIONS
    async def test_streamed_write_in_uneven_chunks_round_trips(
        self, make_store: StoreFactory, function: DigestFunction
    ) -> None:
        store = await make_store(None)
        data = _blob(5 * _MiB + 12_345, 3)
        digest = digest_of(data, function)
        sizes = [1, 65_536, _MiB, 3_000, 2 * _MiB + 5, 7]
        async with store.open_write(digest) as writer:
            position, turn = 0, 0
            while position < len(data):
                size = sizes[turn % len(sizes)]
                await writer.write(memoryview(data)[position : position + size])
                position, turn = position + size, turn + 1
        assert await store.get(digest) == data

    async def test_writer_does_not_keep_the_callers_buffer(self, make_store: StoreFactory) -> None:
        store = await make_store(None)
        data = _blob(300_000, 4)
        digest = digest_of(data)
        buffer = bytearray(100_000)
        async with store.open_write(digest) as writer:
            for start in range(0, len(data), len(buffer)):
                buffer[:] = data[start : start + len(buffer)]
                await writer.write(memoryview(buffer))
            buffer[:] = bytes(len(buffer))  # scribble over it before the commit
        assert await store.get(digest) == data

    @pytest.mark.parametrize(
        ("offset", "limit"),
        [
            (0, None),
            (1, None),
            (0, 0),
            (10, 100),
            (_MiB - 5, _MiB + 10),
            (2 * _MiB, None),
            (3 * _MiB + 99, None),
            (3 * _MiB + 100, None),
            (0, 10 * _MiB),
        ],
    )
    async def test_read_returns_exactly_the_requested_range(
        self, make_store: StoreFactory, offset: int, limit: int | None
    ) -> None:
        store = await make_store(None)
        data = _blob(3 * _MiB + 100, 5)
        digest = digest_of(data)
        await store.put(digest, data)
        end = len(data) if limit is None else offset + limit
        assert await _read_all(store, digest, offset, limit) == data[offset:end]

    async def test_read_past_the_end_is_refused(self, make_store: StoreFactory) -> None:
        store = await make_store(None)
        data = _blob(100, 6)
        digest = digest_of(data)
        await store.put(digest, data)
        with pytest.raises(ValueError, match="offset"):
            await _read_all(store, digest, offset=101)

    async def test_find_missing_keeps_input_order_and_drops_duplicates(
        self, make_store: StoreFactory
    ) -> None:
        store = await make_store(None)
        (a, data_a), (b, data_b), (c, _), (d, _) = _blobs(4, 100)
        await store.put(a, data_a)
        await store.put(b, data_b)
        empty = DigestFunction.SHA256.empty
        assert await store.find_missing([d, a, c, d, empty, b, c]) == [d, c]
        assert await store.find_missing([]) == []

    # -- verification and atomicity --------------------------------------------------

    @pytest.mark.parametrize("wrong", ["bytes", "too-long", "too-short"])
    async def test_a_write_that_does_not_match_its_digest_stores_nothing(
        self, make_store: StoreFactory, wrong: str
    ) -> None:
        data = _blob(10_000, 7)
        digest = digest_of(data)
        bad = {
            "bytes": data[:-1] + bytes([data[-1] ^ 1]),
            "too-long": data + b"!",
            "too-short": data[:-1],
        }[wrong]
        # A cap of exactly one blob also proves the failed write gave its room back.
        store = await make_store(None)
        with pytest.raises(DigestMismatchError) as caught:
            await store.put(digest, bad)
        assert str(digest) in str(caught.value)
        with pytest.raises(DigestMismatchError):
            async with store.open_write(digest) as writer:
                await writer.write(bad[:5000])
                await writer.write(bad[5000:])
        assert not await store.contains(digest)
        with pytest.raises(BlobNotFoundError):
            await store.get(digest)
        await store.put(digest, data)
        assert await store.get(digest) == data

    async def test_aborted_write_stores_nothing(self, make_store: StoreFactory) -> None:
        data = _blob(50_000, 8)
        digest = digest_of(data)
        store = await make_store(None)
        writer = store.open_write(digest)
        await writer.write(data[:20_000])
        await writer.abort()
        assert not await store.contains(digest)
        assert store.stats().bytes == 0
        await store.put(digest, data)
        assert await store.get(digest) == data

    async def test_writer_block_that_raises_aborts_even_with_all_bytes_written(
        self, make_store: StoreFactory
    ) -> None:
        store = await make_store(None)
        data = _blob(50_000, 9)
        digest = digest_of(data)
        with pytest.raises(RuntimeError, match="client went away"):
            async with store.open_write(digest) as writer:
                await writer.write(data)
                raise RuntimeError("client went away")
        assert not await store.contains(digest)

    async def test_concurrent_writers_of_one_digest_leave_one_intact_blob(
        self, make_store: StoreFactory
    ) -> None:
        store = await make_store(None)
        data = _blob(3 * _MiB + 17, 10)
        digest = digest_of(data)

        async def upload(chunk_size: int) -> None:
            async with store.open_write(digest) as writer:
                for start in range(0, len(data), chunk_size):
                    await writer.write(data[start : start + chunk_size])
                    await asyncio.sleep(0)

        await asyncio.gather(*(upload(size) for size in (100_000, 256_000, _MiB, 3 * _MiB + 17)))
        assert await store.get(digest) == data
        assert store.stats().blobs == 1
        assert store.stats().bytes == len(data)

    # -- the empty blob --------------------------------------------------------------

    @_FUNCTIONS
    async def test_empty_blob_is_always_present(
        self, make_store: StoreFactory, function: DigestFunction
    ) -> None:
        store = await make_store(None)
        empty = function.empty
        assert await store.contains(empty)
        assert await store.find_missing([empty]) == []
        assert await store.get(empty) == b""
        assert await _read_all(store, empty) == b""
        await store.put(empty, b"")
        with pytest.raises(DigestMismatchError):
            await store.put(empty, b"x")
        assert await store.get(empty) == b""

    # -- missing blobs and deletion --------------------------------------------------

    async def test_get_or_read_of_a_missing_blob_raises_blob_not_found(
        self, make_store: StoreFactory
    ) -> None:
        store = await make_store(None)
        digest = digest_of(b"never stored")
        with pytest.raises(BlobNotFoundError) as caught:
            await store.get(digest)
        assert caught.value.digest == digest
        with pytest.raises(BlobNotFoundError):
            await _read_all(store, digest)

    async def test_delete_removes_a_blob_but_not_a_pinned_one(
        self, make_store: StoreFactory
    ) -> None:
        store = await make_store(None)
        (a, data_a), (b, data_b) = _blobs(2, 100)
        await store.put(a, data_a)
        await store.put(b, data_b)
        await store.delete(a)
        with store.pin([b]):
            await store.delete(b)
        assert await store.find_missing([a, b]) == [a]
        await store.delete(a)  # deleting what is absent is no error

    async def test_stats_count_blobs_and_bytes(self, make_store: StoreFactory) -> None:
        store = await make_store(None)
        (a, data_a), (b, data_b) = _blobs(2, 300)
        await store.put(a, data_a)
        await store.put(b, data_b)
        await store.put(b, data_b)
        stats = store.stats()
        assert (stats.blobs, stats.bytes) == (2, 600)

    async def test_local_path_if_offered_holds_the_blob(self, make_store: StoreFactory) -> None:
        store = await make_store(None)
        data = _blob(1000, 11)
        digest = digest_of(data)
        await store.put(digest, data)
        path = store.local_path(digest)
        assert store.local_path(digest_of(b"never stored")) is None
        if path is not None:  # local paths are optional; when offered they hold the blob
            assert await asyncio.to_thread(path.read_bytes) == data


@pytest.mark.asyncio
class CappedBlobStoreContract(BlobStoreContract):
    """For a store that honours ``max_size``: LRU eviction, pins, a full store refusing."""

    # -- cap, eviction and pins ------------------------------------------------------

    @pytest.mark.parametrize("use", ["contains", "get", "read", "find_missing"])
    async def test_eviction_removes_the_least_recently_used_blob_first(
        self, make_store: StoreFactory, use: str
    ) -> None:
        store = await make_store(3000)
        (a, data_a), (b, data_b), (c, data_c), (d, data_d) = _blobs(4, 1000)
        for digest, data in ((a, data_a), (b, data_b), (c, data_c)):
            await store.put(digest, data)
        await _use(store, a, use)  # now b is the oldest
        await store.put(d, data_d)
        assert await store.find_missing([a, b, c, d]) == [b]
        assert store.stats().bytes <= 3000
        assert store.stats().evictions == 1

    async def test_pinned_blob_survives_eviction(self, make_store: StoreFactory) -> None:
        store = await make_store(2000)
        (a, data_a), (b, data_b), (c, data_c) = _blobs(3, 1000)
        await store.put(a, data_a)
        await store.put(b, data_b)
        with store.pin([a]):
            await store.put(c, data_c)  # a is older, but pinned: b goes
        assert await store.find_missing([a, b, c]) == [b]

    async def test_pins_nest(self, make_store: StoreFactory) -> None:
        store = await make_store(2000)
        (a, data_a), (b, data_b), (c, data_c), (d, data_d) = _blobs(4, 1000)
        await store.put(a, data_a)
        with store.pin([a]):
            with store.pin([a]):
                pass
            await store.put(b, data_b)
            await store.put(c, data_c)  # evicts b: a is still pinned by the outer block
            assert await store.find_missing([a, b]) == [b]
        await store.contains(c)  # leaves a as the oldest
        await store.put(d, data_d)
        assert await store.find_missing([a, c, d]) == [a]

    async def test_write_fails_with_store_full_when_pins_take_the_cap(
        self, make_store: StoreFactory
    ) -> None:
        store = await make_store(2000)
        (a, data_a), (b, data_b), (c, data_c) = _blobs(3, 1000)
        await store.put(a, data_a)
        await store.put(b, data_b)
        with store.pin([a, b]):
            with pytest.raises(StoreFullError, match="max_size"):
                await store.put(c, data_c)
            assert await store.find_missing([a, b, c]) == [c]
            await store.put(a, data_a)  # rewriting a held blob needs no room
        await store.put(c, data_c)
        assert await store.get(c) == data_c

    async def test_blob_larger_than_the_cap_is_refused_naming_the_cap(
        self, make_store: StoreFactory
    ) -> None:
        store = await make_store(1000)
        data = _blob(1001, 12)
        digest = digest_of(data)
        with pytest.raises(StoreFullError, match="max_size"):
            await store.put(digest, data)
        assert not await store.contains(digest)


@pytest.mark.asyncio
class PersistentBlobStoreContract(BlobStoreContract):
    """For a store that keeps blobs across a restart; override ``reopen_store``."""

    @pytest_asyncio.fixture
    async def reopen_store(self) -> AsyncIterator[ReopenStore]:
        pytest.fail(
            f"{type(self).__name__} must override the reopen_store fixture with one that "
            "returns `async (store) -> BlobStore` reopening the store on the same data"
        )
        yield

    # -- persistence -----------------------------------------------------------------

    async def test_blobs_survive_reopen(
        self, make_store: StoreFactory, reopen_store: ReopenStore
    ) -> None:
        store = await make_store(None)
        (a, data_a), (b, data_b) = _blobs(2, 5000, DigestFunction.BLAKE3)
        await store.put(a, data_a)
        await store.put(b, data_b)
        store = await reopen_store(store)
        assert await store.get(a) == data_a
        assert await _read_all(store, b, 10, 20) == data_b[10:30]
        assert await store.contains(DigestFunction.BLAKE3.empty)
        assert (store.stats().blobs, store.stats().bytes) == (2, 10_000)
