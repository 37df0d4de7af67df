"""The action cache: hits, misses, persistence, and never serving a result whose blobs are gone."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from rexcore.artifacts import (
    ActionCache,
    ActionCacheOptions,
    Digest,
    DigestFunction,
    DiskBlobStore,
    MemoryBlobStore,
    MissingBlobsError,
    StorageError,
    create_action_cache,
    digest_of,
)
from rexcore.serialization.action_result import (
    ActionResult,
    ExecutionMetadata,
    OutputDirectory,
    OutputFile,
)


def _action(name: str, function: DigestFunction = DigestFunction.SHA256) -> Digest:
    return digest_of(f"action {name}".encode(), function)


async def _result_with_blobs(store: MemoryBlobStore | DiskBlobStore, name: str) -> ActionResult:
    """A result whose output, stdout and directory blobs are all in ``store``."""
    blobs = [f"{name} output".encode(), f"{name} stdout".encode(), f"{name} tree".encode()]
    output, stdout, tree = (digest_of(blob) for blob in blobs)
    for digest, blob in zip((output, stdout, tree), blobs, strict=True):
        await store.put(digest, blob)
    return ActionResult(
        exit_code=0,
        output_files=(OutputFile("out/a.o", output, is_executable=True),),
        output_directories=(OutputDirectory("out/dir", tree, file_digests=(output,)),),
        stdout_digest=stdout,
        execution_metadata=ExecutionMetadata(worker="worker-1", cpu_seconds=0.25),
    )


def _entry_file(root: Path, action: Digest) -> Path:
    return root / "ac" / action.function.value / action.hash[:2] / action.hash


@pytest.fixture
async def blob_store() -> AsyncIterator[MemoryBlobStore]:
    store = MemoryBlobStore(max_size=None)
    yield store
    await store.close()


@pytest.fixture
async def cache(tmp_path: Path, blob_store: MemoryBlobStore) -> AsyncIterator[ActionCache]:
    cache = create_action_cache(tmp_path, blob_store)
    yield cache
    await cache.close()


async def test_unknown_action_is_a_miss(cache: ActionCache) -> None:
    assert await cache.get(_action("never run")) is None


@pytest.mark.parametrize("function", list(DigestFunction), ids=lambda f: f.value)
async def test_stored_result_is_a_hit(
    cache: ActionCache, blob_store: MemoryBlobStore, function: DigestFunction
) -> None:
    result = await _result_with_blobs(blob_store, "compile")
    action = _action("compile", function)
    await cache.put(action, result)
    assert await cache.get(action) == result
    assert (
        await cache.get(
            _action(
                "compile",
                DigestFunction.BLAKE3
                if function is DigestFunction.SHA256
                else DigestFunction.SHA256,
            )
        )
        is None
    )


async def test_result_survives_reopen(tmp_path: Path, blob_store: MemoryBlobStore) -> None:
    result = await _result_with_blobs(blob_store, "link")
    cache = create_action_cache(tmp_path, blob_store)
    await cache.put(_action("link"), result)
    await cache.close()
    assert _entry_file(tmp_path, _action("link")).is_file()

    reopened = create_action_cache(tmp_path, blob_store)
    try:
        assert await reopened.get(_action("link")) == result
        assert await reopened.get(_action("other")) is None
    finally:
        await reopened.close()


async def test_results_beyond_the_memory_bound_are_read_from_disk(
    tmp_path: Path, blob_store: MemoryBlobStore
) -> None:
    cache = create_action_cache(tmp_path, blob_store, ActionCacheOptions(max_entries_in_memory=1))
    results = {name: await _result_with_blobs(blob_store, name) for name in ("a", "b", "c")}
    for name, result in results.items():
        await cache.put(_action(name), result)
    for name, result in results.items():
        assert await cache.get(_action(name)) == result
    await cache.close()


async def test_overwritten_result_returns_the_latest(
    cache: ActionCache, blob_store: MemoryBlobStore
) -> None:
    first = await _result_with_blobs(blob_store, "first")
    second = await _result_with_blobs(blob_store, "second")
    await cache.put(_action("x"), first)
    await cache.put(_action("x"), second)
    assert await cache.get(_action("x")) == second


@pytest.mark.parametrize("which", ["output_file", "stdout", "directory_file", "tree"])
async def test_result_whose_blob_was_deleted_is_a_miss(
    cache: ActionCache, blob_store: MemoryBlobStore, which: str
) -> None:
    result = await _result_with_blobs(blob_store, "test")
    await cache.put(_action("test"), result)
    gone = {
        "output_file": result.output_files[0].digest,
        "stdout": result.stdout_digest,
        "directory_file": result.output_directories[0].file_digests[0],
        "tree": result.output_directories[0].tree_digest,
    }[which]
    assert gone is not None
    await blob_store.delete(gone)
    assert await cache.get(_action("test")) is None
    await blob_store.put(gone, await _blob_bytes(result, gone))
    assert await cache.get(_action("test")) == result  # back once the blob is back


async def _blob_bytes(result: ActionResult, digest: Digest) -> bytes:
    for blob in (b"test output", b"test stdout", b"test tree"):
        if digest_of(blob) == digest:
            return blob
    raise AssertionError(f"{digest} is not one of the test's blobs")


async def test_result_whose_output_was_evicted_is_a_miss(tmp_path: Path) -> None:
    store = await DiskBlobStore(tmp_path / "cas", max_size=100).open()
    cache = create_action_cache(tmp_path, store)
    try:
        output = b"o" * 60
        await store.put(digest_of(output), output)
        result = ActionResult(output_files=(OutputFile("out", digest_of(output)),))
        await cache.put(_action("build"), result)
        assert await cache.get(_action("build")) == result
        other = b"p" * 60
        await store.put(digest_of(other), other)  # evicts the output
        assert await cache.get(_action("build")) is None
    finally:
        await cache.close()
        await store.close()


async def test_put_refuses_a_result_with_missing_blobs(
    cache: ActionCache, blob_store: MemoryBlobStore
) -> None:
    present = digest_of(b"present")
    await blob_store.put(present, b"present")
    absent = [digest_of(b"absent one"), digest_of(b"absent two")]
    result = ActionResult(
        output_files=(OutputFile("a", present), OutputFile("b", absent[0])),
        stderr_digest=absent[1],
    )
    with pytest.raises(MissingBlobsError) as caught:
        await cache.put(_action("bad"), result)
    assert isinstance(caught.value, StorageError)
    assert sorted(caught.value.missing) == sorted(absent)
    for digest in absent:
        assert str(digest) in str(caught.value)
    assert str(_action("bad")) in str(caught.value)
    assert await cache.get(_action("bad")) is None


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{not json",
        b'{"action_digest": 5, "result": {}}',
        b'{"result": {"exit_code": "zero"}}',
        b"\xff\xfe binary",
    ],
    ids=["empty", "truncated", "bad-digest", "wrong-schema", "binary"],
)
async def test_corrupt_entry_file_is_a_miss_and_is_removed(
    tmp_path: Path, blob_store: MemoryBlobStore, content: bytes
) -> None:
    action = _action("corrupt")
    cache = create_action_cache(tmp_path, blob_store)
    await cache.put(action, ActionResult())
    await cache.close()
    _entry_file(tmp_path, action).write_bytes(content)

    reopened = create_action_cache(tmp_path, blob_store)
    try:
        assert await reopened.get(action) is None
        assert not _entry_file(tmp_path, action).exists()
        await reopened.put(action, ActionResult(exit_code=0))  # and it can be stored again
        assert await reopened.get(action) == ActionResult(exit_code=0)
    finally:
        await reopened.close()


async def test_entry_file_of_another_action_is_a_miss(
    tmp_path: Path, blob_store: MemoryBlobStore
) -> None:
    cache = create_action_cache(tmp_path, blob_store)
    await cache.put(_action("one"), ActionResult(exit_code=1))
    await cache.close()
    misplaced = _entry_file(tmp_path, _action("two"))
    misplaced.parent.mkdir(parents=True, exist_ok=True)
    misplaced.write_bytes(_entry_file(tmp_path, _action("one")).read_bytes())

    reopened = create_action_cache(tmp_path, blob_store)
    try:
        assert await reopened.get(_action("two")) is None
        assert await reopened.get(_action("one")) == ActionResult(exit_code=1)
    finally:
        await reopened.close()


async def test_delete_forgets_the_result_also_on_disk(
    tmp_path: Path, blob_store: MemoryBlobStore
) -> None:
    cache = create_action_cache(tmp_path, blob_store)
    await cache.put(_action("gone"), ActionResult())
    await cache.delete(_action("gone"))
    assert await cache.get(_action("gone")) is None
    await cache.delete(_action("gone"))  # deleting what is absent is no error
    await cache.close()
    assert not _entry_file(tmp_path, _action("gone")).exists()


async def test_no_temp_files_are_left_after_puts(cache: ActionCache, tmp_path: Path) -> None:
    for name in ("a", "b"):
        await cache.put(_action(name), ActionResult())
    assert list((tmp_path / "ac" / "tmp").iterdir()) == []


async def test_closed_cache_refuses_use(cache: ActionCache) -> None:
    await cache.close()
    with pytest.raises(StorageError, match="closed"):
        await cache.get(_action("late"))
