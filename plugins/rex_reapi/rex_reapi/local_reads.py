"""ByteStream.Read of a blob that the store keeps in a local file (the disk store's).

The ReadResponses are built in a thread a batch at a time (a ``pread`` per batch, then each
response's header joined to its slice), so the event loop only hands finished messages to
gRPC, with one thread hop per batch instead of per chunk, and the next batch is read while
this one is sent.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
from collections.abc import AsyncGenerator

from rex_reapi.wire import encode_read_response
from rexcore.artifacts.digest import Digest
from rexcore.artifacts.store import BlobStore, StorageError

__all__ = ["READ_BATCH", "open_blob_file", "stream_blob_file"]

#: Bytes of a blob turned into ReadResponses per trip to a thread (whole chunks).
READ_BATCH = 4 << 20


async def open_blob_file(store: BlobStore, digest: Digest,
                         executor: concurrent.futures.Executor) -> int | None:
    """A descriptor of the blob's local file, or None when the store keeps none for it
    (no local files, or the blob is not there: the caller then asks the store itself)."""
    if not hasattr(os, "pread"):  # Windows
        return None
    with store.pin([digest]):
        path = store.local_path(digest)
        if path is None:
            return None
        # Opened while pinned: an open file outlives an eviction.
        try:
            return await asyncio.wrap_future(executor.submit(
                os.open, path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)))
        except FileNotFoundError:
            return None  # removed behind the store's back


def _encode_span(fd: int, start: int, end: int, chunk: int) -> tuple[list[bytes], int]:
    """ReadResponses for bytes ``start..end`` of the file, ``chunk`` bytes each, and how
    many bytes they hold (fewer than asked for if the file ends early)."""
    data = os.pread(fd, end - start, start)
    view = memoryview(data)
    messages = [encode_read_response(view[at:at + chunk]) for at in range(0, len(data), chunk)]
    return messages, len(data)


async def stream_blob_file(fd: int, digest: Digest, start: int, end: int, chunk: int,
                           executor: concurrent.futures.Executor) -> AsyncGenerator[bytes, None]:
    """Serialized ReadResponses of bytes ``start..end`` of the blob open as ``fd``;
    closes ``fd`` when done (only once no thread reads it any more)."""
    batch = max(chunk, READ_BATCH - READ_BATCH % chunk)
    ahead: concurrent.futures.Future[tuple[list[bytes], int]] | None = None
    try:
        position = start
        if position < end:
            ahead = executor.submit(_encode_span, fd, position, min(end, position + batch), chunk)
        while ahead is not None:
            messages, got = await asyncio.wrap_future(ahead)
            wanted = min(end, position + batch) - position
            if got < wanted:
                raise StorageError(f"blob {digest} is shorter in its file than its digest says; "
                                   "delete the file so the blob is uploaded again")
            position += wanted
            ahead = None
            if position < end:
                ahead = executor.submit(_encode_span, fd, position, min(end, position + batch),
                                        chunk)
            for message in messages:
                yield message
    finally:
        if ahead is not None and not ahead.done():
            # Never close a file a thread reads: close it once the read is over.
            ahead.add_done_callback(lambda _: os.close(fd))
        else:
            os.close(fd)

