"""Chunked transfer over the native HTTP API, against a real rexd on 127.0.0.1: only the
chunks the server lacks move, a killed transfer resumes with the rest, and a corrupt chunk
or a manifest that does not hold up is refused with a 4xx and commits nothing."""

from __future__ import annotations

import asyncio
import os
import random
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import zstandard

from rexcore.artifacts.chunking import ChunkingParams, chunk_bytes
from rexcore.artifacts.digest import Digest, DigestFunction, digest_of
from rexcore.artifacts.manifest import ChunkManifest
from rexcore.artifacts.transfer import (
    BlobMismatchError,
    ChunkEncoding,
    ChunkPayload,
    ChunkRemote,
    MissingChunksError,
    TransferError,
    TransferManager,
    TransferOptions,
)
from rexcore.protocol.client import (
    CHUNKED_MIN_SIZE,
    HttpChunkRemote,
    RexClient,
)
from rexcore.testing import RunningRexd

REPO = Path(__file__).resolve().parent.parent

BLAKE3, SHA256 = DigestFunction.BLAKE3, DigestFunction.SHA256
SMALL = ChunkingParams(avg_size=16 << 10)  # 4 KiB / 16 KiB / 64 KiB chunks


def _random(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture
async def client(rexd: RunningRexd) -> AsyncIterator[RexClient]:
    async with RexClient(rexd.url) as client:
        yield client


@pytest.fixture
async def http(rexd: RunningRexd) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=rexd.url) as session:
        yield session


class Interrupting(HttpChunkRemote):
    """Counts chunks moved and sets ``reached`` once ``stop_after`` of them are done (the
    test then cancels the transfer there, as a killed client would stop)."""

    def __init__(self, client: RexClient, stop_after: int | None = None) -> None:
        super().__init__(client)
        self.stop_after = stop_after
        self.reached = asyncio.Event()
        self.moved: list[Digest] = []

    def _count(self, digest: Digest) -> None:
        self.moved.append(digest)
        if self.stop_after is not None and len(self.moved) >= self.stop_after:
            self.reached.set()

    async def put_chunk(self, digest: Digest, payload: ChunkPayload) -> None:
        await super().put_chunk(digest, payload)
        self._count(digest)

    async def get_chunk(self, digest: Digest) -> ChunkPayload:
        payload = await super().get_chunk(digest)
        self._count(digest)
        return payload


def _manager(remote: ChunkRemote, function: DigestFunction = BLAKE3) -> TransferManager:
    return TransferManager(remote, function, SMALL, TransferOptions(concurrency=4))


async def _interrupt(task: asyncio.Task[Any], remote: Interrupting) -> None:
    await asyncio.wait([task, asyncio.ensure_future(remote.reached.wait())],
                       return_when=asyncio.FIRST_COMPLETED)
    assert not task.done(), "the transfer finished before it could be interrupted"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def _rex(*args: str) -> tuple[int, str, str]:
    """``python -m rexcore.cli.rex`` as a user runs it, without blocking the server."""
    environment = {k: v for k, v in os.environ.items() if k != "REX_SERVER"}
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "rexcore.cli.rex", *args, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=environment,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def _error(
    http: aiohttp.ClientSession, method: str, path: str, **kwargs: Any
) -> tuple[int, dict[str, Any]]:
    async with http.request(method, path, **kwargs) as response:
        assert response.content_type == "application/json", await response.text()
        return response.status, (await response.json())["error"]


# -- the ChunkRemote over HTTP -------------------------------------------------------------


def test_http_chunk_remote_is_a_chunk_remote(client: RexClient) -> None:
    assert isinstance(HttpChunkRemote(client), ChunkRemote)


