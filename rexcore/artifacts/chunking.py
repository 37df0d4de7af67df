"""Content-defined chunking: FastCDC 2020 with the REAPI parameters, chunks digested.

The cutting is pyfastcdc's (Cython, releases the GIL); it reproduces every boundary of the
REAPI FastCDC 2020 test vectors for normalization 2 and seeds 0 and 666 (see
``tests/test_chunking.py``). Chunk digests use the session's digest function.

Cutting costs about as much per byte as BLAKE3 does, so for anything bigger than a few
chunks one thread cuts while the calling thread hashes the chunks it is handed, in batches
of memoryview slices (never copies). Files are read into a few recycled buffers rather than
mapped: a file truncated underneath cannot kill the process with SIGBUS, and fresh memory,
whose page faults cost more than the read on our VMs, is touched only once.
"""

from __future__ import annotations

import functools
import os
import queue
import threading
from collections.abc import Callable, Iterator
from typing import BinaryIO

import pyfastcdc

from rexcore.artifacts.digest import Digest, DigestFunction, digest_of
from rexcore.artifacts.manifest import REAPI_CHUNKING, ChunkingParams, ChunkManifest

__all__ = [
    "REAPI_CHUNKING",
    "ChunkingParams",
    "chunk_bytes",
    "chunk_digests",
    "chunk_file",
    "file_chunk_digests",
]

Buffer = bytes | bytearray | memoryview
# Chunks in blob order, and what to call once they are hashed (to recycle their buffer).
_Batch = tuple[list[memoryview], Callable[[], None] | None]

# Below this size cutting and hashing share the calling thread: a helper thread costs more
# than the overlap saves for a handful of chunks.
_PIPELINE_MIN = 8 << 20
# Chunks per batch handed from the cutting thread to the hashing one (for in-memory data).
_BATCH = 4
# Batches the cutter may run ahead of the hasher.
_PIPELINE_DEPTH = 8
# File reads: blocks of this size (or 2 * max_size), into at most this many buffers at a
# time per file, recycled between calls.
_READ_BLOCK = 8 << 20
_READ_BUFFERS = 3


def chunk_bytes(
    data: Buffer,
    params: ChunkingParams = REAPI_CHUNKING,
    function: DigestFunction = DigestFunction.BLAKE3,
) -> ChunkManifest:
    """The manifest of an in-memory blob (blob digest included)."""
    view = memoryview(data).cast("B")
    if len(view) < params.max_size:
        whole = digest_of(view, function)
        return ChunkManifest(whole, params, (whole,))
    chunks, blob = _digest_pieces(
        _cut_buffer(view, params), function, with_blob=True, pipeline=len(view) >= _PIPELINE_MIN
    )
    assert blob is not None
    return ChunkManifest(blob, params, chunks)


def chunk_digests(
    data: Buffer,
    params: ChunkingParams = REAPI_CHUNKING,
    function: DigestFunction = DigestFunction.BLAKE3,
) -> list[Digest]:
    """Only the chunk digests of an in-memory blob, in order: the cut and the chunk hashes
    without the whole-blob digest (which any upload computes anyway)."""
    view = memoryview(data).cast("B")
    if len(view) < params.max_size:
        return [digest_of(view, function)]
    chunks, _ = _digest_pieces(
        _cut_buffer(view, params), function, with_blob=False, pipeline=len(view) >= _PIPELINE_MIN
    )
    return chunks


def chunk_file(
    path: str | os.PathLike[str],
    params: ChunkingParams = REAPI_CHUNKING,
    function: DigestFunction = DigestFunction.BLAKE3,
) -> ChunkManifest:
    """The manifest of a file, read once in large blocks. Blocking: call it in a thread."""
    chunks, blob = file_chunk_digests(path, params, function, with_blob=True)
    assert blob is not None
    return ChunkManifest(blob, params, chunks)


def file_chunk_digests(
    path: str | os.PathLike[str],
    params: ChunkingParams,
    function: DigestFunction,
    *,
    with_blob: bool,
) -> tuple[list[Digest], Digest | None]:
    """A file's chunk digests in order and, if asked, its blob digest. Blocking."""
    with open(path, "rb", buffering=0) as file:
        size = os.fstat(file.fileno()).st_size
        if size < params.max_size:
            data = file.read()
            if len(data) < params.max_size:
                blob = digest_of(data, function)
                return [blob], blob
            file.seek(0)  # it grew since the stat
        return _digest_pieces(
            _cut_file(file, params),
            function,
            with_blob=with_blob,
            pipeline=size >= _PIPELINE_MIN,
        )


