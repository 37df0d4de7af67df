"""The built-in blob stores against the contract, and what only the disk store promises."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from rexcore.artifacts import (
    Digest,
    DigestFunction,
    DigestMismatchError,
    DiskBlobStore,
    DiskStoreOptions,
    MemoryBlobStore,
    MemoryStoreOptions,
    StoreFullError,
    create_disk_store,
    create_memory_store,
    digest_of,
)
from rexcore.artifacts.store import BlobStore
from rexcore.config.types import ByteSize
from rexcore.plugins.descriptors import ComponentContext
from rexcore.testing.contracts import (
    CappedBlobStoreContract,
    PersistentBlobStoreContract,
    ReopenStore,
    StoreFactory,
)

_MiB = 1 << 20


def _data(size: int, seed: int = 0) -> bytes:
    return (seed.to_bytes(4, "big") + os.urandom(16)) * (size // 20) + b"x" * (size % 20)


class TestMemoryBlobStore(CappedBlobStoreContract):
    @pytest.fixture
    async def make_store(self) -> AsyncIterator[StoreFactory]:
        stores: list[BlobStore] = []

        async def make(max_size: int | None) -> BlobStore:
            stores.append(MemoryBlobStore(max_size=max_size))
            return stores[-1]

        yield make
        for store in stores:
            await store.close()


class TestDiskBlobStore(CappedBlobStoreContract, PersistentBlobStoreContract):
    @pytest.fixture
    async def make_store(self, tmp_path: Path) -> AsyncIterator[StoreFactory]:
        stores: list[BlobStore] = []

        async def make(max_size: int | None) -> BlobStore:
            stores.append(DiskBlobStore(tmp_path / f"store{len(stores)}", max_size=max_size))
            return stores[-1]

        yield make
        for store in stores:
            await store.close()

    @pytest.fixture
    async def reopen_store(self) -> AsyncIterator[ReopenStore]:
        reopened: list[BlobStore] = []

        async def reopen(store: BlobStore) -> BlobStore:
            assert isinstance(store, DiskBlobStore)
            await store.close()
            reopened.append(DiskBlobStore(store.root, max_size=store.stats().max_bytes))
            return reopened[-1]

        yield reopen
        for store in reopened:
            await store.close()


def test_factories_build_stores_from_options(tmp_path: Path) -> None:
    context = ComponentContext(data_dir=tmp_path)
    disk = create_disk_store(DiskStoreOptions(), context)
    assert disk.root == tmp_path / "cas"
    assert disk.stats().max_bytes == 10 << 30
    assert create_disk_store(DiskStoreOptions(path="blobs"), context).root == tmp_path / "blobs"
    elsewhere = tmp_path / "elsewhere"
    assert create_disk_store(DiskStoreOptions(path=str(elsewhere)), context).root == elsewhere
    memory = create_memory_store(MemoryStoreOptions(max_size=ByteSize(5 << 20)), context)
    assert memory.stats().max_bytes == 5 << 20
    assert memory.local_path(digest_of(b"x")) is None


# -- the disk store ------------------------------------------------------------------


def _temp_files(root: Path) -> list[Path]:
    return sorted((root / "tmp").iterdir())


def _blob_file(root: Path, digest: Digest) -> Path:
    return root / digest.function.value / digest.hash[:2] / digest.hash


@pytest.fixture
async def disk_store(tmp_path: Path) -> AsyncIterator[DiskBlobStore]:
    store = await DiskBlobStore(tmp_path / "cas").open()
    yield store
    await store.close()


async def test_published_blobs_are_read_only_files(disk_store: DiskBlobStore) -> None:
    data = _data(10_000)
    digest = digest_of(data)
    await disk_store.put(digest, data)
    for blob in (digest, DigestFunction.SHA256.empty, DigestFunction.BLAKE3.empty):
        path = disk_store.local_path(blob)
        assert path is not None and path == _blob_file(disk_store.root, blob)
        assert stat.S_IMODE(path.stat().st_mode) == 0o444
    assert _blob_file(disk_store.root, digest).read_bytes() == data


async def test_rejected_and_aborted_writes_leave_no_temp_file(disk_store: DiskBlobStore) -> None:
    data = _data(3 * _MiB)
    digest = digest_of(data)
    with pytest.raises(DigestMismatchError):
        await disk_store.put(digest, data[:-1] + b"?")
    writer = disk_store.open_write(digest)
    await writer.write(data[: 2 * _MiB + 1])
    assert len(_temp_files(disk_store.root)) == 1
    await writer.abort()
    assert _temp_files(disk_store.root) == []
    assert not _blob_file(disk_store.root, digest).exists()


async def test_leftover_temp_file_is_removed_on_open(tmp_path: Path) -> None:
    store = await DiskBlobStore(tmp_path).open()
    await store.close()
    (tmp_path / "tmp" / f"{'ab' * 32}.4242.0011223344ff.tmp").write_bytes(b"partial")
    store = await DiskBlobStore(tmp_path).open()
    assert _temp_files(tmp_path) == []
    await store.close()


_CRASHING_WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from rexcore.artifacts import DiskBlobStore, digest_of

    async def main():
        data = bytes(range(256)) * (5 * 4096)  # 5 MiB
        store = DiskBlobStore(Path(sys.argv[1]))
        writer = store.open_write(digest_of(data))
        await writer.write(data[: 3 << 20])  # past one batch, so bytes reach the temp file
        print("written", flush=True)
        await asyncio.sleep(60)

    asyncio.run(main())
    """
)