async def test_upload_then_download_over_http_round_trips_and_stores_the_whole_blob(
    rexd: RunningRexd, client: RexClient, tmp_path: Path
) -> None:
    data = _random(1 << 20, seed=1)
    (tmp_path / "source").write_bytes(data)
    manager = _manager(HttpChunkRemote(client))

    report = await manager.upload_file(tmp_path / "source")

    assert report.blob == digest_of(data, BLAKE3)
    assert report.bytes_moved == len(data)
    assert len(report.manifest.chunks) > 10
    # The server spliced the chunks into the blob: every other path can use it whole.
    assert await rexd.runtime.blob_store.get(report.blob) == data
    back = await manager.download_file(report.blob, tmp_path / "copy")
    assert (tmp_path / "copy").read_bytes() == data
    assert back.manifest == report.manifest
    assert back.bytes_moved == len(data)


async def test_an_edit_re_sends_over_http_only_the_chunks_it_touched(
    client: RexClient, tmp_path: Path
) -> None:
    data = _random(2 << 20, seed=2)
    (tmp_path / "v1").write_bytes(data)
    (tmp_path / "v2").write_bytes(data[: 1 << 20] + b"inserted " * 100 + data[1 << 20 :])
    manager = _manager(HttpChunkRemote(client))
    await manager.upload_file(tmp_path / "v1")

    report = await manager.upload_file(tmp_path / "v2")

    assert report.bytes_moved <= 3 * SMALL.max_size
    assert report.reused >= len(report.manifest.chunks) - 3
    copy = tmp_path / "copy"
    copy.write_bytes(data)  # the old version is at hand: only the edit comes down
    down = await manager.download_file(report.blob, copy)
    assert copy.read_bytes() == (tmp_path / "v2").read_bytes()
    assert down.bytes_moved <= 3 * SMALL.max_size


