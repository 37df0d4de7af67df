"""Chunked transfer: files move as FastCDC chunks through manifests, against a ChunkRemote.

An upload cuts the file (:func:`~rexcore.artifacts.chunking.chunk_file`), asks the remote
which chunks it lacks, sends those (in parallel, zstd-compressed where that pays) and
finally stores the manifest; the remote checks the manifest adds up before it keeps it. An
interrupted upload leaves only whole, verified chunks behind, so running it again sends
just the rest.

A download fetches the manifest, writes chunks into a hidden partial file beside the
destination and renames it into place once the whole blob verifies. Chunks come from, in
order: the partial file of an interrupted download (each re-verified), an older file at the
destination (content-defined chunks survive edits), the remote. Every chunk is verified
against its digest before it is written, and the blob against its digest before the rename.

Any :class:`~rexcore.artifacts.manifest.TransferError` leaves nothing committed: no
destination file, no partial file, no manifest (chunks an upload already stored stay; they
are verified blobs and make the retry cheaper). A cancelled or otherwise interrupted
download keeps its partial file for the next attempt.
"""

from __future__ import annotations

import asyncio
import enum
import os
import threading
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Protocol, TypeVar, runtime_checkable

import attrs
import zstandard

from rexcore.artifacts.chunking import chunk_file, file_chunk_digests
from rexcore.artifacts.digest import Digest, DigestFunction, digest_of
from rexcore.artifacts.manifest import (
    REAPI_CHUNKING,
    BlobMismatchError,
    ChunkingParams,
    ChunkManifest,
    CorruptChunkError,
    InvalidManifestError,
    ManifestNotFoundError,
    MissingChunksError,
    TransferError,
)

__all__ = [
    "BlobMismatchError",
    "ChunkEncoding",
    "ChunkPayload",
    "ChunkRemote",
    "ChunkTransfer",
    "CorruptChunkError",
    "InvalidManifestError",
    "ManifestNotFoundError",
    "MissingChunksError",
    "TransferError",
    "TransferManager",
    "TransferOptions",
    "TransferProgress",
    "TransferReport",
    "TreeReport",
    "decode_chunk",
    "encode_chunk",
    "verify_chunk",
]

_T = TypeVar("_T")
_R = TypeVar("_R")
#: ``progress(done_bytes, total_bytes)``: bytes of the blob in place so far, as chunks land.
TransferProgress = Callable[[int, int], None]


class ChunkEncoding(enum.Enum):
    """How a chunk's bytes travel; the digest is always of the plain bytes."""

    IDENTITY = "identity"
    ZSTD = "zstd"


@attrs.frozen
class ChunkPayload:
    """A chunk as it travels: its bytes in ``encoding``."""

    encoding: ChunkEncoding
    data: bytes = attrs.field(repr=lambda data: f"<{len(data)} bytes>")


# Compression has to save at least this share of a chunk to be worth the receiver's time.
_MIN_SAVING = 1 / 8
# Chunks this small (a blob's tail) are sent as they are.
_COMPRESS_MIN = 1 << 10
# Two samples of this size (start and middle) decide cheaply whether a chunk compresses.
_SAMPLE = 8 << 10
_per_thread = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache: dict[int, zstandard.ZstdCompressor] = _per_thread.__dict__.setdefault("zstd", {})
    if level not in cache:  # compressors are not thread-safe; one per thread and level
        cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return cache[level]


def _pays(packed_size: int, size: int) -> bool:
    return packed_size <= size * (1 - _MIN_SAVING)


def encode_chunk(data: bytes | memoryview, level: int = 3) -> ChunkPayload:
    """``data`` zstd-compressed if that saves at least 1/8, else as it is. Random or
    already-compressed data is recognised from two small samples, so it costs little."""
    size = len(data)
    if size < _COMPRESS_MIN:
        return ChunkPayload(ChunkEncoding.IDENTITY, bytes(data))
    if size > 4 * _SAMPLE:
        probe = _compressor(1)
        middle = size // 2
        samples = (data[:_SAMPLE], data[middle : middle + _SAMPLE])
        if not any(_pays(len(probe.compress(s)), _SAMPLE) for s in samples):
            return ChunkPayload(ChunkEncoding.IDENTITY, bytes(data))
    packed = _compressor(level).compress(data)
    if not _pays(len(packed), size):
        return ChunkPayload(ChunkEncoding.IDENTITY, bytes(data))
    return ChunkPayload(ChunkEncoding.ZSTD, packed)