async def test_crash_mid_write_leaves_no_partial_blob_after_reopen(tmp_path: Path) -> None:
    data = bytes(range(256)) * (5 * 4096)
    digest = digest_of(data)
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _CRASHING_WRITER,
        str(tmp_path),
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert child.stdout is not None
    assert await asyncio.wait_for(child.stdout.readline(), 30) == b"written\n"
    assert [p.stat().st_size for p in _temp_files(tmp_path)] == [3 << 20]
    child.send_signal(signal.SIGKILL)
    await child.wait()

    store = await DiskBlobStore(tmp_path).open()
    try:
        assert not await store.contains(digest)
        assert not _blob_file(tmp_path, digest).exists()
        assert _temp_files(tmp_path) == []
        await store.put(digest, data)
        assert await store.get(digest) == data
    finally:
        await store.close()


async def test_open_keeps_the_temp_files_of_live_writers(tmp_path: Path) -> None:
    data = _data(3 * _MiB)
    digest = digest_of(data)
    first = await DiskBlobStore(tmp_path).open()
    writer = first.open_write(digest)
    await writer.write(data[: 2 * _MiB + 1])
    second = await DiskBlobStore(tmp_path).open()  # e.g. a worker opening the same root
    assert len(_temp_files(tmp_path)) == 1
    await writer.write(data[2 * _MiB + 1 :])
    await writer.commit()
    assert _blob_file(tmp_path, digest).read_bytes() == data
    await first.close()
    await second.close()


async def test_index_and_lru_order_survive_reopen(tmp_path: Path) -> None:
    blobs = [(digest_of(data), data) for data in (_data(1000, seed) for seed in range(4))]
    (a, data_a), (b, _), (c, _), (d, data_d) = blobs
    store = await DiskBlobStore(tmp_path, max_size=3000).open()
    for digest, data in blobs[:3]:
        await store.put(digest, data)
    assert await store.get(a) == data_a  # now b is the oldest
    await store.close()

    store = await DiskBlobStore(tmp_path, max_size=3000).open()
    try:
        assert (store.stats().blobs, store.stats().bytes) == (3, 3000)
        await store.put(d, data_d)
        assert await store.find_missing([a, b, c, d]) == [b]
        assert not _blob_file(tmp_path, b).exists()
    finally:
        await store.close()