async def test_an_upload_killed_halfway_resumes_sending_only_the_rest(
    rexd: RunningRexd, client: RexClient, tmp_path: Path
) -> None:
    data = _random(2 << 20, seed=3)
    source = tmp_path / "source"
    source.write_bytes(data)
    manifest = chunk_bytes(data, SMALL, BLAKE3)
    chunks = set(manifest.chunks)
    first = Interrupting(client, stop_after=len(chunks) // 2)

    await _interrupt(asyncio.create_task(_manager(first).upload_file(source)), first)

    store = rexd.runtime.blob_store
    left = set(await store.find_missing(list(chunks)))
    assert set(first.moved) <= chunks - left  # each chunk acknowledged is stored, verified
    assert left and len(left) < len(chunks)
    assert await store.find_missing([manifest.blob]) == [manifest.blob]  # nothing committed
    second = Interrupting(client)

    report = await _manager(second).upload_file(source)

    # A PUT whose body left before the kill may still land after the check above: the
    # second upload sends at most what was left, and never a chunk the first one sent.
    assert set(second.moved) <= left and not set(second.moved) & set(first.moved)
    assert report.bytes_moved == sum(d.size for d in set(second.moved)) < len(data)
    assert report.reused == len(chunks) - len(set(second.moved)) >= len(chunks) - len(left)
    assert await store.get(manifest.blob) == data


async def test_a_download_killed_halfway_resumes_fetching_only_the_rest(
    client: RexClient, tmp_path: Path
) -> None:
    data = _random(2 << 20, seed=4)
    (tmp_path / "source").write_bytes(data)
    blob = (await _manager(HttpChunkRemote(client)).upload_file(tmp_path / "source")).blob
    chunks = set(chunk_bytes(data, SMALL, BLAKE3).chunks)
    target = tmp_path / "copy"
    first = Interrupting(client, stop_after=len(chunks) // 2)

    await _interrupt(asyncio.create_task(_manager(first).download_file(blob, target)), first)

    assert not target.exists()
    assert [p.name for p in tmp_path.glob(".copy.*.rexpart")]  # kept for the next attempt
    second = Interrupting(client)

    await _manager(second).download_file(blob, target)

    assert target.read_bytes() == data
    assert not set(second.moved) & set(first.moved)
    assert len(second.moved) == len(chunks) - len(set(first.moved))
    assert not list(tmp_path.glob(".copy.*"))


async def test_zstd_chunks_travel_compressed_both_ways(
    client: RexClient, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    text = b"".join(b"line %d of a very compressible build log\n" % i for i in range(60_000))
    (tmp_path / "log").write_bytes(text)
    report = await _manager(HttpChunkRemote(client)).upload_file(tmp_path / "log")
    assert report.wire_bytes < report.bytes_moved / 4
    chunk = report.manifest.chunks[0]
    async with http.get(f"/v1/chunks/{chunk}",
                        headers={"Rex-Accept-Chunk-Encoding": "zstd"}) as response:
        assert response.headers["Rex-Chunk-Encoding"] == "zstd"
        packed = await response.read()
    assert zstandard.ZstdDecompressor().decompress(packed) == text[: chunk.size]
    async with http.get(f"/v1/chunks/{chunk}") as response:
        assert response.headers["Rex-Chunk-Encoding"] == "identity"
        assert await response.read() == text[: chunk.size]


async def test_the_manifest_of_a_blob_stored_whole_is_cut_on_demand(
    rexd: RunningRexd, client: RexClient, tmp_path: Path
) -> None:
    data = _random(5 << 20, seed=5)
    digest = digest_of(data, SHA256)
    await client.put_blob(digest, data)

    manifest = await HttpChunkRemote(client).get_manifest(digest)

    assert manifest is not None and len(manifest.chunks) > 1
    assert manifest == chunk_bytes(data, function=SHA256)  # the REAPI parameters
    assert not await rexd.runtime.blob_store.find_missing(list(manifest.chunks))
    await TransferManager(HttpChunkRemote(client), SHA256).download_file(digest, tmp_path / "x")
    assert (tmp_path / "x").read_bytes() == data


async def test_the_manifest_of_an_unknown_blob_is_not_found(client: RexClient) -> None:
    assert await HttpChunkRemote(client).get_manifest(digest_of(b"never stored", BLAKE3)) is None


# -- bad input: a clear 4xx, nothing committed ---------------------------------------------


async def test_a_corrupt_chunk_is_refused_and_not_stored(
    rexd: RunningRexd, http: aiohttp.ClientSession
) -> None:
    good = _random(100_000, seed=6)
    chunk = digest_of(good, BLAKE3)
    bad = bytearray(good)
    bad[500] ^= 1

    status, error = await _error(http, "PUT", f"/v1/chunks/{chunk}", data=bytes(bad))

    assert (status, error["code"]) == (400, "corrupt_chunk")
    assert str(chunk) in error["message"] and "nothing was committed" in error["message"]
    packed = zstandard.ZstdCompressor().compress(bytes(bad))
    status, error = await _error(http, "PUT", f"/v1/chunks/{chunk}", data=packed,
                                 headers={"Rex-Chunk-Encoding": "zstd"})
    assert (status, error["code"]) == (400, "corrupt_chunk")
    status, error = await _error(http, "PUT", f"/v1/chunks/{chunk}", data=b"not zstd at all",
                                 headers={"Rex-Chunk-Encoding": "zstd"})
    assert (status, error["code"]) == (400, "corrupt_chunk")
    status, error = await _error(http, "PUT", f"/v1/chunks/{chunk}", data=good,
                                 headers={"Rex-Chunk-Encoding": "brotli"})
    assert (status, error["code"]) == (400, "unsupported_chunk_encoding")
    assert await rexd.runtime.blob_store.find_missing([chunk]) == [chunk]


async def test_a_manifest_naming_a_missing_chunk_is_refused_listing_it(
    rexd: RunningRexd, client: RexClient, http: aiohttp.ClientSession
) -> None:
    data = _random(300_000, seed=7)
    manifest = chunk_bytes(data, SMALL, BLAKE3)
    remote = HttpChunkRemote(client)
    absent = manifest.chunks[-1]
    for offset, chunk in manifest:
        if chunk != absent:
            await remote.put_chunk(chunk, _plain(data, offset, chunk))

    status, error = await _error(http, "PUT", f"/v1/manifests/{manifest.blob}",
                                 data=manifest.to_json())

    assert (status, error["code"]) == (400, "missing_chunks")
    assert error["missing"] == [str(absent)]
    with pytest.raises(MissingChunksError) as caught:
        await remote.put_manifest(manifest)
    assert caught.value.missing == (absent,)
    assert await rexd.runtime.blob_store.find_missing([manifest.blob]) == [manifest.blob]
    assert await remote.get_manifest(manifest.blob) is None


async def test_a_manifest_with_a_wrong_total_size_is_refused(
    rexd: RunningRexd, http: aiohttp.ClientSession
) -> None:
    data = _random(300_000, seed=8)
    manifest = chunk_bytes(data, SMALL, BLAKE3)
    wrong = Digest(BLAKE3, manifest.blob.hash, manifest.blob.size + 1)
    doc = orjson.loads(manifest.to_json())
    doc["blob"] = str(wrong)

    status, error = await _error(http, "PUT", f"/v1/manifests/{wrong}", data=orjson.dumps(doc))

    assert (status, error["code"]) == (400, "invalid_manifest")
    assert "300000" in error["message"] and "nothing was stored" in error["message"].lower()
    status, error = await _error(http, "PUT", f"/v1/manifests/{wrong}", data=b"{not json")
    assert (status, error["code"]) == (400, "invalid_manifest")
    assert await rexd.runtime.blob_store.find_missing([wrong]) == [wrong]


async def test_chunks_that_do_not_make_up_the_blob_are_refused_and_nothing_is_stored(
    rexd: RunningRexd, client: RexClient
) -> None:
    data = _random(300_000, seed=9)
    manifest = chunk_bytes(data, SMALL, BLAKE3)
    remote = HttpChunkRemote(client)
    for offset, chunk in manifest:
        await remote.put_chunk(chunk, _plain(data, offset, chunk))
    reordered = list(manifest.chunks)
    reordered[0], reordered[1] = reordered[1], reordered[0]
    # Sizes still add up, each chunk verifies; the concatenation is other bytes.
    claimed = ChunkManifest(manifest.blob, SMALL, reordered)

    with pytest.raises(BlobMismatchError, match="not the blob"):
        await remote.put_manifest(claimed)

    assert await rexd.runtime.blob_store.find_missing([manifest.blob]) == [manifest.blob]
    assert await remote.get_manifest(manifest.blob) is None


def _plain(data: bytes, offset: int, chunk: Digest) -> ChunkPayload:
    return ChunkPayload(ChunkEncoding.IDENTITY, data[offset : offset + chunk.size])


# -- RexClient and the rex CLI take the chunked path for large files -----------------------


async def test_rex_client_uploads_an_edited_large_file_as_its_changed_chunks(
    client: RexClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    data = _random(CHUNKED_MIN_SIZE + (2 << 20), seed=10)
    source = work / "big.bin"
    source.write_bytes(data)
    sent: list[int] = []
    real_put = HttpChunkRemote.put_chunk

    async def counting_put(self: HttpChunkRemote, digest: Digest, payload: ChunkPayload) -> None:
        sent.append(digest.size)
        await real_put(self, digest, payload)

    monkeypatch.setattr(HttpChunkRemote, "put_chunk", counting_put)
    seen: list[tuple[int, int]] = []
    first = await client.upload_file(source, progress=lambda *p: seen.append(p))
    assert first == digest_of(data, BLAKE3)
    assert sum(sent) == len(data)
    assert seen[-1] == (len(data), len(data))
    sent.clear()
    edited = b"x" * 1024 + data
    source.write_bytes(edited)

    second = await client.upload_file(source)

    assert second == digest_of(edited, BLAKE3)
    assert 0 < sum(sent) <= 2 * (2 << 20)  # the first chunk or two, not the file
    seen.clear()
    target = work / "copy.bin"
    target.write_bytes(data)  # the previous version: its chunks are reused
    await client.download_file(second, target, progress=lambda *p: seen.append(p))
    assert target.read_bytes() == edited
    assert seen[-1] == (len(edited), len(edited))
    assert sorted(p.name for p in work.iterdir()) == ["big.bin", "copy.bin"]


async def test_rex_cas_put_and_get_of_a_large_file_go_through_chunks(
    rexd: RunningRexd, tmp_path: Path
) -> None:
    data = _random(CHUNKED_MIN_SIZE + 12_345, seed=11)
    source = tmp_path / "input.bin"
    source.write_bytes(data)

    status, stdout, stderr = await _rex("--server", rexd.url, "cas", "put", str(source))

    assert status == 0, stderr
    digest = digest_of(data, BLAKE3)
    assert stdout == f"{digest}\n"
    manifest = chunk_bytes(data, function=BLAKE3)
    store = rexd.runtime.blob_store
    assert not await store.find_missing([digest, *manifest.chunks])  # chunks, then spliced
    target = tmp_path / "output.bin"
    status, _, stderr = await _rex("--server", rexd.url, "cas", "get", str(digest), "-o",
                                   str(target))
    assert status == 0, stderr
    assert target.read_bytes() == data


async def test_rex_cas_get_of_a_large_blob_with_lost_chunks_fails_cleanly(
    rexd: RunningRexd, client: RexClient, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    data = _random(CHUNKED_MIN_SIZE, seed=12)
    (work / "input.bin").write_bytes(data)
    digest = await client.upload_file(work / "input.bin")
    store = rexd.runtime.blob_store
    manifest = chunk_bytes(data, function=BLAKE3)
    await store.delete(digest)
    await store.delete(manifest.chunks[3])

    status, _, stderr = await _rex("--server", rexd.url, "cas", "get", str(digest), "-o",
                                   str(work / "out.bin"))

    assert status == 1
    assert str(manifest.chunks[3]) in stderr and "Traceback" not in stderr
    assert os.listdir(work) == ["input.bin"]


# -- directory trees -----------------------------------------------------------------------


async def test_a_tree_round_trips_and_an_edit_re_sends_only_its_chunks(
    client: RexClient, tmp_path: Path
) -> None:
    source = tmp_path / "tree"
    (source / "lib" / "deep").mkdir(parents=True)
    files = {
        "a.bin": _random(400_000, seed=20),
        "lib/b.bin": _random(300_000, seed=21),
        "lib/deep/c.txt": b"small\n",
        "lib/empty": b"",
    }
    for relative, data in files.items():
        (source / relative).write_bytes(data)
    (source / "link").symlink_to("a.bin")
    manager = _manager(HttpChunkRemote(client))

    first = await manager.upload_tree(source)

    assert sorted(first.blobs) == sorted(files)  # regular files only
    assert first.blobs["lib/b.bin"] == digest_of(files["lib/b.bin"], BLAKE3)
    (source / "a.bin").write_bytes(b"edit" + files["a.bin"])
    second = await manager.upload_tree(source)
    assert 0 < second.bytes_moved <= 2 * SMALL.max_size
    target = tmp_path / "copy"
    down = await manager.download_tree(second.blobs, target)
    for relative in files:
        assert (target / relative).read_bytes() == (source / relative).read_bytes()
    assert down.bytes_moved == sum(p.stat().st_size for p in source.rglob("*") if p.is_file()
                                   and not p.is_symlink())


async def test_a_tree_download_refuses_paths_that_leave_its_root(
    client: RexClient, tmp_path: Path
) -> None:
    manager = _manager(HttpChunkRemote(client))
    blob = digest_of(b"x", BLAKE3)
    for bad in ("../escape", "/etc/passwd", "a/../../b", ""):
        with pytest.raises(TransferError, match="leave the tree"):
            await manager.download_tree({bad: blob}, tmp_path / "root")
    assert not (tmp_path / "root").exists()