def decode_chunk(digest: Digest, payload: ChunkPayload) -> bytes:
    """The plain bytes of a payload, checked for size (not hash; see :func:`verify_chunk`).
    A zstd frame may not claim more bytes than the digest's size."""
    if payload.encoding is ChunkEncoding.IDENTITY:
        data = payload.data
    else:
        try:
            declared = zstandard.frame_content_size(payload.data)
            if declared not in (digest.size, zstandard.CONTENTSIZE_UNKNOWN):
                raise CorruptChunkError(
                    digest, f"its zstd frame declares {declared} bytes, the digest {digest.size}"
                )
            data = zstandard.ZstdDecompressor().decompress(
                payload.data, max_output_size=digest.size
            )
        except zstandard.ZstdError as exc:
            raise CorruptChunkError(digest, f"its zstd data does not decompress ({exc})") from exc
    if len(data) != digest.size:
        raise CorruptChunkError(digest, f"{len(data)} bytes arrived, the digest says {digest.size}")
    return data


def verify_chunk(digest: Digest, data: bytes | memoryview) -> None:
    """Raise :class:`CorruptChunkError` unless ``data`` is the chunk ``digest`` names."""
    actual = digest_of(data, digest.function)
    if actual != digest:
        cause = (
            f"{actual.size} bytes arrived, the digest says {digest.size}"
            if actual.size != digest.size
            else f"the bytes hash to {actual.hash}"
        )
        raise CorruptChunkError(digest, cause)


@runtime_checkable
class ChunkRemote(Protocol):
    """The far side of a chunked transfer (a rex server over HTTP, a REAPI CAS, a store in
    this process). A remote verifies what it receives: a chunk against its digest, a
    manifest by checking its chunks are present and make up its blob."""

    async def find_missing(self, digests: Sequence[Digest]) -> list[Digest]:
        """The chunks among ``digests`` the remote lacks."""
        ...

    async def put_chunk(self, digest: Digest, payload: ChunkPayload) -> None:
        """Store one chunk; raises :class:`CorruptChunkError` if it does not verify."""
        ...

    async def get_chunk(self, digest: Digest) -> ChunkPayload:
        """One chunk, in whichever encoding the remote chose; raises
        :class:`MissingChunksError` if absent."""
        ...

    async def put_manifest(self, manifest: ChunkManifest) -> None:
        """Record ``manifest``; raises :class:`MissingChunksError` or
        :class:`BlobMismatchError` and stores nothing if it does not hold up."""
        ...

    async def get_manifest(self, blob: Digest) -> ChunkManifest | None:
        """The manifest of ``blob``, or ``None``; raises :class:`InvalidManifestError` for
        one that does not validate."""
        ...


@attrs.frozen
class TransferOptions:
    """How a :class:`TransferManager` moves chunks."""

    #: Chunks in flight at once, per transfer.
    concurrency: int = attrs.field(default=8, validator=attrs.validators.ge(1))
    #: Whether uploads zstd-compress chunks that compress (downloads take what comes).
    compression: bool = True
    compression_level: int = attrs.field(
        default=3, validator=[attrs.validators.ge(1), attrs.validators.le(19)]
    )


@attrs.frozen
class ChunkTransfer:
    """One chunk that moved: how it was encoded and how many bytes went over the wire."""

    digest: Digest
    encoding: ChunkEncoding
    wire_size: int


@attrs.frozen
class TransferReport:
    """What a transfer did."""

    manifest: ChunkManifest
    #: The distinct chunks that moved, in the order they finished.
    moved: tuple[ChunkTransfer, ...]
    #: Distinct chunks that did not move because the destination already had them.
    reused: int

    @property
    def blob(self) -> Digest:
        return self.manifest.blob

    @property
    def bytes_moved(self) -> int:
        """Plain bytes of the chunks that moved."""
        return sum(t.digest.size for t in self.moved)

    @property
    def wire_bytes(self) -> int:
        """Bytes of the chunks that moved, as encoded."""
        return sum(t.wire_size for t in self.moved)


