"""Small blobs on the Execute path: stored on the event loop, read back from memory, and
the rex input root handed to the scheduler instead of being read back."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from rex_reapi.cas import _open_writer
from rex_reapi.convert import (
    INLINE_WRITE,
    InputTreeConverter,
    RecentBlobs,
    convert_action,
)
from rex_reapi.errors import ReapiError
from rex_reapi.proto import remote_execution_pb2 as re_pb2
from rexcore.artifacts.digest import Digest, DigestFunction
from rexcore.artifacts.disk import DiskBlobStore
from rexcore.artifacts.memory import MemoryBlobStore
from rexcore.artifacts.store import DigestMismatchError, put_blobs, put_missing


def _sha(data: bytes) -> Digest:
    return Digest(DigestFunction.SHA256, hashlib.sha256(data).hexdigest(), len(data))


def _proto(digest: Digest) -> re_pb2.Digest:
    return re_pb2.Digest(hash=digest.hash, size_bytes=digest.size)


class _NoThreads(DiskBlobStore):
    """A disk store that fails any trip to its threads once open (so a test sees none
    was made)."""

    threads_allowed = True

    async def _run(self, function: Any, *args: Any) -> Any:
        if not self.threads_allowed:
            raise AssertionError(f"{function.__name__} went to a thread")
        return await super()._run(function, *args)


async def _action(store: MemoryBlobStore) -> tuple[Digest, list[Digest]]:
    """An Action with its Command and a one-file input root, stored; the REAPI digests of
    the Action and of the three blobs that only the conversion reads."""
    content = b"input\n"
    await store.put(_sha(content), content)
    blobs = [
        re_pb2.Command(arguments=["cat", "in.txt"], output_paths=["out.txt"]).SerializeToString(),
        re_pb2.Directory(files=[re_pb2.FileNode(name="in.txt", digest=_proto(_sha(content)))])
        .SerializeToString(),
    ]
    command, root = (_sha(b) for b in blobs)
    action = re_pb2.Action(command_digest=_proto(command), input_root_digest=_proto(root))
    blobs.append(action.SerializeToString())
    for data in blobs:
        await store.put(_sha(data), data)
    return _sha(blobs[2]), [command, root, _sha(blobs[2])]


def test_recent_blobs_keep_the_newest_within_their_byte_budget() -> None:
    recent = RecentBlobs(max_bytes=250, max_blob=100)
    blobs = [bytes([n]) * 100 for n in range(3)]
    for data in blobs:
        recent.remember(_sha(data), data)
    assert recent.get(_sha(blobs[0])) is None  # the oldest made room
    assert recent.get(_sha(blobs[1])) == blobs[1]
    assert recent.get(_sha(blobs[2])) == blobs[2]


def test_recent_blobs_skip_empty_and_large_blobs() -> None:
    recent = RecentBlobs(max_blob=10)
    recent.remember(_sha(b""), b"")
    recent.remember(_sha(b"x" * 11), b"x" * 11)
    assert len(recent) == 0


async def test_a_few_small_blobs_are_stored_without_a_thread_hop(tmp_path: Path) -> None:
    store = _NoThreads(tmp_path / "cas")
    await store.open()
    store.threads_allowed = False
    blobs = {_sha(data): data for data in (b"action", b"command", b"directory")}
    await put_blobs(store, blobs)
    assert not await store.find_missing(blobs)
    large = b"x" * (INLINE_WRITE + 1)
    with pytest.raises(AssertionError, match="thread"):  # more than that: a thread's work
        await put_blobs(store, {_sha(large): large})


async def test_put_missing_stores_only_what_the_store_lacks() -> None:
    stored: list[Digest] = []

    class Counting(MemoryBlobStore):
        async def put_many(self, blobs: dict[Digest, bytes]) -> None:
            for digest, data in blobs.items():
                stored.append(digest)
                await self.put(digest, data)

    store = Counting()
    await store.put(_sha(b"old"), b"old")
    await put_missing(store, {_sha(b"old"): b"old", _sha(b"new"): b"new"})
    assert stored == [_sha(b"new")]


async def test_a_small_upload_is_remembered_once_stored_and_verified(tmp_path: Path) -> None:
    store = DiskBlobStore(tmp_path / "cas")
    recent = RecentBlobs()
    good = _open_writer(store, _sha(b"blob"), recent)
    await good.write(b"bl")
    await good.write(b"ob")
    await good.commit()
    assert recent.get(_sha(b"blob")) == b"blob"
    bad = _open_writer(store, _sha(b"other"), recent)
    await bad.write(b"wrong")
    with pytest.raises(DigestMismatchError):
        await bad.commit()
    assert recent.get(_sha(b"other")) is None


async def test_execute_converts_from_just_uploaded_blobs_the_store_no_longer_holds() -> None:
    store = MemoryBlobStore()
    action, read_only_by_conversion = await _action(store)
    recent = RecentBlobs()
    for digest in read_only_by_conversion:
        recent.remember(digest, await store.get(digest))
        await store.delete(digest)  # evicted since: the bytes in memory still serve
    converted = await convert_action(action, store, InputTreeConverter(store, recent=recent), 60)
    assert converted.command.arguments == ("cat", "in.txt")
    with pytest.raises(ReapiError, match="not in the CAS"):  # without them: missing
        await convert_action(action, store, InputTreeConverter(store), 60)


async def test_the_scheduler_is_handed_the_input_root_a_conversion_made() -> None:
    store = MemoryBlobStore()
    action, _ = await _action(store)
    inputs = InputTreeConverter(store)
    first = await convert_action(action, store, inputs, 60)
    root = first.action.input_root_digest
    assert first.blobs()[root] == await store.get(root)
    # The rex Action and Command are handed over, not stored: the scheduler and the
    # workers get them with the submission and the assignment.
    assert first.native_digest in first.blobs()
    assert first.action.command_digest in first.blobs()
    missing = await store.find_missing([first.native_digest, first.action.command_digest])
    assert set(missing) == {first.native_digest, first.action.command_digest}
    again = await convert_action(action, store, inputs, 60)  # converted before: not at hand
    assert again.input_root_bytes is None
    assert root not in again.blobs()
