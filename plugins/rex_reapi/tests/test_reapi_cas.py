"""ContentAddressableStorage over gRPC: FindMissingBlobs, batch transfers, paged GetTree."""

from __future__ import annotations

import blake3
import grpc
import pytest
import zstandard
from google.rpc import code_pb2
from reapi_fixtures import Reapi, reapi, reapi_config, sha256_digest

_FIXTURES = (reapi, reapi_config)  # pytest finds them by name here
from rex_reapi.proto import remote_execution_pb2 as re_pb2

_Fn = re_pb2.DigestFunction.Value
_Request = re_pb2.BatchUpdateBlobsRequest.Request


def blake3_digest(data: bytes) -> re_pb2.Digest:
    return re_pb2.Digest(hash=blake3.blake3(data).hexdigest(), size_bytes=len(data))


def _key(digest: re_pb2.Digest) -> tuple[str, int]:
    return digest.hash, digest.size_bytes


async def _missing(
    reapi: Reapi, digests: list[re_pb2.Digest], function: int = 0,
) -> set[tuple[str, int]]:
    response = await reapi.cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
        blob_digests=digests, digest_function=function))
    return {_key(d) for d in response.missing_blob_digests}


# -- FindMissingBlobs ---------------------------------------------------------------------


async def test_find_missing_blobs_lists_only_absent_sha256_blobs(reapi: Reapi) -> None:
    [present] = await reapi.upload(b"present")
    absent = sha256_digest(b"absent")
    assert await _missing(reapi, [present, absent]) == {_key(absent)}
    assert await _missing(reapi, [present, absent], _Fn.SHA256) == {_key(absent)}


async def test_find_missing_blobs_with_blake3_digest_function(reapi: Reapi) -> None:
    present, absent = b"blake3 present", b"blake3 absent"
    response = await reapi.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(
        digest_function=_Fn.BLAKE3,
        requests=[_Request(digest=blake3_digest(present), data=present)]))
    assert response.responses[0].status.code == code_pb2.OK
    missing = await _missing(reapi, [blake3_digest(present), blake3_digest(absent)], _Fn.BLAKE3)
    assert missing == {_key(blake3_digest(absent))}
    # The same bytes under SHA-256 were never stored.
    assert await _missing(reapi, [sha256_digest(present)]) == {_key(sha256_digest(present))}


async def test_empty_blob_is_never_missing(reapi: Reapi) -> None:
    assert await _missing(reapi, [sha256_digest(b"")]) == set()
    assert await _missing(reapi, [blake3_digest(b"")], _Fn.BLAKE3) == set()


async def test_find_missing_blobs_with_malformed_digest_is_invalid_argument(reapi: Reapi) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await reapi.cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
            blob_digests=[re_pb2.Digest(hash="zz", size_bytes=1)]))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_unserved_digest_function_is_invalid_argument(reapi: Reapi) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await reapi.cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
            blob_digests=[sha256_digest(b"x")], digest_function=_Fn.MD5))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- BatchUpdateBlobs ---------------------------------------------------------------------


async def test_batch_update_verifies_every_blob_and_stores_only_the_good_ones(reapi: Reapi) -> None:
    good, bad = b"good blob", b"bad blob"
    wrong = sha256_digest(b"something else entirely")
    wrong.size_bytes = len(bad)
    response = await reapi.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(requests=[
        _Request(digest=sha256_digest(good), data=good),
        _Request(digest=wrong, data=bad),
    ]))
    codes = [r.status.code for r in response.responses]
    assert codes == [code_pb2.OK, code_pb2.INVALID_ARGUMENT]
    assert [_key(r.digest) for r in response.responses] == [_key(sha256_digest(good)), _key(wrong)]
    assert await _missing(reapi, [sha256_digest(good), wrong, sha256_digest(bad)]) == {
        _key(wrong), _key(sha256_digest(bad))}