@attrs.frozen
class TreeReport:
    """What a tree transfer did, per file (POSIX paths relative to the tree's root)."""

    files: Mapping[str, TransferReport]

    @property
    def blobs(self) -> dict[str, Digest]:
        """Each file's blob digest: what :meth:`TransferManager.download_tree` takes."""
        return {path: report.blob for path, report in self.files.items()}

    @property
    def bytes_moved(self) -> int:
        return sum(report.bytes_moved for report in self.files.values())

    @property
    def wire_bytes(self) -> int:
        return sum(report.wire_bytes for report in self.files.values())


class TransferManager:
    """Uploads and downloads files through chunk manifests against a :class:`ChunkRemote`.

    ``function`` is the session's digest function (chunks and blobs of uploads use it);
    ``params`` are the chunking parameters the remote advertises.
    """

    def __init__(
        self,
        remote: ChunkRemote,
        function: DigestFunction = DigestFunction.BLAKE3,
        params: ChunkingParams = REAPI_CHUNKING,
        options: TransferOptions | None = None,
    ) -> None:
        self.remote = remote
        self.function = function
        self.params = params
        self.options = options or TransferOptions()

    async def upload_file(
        self,
        path: str | os.PathLike[str],
        *,
        manifest: ChunkManifest | None = None,
        progress: TransferProgress | None = None,
    ) -> TransferReport:
        """Send the chunks of ``path`` the remote lacks, then its manifest. ``manifest`` is
        the file's, if the caller cut it already (every chunk is verified as it is read)."""
        path = Path(path)
        if manifest is None:
            manifest = await asyncio.to_thread(chunk_file, path, self.params, self.function)
        placements = manifest.placements()
        missing = await self.remote.find_missing(list(placements))
        moved: list[ChunkTransfer] = []
        track = _Tracker(manifest, placements, missing, progress)
        if missing:
            fd = await _in_thread(os.open, path, os.O_RDONLY, discard=os.close)
            try:
                moved = await self._each(
                    missing,
                    lambda chunk: track(self._send(path, fd, chunk, placements[chunk][0])),
                )
            finally:
                os.close(fd)
        size = (await asyncio.to_thread(os.stat, path)).st_size
        if size != manifest.blob.size:
            raise BlobMismatchError(
                f"{path} changed while it was uploaded ({manifest.blob.size} bytes when cut, "
                f"{size} now); no manifest was stored, upload it again"
            )
        if moved or not await self._remote_holds(manifest):
            await self.remote.put_manifest(manifest)
        return TransferReport(manifest, tuple(moved), len(placements) - len(moved))

    async def download_file(
        self,
        blob: Digest,
        path: str | os.PathLike[str],
        *,
        reuse_existing: bool = True,
        progress: TransferProgress | None = None,
    ) -> TransferReport:
        """Fetch ``blob`` into ``path`` (replaced atomically), moving only chunks that are
        not already at hand; ``reuse_existing`` takes chunks from an older ``path``."""
        path = Path(path)
        manifest = await self.remote.get_manifest(blob)
        if manifest is None:
            raise ManifestNotFoundError(blob)
        if manifest.blob != blob:
            raise InvalidManifestError(
                f"asked for the manifest of {blob}, the remote answered with the manifest of "
                f"{manifest.blob}"
            )
        placements = manifest.placements()
        partial = path.with_name(f".{path.name}.{blob.hash[:16]}.rexpart")
        try:
            resuming = await asyncio.to_thread(partial.exists)
            fd = await _in_thread(_open_partial, partial, blob.size, discard=os.close)
            try:
                at_hand: set[Digest] = set()
                if resuming:
                    at_hand |= await _in_thread(_verified_in, fd, placements)
                if reuse_existing and len(at_hand) < len(placements):
                    wanted = {d: o for d, o in placements.items() if d not in at_hand}
                    at_hand |= await _in_thread(_copy_from_file, path, fd, manifest.params, wanted)
                wanted_list = [d for d in placements if d not in at_hand and d.size]
                missing = await self.remote.find_missing(wanted_list) if wanted_list else []
                if missing:
                    raise MissingChunksError(blob, missing, "the remote")
                track = _Tracker(manifest, placements, wanted_list, progress)
                moved = await self._each(
                    wanted_list, lambda chunk: track(self._fetch(fd, chunk, placements[chunk]))
                )
                await _in_thread(_verify_file, fd, blob, path)
            finally:
                os.close(fd)
            await asyncio.to_thread(os.replace, partial, path)
        except TransferError:
            await asyncio.to_thread(partial.unlink, missing_ok=True)
            raise
        return TransferReport(manifest, tuple(moved), len(placements) - len(moved))

    async def upload_tree(
        self, root: str | os.PathLike[str], *, files_at_once: int = 4
    ) -> TreeReport:
        """Upload every regular file under ``root`` (symlinks are not followed nor sent,
        empty directories not recorded), ``files_at_once`` files at a time, each through
        its manifest; chunks shared between files move once."""
        root = Path(root)
        paths = await asyncio.to_thread(_regular_files, root)
        reports = await self._each(
            paths,
            lambda relative: self._tagged(relative, self.upload_file(root / relative)),
            limit=files_at_once,
        )
        return TreeReport(dict(sorted(reports)))

    async def download_tree(
        self,
        blobs: Mapping[str, Digest],
        root: str | os.PathLike[str],
        *,
        files_at_once: int = 4,
    ) -> TreeReport:
        """Fetch each ``{relative path: blob}`` under ``root`` (as :attr:`TreeReport.blobs`
        gives), ``files_at_once`` at a time; files already there lend their chunks. A path
        that would leave ``root`` is refused before anything moves."""
        root = Path(root)
        targets = {relative: root / _inside(relative) for relative in blobs}

        async def fetch(relative: str) -> tuple[str, TransferReport]:
            target = targets[relative]
            await asyncio.to_thread(target.parent.mkdir, parents=True, exist_ok=True)
            return await self._tagged(relative, self.download_file(blobs[relative], target))

        reports = await self._each(list(blobs), fetch, limit=files_at_once)
        return TreeReport(dict(sorted(reports)))

    @staticmethod
    async def _tagged(
        relative: str, transfer: Awaitable[TransferReport]
    ) -> tuple[str, TransferReport]:
        return relative, await transfer

    async def _remote_holds(self, manifest: ChunkManifest) -> bool:
        try:
            return await self.remote.get_manifest(manifest.blob) == manifest
        except InvalidManifestError:
            return False  # a broken one is replaced

    async def _send(self, path: Path, fd: int, chunk: Digest, offset: int) -> ChunkTransfer:
        payload = await _in_thread(self._read_payload, path, fd, chunk, offset)
        await self.remote.put_chunk(chunk, payload)
        return ChunkTransfer(chunk, payload.encoding, len(payload.data))

    def _read_payload(self, path: Path, fd: int, chunk: Digest, offset: int) -> ChunkPayload:
        data = os.pread(fd, chunk.size, offset)
        try:
            verify_chunk(chunk, data)
        except CorruptChunkError:
            raise BlobMismatchError(
                f"{path} changed while it was uploaded: its bytes at offset {offset} are no "
                f"longer chunk {chunk}; no manifest was stored, upload it again"
            ) from None
        if self.options.compression:
            return encode_chunk(data, self.options.compression_level)
        return ChunkPayload(ChunkEncoding.IDENTITY, data)

    async def _fetch(self, fd: int, chunk: Digest, offsets: list[int]) -> ChunkTransfer:
        payload = await self.remote.get_chunk(chunk)
        await _in_thread(_write_chunk, fd, chunk, payload, offsets)
        return ChunkTransfer(chunk, payload.encoding, len(payload.data))

    async def _each(
        self,
        items: Collection[_T],
        step: Callable[[_T], Awaitable[_R]],
        limit: int | None = None,
    ) -> list[_R]:
        """``step`` over ``items``, at most ``limit`` (``options.concurrency``) at a time;
        the first failure cancels the rest and is raised as it is."""
        results: list[_R] = []
        pending = iter(items)

        async def worker() -> None:
            for item in pending:
                results.append(await step(item))

        bound = limit or self.options.concurrency
        workers = [asyncio.create_task(worker()) for _ in range(min(bound, len(items)))]
        try:
            await asyncio.gather(*workers)
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        return results


