"""Input-tree conversion under concurrency: overlapping trees converted at once."""

from __future__ import annotations

import asyncio
import hashlib

from rex_reapi.convert import InputTreeConverter
from rex_reapi.proto import remote_execution_pb2 as re_pb2
from rexcore.artifacts.digest import Digest, DigestFunction
from rexcore.artifacts.memory import MemoryBlobStore


class _HeldStore(MemoryBlobStore):
    """The first store call waits for ``release``: the conversion making it is caught
    between converting its directories and storing them."""

    def __init__(self) -> None:
        super().__init__()
        self.storing, self.release = asyncio.Event(), asyncio.Event()

    async def put_many(self, blobs):  # type: ignore[no-untyped-def]
        if not self.storing.is_set():
            self.storing.set()
            await self.release.wait()
        for digest, data in blobs.items():
            await self.put(digest, data)


def _sha(data: bytes) -> Digest:
    return Digest(DigestFunction.SHA256, hashlib.sha256(data).hexdigest(), len(data))


async def _store(store: MemoryBlobStore, message: re_pb2.Directory) -> Digest:
    data = message.SerializeToString()
    digest = _sha(data)
    await store.put(digest, data)
    return digest


def _proto(digest: Digest) -> re_pb2.Digest:
    return re_pb2.Digest(hash=digest.hash, size_bytes=digest.size)


async def test_a_tree_sharing_directories_with_one_being_stored_converts() -> None:
    store = _HeldStore()
    content = b"shared input\n"
    file_digest = _sha(content)
    await store.put(file_digest, content)
    shared = await _store(store, re_pb2.Directory(
        files=[re_pb2.FileNode(name="f.txt", digest=_proto(file_digest))]))
    roots = []
    for index in range(8):  # distinct roots, one shared subdirectory (as Bazel's toolchains)
        middle = await _store(store, re_pb2.Directory(
            directories=[re_pb2.DirectoryNode(name="tools", digest=_proto(shared))]))
        roots.append(await _store(store, re_pb2.Directory(
            files=[re_pb2.FileNode(name=f"in{index}.txt", digest=_proto(file_digest))],
            directories=[re_pb2.DirectoryNode(name="sub", digest=_proto(middle))])))
    converter = InputTreeConverter(store)
    first = asyncio.create_task(converter.convert(roots[0]))
    await store.storing.wait()  # the first tree is converted, its blobs not stored yet
    others = await asyncio.gather(*(converter.convert(root) for root in roots[1:]))
    store.release.set()
    natives = [await first, *others]
    assert len(set(natives)) == len(roots)
    assert not await store.find_missing(natives)