def _cutter(params: ChunkingParams) -> pyfastcdc.FastCDC:
    return pyfastcdc.FastCDC(
        params.avg_size,
        min_size=params.min_size,
        max_size=params.max_size,
        normalized_chunking=params.normalization,  # type: ignore[arg-type]
        seed=params.seed,
    )


def _cut_buffer(view: memoryview, params: ChunkingParams) -> Iterator[_Batch]:
    batch: list[memoryview] = []
    for chunk in _cutter(params).cut_buf(view):
        batch.append(chunk.data)
        if len(batch) == _BATCH:
            yield batch, None
            batch = []
    if batch:
        yield batch, None


class _BufferPool:
    """Read buffers kept between calls: on our VMs the page faults of fresh memory cost
    more than reading the file into memory that was used before."""

    def __init__(self, keep: int) -> None:
        self._keep = keep
        self._idle: list[bytearray] = []
        self._lock = threading.Lock()

    def take(self, capacity: int) -> bytearray:
        with self._lock:
            for index, buffer in enumerate(self._idle):
                if len(buffer) == capacity:
                    return self._idle.pop(index)
        return bytearray(capacity)

    def give(self, buffer: bytearray) -> None:
        with self._lock:
            if len(self._idle) >= self._keep:
                self._idle.pop(0)
            self._idle.append(buffer)


_POOL = _BufferPool(keep=_READ_BUFFERS)


def _cut_file(file: BinaryIO, params: ChunkingParams) -> Iterator[_Batch]:
    """A file's chunks, one batch per buffer read. A batch's buffer goes back to the pool
    when the hasher releases it; the cutter holds at most ``_READ_BUFFERS`` at once and
    waits for a release before reading on."""
    cutter = _cutter(params)
    capacity = max(_READ_BLOCK, 2 * params.max_size) + params.max_size
    slots = threading.Semaphore(_READ_BUFFERS)

    def take() -> bytearray:
        slots.acquire()
        return _POOL.take(capacity)

    def release(buffer: bytearray) -> None:
        _POOL.give(buffer)
        slots.release()

    buffer, carried = take(), 0
    while True:
        view = memoryview(buffer)
        filled = carried + _read_into(file, view[carried:])
        at_end = filled < capacity
        pieces = iter(cutter.cut_buf(view[:filled]))
        batch: list[memoryview] = []
        start = 0
        # A cut looks at most max_size bytes past the chunk's start; with fewer left in
        # the buffer, the rest waits for the next read so the cut is not made early.
        while start < filled and (at_end or filled - start >= params.max_size):
            batch.append(next(pieces).data)
            start += len(batch[-1])
        done = functools.partial(release, buffer)
        if at_end:
            yield batch, done
            return
        following = take()
        carried = filled - start
        following[:carried] = view[start:filled]
        yield batch, done
        buffer = following


def _read_into(file: BinaryIO, target: memoryview) -> int:
    done = 0
    while done < len(target):
        count = file.readinto(target[done:])  # type: ignore[attr-defined]
        if not count:
            break
        done += count
    return done


def _digest_pieces(
    batches: Iterator[_Batch], function: DigestFunction, *, with_blob: bool, pipeline: bool
) -> tuple[list[Digest], Digest | None]:
    chunks: list[Digest] = []
    blob_hasher = function.hasher() if with_blob else None
    total = 0
    for pieces, release in _handed_over(batches) if pipeline else batches:
        for piece in pieces:
            hasher = function.hasher()
            hasher.update(piece)
            chunks.append(Digest(function, hasher.hexdigest(), len(piece)))
            if blob_hasher is not None:
                blob_hasher.update(piece)
            total += len(piece)
        if release is not None:
            release()
    blob = Digest(function, blob_hasher.hexdigest(), total) if blob_hasher else None
    return chunks, blob


_DONE = object()


def _handed_over(batches: Iterator[_Batch]) -> Iterator[_Batch]:
    """Run ``batches`` in a helper thread and yield what it produces, in order."""
    handoff: queue.Queue[object] = queue.Queue(maxsize=_PIPELINE_DEPTH)
    stop = threading.Event()

    def produce() -> None:
        try:
            for batch in batches:
                while not stop.is_set():
                    try:
                        handoff.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            handoff.put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            handoff.put(exc)

    cutter = threading.Thread(target=produce, name="rex-chunking", daemon=True)
    cutter.start()
    try:
        while (item := handoff.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        while cutter.is_alive():  # unblock a cutter waiting for room or for a buffer
            try:
                dropped = handoff.get(timeout=0.05)
            except queue.Empty:
                continue
            if isinstance(dropped, tuple) and dropped[1] is not None:
                dropped[1]()
        cutter.join()