class _Tracker:
    """Reports progress as chunk transfers finish: the bytes of the blob in place."""

    def __init__(
        self,
        manifest: ChunkManifest,
        placements: dict[Digest, list[int]],
        to_move: Sequence[Digest],
        progress: TransferProgress | None,
    ) -> None:
        self.total = manifest.blob.size
        self.placements = placements
        self.progress = progress
        self.done = self.total - sum(d.size * len(placements[d]) for d in set(to_move))
        if progress is not None:
            progress(self.done, self.total)

    async def __call__(self, transfer: Awaitable[ChunkTransfer]) -> ChunkTransfer:
        moved = await transfer
        if self.progress is not None:
            self.done += moved.digest.size * len(self.placements[moved.digest])
            self.progress(self.done, self.total)
        return moved


async def _in_thread(
    func: Callable[..., _R], *args: object, discard: Callable[[_R], object] | None = None
) -> _R:
    """``func(*args)`` in a thread. Unlike :func:`asyncio.to_thread`, a cancelled caller
    waits for the thread to finish before the cancellation propagates, so a file descriptor
    is never closed (and reused) under a read or write still running; ``discard`` disposes
    of a result nobody will receive."""
    future = asyncio.get_running_loop().run_in_executor(None, func, *args)
    cancelled = False
    while not future.done():
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            if future.cancelled():
                raise
            cancelled = True
    if cancelled:
        if discard is not None and future.exception() is None:
            discard(future.result())
        raise asyncio.CancelledError
    return future.result()