async def test_reopen_with_a_lower_cap_evicts_the_oldest(tmp_path: Path) -> None:
    blobs = [(digest_of(data), data) for data in (_data(1000, seed) for seed in range(3))]
    store = await DiskBlobStore(tmp_path, max_size=None).open()
    for digest, data in blobs:
        await store.put(digest, data)
    await store.close()
    store = await DiskBlobStore(tmp_path, max_size=2000).open()
    try:
        assert await store.find_missing([d for d, _ in blobs]) == [blobs[0][0]]
        assert not _blob_file(tmp_path, blobs[0][0]).exists()
    finally:
        await store.close()


# -- a full disk ---------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs (needs root on Linux, as in CI)."""
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root on Linux")
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


@pytest.mark.parametrize("how", ["put", "streamed"])
async def test_full_disk_fails_the_write_cleanly_and_the_store_keeps_serving(
    small_disk: Path, how: str
) -> None:
    store = await DiskBlobStore(small_disk, max_size=10 * _MiB).open()
    try:
        kept = _data(100_000, 1)
        await store.put(digest_of(kept), kept)
        too_big = _data(300_000, 2)
        digest = digest_of(too_big)
        with pytest.raises(StoreFullError) as caught:
            if how == "put":
                await store.put(digest, too_big)
            else:
                async with store.open_write(digest) as writer:
                    for start in range(0, len(too_big), 64 * 1024):
                        await writer.write(too_big[start : start + 64 * 1024])
        message = str(caught.value)
        assert str(small_disk) in message
        assert "free disk space or lower max_size" in message
        assert not await store.contains(digest)
        assert not _blob_file(small_disk, digest).exists()
        assert _temp_files(small_disk) == []
        assert store.stats().bytes == len(kept)

        assert await store.get(digest_of(kept)) == kept
        small = _data(20_000, 3)
        await store.put(digest_of(small), small)
        assert await store.get(digest_of(small)) == small
    finally:
        await store.close()


# -- several processes on one root; publishing files in place ---------------------------


async def test_a_blob_published_by_another_store_on_the_same_root_is_visible(tmp_path: Path):
    """A local worker publishes outputs straight into the coordinator's store. The store
    that owns the root (it scanned it) sees them once told to refresh them, and never
    pays a stat for a miss; a store sharing the root without owning it (scan=False, the
    worker's) looks at the disk on an index miss."""
    owner = await DiskBlobStore(tmp_path / "cas").open()
    sharer = await DiskBlobStore(tmp_path / "cas", max_size=None, scan=False).open()
    try:
        data = b"published by the worker"
        digest = digest_of(data)
        other = digest_of(b"published too")
        never = digest_of(b"never published")
        assert await owner.find_missing([digest, other, never]) == [digest, other, never]
        await sharer.put(digest, data)
        await sharer.put(other, b"published too")
        assert await owner.find_missing([digest, other, never]) == [digest, other, never]
        assert owner.refresh(digest) and owner.refresh(other) and not owner.refresh(never)
        assert await owner.contains(digest)
        assert await owner.find_missing([digest, other, never]) == [never]
        assert await owner.get(digest) == data
        assert b"".join([chunk async for chunk in owner.read(digest, 10)]) == data[10:]
        assert owner.local_path(other) is not None
        # What the owner publishes, the sharer finds on its first look.
        mine = b"published by the coordinator"
        await owner.put(digest_of(mine), mine)
        assert await sharer.get(digest_of(mine)) == mine
        # A blob the owner evicts is gone for the other store from its first failed read.
        await owner.delete(digest)
        with pytest.raises(Exception, match="not in the store"):
            await sharer.get(digest)
        assert await sharer.find_missing([digest]) == [digest]
    finally:
        await owner.close()
        await sharer.close()


