"""ContentAddressableStorage, ByteStream and Capabilities."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import time
from collections.abc import AsyncIterator

import attrs
import grpc
import zstandard
from google.rpc import code_pb2

from rex_reapi.backend import ReapiBackend, streaming, unary
from rex_reapi.convert import INLINE_READ, RecentBlobs, get_many, invalid
from rex_reapi.digests import function_value, to_proto, to_rex
from rex_reapi.errors import ReapiError, missing_blobs_error, rpc_status
from rex_reapi.local_reads import open_blob_file, stream_blob_file
from rex_reapi.proto import bytestream_pb2 as bs_pb2
from rex_reapi.proto import bytestream_pb2_grpc as bs_grpc
from rex_reapi.proto import remote_execution_pb2 as re_pb2
from rex_reapi.proto import remote_execution_pb2_grpc as re_grpc
from rex_reapi.proto import semver_pb2
from rex_reapi.resource_names import parse_read_name, parse_write_name
from rex_reapi.wire import MalformedMessageError, WriteChunk, encode_read_response
from rexcore.artifacts.chunk_store import splice_chunks, split_stored_blob
from rexcore.artifacts.digest import Digest
from rexcore.artifacts.manifest import (
    REAPI_CHUNKING,
    BlobMismatchError,
    InvalidManifestError,
    MissingChunksError,
)
from rexcore.artifacts.store import (
    BlobNotFoundError,
    BlobStore,
    BlobWriter,
    DigestMismatchError,
    StorageError,
    StoreFullError,
    put_blobs,
)

__all__ = ["ByteStreamService", "CapabilitiesService", "CasService"]

_Compressor = re_pb2.Compressor.Value
_Chunking = re_pb2.ChunkingFunction.Value
#: How SplitBlob cuts (advertised in Capabilities): FastCDC 2020, the REAPI parameters.
CHUNKING = REAPI_CHUNKING
#: Unfinished ByteStream uploads are kept this long after their last message, for resume.
UPLOAD_IDLE_S = 600.0
#: REAPI versions served: 2.0 (Bazel 4) through 2.3.
LOW_API = semver_pb2.SemVer(major=2, minor=0)
HIGH_API = semver_pb2.SemVer(major=2, minor=3)


class CapabilitiesService(re_grpc.CapabilitiesServicer):
    def __init__(self, backend: ReapiBackend) -> None:
        self.backend = backend

    @unary
    async def GetCapabilities(self, request: re_pb2.GetCapabilitiesRequest,
                              context: grpc.aio.ServicerContext) -> re_pb2.ServerCapabilities:
        backend = self.backend
        backend.check_instance(request.instance_name)
        functions = [function_value(f) for f in backend.functions]
        capabilities = re_pb2.ServerCapabilities(
            cache_capabilities=re_pb2.CacheCapabilities(
                digest_functions=functions,
                action_cache_update_capabilities=re_pb2.ActionCacheUpdateCapabilities(
                    update_enabled=backend.updates_allowed),
                max_batch_total_size_bytes=backend.options.max_batch_total_size,
                symlink_absolute_path_strategy=re_pb2.SymlinkAbsolutePathStrategy.DISALLOWED,
                supported_compressors=[_Compressor.ZSTD],
                supported_batch_update_compressors=[_Compressor.ZSTD],
                split_blob_support=True,
                splice_blob_support=True,
                fast_cdc_2020_params=re_pb2.FastCdc2020Params(
                    avg_chunk_size_bytes=CHUNKING.avg_size, seed=CHUNKING.seed),
            ),
            deprecated_api_version=LOW_API,
            low_api_version=LOW_API,
            high_api_version=HIGH_API,
        )
        scheduler = backend.runtime.scheduler
        if scheduler is not None:
            capabilities.execution_capabilities.CopyFrom(re_pb2.ExecutionCapabilities(
                digest_function=functions[0],
                digest_functions=functions,
                exec_enabled=True,
                execution_priority_capabilities=re_pb2.PriorityCapabilities(priorities=[
                    re_pb2.PriorityCapabilities.PriorityRange(min_priority=-(2**31),
                                                              max_priority=2**31 - 1)]),
            ))
        return capabilities


def _decompress(data: bytes, digest: Digest) -> bytes:
    try:
        return zstandard.ZstdDecompressor().decompress(data, max_output_size=digest.size)
    except zstandard.ZstdError as exc:
        raise invalid(f"blob {digest}: the zstd data does not decompress: {exc}") from None


class CasService(re_grpc.ContentAddressableStorageServicer):
    def __init__(self, backend: ReapiBackend) -> None:
        self.backend = backend

    @unary
    async def FindMissingBlobs(self, request: re_pb2.FindMissingBlobsRequest,
                               context: grpc.aio.ServicerContext) -> re_pb2.FindMissingBlobsResponse:
        self.backend.check_instance(request.instance_name)
        function = self.backend.function(request.digest_function)
        digests = [to_rex(d, function, "blob_digests") for d in request.blob_digests]
        missing = await self.backend.store.find_missing(digests)
        return re_pb2.FindMissingBlobsResponse(missing_blob_digests=[to_proto(d) for d in missing])

    def _check_batch(self, sizes: list[int], what: str) -> None:
        total, limit = sum(sizes), self.backend.options.max_batch_total_size
        if total > limit:
            raise invalid(f"{what} of {total} bytes is over the limit of {limit} bytes "
                          "(max_batch_total_size_bytes); use ByteStream for large blobs")

    @unary
    async def BatchUpdateBlobs(self, request: re_pb2.BatchUpdateBlobsRequest,
                               context: grpc.aio.ServicerContext) -> re_pb2.BatchUpdateBlobsResponse:
        backend = self.backend
        backend.check_instance(request.instance_name)
        function = backend.function(request.digest_function)
        self._check_batch([len(r.data) for r in request.requests], "BatchUpdateBlobs")

        async def update(one: re_pb2.BatchUpdateBlobsRequest.Request) -> object:
            try:
                digest = to_rex(one.digest, function, "digest")
                if one.compressor == _Compressor.ZSTD:
                    data = _decompress(one.data, digest)
                elif one.compressor == _Compressor.IDENTITY:
                    data = one.data
                else:
                    raise invalid(f"compressor {one.compressor} is not served (use ZSTD)")
                await backend.store.put(digest, data)
                backend.recent.remember(digest, data)
                return rpc_status(code_pb2.OK)
            except ReapiError as exc:
                return exc.status()
            except DigestMismatchError as exc:
                return rpc_status(code_pb2.INVALID_ARGUMENT, str(exc))
            except StoreFullError as exc:
                return rpc_status(code_pb2.RESOURCE_EXHAUSTED, str(exc))
            except StorageError as exc:
                return rpc_status(code_pb2.INTERNAL, str(exc))

        statuses = await asyncio.gather(*(update(one) for one in request.requests))
        return re_pb2.BatchUpdateBlobsResponse(responses=[
            re_pb2.BatchUpdateBlobsResponse.Response(digest=one.digest, status=status)
            for one, status in zip(request.requests, statuses)
        ])

    @unary
    async def BatchReadBlobs(self, request: re_pb2.BatchReadBlobsRequest,
                             context: grpc.aio.ServicerContext) -> re_pb2.BatchReadBlobsResponse:
        backend = self.backend
        backend.check_instance(request.instance_name)
        function = backend.function(request.digest_function)
        digests = [to_rex(d, function, "digests") for d in request.digests]
        self._check_batch([d.size for d in digests], "BatchReadBlobs")
        blobs = await get_many(backend.store, digests)
        response = re_pb2.BatchReadBlobsResponse()
        for proto, digest, blob in zip(request.digests, digests, blobs):
            one = response.responses.add(digest=proto)
            if isinstance(blob, BlobNotFoundError):
                one.status.CopyFrom(rpc_status(code_pb2.NOT_FOUND, f"blob {digest} is not in the CAS"))
            elif isinstance(blob, StorageError):
                one.status.CopyFrom(rpc_status(code_pb2.INTERNAL, str(blob)))
            elif isinstance(blob, BaseException):
                raise blob
            else:
                one.data = blob
                one.status.CopyFrom(rpc_status(code_pb2.OK))
        return response

    @streaming
    async def GetTree(self, request: re_pb2.GetTreeRequest,
                      context: grpc.aio.ServicerContext) -> AsyncIterator[re_pb2.GetTreeResponse]:
        backend = self.backend
        backend.check_instance(request.instance_name)
        function = backend.function(request.digest_function)
        root = to_rex(request.root_digest, function, "root_digest")
        if request.page_size < 0:
            raise invalid(f"page_size {request.page_size} is negative")
        page_size = min(request.page_size or backend.options.max_tree_page_size,
                        backend.options.max_tree_page_size)
        skip = _page_offset(request.page_token)
        # Breadth-first, children in Directory order, each directory once: stable for one
        # tree, so a page token (an offset into that order) resumes where a page ended.
        seen: set[Digest] = {root}
        level = [root]
        position = 0
        page = re_pb2.GetTreeResponse()
        first = True
        while level:
            blobs = await get_many(backend.store, level)
            next_level: list[Digest] = []
            for digest, blob in zip(level, blobs):
                if isinstance(blob, BlobNotFoundError):
                    if first:
                        raise ReapiError(grpc.StatusCode.NOT_FOUND,
                                         f"the tree root {digest} is not in the CAS")
                    continue  # the spec: return what is present, omit the rest
                if isinstance(blob, BaseException):
                    raise blob
                first = False
                directory = re_pb2.Directory()
                try:
                    directory.ParseFromString(blob)
                except Exception:
                    raise invalid(f"directory {digest} is not a valid Directory message") from None
                for node in directory.directories:
                    child = to_rex(node.digest, function, "directory node")
                    if child not in seen:
                        seen.add(child)
                        next_level.append(child)
                if position >= skip:
                    # A full page goes out only once another directory follows: the last
                    # page must carry no token (the spec: a token means more results).
                    if len(page.directories) >= page_size:
                        page.next_page_token = _page_token(position)
                        yield page
                        page = re_pb2.GetTreeResponse()
                    page.directories.append(directory)
                position += 1
            level = next_level
        if page.directories or position <= skip:
            yield page

    @unary
    async def SplitBlob(self, request: re_pb2.SplitBlobRequest,
                        context: grpc.aio.ServicerContext) -> re_pb2.SplitBlobResponse:
        backend = self.backend
        backend.check_instance(request.instance_name)
        function = backend.function(request.digest_function)
        blob = to_rex(request.blob_digest, function, "blob_digest")
        if request.chunking_function not in (_Chunking.UNKNOWN, _Chunking.FAST_CDC_2020):
            raise invalid(f"chunking function {_chunking_name(request.chunking_function)} is "
                          "not served; rex splits with FAST_CDC_2020 (see GetCapabilities)")
        try:
            manifest = await split_stored_blob(backend.store, blob, CHUNKING)
        except BlobNotFoundError:
            raise ReapiError(grpc.StatusCode.NOT_FOUND,
                             f"blob {blob} is not in the CAS; upload it before splitting it") from None
        except BlobMismatchError as exc:
            raise ReapiError(grpc.StatusCode.DATA_LOSS, str(exc)) from None
        return re_pb2.SplitBlobResponse(chunk_digests=[to_proto(c) for c in manifest.chunks],
                                        chunking_function=_Chunking.FAST_CDC_2020)

    @unary
    async def SpliceBlob(self, request: re_pb2.SpliceBlobRequest,
                         context: grpc.aio.ServicerContext) -> re_pb2.SpliceBlobResponse:
        backend = self.backend
        backend.check_instance(request.instance_name)
        function = backend.function(request.digest_function)
        blob = to_rex(request.blob_digest, function, "blob_digest")
        chunks = [to_rex(d, function, "chunk_digests") for d in request.chunk_digests]
        try:
            # The chunks stream into a store writer that verifies the whole against
            # blob_digest before publishing it: a bad splice stores nothing.
            await splice_chunks(backend.store, blob, chunks)
        except MissingChunksError as exc:
            error = missing_blobs_error(exc.missing, "chunk list")
            shown = ", ".join(str(d) for d in exc.missing[:5])
            error.message = (f"{len(exc.missing)} chunk(s) of {blob} are not in the CAS "
                             f"({shown}); upload them, then splice again")
            raise error from None
        except (InvalidManifestError, BlobMismatchError) as exc:
            raise invalid(str(exc)) from None
        return re_pb2.SpliceBlobResponse(blob_digest=to_proto(blob))


def _chunking_name(value: int) -> str:
    try:
        return _Chunking.Name(value)
    except ValueError:
        return str(value)


def _page_token(offset: int) -> str:
    return base64.urlsafe_b64encode(f"rex-tree:{offset}".encode()).decode()


def _page_offset(token: str) -> int:
    if not token:
        return 0
    try:
        text = base64.urlsafe_b64decode(token.encode()).decode()
        prefix, _, number = text.partition(":")
        if prefix == "rex-tree" and number.isdigit():
            return int(number)
    except (ValueError, UnicodeDecodeError):
        pass
    raise invalid(f"page_token {token!r} was not issued by this server's GetTree")


#: Uploads up to this size are gathered in memory and stored in one call (one thread hop
#: in the disk store) instead of streaming through a store writer (one hop per message
#: plus opening and publishing): Bazel uploads every small input through ByteStream.
SMALL_UPLOAD = 1 << 20


class _BufferedWriter:
    """A BlobWriter for small blobs: the bytes wait in memory until ``commit`` stores them.
    Views of ``bytes`` (the Write handler's payloads) are kept as they are, not copied: a
    blob sent in one message is stored straight from the message."""

    def __init__(self, store: BlobStore, digest: Digest, recent: RecentBlobs) -> None:
        self.digest = digest
        self._store = store
        self._recent = recent
        self._pieces: list[bytes | memoryview] = []

    async def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        self._pieces.append(view if type(view.obj) is bytes else bytes(view))

    async def commit(self) -> None:
        pieces = self._pieces
        # put_blobs: a blob of a few KiB (most of Bazel's uploads) is stored right here.
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        await put_blobs(self._store, {self.digest: data})
        self._recent.remember(self.digest, data)

    async def abort(self) -> None:
        self._pieces.clear()


def _open_writer(store: BlobStore, digest: Digest, recent: RecentBlobs) -> BlobWriter:
    if digest.size <= SMALL_UPLOAD:
        return _BufferedWriter(store, digest, recent)  # type: ignore[return-value]
    return store.open_write(digest)


@attrs.define(eq=False)
class _Upload:
    """An unfinished ByteStream write: what has arrived, for QueryWriteStatus and resume."""

    digest: Digest
    compressed: bool
    writer: BlobWriter
    #: Bytes received so far, counted as the client counts write_offset.
    received: int = 0
    decompressor: zstandard.ZstdDecompressionObj | None = None
    written: int = 0
    last_used: float = attrs.field(factory=time.monotonic)
    lock: asyncio.Lock = attrs.field(factory=asyncio.Lock)


class ByteStreamService(bs_grpc.ByteStreamServicer):
    def __init__(self, backend: ReapiBackend) -> None:
        self.backend = backend
        self._uploads: dict[str, _Upload] = {}
        self._sweeper: asyncio.Task[None] | None = None
        #: Reads of local blob files (``local_reads``).
        self._readers = concurrent.futures.ThreadPoolExecutor(
            max_workers=4, thread_name_prefix="rex-reapi-read")

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for upload in self._uploads.values():
            with contextlib.suppress(Exception):
                await upload.writer.abort()
        self._uploads.clear()
        await asyncio.to_thread(self._readers.shutdown)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(UPLOAD_IDLE_S / 4)
            now = time.monotonic()
            for name, upload in list(self._uploads.items()):
                if now - upload.last_used > UPLOAD_IDLE_S and not upload.lock.locked():
                    self._uploads.pop(name, None)
                    with contextlib.suppress(Exception):
                        await upload.writer.abort()

    @streaming
    async def Read(self, request: bs_pb2.ReadRequest,
                   context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        backend = self.backend
        name = parse_read_name(request.resource_name, backend.functions)
        backend.check_instance(name.instance_name)
        digest = name.digest
        if request.read_offset < 0 or request.read_offset > digest.size:
            raise ReapiError(grpc.StatusCode.OUT_OF_RANGE,
                             f"read_offset {request.read_offset} is outside blob {digest} "
                             f"(0..{digest.size})")
        if request.read_limit < 0:
            raise ReapiError(grpc.StatusCode.OUT_OF_RANGE,
                             f"read_limit {request.read_limit} is negative")
        if name.compressor != "identity" and request.read_limit:
            raise invalid("read_limit must be 0 when reading compressed-blobs/")
        offset, limit = request.read_offset, request.read_limit or None
        chunk = backend.options.read_chunk_size
        store = backend.store
        if name.compressor == "identity":
            end = digest.size if limit is None else min(digest.size, offset + limit)
            if digest.size <= INLINE_READ:
                # A small blob (most outputs, stdout, stderr) in one response, read right
                # here: the trips to a thread to open and read it cost more.
                [data] = await get_many(store, [digest])
                if isinstance(data, BlobNotFoundError):
                    raise ReapiError(grpc.StatusCode.NOT_FOUND,
                                     f"blob {digest} is not in the CAS") from None
                if isinstance(data, BaseException):
                    raise data
                view = memoryview(data)[offset:end]
                for start in range(0, len(view), chunk):
                    yield encode_read_response(view[start:start + chunk])
                return
            # A blob in a local file (the disk store) goes out straight from the file.
            fd = await open_blob_file(store, digest, self._readers)
            if fd is not None:
                async with contextlib.aclosing(stream_blob_file(
                        fd, digest, offset, end, chunk, self._readers)) as messages:
                    async for message in messages:
                        yield message
                return
        try:
            stream = store.read(digest, offset, limit)
            if name.compressor == "zstd":
                compressor = zstandard.ZstdCompressor(level=1).compressobj()
                async for data in stream:
                    out = compressor.compress(data)
                    if out:
                        yield encode_read_response(out)
                yield encode_read_response(compressor.flush())
                return
            async for data in stream:
                view = memoryview(data)
                for start in range(0, len(view), chunk):
                    yield encode_read_response(view[start:start + chunk])
        except BlobNotFoundError:
            raise ReapiError(grpc.StatusCode.NOT_FOUND, f"blob {digest} is not in the CAS") from None

    @unary
    async def Write(self, request_iterator: AsyncIterator[WriteChunk | MalformedMessageError],
                    context: grpc.aio.ServicerContext) -> bs_pb2.WriteResponse:
        backend = self.backend
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep())
        resource = ""
        upload: _Upload | None = None
        try:
            async for request in request_iterator:
                if isinstance(request, MalformedMessageError):
                    raise invalid(f"a WriteRequest is not a valid message ({request})"
                                  + (f" in the Write to {resource}" if resource else ""))
                if upload is None:
                    resource = request.resource_name
                    if not resource:
                        raise invalid("the first WriteRequest must name the resource")
                    name = parse_write_name(resource, backend.functions)
                    backend.check_instance(name.instance_name)
                    digest, compressed = name.digest, name.compressor != "identity"
                    existing = self._uploads.get(resource)
                    if existing is None:
                        if await backend.store.contains(digest):
                            return bs_pb2.WriteResponse(
                                committed_size=-1 if compressed else digest.size)
                        existing = _Upload(
                            digest, compressed, _open_writer(backend.store, digest, backend.recent),
                            decompressor=zstandard.ZstdDecompressor().decompressobj()
                            if compressed else None)
                        self._uploads[resource] = existing
                    if existing.lock.locked():
                        raise ReapiError(grpc.StatusCode.ABORTED,
                                         f"another Write to {resource} is in progress")
                    await existing.lock.acquire()
                    upload = existing
                elif request.resource_name and request.resource_name != resource:
                    raise invalid(f"resource_name changed within one Write ({resource} -> "
                                  f"{request.resource_name})")
                if await self._receive(upload, request, resource):
                    return bs_pb2.WriteResponse(
                        committed_size=-1 if upload.compressed else upload.digest.size)
        finally:
            if upload is not None:
                upload.lock.release()
        if upload is None:
            raise invalid("Write received no requests")
        raise invalid(f"the Write to {resource} ended without finish_write after "
                      f"{upload.received} bytes; resume it with write_offset={upload.received}")

    async def _receive(self, upload: _Upload, request: WriteChunk, resource: str) -> bool:
        """Take one message; True once the blob is verified and stored."""
        upload.last_used = time.monotonic()
        if request.write_offset != upload.received:
            raise invalid(f"write_offset {request.write_offset} does not continue the upload of "
                          f"{resource}, which holds {upload.received} bytes; ask "
                          "QueryWriteStatus where to resume")
        data: bytes | memoryview = request.data
        received = upload.received + len(data)
        if upload.decompressor is not None:
            try:
                data = upload.decompressor.decompress(data)
            except zstandard.ZstdError as exc:
                self._drop(resource)
                raise invalid(f"{resource}: the zstd stream does not decompress: {exc}") from None
        if upload.written + len(data) > upload.digest.size:
            self._drop(resource)
            raise invalid(f"{resource}: more data than the {upload.digest.size} bytes the "
                          "digest names")
        if data:
            try:
                await upload.writer.write(data)
            except BaseException:
                # Cancelled or failed mid-write, the writer holds an unknown part of this
                # message (a store writer discards itself): resume must restart at 0.
                self._drop(resource)
                raise
            upload.written += len(data)
        # Counted only once stored, so QueryWriteStatus never claims bytes the blob lacks.
        upload.received = received
        if not request.finish_write:
            return False
        self._uploads.pop(resource, None)
        if upload.written != upload.digest.size:
            with contextlib.suppress(Exception):
                await upload.writer.abort()
            raise invalid(f"{resource}: finish_write after {upload.written} bytes, but the "
                          f"digest names {upload.digest.size}")
        try:
            await upload.writer.commit()
        except DigestMismatchError as exc:
            raise invalid(f"{resource}: {exc}") from None
        return True

    def _drop(self, resource: str) -> None:
        upload = self._uploads.pop(resource, None)
        if upload is not None:
            task = asyncio.ensure_future(upload.writer.abort())
            task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    @unary
    async def QueryWriteStatus(self, request: bs_pb2.QueryWriteStatusRequest,
                               context: grpc.aio.ServicerContext) -> bs_pb2.QueryWriteStatusResponse:
        backend = self.backend
        name = parse_write_name(request.resource_name, backend.functions)
        backend.check_instance(name.instance_name)
        upload = self._uploads.get(request.resource_name)
        if upload is not None:
            return bs_pb2.QueryWriteStatusResponse(committed_size=upload.received, complete=False)
        if await backend.store.contains(name.digest):
            return bs_pb2.QueryWriteStatusResponse(committed_size=name.digest.size, complete=True)
        raise ReapiError(grpc.StatusCode.NOT_FOUND,
                         f"no upload {request.resource_name} is in progress; start it at offset 0")
