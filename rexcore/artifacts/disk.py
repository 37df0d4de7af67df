"""The ``disk`` blob store: one read-only file per blob, LRU-evicted under a size cap.

Layout under the root (``<data_dir>/cas`` by default)::

    <root>/<function>/<hash[:2]>/<hash>    published blobs, mode 0444 (workers hardlink them)
    <root>/tmp/<hash>.<pid>.<random>.tmp   writes in progress, each locked by its writer

A write hashes while it streams into its own temp file and is published by ``link`` only
once size and hash match, so a reader never sees a partial blob, concurrent writers of one
digest cannot disturb each other, and a crash leaves at most a temp file, which the next
open removes (its lock is gone with the crashed process).

The index (sizes and recency) is in memory, rebuilt on open by scanning the root and
ordering blobs by mtime; uses are written back as mtimes in batches, so the LRU order
roughly survives a restart. A blob another process published on the same root (a local
worker sharing the coordinator's store) is adopted into the index the first time it is
asked for: a miss in the index costs one ``stat`` of the blob's file. File work runs in the store's own threads in batches of
about 2 MiB, so hashing (hashlib and blake3 release the GIL on big buffers) and the
event loop run side by side.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import io
import os
import stat
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs

from rexcore.artifacts._files import (
    TempFile,
    fsync_directory,
    link_new,
    publish_temp,
    remove_file,
    remove_stale_temps,
    write_new_file,
)
from rexcore.artifacts._local import CAP_OPTION, IndexedBlobStore, VerifyingWriter, check_range
from rexcore.artifacts.digest import Digest, DigestFunction, Hasher, InvalidDigestError
from rexcore.artifacts.store import (
    BlobNotFoundError,
    DigestMismatchError,
    StorageError,
    StoreFullError,
)
from rexcore.config.types import ByteSize
from rexcore.plugins.descriptors import ComponentContext

__all__ = ["DiskBlobStore", "DiskStoreOptions", "create_disk_store"]

T = TypeVar("T")

# Bytes gathered before each hop to a thread: big enough that the hop costs little next to
# hashing and writing, small enough to keep memory per upload bounded.
_BATCH = 2 << 20
# Written pieces at least this big that are views of ``bytes`` (immutable, so the caller
# cannot change them later) are kept by reference until their batch is written: no copy.
# Smaller or mutable ones are copied, small ones together.
_BY_REFERENCE = 64 << 10
_READ_CHUNK = 1 << 20
#: Small in-memory blobs coming to at most this many bytes in all (an Action and its
#: Command, a few Directories, a small upload) are written on the calling thread: creating
#: a file or two costs less than the hop to a thread and back.
INLINE_PUT = 16 << 10
# Recency goes to disk (as mtimes) after this many uses or this many seconds.
_RECENCY_BATCH = 1024
_RECENCY_INTERVAL = 30.0
# Index misses checked with a stat right on the event loop; more go to a thread.
_INLINE_STATS = 64
# In-memory blobs up to this size are hashed, written and published in one thread hop.
_SMALL_PUT = 1 << 20
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


@attrs.frozen
class DiskStoreOptions:
    """Options of the ``disk`` blob store."""

    #: Root directory; empty means ``<data_dir>/cas``, a relative path is under the data dir.
    path: str = ""
    #: Bytes of blobs kept before the least recently used are evicted.
    max_size: ByteSize = attrs.field(
        default=ByteSize(10 << 30), validator=attrs.validators.gt(ByteSize(0))
    )
    #: Also flush each blob to the device before publishing it. Without it a process crash
    #: still never leaves a partial blob (publication is an atomic link of a complete
    #: file); an OS crash or power loss may, so turn it on where that matters more than
    #: write speed.
    fsync: bool = False


def _blob_path(root: str, function: DigestFunction, hash_: str) -> str:
    return os.path.join(root, function.value, hash_[:2], hash_)


def _ensure_empty_blobs(root: str, temp_dir: str, mode: int) -> None:
    """Empty blobs exist as files too, so callers can hardlink them like any other."""
    for function in DigestFunction:
        path = _blob_path(root, function, function.empty.hash)
        if not os.path.exists(path):
            write_new_file(temp_dir, path, b"", mode=mode)


def _scan(root: str, mode: int) -> tuple[list[Digest], int]:
    """Prepare the root; every blob in it, least recently used first, and the newest mtime."""
    temp_dir = os.path.join(root, "tmp")
    os.makedirs(temp_dir, exist_ok=True)
    remove_stale_temps(temp_dir)
    _ensure_empty_blobs(root, temp_dir, mode)
    found: list[tuple[int, Digest]] = []
    for function in DigestFunction:
        with os.scandir(os.path.join(root, function.value)) as shards:
            for shard in shards:
                if len(shard.name) != 2 or not shard.is_dir(follow_symlinks=False):
                    continue
                with os.scandir(shard.path) as entries:
                    for entry in entries:
                        if not entry.name.startswith(shard.name):
                            continue
                        try:
                            info = entry.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue  # evicted by another process meanwhile
                        if not stat.S_ISREG(info.st_mode) or info.st_size == 0:
                            continue
                        try:
                            digest = Digest(function, entry.name, info.st_size)
                        except InvalidDigestError:
                            continue  # not ours; leave it alone
                        found.append((info.st_mtime_ns, digest))
    found.sort(key=lambda item: item[0])
    return [digest for _, digest in found], (found[-1][0] if found else 0)


def _blob_file_present(path: str, size: int) -> bool:
    try:
        info = os.stat(path)
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and info.st_size == size


def _blob_files_present(candidates: list[tuple[str, int]]) -> list[bool]:
    return [_blob_file_present(path, size) for path, size in candidates]


def _link_file(source: str, target: str, stamp: int, mode: int, fsync: bool) -> bool:
    os.chmod(source, mode)
    os.utime(source, ns=(stamp, stamp))
    if fsync:
        fd = os.open(source, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    added = link_new(source, target)
    if fsync and added:
        fsync_directory(os.path.dirname(target))
    return added


def _prepare(root: str, mode: int) -> tuple[list[Digest], int]:
    """What a store that does not own the root does on open: no scan, no cleaning."""
    temp_dir = os.path.join(root, "tmp")
    os.makedirs(temp_dir, exist_ok=True)
    _ensure_empty_blobs(root, temp_dir, mode)
    return [], 0


def _set_mtimes(stamps: list[tuple[str, int]]) -> None:
    for path, stamp in stamps:
        try:
            os.utime(path, ns=(stamp, stamp))
        except OSError:
            pass  # evicted meanwhile, or not ours to touch: recency is only a hint


def _remove_all(paths: list[str]) -> None:
    for path in paths:
        remove_file(path)


def _read_whole(path: str) -> bytes:
    with open(path, "rb", buffering=0) as file:
        return file.readall()


def _open_and_read(path: str, offset: int, size: int) -> tuple[io.FileIO | None, bytes]:
    """Open at ``offset`` and read the first chunk; the file is returned open only if
    more than one chunk is wanted."""
    file = io.FileIO(path, "rb")
    try:
        file.seek(offset)
        chunk = file.read(min(size, _READ_CHUNK))
    except BaseException:
        file.close()
        raise
    if len(chunk) >= size:
        file.close()
        return None, chunk
    return file, chunk


def _hash_pieces(hasher: Hasher, pieces: list[memoryview | bytearray]) -> None:
    for piece in pieces:
        hasher.update(memoryview(piece))


def _write_pieces(temp: TempFile, pieces: list[memoryview | bytearray]) -> None:
    for piece in pieces:
        temp.write(memoryview(piece))


class _DiskBlobWriter(VerifyingWriter):
    _store: DiskBlobStore

    def __init__(self, digest: Digest, store: DiskBlobStore) -> None:
        super().__init__(digest, store)
        self._temp: TempFile | None = None
        # The next batch. Write-behind: while one thread hashes a full batch and another
        # writes it, the next one gathers here, so receiving, hashing and the copy into the
        # page cache run side by side.
        self._pieces: list[memoryview | bytearray] = []
        self._gathered = 0
        # The thread calls in progress; a discard waits for them before closing the file.
        self._inflight: list[concurrent.futures.Future[Any]] = []
        # The batch handed to the threads and not yet awaited; a failure surfaces on the
        # next call (a later write, or the commit).
        self._behind: list[concurrent.futures.Future[Any]] = []

    async def _wait(self, future: concurrent.futures.Future[T]) -> T:
        try:
            return await asyncio.wrap_future(future)
        except OSError as exc:
            raise self._store._write_error(exc, self.digest) from exc

    async def _settle(self) -> None:
        """Wait for the batch written behind, so each batch is hashed and written in order."""
        behind = self._behind
        if not behind:
            return
        try:
            await asyncio.wait([asyncio.wrap_future(f) for f in behind])
            for future in behind:
                await self._wait(future)  # done: raises its failure, if any
        finally:
            if all(future.done() for future in behind):  # a cancelled wait keeps them
                self._behind = []

    async def _call(self, function: Callable[..., T], *args: Any) -> T:
        await self._settle()
        future = self._store._executor.submit(function, *args)
        self._inflight = [future]
        return await self._wait(future)

    async def _open(self) -> None:
        self._temp = await self._call(TempFile, self._store._temp_dir, self.digest.hash)

    async def _consume(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        pieces = self._pieces
        if not pieces and len(view) >= _BATCH:
            # A batch by itself: hashed and written straight from the caller's buffer,
            # done when this returns (so the caller may reuse the buffer).
            pieces.append(view)
            await self._flush()
            await self._settle()
            return
        if len(view) >= _BY_REFERENCE and type(view.obj) is bytes:
            pieces.append(view)
        elif pieces and type(pieces[-1]) is bytearray:
            pieces[-1] += view
        else:
            pieces.append(bytearray(view))
        self._gathered += len(view)
        if self._gathered >= _BATCH:
            await self._flush()

    async def _flush(self) -> None:
        """Hand the gathered batch to the threads without waiting for it."""
        if not self._pieces:
            return
        await self._settle()
        assert self._temp is not None
        batch, self._pieces, self._gathered = self._pieces, [], 0
        executor = self._store._executor
        self._inflight = self._behind = [
            executor.submit(_hash_pieces, self._hasher, batch),
            executor.submit(_write_pieces, self._temp, batch),
        ]

    async def _seal(self) -> str:
        await self._flush()
        await self._settle()
        return self._hasher.hexdigest()

    async def _publish(self) -> None:
        store, temp = self._store, self._temp
        assert temp is not None
        dropping = store._dropping.get(self.digest)
        if dropping is not None:  # an eviction of this very blob is still deleting it
            await asyncio.wait([dropping])
        target = store._path(self.digest)
        added = await self._call(
            _publish_temp, temp, target, store._stamp(), store._fsync, store._file_mode
        )
        if not added:
            store._note_use(self.digest)

    async def _discard(self) -> None:
        temp, inflight = self._temp, self._inflight
        if temp is None:
            return

        def discard() -> None:
            concurrent.futures.wait(inflight)  # never close a file a thread writes
            temp.remove()

        await asyncio.wrap_future(self._store._executor.submit(discard))


def _publish_temp(temp: TempFile, target: str, stamp: int, fsync: bool, mode: int) -> bool:
    # The stamp, not the clock, orders blobs on the next open: clocks tick coarsely.
    try:
        return publish_temp(temp, target, mode=mode, stamp_ns=stamp, fsync=fsync)
    finally:
        temp.remove()


def _put_small(
    temp_dir: str,
    target: str,
    digest: Digest,
    data: bytes | memoryview,
    stamp: int,
    fsync: bool,
    mode: int,
) -> str | bool:
    """Verify and publish a whole in-memory blob: the actual hash if it does not match,
    else whether the blob was new."""
    hasher = digest.function.hasher(expected_size=len(data))
    hasher.update(data)
    actual = hasher.hexdigest()
    if actual != digest.hash:
        return actual
    return write_new_file(temp_dir, target, data, mode=mode, stamp_ns=stamp, fsync=fsync)


def _put_small_many(
    temp_dir: str,
    jobs: list[tuple[str, Digest, bytes | memoryview, int]],
    fsync: bool,
    mode: int,
) -> list[str | bool | OSError]:
    outcomes: list[str | bool | OSError] = []
    for target, digest, data, stamp in jobs:
        try:
            outcomes.append(_put_small(temp_dir, target, digest, data, stamp, fsync, mode))
        except OSError as exc:
            outcomes.append(exc)
    return outcomes


class DiskBlobStore(IndexedBlobStore):
    """A :class:`~rexcore.artifacts.store.BlobStore` of files under ``root``.

    Construction does no I/O; the first call (or :meth:`open`) scans the root, removes
    stale temp files and evicts down to ``max_size`` (``None`` is no cap). Several
    processes may open one root safely (each temp file is locked by its writer), but each
    keeps its own index and cap: let one of them own writes and eviction.
    """

    def __init__(
        self,
        root: Path,
        *,
        max_size: int | None = 10 << 30,
        fsync: bool = False,
        file_mode: int = 0o444,
        scan: bool = True,
    ) -> None:
        super().__init__(max_size, where=str(root))
        self.root = root
        self._root = str(root)
        #: Mode of every blob file: read-only (0444), or 0555 for a store of executables.
        self._file_mode = file_mode
        #: Index every blob on open (and clean up stale temp files). A store opened on
        #: another process's root (a local worker on the coordinator's) skips that: it
        #: finds each blob on first use, with one stat.
        self._scan_on_open = scan
        # A store that scans its root owns it: blobs another process publishes there reach
        # its index through refresh() (the scheduler refreshes each result's outputs), so
        # a miss costs no stat. A store opened without a scan shares a root it does not
        # own (a local worker's), and looks on disk when its index misses.
        self._shared = not scan
        self._temp_dir = os.path.join(self._root, "tmp")
        self._fsync = fsync
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=min(8, (os.cpu_count() or 1) + 2), thread_name_prefix="rex-disk-store"
        )
        self._loaded = False
        self._load_lock = asyncio.Lock()
        self._dropping: dict[Digest, asyncio.Future[None]] = {}
        self._recent: dict[Digest, None] = {}
        self._last_recency_flush = time.monotonic()
        self._recency_flush: asyncio.Task[None] | None = None
        self._last_stamp = 0

    async def _run(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    def _path(self, digest: Digest) -> str:
        return _blob_path(self._root, digest.function, digest.hash)

    def _stamp(self) -> int:
        """A strictly increasing mtime in ns, so uses recorded close together keep order."""
        self._last_stamp = max(time.time_ns(), self._last_stamp + 1)
        return self._last_stamp

    def _read_error(self, exc: OSError, digest: Digest) -> StorageError:
        if isinstance(exc, FileNotFoundError):
            self._index.discard(digest)  # removed behind our back
            return BlobNotFoundError(digest)
        return StorageError(
            f"cannot read blob {digest} at {self._path(digest)}: {exc.strerror or exc}; "
            "check the disk, or delete the file so the blob is uploaded again"
        )

    def _write_error(self, exc: OSError, digest: Digest) -> StorageError:
        where = exc.filename or self._temp_dir
        if exc.errno in _DISK_FULL:
            return StoreFullError(
                f"no space left on the disk holding the blob store at {self._root} ({where}) "
                f"while writing blob {digest}; nothing was stored: free disk space or lower "
                f"max_size ({CAP_OPTION}) below the free space"
            )
        return StorageError(
            f"cannot write blob {digest} to the blob store at {self._root} ({where}): "
            f"{exc.strerror or exc}; nothing was stored: check the directory's permissions "
            "and the disk"
        )

    async def open(self) -> DiskBlobStore:
        """Load the index now rather than on first use."""
        await self._ready()
        return self

    async def _ready(self) -> None:
        self._check_open()
        if self._loaded:
            return
        async with self._load_lock:
            if self._loaded:
                return
            try:
                found, newest = await self._run(
                    _scan if self._scan_on_open else _prepare, self._root, self._file_mode
                )
            except OSError as exc:
                raise StorageError(
                    f"cannot open the blob store at {self._root}: {exc}; check that the "
                    "directory is writable, or set storage.blob_store.options.path"
                ) from exc
            self._index.load(found)
            self._last_stamp = max(self._last_stamp, newest)
            self._loaded = True
            victims = self._index.trim()
            if victims:
                await self._drop(victims)

    def _touch(self, digest: Digest) -> bool:
        if not self._index.touch(digest) and not (
            self._shared and self._adopt(digest, self._stat_blob(digest))
        ):
            return False
        self._note_use(digest)
        return True

    def _stat_blob(self, digest: Digest) -> bool:
        """Whether a complete blob file for ``digest`` is on disk (another process may
        have published it on this root since the index was loaded)."""
        return _blob_file_present(self._path(digest), digest.size)

    def _adopt(self, digest: Digest, present: bool) -> bool:
        if not present or digest in self._dropping:  # an eviction of ours is deleting it
            return False
        self._index.add(digest)
        return True

    async def find_missing(self, digests: Iterable[Digest]) -> list[Digest]:
        await self._ready()
        seen: set[Digest] = set()
        unindexed: list[Digest] = []
        for digest in digests:
            if digest in seen or digest.is_empty:
                continue
            seen.add(digest)
            if self._index.touch(digest):
                self._note_use(digest)
            else:
                unindexed.append(digest)
        if not unindexed:
            return []
        if not self._shared:
            return unindexed
        if len(unindexed) <= _INLINE_STATS:
            present = [self._stat_blob(digest) for digest in unindexed]
        else:
            present = await self._run(
                _blob_files_present, [(self._path(d), d.size) for d in unindexed]
            )
        missing = []
        for digest, there in zip(unindexed, present):
            if self._adopt(digest, there):
                self._note_use(digest)
            else:
                missing.append(digest)
        return missing

    def refresh(self, digest: Digest) -> bool:
        """Check the blob's file again; forget the blob if it is gone (another process on
        this root evicted it). Whether the blob is present."""
        if digest.is_empty:
            return True
        present = self._stat_blob(digest)
        if not present:
            self._index.discard(digest)
        elif digest not in self._index:
            self._adopt(digest, present)
        return present

    async def link_file(self, digest: Digest, path: Path) -> bool:
        """Publish the file at ``path`` as blob ``digest`` by hardlinking it: no copy and
        no second read. The caller vouches that its bytes hash to ``digest`` (it hashed
        them itself) and that nothing else can write to the file; the file becomes
        read-only (the store's mode) and keeps its other names. Raises OSError, with
        ``errno.EXDEV`` when ``path`` is on another file system (then copy it in with
        :meth:`open_write`). Returns whether the blob was new to the store."""
        await self._ready()
        if digest.is_empty or self._touch(digest):
            return False
        dropping = self._dropping.get(digest)
        if dropping is not None:
            await asyncio.wait([dropping])
        await self._make_room(digest)
        try:
            added = await self._run(
                _link_file, str(path), self._path(digest), self._stamp(), self._file_mode,
                self._fsync,
            )
        finally:
            self._index.release(digest)
        self._index.add(digest)
        if not added:
            self._note_use(digest)
        return added

    def _note_use(self, digest: Digest) -> None:
        recent = self._recent
        recent.pop(digest, None)
        recent[digest] = None
        if self._recency_flush is None and (
            len(recent) >= _RECENCY_BATCH
            or time.monotonic() - self._last_recency_flush >= _RECENCY_INTERVAL
        ):
            try:
                self._recency_flush = asyncio.get_running_loop().create_task(self._flush_recency())
            except RuntimeError:  # no loop (a sync caller): the next use or close flushes
                pass

    async def _flush_recency(self) -> None:
        try:
            # Stamped in order of use, which is the index's order among these blobs.
            stamps = [(self._path(d), self._stamp()) for d in self._recent if d in self._index]
            self._recent.clear()
            self._last_recency_flush = time.monotonic()
            if stamps:
                await self._run(_set_mtimes, stamps)
        finally:
            self._recency_flush = None

    async def _drop(self, digests: list[Digest]) -> None:
        done = asyncio.ensure_future(self._run(_remove_all, [self._path(d) for d in digests]))
        for digest in digests:
            self._dropping[digest] = done

        def forget(_: object) -> None:
            for digest in digests:
                if self._dropping.get(digest) is done:
                    del self._dropping[digest]

        done.add_done_callback(forget)
        await asyncio.shield(done)

    async def get(self, digest: Digest) -> bytes:
        await self._require(digest)
        if digest.is_empty:
            return b""
        try:
            return await self._run(_read_whole, self._path(digest))
        except OSError as exc:
            raise self._read_error(exc, digest) from exc

    async def read(
        self, digest: Digest, offset: int = 0, limit: int | None = None
    ) -> AsyncIterator[bytes]:
        await self._require(digest)
        remaining = check_range(digest, offset, limit)
        if not remaining:
            return
        try:
            file, chunk = await self._run(_open_and_read, self._path(digest), offset, remaining)
        except OSError as exc:
            raise self._read_error(exc, digest) from exc
        # Read-ahead: the next chunk is read in a thread while the caller sends this one.
        ahead: concurrent.futures.Future[bytes] | None = None
        try:
            while True:
                if not chunk:
                    raise StorageError(
                        f"blob {digest} at {self._path(digest)} is shorter than its digest "
                        "says; delete the file so the blob is uploaded again"
                    )
                remaining -= len(chunk)
                if not remaining or file is None:
                    yield chunk
                    return
                ahead = self._executor.submit(file.read, min(remaining, _READ_CHUNK))
                yield chunk
                try:
                    chunk = await asyncio.wrap_future(ahead)
                except OSError as exc:
                    raise self._read_error(exc, digest) from exc
                ahead = None
        finally:
            if file is not None:
                if ahead is not None and not ahead.done():
                    # Never close a file a thread reads: close it once the read is over.
                    ahead.add_done_callback(lambda _: file.close())
                else:
                    file.close()

    async def put(self, digest: Digest, data: bytes | memoryview) -> None:
        """Store an in-memory blob; a small one costs a single thread hop (hash, write,
        publish), where the streaming writer takes three."""
        await self.put_many({digest: data})

    def writes_inline(self, size: int) -> bool:
        """Whether small blobs of ``size`` bytes in all are written on the calling thread
        (:data:`INLINE_PUT`; never with ``fsync``, which would stall an event loop)."""
        return size <= INLINE_PUT and not self._fsync

    async def put_many(self, blobs: Mapping[Digest, bytes | memoryview]) -> None:
        """Store several in-memory blobs; all the small ones in one thread hop, or right
        here when they are tiny (:meth:`writes_inline`). Raises the first failure
        (:class:`DigestMismatchError`, :class:`StoreFullError`...); the blobs that were
        fine are stored all the same."""
        small = {
            d: data for d, data in blobs.items() if len(data) == d.size and 0 < d.size <= _SMALL_PUT
        }
        for digest, data in blobs.items():
            if digest not in small:
                await super().put(digest, data)  # also reports a size mismatch
        if not small:
            return
        await self._ready()
        reserved: list[Digest] = []
        try:
            for digest in small:
                if digest not in self._index:  # rewriting a held blob needs no room
                    await self._make_room(digest)
                    reserved.append(digest)
                dropping = self._dropping.get(digest)
                if dropping is not None:  # an eviction of this very blob is deleting it
                    await asyncio.wait([dropping])
            jobs = [(self._path(d), d, data, self._stamp()) for d, data in small.items()]
            if self.writes_inline(sum(map(len, small.values()))):
                outcomes = _put_small_many(self._temp_dir, jobs, self._fsync, self._file_mode)
            else:
                outcomes = await self._run(
                    _put_small_many, self._temp_dir, jobs, self._fsync, self._file_mode
                )
        finally:
            for digest in reserved:
                self._index.release(digest)
        failure: StorageError | None = None
        for (_, digest, data, _), outcome in zip(jobs, outcomes):
            if isinstance(outcome, OSError):
                failure = failure or self._write_error(outcome, digest)
            elif isinstance(outcome, str):
                failure = failure or DigestMismatchError(digest, outcome, len(data))
            else:
                self._index.add(digest)
                if not outcome:
                    self._note_use(digest)
        if failure is not None:
            raise failure

    def open_write(self, digest: Digest) -> _DiskBlobWriter:
        self._check_open()
        return _DiskBlobWriter(digest, self)

    def local_path(self, digest: Digest) -> Path | None:
        if not self._loaded or not (digest.is_empty or self._touch(digest)):
            return None
        return Path(self._path(digest))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._recency_flush is not None:
            await self._recency_flush
        if self._loaded:
            await self._flush_recency()
        if self._dropping:
            await asyncio.wait(set(self._dropping.values()))
        await asyncio.to_thread(self._executor.shutdown)


def create_disk_store(options: DiskStoreOptions, context: ComponentContext) -> DiskBlobStore:
    """The ``disk`` descriptor's factory."""
    root = Path(options.path).expanduser() if options.path else Path("cas")
    return DiskBlobStore(context.data_dir / root, max_size=options.max_size, fsync=options.fsync)
