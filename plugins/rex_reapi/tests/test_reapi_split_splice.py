"""SplitBlob and SpliceBlob over gRPC: FastCDC 2020 chunks of stored blobs, blobs rebuilt
from stored chunks only once they verify, and Capabilities saying so."""

from __future__ import annotations

import random

import blake3
import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from reapi_fixtures import Reapi, reapi, reapi_config, sha256_digest
from rex_reapi.proto import remote_execution_pb2 as re_pb2

from rexcore.artifacts.chunking import REAPI_CHUNKING, chunk_bytes
from rexcore.artifacts.digest import DigestFunction

_FIXTURES = (reapi, reapi_config)  # pytest finds them by name here
_Fn = re_pb2.DigestFunction.Value
_Chunking = re_pb2.ChunkingFunction.Value
_Request = re_pb2.BatchUpdateBlobsRequest.Request
# Over max_size (2 MiB), under the 4 MiB batch limit: several chunks, one BatchUpdateBlobs.
_SIZE = (3 << 20) + 12_345


def _random(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def blake3_digest(data: bytes) -> re_pb2.Digest:
    return re_pb2.Digest(hash=blake3.blake3(data).hexdigest(), size_bytes=len(data))


def _key(digest: re_pb2.Digest) -> tuple[str, int]:
    return digest.hash, digest.size_bytes


async def _store(reapi: Reapi, blobs: dict[bytes, re_pb2.Digest], function: int = 0) -> None:
    response = await reapi.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(
        digest_function=function,
        requests=[_Request(digest=d, data=b) for b, d in blobs.items()]))
    assert all(r.status.code == 0 for r in response.responses), response


async def _missing(reapi: Reapi, digests: list[re_pb2.Digest], function: int = 0) -> set:
    response = await reapi.cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
        blob_digests=digests, digest_function=function))
    return {_key(d) for d in response.missing_blob_digests}


async def _read(reapi: Reapi, digest: re_pb2.Digest, function: int = 0) -> bytes:
    response = await reapi.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(
        digests=[digest], digest_function=function))
    [one] = response.responses
    assert one.status.code == 0, one.status
    return one.data