def _regular_files(root: Path) -> list[str]:
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a directory; upload_tree sends a directory")
    found: list[str] = []
    for directory, _, names in os.walk(root):
        for name in names:
            path = Path(directory, name)
            if path.is_file() and not path.is_symlink():
                found.append(path.relative_to(root).as_posix())
    return sorted(found)


def _inside(relative: str) -> PurePosixPath:
    path = PurePosixPath(relative)
    if path.is_absolute() or not path.parts or ".." in path.parts or "\\" in relative:
        raise InvalidManifestError(
            f"tree path {relative!r} would leave the tree's root; paths are relative, "
            "'/'-separated and without '..'; nothing was downloaded"
        )
    return path


def _open_partial(partial: Path, size: int) -> int:
    fd = os.open(partial, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_size != size:
            os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _holds(fd: int, chunk: Digest, offsets: Iterable[int]) -> bool:
    return all(
        digest_of(os.pread(fd, chunk.size, offset), chunk.function) == chunk for offset in offsets
    )


def _verified_in(fd: int, placements: dict[Digest, list[int]]) -> set[Digest]:
    """The chunks a partial file already holds at every place they belong."""
    return {chunk for chunk, offsets in placements.items() if _holds(fd, chunk, offsets)}


def _copy_from_file(
    source: Path, fd: int, params: ChunkingParams, wanted: dict[Digest, list[int]]
) -> set[Digest]:
    """Copy the wanted chunks an existing file holds into the partial file (verified)."""
    if not wanted or not source.is_file():
        return set()
    function = next(iter(wanted)).function
    try:
        chunks, _ = file_chunk_digests(source, params, function, with_blob=False)
        copied: set[Digest] = set()
        with open(source, "rb", buffering=0) as old:
            offset = 0
            for chunk in chunks:
                if chunk in wanted and chunk not in copied:
                    data = os.pread(old.fileno(), chunk.size, offset)
                    if digest_of(data, function) == chunk:  # it may have changed since
                        for target in wanted[chunk]:
                            os.pwrite(fd, data, target)
                        copied.add(chunk)
                offset += chunk.size
    except OSError:
        return set()  # an unreadable old copy is only a missed shortcut
    return copied


def _write_chunk(fd: int, chunk: Digest, payload: ChunkPayload, offsets: list[int]) -> None:
    data = decode_chunk(chunk, payload)
    verify_chunk(chunk, data)
    for offset in offsets:
        os.pwrite(fd, data, offset)


_VERIFY_BLOCK = 8 << 20


def _verify_file(fd: int, blob: Digest, path: Path) -> None:
    hasher = blob.function.hasher(expected_size=blob.size)
    for offset in range(0, blob.size, _VERIFY_BLOCK):
        hasher.update(os.pread(fd, min(_VERIFY_BLOCK, blob.size - offset), offset))
    actual = hasher.hexdigest()
    if actual != blob.hash:
        raise BlobMismatchError(
            f"the chunks of {blob} each verify but together hash to {actual}: the remote's "
            f"manifest is wrong; nothing was written to {path}"
        )