async def test_batch_update_with_wrong_size_is_invalid_argument_for_that_blob(reapi: Reapi) -> None:
    data = b"sized"
    digest = sha256_digest(data)
    digest.size_bytes += 1
    response = await reapi.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(
        requests=[_Request(digest=digest, data=data)]))
    assert response.responses[0].status.code == code_pb2.INVALID_ARGUMENT
    assert await _missing(reapi, [digest]) == {_key(digest)}


async def test_batch_update_accepts_zstd_compressed_data(reapi: Reapi) -> None:
    data = b"compress me " * 1000
    digest = sha256_digest(data)
    response = await reapi.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(requests=[
        _Request(digest=digest, data=zstandard.ZstdCompressor().compress(data),
                 compressor=re_pb2.Compressor.ZSTD)]))
    assert response.responses[0].status.code == code_pb2.OK
    read = await reapi.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=[digest]))
    assert read.responses[0].data == data


async def test_batch_update_with_corrupt_zstd_is_invalid_argument_for_that_blob(
    reapi: Reapi,
) -> None:
    data = b"not really zstd"
    response = await reapi.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(requests=[
        _Request(digest=sha256_digest(data), data=data, compressor=re_pb2.Compressor.ZSTD)]))
    assert response.responses[0].status.code == code_pb2.INVALID_ARGUMENT
    assert await _missing(reapi, [sha256_digest(data)]) == {_key(sha256_digest(data))}


@pytest.mark.parametrize("reapi_config", [{"protocols": {"reapi": {"max_batch_total_size": 1000}}}])
async def test_batch_update_over_the_limit_is_refused_whole(reapi: Reapi) -> None:
    blobs = [bytes([n]) * 600 for n in range(2)]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await reapi.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(requests=[
            _Request(digest=sha256_digest(b), data=b) for b in blobs]))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await _missing(reapi, [sha256_digest(b) for b in blobs]) == {
        _key(sha256_digest(b)) for b in blobs}


# -- BatchReadBlobs -----------------------------------------------------------------------


async def test_batch_read_returns_found_blobs_and_not_found_per_blob(reapi: Reapi) -> None:
    [found] = await reapi.upload(b"found")
    absent = sha256_digest(b"never uploaded")
    response = await reapi.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=[found, absent]))
    by_hash = {r.digest.hash: r for r in response.responses}
    assert by_hash[found.hash].status.code == code_pb2.OK
    assert by_hash[found.hash].data == b"found"
    assert by_hash[absent.hash].status.code == code_pb2.NOT_FOUND
    assert by_hash[absent.hash].data == b""


async def test_batch_read_blake3_blob(reapi: Reapi) -> None:
    data = b"blake3 batch"
    await reapi.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(
        digest_function=_Fn.BLAKE3, requests=[_Request(digest=blake3_digest(data), data=data)]))
    response = await reapi.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(
        digest_function=_Fn.BLAKE3, digests=[blake3_digest(data)]))
    assert response.responses[0].status.code == code_pb2.OK
    assert response.responses[0].data == data


@pytest.mark.parametrize("reapi_config", [{"protocols": {"reapi": {"max_batch_total_size": 1000}}}])
async def test_batch_read_over_the_limit_is_refused(reapi: Reapi) -> None:
    blobs = [bytes([n]) * 600 for n in range(2)]
    for blob in blobs:
        await reapi.upload(blob)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await reapi.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(
            digests=[sha256_digest(b) for b in blobs]))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- GetTree ------------------------------------------------------------------------------


async def _upload_tree(reapi: Reapi) -> tuple[re_pb2.Digest, list[re_pb2.Directory]]:
    """root -> a, b; a -> c; b -> c (shared): four distinct directories."""
    [file] = await reapi.upload(b"leaf file")
    c = re_pb2.Directory(files=[re_pb2.FileNode(name="f", digest=file)])
    c_digest = await reapi.upload_message(c)
    a = re_pb2.Directory(directories=[re_pb2.DirectoryNode(name="c", digest=c_digest)],
                         files=[re_pb2.FileNode(name="in_a", digest=file)])
    b = re_pb2.Directory(directories=[re_pb2.DirectoryNode(name="c", digest=c_digest)])
    a_digest, b_digest = await reapi.upload_message(a), await reapi.upload_message(b)
    root = re_pb2.Directory(directories=[re_pb2.DirectoryNode(name="a", digest=a_digest),
                                         re_pb2.DirectoryNode(name="b", digest=b_digest)])
    return await reapi.upload_message(root), [root, a, b, c]