def _rich_status(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    raise AssertionError(f"no grpc-status-details-bin in {error}")


async def test_capabilities_advertise_split_splice_and_the_fastcdc_parameters(
    reapi: Reapi,
) -> None:
    capabilities = await reapi.capabilities.GetCapabilities(re_pb2.GetCapabilitiesRequest())
    cache = capabilities.cache_capabilities
    assert cache.split_blob_support and cache.splice_blob_support
    assert cache.fast_cdc_2020_params.avg_chunk_size_bytes == 512 << 10
    assert cache.fast_cdc_2020_params.seed == 0


@pytest.mark.parametrize("function", [_Fn.SHA256, _Fn.BLAKE3])
async def test_split_blob_stores_the_fastcdc_chunks_of_a_stored_blob(
    reapi: Reapi, function: int
) -> None:
    data = _random(_SIZE, seed=1)
    rex_function = DigestFunction.SHA256 if function == _Fn.SHA256 else DigestFunction.BLAKE3
    digest = sha256_digest(data) if function == _Fn.SHA256 else blake3_digest(data)
    await _store(reapi, {data: digest}, function)

    response = await reapi.cas.SplitBlob(re_pb2.SplitBlobRequest(
        blob_digest=digest, digest_function=function))

    expected = chunk_bytes(data, REAPI_CHUNKING, rex_function).chunks
    assert [(d.hash, d.size_bytes) for d in response.chunk_digests] == [
        (c.hash, c.size) for c in expected]
    assert len(response.chunk_digests) > 1
    assert response.chunking_function == _Chunking.FAST_CDC_2020
    assert not await _missing(reapi, list(response.chunk_digests), function)
    rebuilt = b"".join([await _read(reapi, d, function) for d in response.chunk_digests])
    assert rebuilt == data


async def test_split_blob_of_a_small_blob_is_the_blob_itself(reapi: Reapi) -> None:
    [digest] = await reapi.upload(b"smaller than the largest chunk")
    response = await reapi.cas.SplitBlob(re_pb2.SplitBlobRequest(blob_digest=digest))
    assert [_key(d) for d in response.chunk_digests] == [_key(digest)]


async def test_split_blob_of_an_absent_blob_is_not_found(reapi: Reapi) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await reapi.cas.SplitBlob(re_pb2.SplitBlobRequest(blob_digest=sha256_digest(b"never")))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "upload it" in caught.value.details()


async def test_split_then_splice_round_trips_a_blob_into_the_cas(reapi: Reapi) -> None:
    data = _random(_SIZE, seed=2)
    digest = sha256_digest(data)
    await _store(reapi, {data: digest})
    chunks = list((await reapi.cas.SplitBlob(
        re_pb2.SplitBlobRequest(blob_digest=digest))).chunk_digests)
    # The chunks alone must make the blob again: drop it, keep only them.
    await reapi.rexd.runtime.blob_store.delete(
        chunk_bytes(data, REAPI_CHUNKING, DigestFunction.SHA256).blob)
    assert await _missing(reapi, [digest]) == {_key(digest)}

    response = await reapi.cas.SpliceBlob(re_pb2.SpliceBlobRequest(
        blob_digest=digest, chunk_digests=chunks, chunking_function=_Chunking.FAST_CDC_2020))

    assert _key(response.blob_digest) == _key(digest)
    assert await _read(reapi, digest) == data


async def test_splice_blob_accepts_chunks_cut_any_way(reapi: Reapi) -> None:
    data = _random(300_000, seed=3)
    pieces = [data[:1], data[1:200_000], data[200_000:]]
    await _store(reapi, {p: blake3_digest(p) for p in pieces}, _Fn.BLAKE3)
    digest = blake3_digest(data)

    await reapi.cas.SpliceBlob(re_pb2.SpliceBlobRequest(
        blob_digest=digest, chunk_digests=[blake3_digest(p) for p in pieces],
        digest_function=_Fn.BLAKE3))

    assert await _read(reapi, digest, _Fn.BLAKE3) == data


async def test_splice_with_a_missing_chunk_fails_precondition_listing_it(reapi: Reapi) -> None:
    present, absent = b"a chunk that is stored", b"a chunk that never was"
    await reapi.upload(present)
    digest = sha256_digest(present + absent)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await reapi.cas.SpliceBlob(re_pb2.SpliceBlobRequest(
            blob_digest=digest, chunk_digests=[sha256_digest(present), sha256_digest(absent)]))

    error = caught.value
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert sha256_digest(absent).hash in error.details()
    failure = error_details_pb2.PreconditionFailure()
    [detail] = _rich_status(error).details
    assert detail.Unpack(failure)
    assert [(v.type, v.subject) for v in failure.violations] == [
        ("MISSING", f"blobs/{sha256_digest(absent).hash}/{len(absent)}")]
    assert await _missing(reapi, [digest]) == {_key(digest)}


async def test_splice_with_the_wrong_blob_digest_is_invalid_and_stores_nothing(
    reapi: Reapi,
) -> None:
    first, second = _random(100_000, seed=4), _random(100_000, seed=5)
    await reapi.upload(first, second)
    chunks = [sha256_digest(first), sha256_digest(second)]
    claimed = sha256_digest(second + first)  # right size, wrong order: other bytes

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await reapi.cas.SpliceBlob(re_pb2.SpliceBlobRequest(
            blob_digest=claimed, chunk_digests=chunks))

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert claimed.hash in caught.value.details()
    assert await _missing(reapi, [claimed]) == {_key(claimed)}
    assert await _missing(reapi, [sha256_digest(first + second)])  # nor anything else


async def test_splice_with_a_wrong_total_size_is_invalid_and_stores_nothing(
    reapi: Reapi,
) -> None:
    [chunk] = await reapi.upload(b"one chunk of twenty-six b")
    claimed = re_pb2.Digest(hash=chunk.hash, size_bytes=chunk.size_bytes + 1)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await reapi.cas.SpliceBlob(re_pb2.SpliceBlobRequest(
            blob_digest=claimed, chunk_digests=[chunk]))

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "add up to" in caught.value.details()
    assert await _missing(reapi, [claimed]) == {_key(claimed)}


async def test_split_with_a_chunking_function_rex_does_not_offer_is_invalid(
    reapi: Reapi,
) -> None:
    [digest] = await reapi.upload(b"x" * 10)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await reapi.cas.SplitBlob(re_pb2.SplitBlobRequest(
            blob_digest=digest, chunking_function=_Chunking.REP_MAX_CDC))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "FAST_CDC_2020" in caught.value.details()