async def test_many_index_misses_of_a_sharing_store_are_checked_in_a_thread(tmp_path: Path):
    owner = await DiskBlobStore(tmp_path / "cas").open()
    sharer = await DiskBlobStore(tmp_path / "cas", max_size=None, scan=False).open()
    try:
        blobs = [f"blob {i}".encode() for i in range(200)]
        digests = [digest_of(b) for b in blobs]
        for digest, data in zip(digests[::2], blobs[::2]):
            await owner.put(digest, data)
        assert await sharer.find_missing(digests) == digests[1::2]
    finally:
        await owner.close()
        await sharer.close()


async def test_link_file_publishes_a_hashed_file_without_copying_it(tmp_path: Path):
    store = await DiskBlobStore(tmp_path / "cas").open()
    try:
        output = tmp_path / "output"
        output.write_bytes(b"an action's output")
        digest = digest_of(b"an action's output")
        assert await store.link_file(digest, output)
        path = store.local_path(digest)
        assert path is not None and os.path.samefile(path, output)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o444
        assert await store.get(digest) == b"an action's output"
        again = tmp_path / "again"
        again.write_bytes(b"an action's output")
        assert not await store.link_file(digest, again)  # held already
    finally:
        await store.close()


async def test_a_store_of_executables_publishes_blobs_with_mode_0555(tmp_path: Path):
    store = await DiskBlobStore(tmp_path / "exe", file_mode=0o555).open()
    try:
        digest = digest_of(b"#!/bin/sh\necho hi\n")
        await store.put(digest, b"#!/bin/sh\necho hi\n")
        path = store.local_path(digest)
        assert path is not None and stat.S_IMODE(os.stat(path).st_mode) == 0o555
        empty = store.local_path(DigestFunction.BLAKE3.empty)
        assert empty is not None and stat.S_IMODE(os.stat(empty).st_mode) == 0o555
    finally:
        await store.close()


# -- writing a small file whole: unnamed (O_TMPFILE) or through a named temp file -------


@pytest.fixture(params=["unnamed", "named"])
def file_writer(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A temp dir for :func:`write_new_file`, which takes the named temp file when the
    file system cannot make unnamed files: forced here for the ``named`` case."""
    from rexcore.artifacts import _files

    temp_dir = tmp_path / f"tmp-{request.param}"
    temp_dir.mkdir()
    if request.param == "named":
        _files._NO_TMPFILE.add(str(temp_dir))
    try:
        yield str(temp_dir)
    finally:
        _files._NO_TMPFILE.discard(str(temp_dir))


def test_write_new_file_publishes_whole_files_once(file_writer: str, tmp_path: Path) -> None:
    from rexcore.artifacts._files import write_new_file

    target = tmp_path / "out" / "ab" / "blob"  # its directories do not exist yet
    assert write_new_file(file_writer, str(target), b"first", mode=0o444, stamp_ns=1234 * 10**9)
    assert target.read_bytes() == b"first"
    assert stat.S_IMODE(target.stat().st_mode) == 0o444
    assert target.stat().st_mtime_ns == 1234 * 10**9
    # An existing name keeps its bytes: content-addressed names hold the same content.
    assert not write_new_file(file_writer, str(target), b"second", mode=0o444)
    assert target.read_bytes() == b"first"
    entry = tmp_path / "entry"
    assert write_new_file(file_writer, str(entry), b"old", fsync=True)
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600
    assert write_new_file(file_writer, str(entry), b"new", replace=True)
    assert entry.read_bytes() == b"new"
    assert os.listdir(file_writer) == []  # no temp file is left behind either way
    from rexcore.artifacts import _files

    if sys.platform == "linux" and file_writer.endswith("-unnamed"):
        assert file_writer not in _files._NO_TMPFILE  # the unnamed way was taken


def test_write_new_file_leaves_nothing_when_the_write_fails(
    file_writer: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rexcore.artifacts import _files

    def no_space(fd: int, data: bytes | memoryview) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_files.os, "write", no_space)
    target = tmp_path / "blob"
    with pytest.raises(OSError):
        _files.write_new_file(file_writer, str(target), b"data")
    monkeypatch.undo()
    assert not target.exists()
    assert os.listdir(file_writer) == []