async def _tree_pages(reapi: Reapi, request: re_pb2.GetTreeRequest) -> list[re_pb2.GetTreeResponse]:
    return [page async for page in reapi.cas.GetTree(request)]


async def test_get_tree_returns_every_directory_once(reapi: Reapi) -> None:
    root, directories = await _upload_tree(reapi)
    pages = await _tree_pages(reapi, re_pb2.GetTreeRequest(root_digest=root))
    got = [d for page in pages for d in page.directories]
    assert sorted(d.SerializeToString() for d in got) == sorted(
        d.SerializeToString() for d in directories)
    assert got[0] == directories[0]
    assert pages[-1].next_page_token == ""


async def test_get_tree_pages_resume_from_their_token_without_repeats(reapi: Reapi) -> None:
    root, directories = await _upload_tree(reapi)
    seen: list[bytes] = []
    token = ""
    calls = 0
    while True:
        calls += 1
        pages = await _tree_pages(reapi, re_pb2.GetTreeRequest(
            root_digest=root, page_size=1, page_token=token))
        # Each call gives pages of at most page_size; resume with the first page's token.
        first = pages[0]
        assert len(first.directories) <= 1
        seen.extend(d.SerializeToString() for d in first.directories)
        token = first.next_page_token
        if not token:
            break
        assert calls <= len(directories)
    assert sorted(seen) == sorted(d.SerializeToString() for d in directories)


async def test_get_tree_last_page_has_no_token(reapi: Reapi) -> None:
    root, directories = await _upload_tree(reapi)
    for page_size in (1, 2, len(directories)):
        pages = await _tree_pages(
            reapi, re_pb2.GetTreeRequest(root_digest=root, page_size=page_size))
        assert [len(p.directories) for p in pages][:-1] == [page_size] * (len(pages) - 1)
        assert sum(len(p.directories) for p in pages) == len(directories)
        assert [bool(p.next_page_token) for p in pages] == [True] * (len(pages) - 1) + [False]


async def test_get_tree_of_a_root_with_a_missing_child_returns_what_is_present(
    reapi: Reapi,
) -> None:
    lost = sha256_digest(b"child never uploaded")
    root = re_pb2.Directory(directories=[re_pb2.DirectoryNode(name="gone", digest=lost)])
    root_digest = await reapi.upload_message(root)
    pages = await _tree_pages(reapi, re_pb2.GetTreeRequest(root_digest=root_digest))
    assert [d for p in pages for d in p.directories] == [root]


async def test_get_tree_of_missing_root_is_not_found(reapi: Reapi) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _tree_pages(reapi, re_pb2.GetTreeRequest(root_digest=sha256_digest(b"no such dir")))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_get_tree_with_a_foreign_page_token_is_invalid_argument(reapi: Reapi) -> None:
    root, _ = await _upload_tree(reapi)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _tree_pages(reapi, re_pb2.GetTreeRequest(root_digest=root, page_token="garbage!"))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_get_tree_of_a_blob_that_is_no_directory_is_invalid_argument(reapi: Reapi) -> None:
    [not_a_directory] = await reapi.upload(b"\xff\xff\xff garbage")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _tree_pages(reapi, re_pb2.GetTreeRequest(root_digest=not_a_directory))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_batch_update_with_the_same_blob_twice_stores_it(reapi: Reapi) -> None:
    data = b"twice in one batch" * 100
    response = await reapi.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(requests=[
        _Request(digest=sha256_digest(data), data=data)] * 2))
    assert [r.status.code for r in response.responses] == [code_pb2.OK, code_pb2.OK]
    assert await _missing(reapi, [sha256_digest(data)]) == set()
