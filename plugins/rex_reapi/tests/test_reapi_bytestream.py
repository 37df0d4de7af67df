"""ByteStream over gRPC: Read with offset and limit, chunked and resumed Writes, resource
names, compressed-blobs/zstd and the blake3 segment."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator

import blake3
import grpc
import pytest
import zstandard
from reapi_fixtures import Reapi, reapi, reapi_config, sha256_digest

_FIXTURES = (reapi, reapi_config)  # pytest finds them by name here
from rex_reapi.cas import SMALL_UPLOAD
from rex_reapi.proto import bytestream_pb2 as bs_pb2
from rex_reapi.proto import remote_execution_pb2 as re_pb2

_Fn = re_pb2.DigestFunction.Value


def _blob_name(digest: re_pb2.Digest, kind: str = "blobs") -> str:
    return f"{kind}/{digest.hash}/{digest.size_bytes}"


def _upload_name(digest: re_pb2.Digest, kind: str = "blobs") -> str:
    return f"uploads/{uuid.uuid4()}/{kind}/{digest.hash}/{digest.size_bytes}"


async def _read(reapi: Reapi, name: str, offset: int = 0, limit: int = 0) -> bytes:
    request = bs_pb2.ReadRequest(resource_name=name, read_offset=offset, read_limit=limit)
    return b"".join([r.data async for r in reapi.bytestream.Read(request)])


async def _read_error(reapi: Reapi, name: str, offset: int = 0, limit: int = 0) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _read(reapi, name, offset, limit)
    return raised.value.code()


def _requests(name: str, data: bytes, chunk: int, start: int = 0,
              finish: bool = True) -> list[bs_pb2.WriteRequest]:
    requests = []
    for offset in range(start, len(data), chunk):
        requests.append(bs_pb2.WriteRequest(
            resource_name=name if offset == start else "", write_offset=offset,
            data=data[offset:offset + chunk]))
    if not requests:
        requests.append(bs_pb2.WriteRequest(resource_name=name, write_offset=start))
    requests[-1].finish_write = finish
    return requests


async def _write(reapi: Reapi, requests: list[bs_pb2.WriteRequest]) -> int:
    async def stream() -> AsyncIterator[bs_pb2.WriteRequest]:
        for request in requests:
            yield request

    return (await reapi.bytestream.Write(stream())).committed_size


async def _write_error(reapi: Reapi, requests: list[bs_pb2.WriteRequest]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _write(reapi, requests)
    return raised.value


async def _is_missing(reapi: Reapi, digest: re_pb2.Digest, function: int = 0) -> bool:
    response = await reapi.cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
        blob_digests=[digest], digest_function=function))
    return bool(response.missing_blob_digests)


# -- Read ---------------------------------------------------------------------------------


async def test_read_whole_blob_and_ranges_by_offset_and_limit(reapi: Reapi) -> None:
    data = bytes(range(256)) * 40
    [digest] = await reapi.upload(data)
    name = _blob_name(digest)
    assert await _read(reapi, name) == data
    assert await _read(reapi, name, offset=1000) == data[1000:]
    assert await _read(reapi, name, offset=1000, limit=17) == data[1000:1017]
    assert await _read(reapi, name, limit=5) == data[:5]
    assert await _read(reapi, name, offset=len(data)) == b""


@pytest.mark.parametrize("reapi_config", [{"protocols": {"reapi": {"read_chunk_size": 1000}}}])
async def test_read_streams_the_blob_in_chunks_of_read_chunk_size(reapi: Reapi) -> None:
    data = os.urandom(4500)
    [digest] = await reapi.upload(data)
    responses = [r.data async for r in reapi.bytestream.Read(
        bs_pb2.ReadRequest(resource_name=_blob_name(digest)))]
    assert b"".join(responses) == data
    assert max(len(r) for r in responses) <= 1000
    assert len(responses) >= 5


async def test_read_offset_beyond_the_blob_is_out_of_range(reapi: Reapi) -> None:
    [digest] = await reapi.upload(b"short")
    assert await _read_error(reapi, _blob_name(digest), offset=6) == grpc.StatusCode.OUT_OF_RANGE
    assert await _read_error(reapi, _blob_name(digest), offset=-1) == grpc.StatusCode.OUT_OF_RANGE


async def test_read_negative_limit_is_out_of_range(reapi: Reapi) -> None:
    [digest] = await reapi.upload(b"short")
    assert await _read_error(reapi, _blob_name(digest), limit=-1) == grpc.StatusCode.OUT_OF_RANGE


async def test_read_of_a_missing_blob_is_not_found(reapi: Reapi) -> None:
    missing = sha256_digest(b"not here")
    assert await _read_error(reapi, _blob_name(missing)) == grpc.StatusCode.NOT_FOUND
    assert await _read_error(reapi, _blob_name(missing, "compressed-blobs/zstd")) == \
        grpc.StatusCode.NOT_FOUND


async def test_read_compressed_blob_decompresses_to_the_blob(reapi: Reapi) -> None:
    data = b"zstd over the wire " * 5000
    [digest] = await reapi.upload(data)
    compressed = await _read(reapi, _blob_name(digest, "compressed-blobs/zstd"))
    assert len(compressed) < len(data)
    assert zstandard.ZstdDecompressor().decompressobj().decompress(compressed) == data


async def test_read_compressed_with_offset_starts_in_the_uncompressed_blob(reapi: Reapi) -> None:
    data = b"0123456789" * 1000
    [digest] = await reapi.upload(data)
    compressed = await _read(reapi, _blob_name(digest, "compressed-blobs/zstd"), offset=5000)
    assert zstandard.ZstdDecompressor().decompressobj().decompress(compressed) == data[5000:]


async def test_read_compressed_with_a_limit_is_invalid_argument(reapi: Reapi) -> None:
    [digest] = await reapi.upload(b"limited")
    assert await _read_error(reapi, _blob_name(digest, "compressed-blobs/zstd"), limit=3) == \
        grpc.StatusCode.INVALID_ARGUMENT


async def test_read_blake3_resource_name(reapi: Reapi) -> None:
    data = b"blake3 bytestream"
    digest = re_pb2.Digest(hash=blake3.blake3(data).hexdigest(), size_bytes=len(data))
    await reapi.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(
        digest_function=_Fn.BLAKE3,
        requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=digest, data=data)]))
    assert await _read(reapi, f"blobs/blake3/{digest.hash}/{digest.size_bytes}") == data
    # Without the segment the hash is read as SHA-256: no such blob.
    assert await _read_error(reapi, _blob_name(digest)) == grpc.StatusCode.NOT_FOUND


async def test_read_empty_blob_needs_no_upload(reapi: Reapi) -> None:
    assert await _read(reapi, _blob_name(sha256_digest(b""))) == b""


@pytest.mark.parametrize("name", [
    "no/kind/here",
    "blobs/" + "a" * 64,
    "blobs/nothex/5",
    "blobs/" + "a" * 63 + "/5",
    "blobs/" + "a" * 64 + "/-5",
    "blobs/" + "a" * 64 + "/five",
    "blobs/md5/" + "a" * 32 + "/5",
    "compressed-blobs/gzip/" + "a" * 64 + "/5",
    "compressed-blobs/identity/" + "a" * 64 + "/5",
    "compressed-blobs/zstd",
    "blobs/" + "a" * 64 + "/5/extra",
    "other-instance/blobs/" + "a" * 64 + "/5",
])
async def test_read_malformed_resource_name_is_invalid_argument(reapi: Reapi, name: str) -> None:
    assert await _read_error(reapi, name) == grpc.StatusCode.INVALID_ARGUMENT


# -- Write --------------------------------------------------------------------------------


async def test_write_in_several_chunks_stores_the_blob(reapi: Reapi) -> None:
    data = os.urandom(100_000)
    digest = sha256_digest(data)
    assert await _write(reapi, _requests(_upload_name(digest), data, 30_000)) == len(data)
    assert await _read(reapi, _blob_name(digest)) == data


async def test_write_with_metadata_after_the_size_is_accepted(reapi: Reapi) -> None:
    data = b"with metadata"
    digest = sha256_digest(data)
    name = _upload_name(digest) + "/some/metadata"
    assert await _write(reapi, _requests(name, data, 4)) == len(data)
    assert not await _is_missing(reapi, digest)


async def test_write_blake3_resource_name(reapi: Reapi) -> None:
    data = os.urandom(5000)
    digest = re_pb2.Digest(hash=blake3.blake3(data).hexdigest(), size_bytes=len(data))
    name = f"uploads/{uuid.uuid4()}/blobs/blake3/{digest.hash}/{digest.size_bytes}"
    assert await _write(reapi, _requests(name, data, 2000)) == len(data)
    assert not await _is_missing(reapi, digest, _Fn.BLAKE3)


async def test_write_compressed_blob_is_stored_uncompressed(reapi: Reapi) -> None:
    data = b"compressible " * 10_000
    digest = sha256_digest(data)
    compressed = zstandard.ZstdCompressor().compress(data)
    name = _upload_name(digest, "compressed-blobs/zstd")
    # write_offset counts compressed bytes, as the spec says.
    assert await _write(reapi, _requests(name, compressed, 100)) in (-1, len(data))
    assert await _read(reapi, _blob_name(digest)) == data


async def test_write_with_digest_mismatch_is_invalid_argument_and_stores_nothing(
    reapi: Reapi,
) -> None:
    data = b"the real bytes"
    digest = sha256_digest(b"other bytes of that len")
    digest.size_bytes = len(data)
    error = await _write_error(reapi, _requests(_upload_name(digest), data, 5))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await _is_missing(reapi, digest)


async def test_write_shorter_or_longer_than_the_digest_is_invalid_argument(reapi: Reapi) -> None:
    data = b"twelve bytes"
    digest = sha256_digest(data)
    short = await _write_error(reapi, _requests(_upload_name(digest), data[:-1], 4))
    assert short.code() == grpc.StatusCode.INVALID_ARGUMENT
    long = await _write_error(reapi, _requests(_upload_name(digest), data + b"!", 4))
    assert long.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await _is_missing(reapi, digest)


async def test_write_of_corrupt_zstd_is_invalid_argument(reapi: Reapi) -> None:
    data = b"x" * 100
    digest = sha256_digest(data)
    name = _upload_name(digest, "compressed-blobs/zstd")
    error = await _write_error(reapi, _requests(name, b"not zstd at all", 100))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await _is_missing(reapi, digest)


async def test_write_of_an_existing_blob_returns_at_once(reapi: Reapi) -> None:
    data = b"already there"
    [digest] = await reapi.upload(data)
    # Uncompressed: the full size (the spec), whatever was sent; no finish_write needed.
    first_only = _requests(_upload_name(digest), data, 4, finish=False)[:1]
    assert await _write(reapi, first_only) == len(data)
    # Compressed: -1.
    compressed = zstandard.ZstdCompressor().compress(data)
    name = _upload_name(digest, "compressed-blobs/zstd")
    assert await _write(reapi, _requests(name, compressed, 4, finish=False)[:1]) == -1


async def test_write_at_a_wrong_offset_is_invalid_argument(reapi: Reapi) -> None:
    data = b"0123456789"
    digest = sha256_digest(data)
    requests = _requests(_upload_name(digest), data, 4)
    requests[1].write_offset = 5
    error = await _write_error(reapi, requests)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    fresh = _requests(_upload_name(digest), data, 4)
    fresh[0].write_offset = 3
    assert (await _write_error(reapi, fresh)).code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await _is_missing(reapi, digest)


async def test_write_without_resource_name_is_invalid_argument(reapi: Reapi) -> None:
    error = await _write_error(reapi, [bs_pb2.WriteRequest(data=b"x", finish_write=True)])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_write_changing_resource_name_midway_is_invalid_argument(reapi: Reapi) -> None:
    data = b"0123456789"
    digest = sha256_digest(data)
    requests = _requests(_upload_name(digest), data, 4)
    requests[1].resource_name = _upload_name(digest)
    assert (await _write_error(reapi, requests)).code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("name", [
    "blobs/{hash}/{size}",  # no uploads/{uuid}/
    "uploads/{uuid}/{hash}/{size}",  # no blobs segment
    "uploads/{uuid}/blobs/nothex/{size}",
    "uploads/{uuid}/blobs/{hash}/big",
    "uploads/{uuid}/blobs/md5/{hash}/{size}",
    "uploads/{uuid}/compressed-blobs/lz4/{hash}/{size}",
    "uploads/{uuid}/blobs/{hash}",
    "elsewhere/uploads/{uuid}/blobs/{hash}/{size}",  # unknown instance
])
async def test_write_malformed_resource_name_is_invalid_argument(reapi: Reapi, name: str) -> None:
    data = b"named badly"
    digest = sha256_digest(data)
    name = name.format(hash=digest.hash, size=digest.size_bytes, uuid=uuid.uuid4())
    error = await _write_error(reapi, _requests(name, data, 100))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await _is_missing(reapi, digest)


async def test_write_ended_without_finish_can_be_resumed(reapi: Reapi) -> None:
    data = os.urandom(10_000)
    digest = sha256_digest(data)
    name = _upload_name(digest)
    error = await _write_error(reapi, _requests(name, data[:4000], 1000, finish=False))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = await reapi.bytestream.QueryWriteStatus(
        bs_pb2.QueryWriteStatusRequest(resource_name=name))
    assert (status.committed_size, status.complete) == (4000, False)
    assert await _write(reapi, _requests(name, data, 3000, start=4000)) == len(data)
    assert await _read(reapi, _blob_name(digest)) == data


async def test_write_broken_midway_resumes_at_the_committed_size(reapi: Reapi) -> None:
    data = os.urandom(64_000)
    digest = sha256_digest(data)
    name = _upload_name(digest)
    sent_enough = asyncio.Event()
    first_part = _requests(name, data, 8000, finish=False)[:3]

    async def broken_stream() -> AsyncIterator[bs_pb2.WriteRequest]:
        for request in first_part:
            yield request
        sent_enough.set()
        await asyncio.Event().wait()  # the connection "hangs" until the client gives up

    call = reapi.bytestream.Write(broken_stream())
    await sent_enough.wait()
    query = bs_pb2.QueryWriteStatusRequest(resource_name=name)
    for _ in range(1000):  # until the server has taken all three messages in
        if (await reapi.bytestream.QueryWriteStatus(query)).committed_size == 24_000:
            break
        await asyncio.sleep(0.01)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    status = await reapi.bytestream.QueryWriteStatus(query)
    assert (status.committed_size, status.complete) == (24_000, False)
    resumed = _requests(name, data, 8000, start=status.committed_size)
    for _ in range(1000):  # the server may not have seen the cancellation yet: ABORTED
        try:
            committed = await _write(reapi, resumed)
            break
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.ABORTED, exc
            await asyncio.sleep(0.01)
    assert committed == len(data)
    assert await _read(reapi, _blob_name(digest)) == data
    done = await reapi.bytestream.QueryWriteStatus(query)
    assert (done.committed_size, done.complete) == (len(data), True)


async def test_compressed_write_resumes_at_the_compressed_offset(reapi: Reapi) -> None:
    data = os.urandom(2000) * 20
    digest = sha256_digest(data)
    compressed = zstandard.ZstdCompressor().compress(data)
    name = _upload_name(digest, "compressed-blobs/zstd")
    half = len(compressed) // 2
    error = await _write_error(reapi, _requests(name, compressed[:half], 100, finish=False))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = await reapi.bytestream.QueryWriteStatus(
        bs_pb2.QueryWriteStatusRequest(resource_name=name))
    assert status.committed_size == half
    await _write(reapi, _requests(name, compressed, 100, start=half))
    assert await _read(reapi, _blob_name(digest)) == data


async def test_query_write_status_of_an_unknown_upload_is_not_found(reapi: Reapi) -> None:
    digest = sha256_digest(b"never started")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await reapi.bytestream.QueryWriteStatus(
            bs_pb2.QueryWriteStatusRequest(resource_name=_upload_name(digest)))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_query_write_status_of_a_stored_blob_is_complete(reapi: Reapi) -> None:
    [digest] = await reapi.upload(b"stored already")
    status = await reapi.bytestream.QueryWriteStatus(
        bs_pb2.QueryWriteStatusRequest(resource_name=_upload_name(digest)))
    assert (status.committed_size, status.complete) == (digest.size_bytes, True)


async def test_query_write_status_with_malformed_name_is_invalid_argument(reapi: Reapi) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await reapi.bytestream.QueryWriteStatus(
            bs_pb2.QueryWriteStatusRequest(resource_name="junk"))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_64_mib_blob_round_trips_through_write_and_read(reapi: Reapi) -> None:
    data = os.urandom(1 << 20) * 64
    digest = sha256_digest(data)
    chunk = 1 << 20

    async def stream() -> AsyncIterator[bs_pb2.WriteRequest]:
        name = _upload_name(digest)
        for offset in range(0, len(data), chunk):
            yield bs_pb2.WriteRequest(
                resource_name=name if offset == 0 else "", write_offset=offset,
                data=data[offset:offset + chunk], finish_write=offset + chunk >= len(data))

    assert (await reapi.bytestream.Write(stream())).committed_size == len(data)
    read = bytearray()
    request = bs_pb2.ReadRequest(resource_name=_blob_name(digest))
    async for response in reapi.bytestream.Read(request):
        read += response.data
    assert len(read) == len(data)
    assert read == data


class _GatedWriter:
    """A store writer whose writes wait at ``gate`` once it is armed (a slow disk)."""

    def __init__(self, inner: object, gate: asyncio.Event, armed: asyncio.Event,
                 entered: asyncio.Event) -> None:
        self._inner, self._gate, self._armed, self._entered = inner, gate, armed, entered
        self.digest = inner.digest  # type: ignore[attr-defined]

    async def write(self, data: bytes) -> None:
        if self._armed.is_set():
            self._entered.set()
            await self._gate.wait()
        await self._inner.write(data)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)


async def test_write_cancelled_while_storing_resumes_where_query_write_status_says(
    reapi: Reapi, monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = reapi.rexd.runtime.blob_store
    gate, armed, entered = asyncio.Event(), asyncio.Event(), asyncio.Event()
    open_write = store.open_write
    monkeypatch.setattr(store, "open_write",
                        lambda digest: _GatedWriter(open_write(digest), gate, armed, entered))
    # Above SMALL_UPLOAD, so the upload streams through a store writer (smaller ones are
    # gathered in memory and stored at finish_write).
    data = os.urandom(SMALL_UPLOAD + 20_000)
    digest = sha256_digest(data)
    name = _upload_name(digest)
    requests = _requests(name, data, 10_000, finish=False)
    query = bs_pb2.QueryWriteStatusRequest(resource_name=name)

    async def stream() -> AsyncIterator[bs_pb2.WriteRequest]:
        yield requests[0]
        for _ in range(1000):  # until the first message is stored
            if (await reapi.bytestream.QueryWriteStatus(query)).committed_size == 10_000:
                break
            await asyncio.sleep(0.01)
        armed.set()
        yield requests[1]  # its write hangs at the gate
        await asyncio.Event().wait()

    call = reapi.bytestream.Write(stream())
    await entered.wait()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    armed.clear()
    gate.set()
    offset = 0
    for _ in range(1000):  # resume as a client does: ask where, continue from there
        try:
            status = await reapi.bytestream.QueryWriteStatus(query)
            offset = status.committed_size
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND
            offset = 0
        try:
            assert await _write(reapi, _requests(name, data, 10_000, start=offset)) == len(data)
            break
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.ABORTED, exc  # the old call still holds it
            await asyncio.sleep(0.01)
    # 0: the cancel dropped the upload; 10,000: it interrupted the gated write; 20,000: the
    # gate opened before the cancel reached the server, so that write completed. Whichever,
    # resuming where QueryWriteStatus said must rebuild the blob exactly.
    assert offset in (0, 10_000, 20_000)
    assert await _read(reapi, _blob_name(digest)) == data


async def test_concurrent_uploads_of_one_blob_under_two_names_both_succeed(reapi: Reapi) -> None:
    data = os.urandom(50_000)
    digest = sha256_digest(data)
    first, second = _upload_name(digest), _upload_name(digest)
    calls = [_write(reapi, _requests(first, data, 5000)),
             _write(reapi, _requests(second, data, 7000))]
    assert await asyncio.gather(*calls) == [len(data), len(data)]
    assert await _read(reapi, _blob_name(digest)) == data


async def test_upload_completed_elsewhere_meanwhile_ends_the_write_at_once(reapi: Reapi) -> None:
    data = os.urandom(20_000)
    digest = sha256_digest(data)
    name = _upload_name(digest)
    error = await _write_error(reapi, _requests(name, data[:5000], 5000, finish=False))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT  # ended without finish_write
    await reapi.upload(data)  # another client uploads the whole blob
    # Resuming the first upload: the blob is there, so the write ends with its full size.
    assert await _write(reapi, _requests(name, data, 5000, start=5000)) == len(data)
    assert await _read(reapi, _blob_name(digest)) == data
