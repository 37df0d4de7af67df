"""Chunked transfers: only missing chunks move, in parallel, resumably, verified, and a bad
chunk or manifest commits nothing."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from pathlib import Path

import orjson
import pytest
import zstandard

from rexcore.artifacts.chunk_store import StoreChunkRemote
from rexcore.artifacts.chunking import ChunkingParams, chunk_bytes, chunk_file
from rexcore.artifacts.digest import Digest, DigestFunction, digest_of
from rexcore.artifacts.manifest import ChunkManifest
from rexcore.artifacts.memory import MemoryBlobStore
from rexcore.artifacts.transfer import (
    BlobMismatchError,
    ChunkEncoding,
    ChunkPayload,
    ChunkRemote,
    CorruptChunkError,
    InvalidManifestError,
    ManifestNotFoundError,
    MissingChunksError,
    TransferError,
    TransferManager,
    TransferOptions,
    decode_chunk,
    encode_chunk,
)

SMALL = ChunkingParams(avg_size=16 << 10)  # 4 KiB / 16 KiB / 64 KiB chunks


def _random(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def _text(size: int) -> bytes:
    line = b"warning: unused variable `x` in src/lib.rs, line %d\n"
    out = bytearray()
    while len(out) < size:
        out += line % len(out)
    return bytes(out[:size])


class Watched:
    """A remote that counts chunk puts and gets, tracks how many run at once, and sets
    ``reached`` once ``stop_after`` of them completed (to interrupt a transfer there)."""

    def __init__(self, inner: StoreChunkRemote, stop_after: int | None = None) -> None:
        self.inner = inner
        self.stop_after = stop_after
        self.reached = asyncio.Event()
        self.puts: list[Digest] = []
        self.gets: list[Digest] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.tamper: dict[Digest, ChunkPayload] = {}

    def _done(self, moved: list[Digest], digest: Digest) -> None:
        moved.append(digest)
        if self.stop_after is not None and len(moved) >= self.stop_after:
            self.reached.set()

    async def find_missing(self, digests: Sequence[Digest]) -> list[Digest]:
        return await self.inner.find_missing(digests)

    async def put_chunk(self, digest: Digest, payload: ChunkPayload) -> None:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.001)  # let the other workers start theirs
            await self.inner.put_chunk(digest, payload)
        finally:
            self.in_flight -= 1
        self._done(self.puts, digest)

    async def get_chunk(self, digest: Digest) -> ChunkPayload:
        payload = self.tamper.get(digest) or await self.inner.get_chunk(digest)
        self._done(self.gets, digest)
        return payload

    async def put_manifest(self, manifest: ChunkManifest) -> None:
        await self.inner.put_manifest(manifest)

    async def get_manifest(self, blob: Digest) -> ChunkManifest | None:
        return await self.inner.get_manifest(blob)


@pytest.fixture
def remote() -> StoreChunkRemote:
    return StoreChunkRemote(MemoryBlobStore(max_size=None))


def _manager(
    remote: ChunkRemote,
    function: DigestFunction = DigestFunction.BLAKE3,
    concurrency: int = 4,
    compression: bool = True,
) -> TransferManager:
    return TransferManager(
        remote, function, SMALL, TransferOptions(concurrency=concurrency, compression=compression)
    )


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_store_chunk_remote_is_a_chunk_remote(remote: StoreChunkRemote) -> None:
    assert isinstance(remote, ChunkRemote)


@pytest.mark.parametrize("function", list(DigestFunction))
async def test_upload_then_download_round_trips_a_file(
    tmp_path: Path, remote: StoreChunkRemote, function: DigestFunction
) -> None:
    data = _random(1_500_000)
    manager = _manager(remote, function)
    up = await manager.upload_file(_write(tmp_path / "in", data))
    assert up.blob == digest_of(data, function)
    assert all(c.function is function for c in up.manifest.chunks)
    assert up.bytes_moved == len(data) and up.reused == 0
    assert remote.chunks_put == len(set(up.manifest.chunks)) > 20

    down = await manager.download_file(up.blob, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == data
    assert down.bytes_moved == len(data) and down.manifest == up.manifest
    assert _leftovers(tmp_path) == []


async def test_uploading_the_same_file_again_sends_no_chunks(
    tmp_path: Path, remote: StoreChunkRemote
) -> None:
    path = _write(tmp_path / "in", _random(1_000_000))
    manager = _manager(remote)
    first = await manager.upload_file(path)
    second = await manager.upload_file(path)
    assert second.moved == () and second.reused == len(set(first.manifest.chunks))
    assert remote.chunks_put == len(first.moved)

    # a lost or broken manifest is stored again, still without sending chunks
    del remote.manifests[first.blob]
    await manager.upload_file(path)
    remote.manifests[first.blob] = b"{"
    await manager.upload_file(path)
    assert await remote.get_manifest(first.blob) == first.manifest
    assert remote.chunks_put == len(first.moved)


async def test_an_edit_re_sends_only_the_chunks_it_touched(
    tmp_path: Path, remote: StoreChunkRemote
) -> None:
    data = _random(2_000_000)
    manager = _manager(remote)
    first = await manager.upload_file(_write(tmp_path / "v1", data))
    edited = data[:1_000_000] + _random(1024, seed=1) + data[1_000_000:]
    second = await manager.upload_file(_write(tmp_path / "v2", edited))
    assert 1 <= len(second.moved) <= 3
    assert second.bytes_moved < 3 * SMALL.max_size
    assert remote.chunks_put == len(first.moved) + len(second.moved)


async def test_chunks_move_in_parallel_up_to_the_concurrency_bound(
    tmp_path: Path, remote: StoreChunkRemote
) -> None:
    watched = Watched(remote)
    await _manager(watched, concurrency=3).upload_file(_write(tmp_path / "in", _random(800_000)))
    assert watched.most_in_flight == 3


async def test_an_interrupted_upload_resumes_sending_only_what_is_missing(
    tmp_path: Path, remote: StoreChunkRemote
) -> None:
    data = _random(1_500_000)
    path = _write(tmp_path / "in", data)
    distinct = len(set(chunk_file(path, SMALL).chunks))
    watched = Watched(remote, stop_after=10)
    upload = asyncio.create_task(_manager(watched, concurrency=1).upload_file(path))
    await watched.reached.wait()
    upload.cancel()
    with pytest.raises(asyncio.CancelledError):
        await upload
    assert len(watched.puts) == 10 and remote.manifests == {}

    again = Watched(remote)
    report = await _manager(again, concurrency=1).upload_file(path)
    assert len(again.puts) == distinct - 10
    assert set(again.puts).isdisjoint(watched.puts)
    assert report.reused == 10 and report.blob in remote.manifests
    await _manager(remote).download_file(report.blob, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == data


async def test_an_interrupted_download_resumes_from_its_verified_chunks(
    tmp_path: Path, remote: StoreChunkRemote
) -> None:
    data = _random(1_500_000)
    blob = (await _manager(remote).upload_file(_write(tmp_path / "in", data))).blob
    distinct = len(set((await remote.get_manifest(blob)).chunks))  # type: ignore[union-attr]
    watched = Watched(remote, stop_after=12)
    download = asyncio.create_task(
        _manager(watched, concurrency=1).download_file(blob, tmp_path / "out")
    )
    await watched.reached.wait()
    download.cancel()
    with pytest.raises(asyncio.CancelledError):
        await download
    assert not (tmp_path / "out").exists()
    assert len(_leftovers(tmp_path)) == 1  # the partial file, kept for the next attempt

    again = Watched(remote)
    report = await _manager(again, concurrency=1).download_file(blob, tmp_path / "out")
    assert len(again.gets) == distinct - 12 and report.reused == 12
    assert set(again.gets).isdisjoint(watched.gets)
    assert (tmp_path / "out").read_bytes() == data
    assert _leftovers(tmp_path) == []


async def test_a_download_over_an_older_copy_fetches_only_the_changed_chunks(
    tmp_path: Path, remote: StoreChunkRemote
) -> None:
    data = _random(2_000_000)
    edited = _random(1024, seed=2) + data
    manager = _manager(remote)
    v1 = await manager.upload_file(_write(tmp_path / "v1", data))
    v2 = await manager.upload_file(_write(tmp_path / "v2", edited))
    await manager.download_file(v1.blob, tmp_path / "out")
    watched = Watched(remote)
    report = await _manager(watched).download_file(v2.blob, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == edited
    assert 1 <= len(watched.gets) <= 3 and report.reused == len(set(v2.manifest.chunks)) - len(
        watched.gets
    )


async def test_a_corrupt_chunk_fails_the_download_and_commits_nothing(
    tmp_path: Path, remote: StoreChunkRemote
) -> None:
    data = _random(1_000_000)
    blob = (await _manager(remote).upload_file(_write(tmp_path / "in", data))).blob
    (tmp_path / "out").write_bytes(b"the previous version")
    manifest = await remote.get_manifest(blob)
    assert manifest is not None
    victim = manifest.chunks[5]
    good = await remote.store.get(victim)
    watched = Watched(remote)
    watched.tamper[victim] = ChunkPayload(ChunkEncoding.IDENTITY, good[:-1] + b"\0")
    with pytest.raises(CorruptChunkError, match=f"chunk {victim} is corrupt: the bytes hash to"):
        await _manager(watched).download_file(blob, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == b"the previous version"
    assert _leftovers(tmp_path) == []


async def test_a_corrupt_chunk_is_refused_by_the_remote(remote: StoreChunkRemote) -> None:
    data = _random(70_000)
    digest = digest_of(data)
    with pytest.raises(CorruptChunkError, match="nothing was committed"):
        await remote.put_chunk(digest, ChunkPayload(ChunkEncoding.IDENTITY, data[:-1] + b"!"))
    with pytest.raises(CorruptChunkError, match="69999 bytes arrived"):
        await remote.put_chunk(digest, ChunkPayload(ChunkEncoding.IDENTITY, data[:-1]))
    assert await remote.find_missing([digest]) == [digest]


async def test_a_manifest_naming_a_missing_chunk_fails_and_commits_nothing(
    tmp_path: Path, remote: StoreChunkRemote
) -> None:
    data = _random(1_000_000)
    blob = (await _manager(remote).upload_file(_write(tmp_path / "in", data))).blob
    manifest = await remote.get_manifest(blob)
    assert manifest is not None
    lost = manifest.chunks[3]
    await remote.store.delete(lost)
    with pytest.raises(MissingChunksError, match=f"names 1 chunk.* the remote lacks: {lost}"):
        await _manager(remote).download_file(blob, tmp_path / "out")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []

    # and a remote refuses to store a manifest whose chunks it does not hold
    other = chunk_bytes(_random(500_000, seed=5), SMALL)
    with pytest.raises(MissingChunksError) as caught:
        await remote.put_manifest(other)
    assert set(caught.value.missing) == set(other.chunks)
    assert other.blob not in remote.manifests


async def test_a_manifest_with_a_wrong_total_size_fails_and_commits_nothing(
    tmp_path: Path, remote: StoreChunkRemote
) -> None:
    data = _random(1_000_000)
    blob = (await _manager(remote).upload_file(_write(tmp_path / "in", data))).blob
    raw = orjson.loads(remote.manifests[blob])
    first = Digest(blob.function, raw["chunks"][0].split("/")[1], 123)
    raw["chunks"][0] = str(first)  # a chunk size that no longer adds up to the blob
    remote.manifests[blob] = orjson.dumps(raw)
    with pytest.raises(InvalidManifestError, match="add up to .* the blob has 1000000"):
        await _manager(remote).download_file(blob, tmp_path / "out")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


async def test_chunks_that_verify_but_do_not_make_up_the_blob_are_refused(
    tmp_path: Path, remote: StoreChunkRemote
) -> None:
    data = _random(600_000)
    manager = _manager(remote)
    real = (await manager.upload_file(_write(tmp_path / "in", data))).manifest
    swapped = (real.chunks[1], real.chunks[0], *real.chunks[2:])
    liar = ChunkManifest(real.blob, real.params, swapped)
    with pytest.raises(BlobMismatchError, match="not stored"):
        await remote.put_manifest(liar)
    remote.manifests[real.blob] = liar.to_json()  # as if a broken server served it anyway
    with pytest.raises(BlobMismatchError, match="each verify but together hash"):
        await manager.download_file(real.blob, tmp_path / "out")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


async def test_a_file_changing_during_upload_stores_no_manifest(
    tmp_path: Path, remote: StoreChunkRemote
) -> None:
    path = _write(tmp_path / "in", _random(500_000))

    class Meddling(Watched):
        async def find_missing(self, digests: Sequence[Digest]) -> list[Digest]:
            path.write_bytes(_random(500_000, seed=9))
            return await super().find_missing(digests)

    with pytest.raises(BlobMismatchError, match="changed while it was uploaded"):
        await _manager(Meddling(remote)).upload_file(path)
    assert remote.manifests == {}


async def test_downloading_an_unknown_blob_says_there_is_no_manifest(
    tmp_path: Path, remote: StoreChunkRemote
) -> None:
    blob = digest_of(b"never uploaded")
    with pytest.raises(ManifestNotFoundError, match="no chunk manifest"):
        await _manager(remote).download_file(blob, tmp_path / "out")
    assert isinstance(ManifestNotFoundError(blob), TransferError)


async def test_compressible_chunks_travel_zstd_and_random_ones_plain(
    tmp_path: Path, remote: StoreChunkRemote
) -> None:
    manager = _manager(remote)
    text = await manager.upload_file(_write(tmp_path / "log", _text(1_000_000)))
    assert {t.encoding for t in text.moved} == {ChunkEncoding.ZSTD}
    assert text.wire_bytes < text.bytes_moved / 4
    assert remote.wire_bytes_put < remote.chunk_bytes_put

    noise = await manager.upload_file(_write(tmp_path / "noise", _random(1_000_000)))
    assert {t.encoding for t in noise.moved} == {ChunkEncoding.IDENTITY}
    assert noise.wire_bytes == noise.bytes_moved

    down = await manager.download_file(text.blob, tmp_path / "log.out")
    assert {t.encoding for t in down.moved} == {ChunkEncoding.ZSTD}
    assert (tmp_path / "log.out").read_bytes() == _text(1_000_000)


async def test_compression_can_be_turned_off(tmp_path: Path, remote: StoreChunkRemote) -> None:
    report = await _manager(remote, compression=False).upload_file(
        _write(tmp_path / "log", _text(300_000))
    )
    assert {t.encoding for t in report.moved} == {ChunkEncoding.IDENTITY}


def test_encode_chunk_compresses_only_when_it_pays() -> None:
    assert encode_chunk(_text(200_000)).encoding is ChunkEncoding.ZSTD
    assert encode_chunk(_random(200_000)).encoding is ChunkEncoding.IDENTITY
    assert encode_chunk(_text(500)).encoding is ChunkEncoding.IDENTITY  # too small to bother
    data = _text(200_000)
    assert decode_chunk(digest_of(data), encode_chunk(data)) == data


def test_a_zstd_frame_claiming_more_than_the_digest_is_corrupt() -> None:
    data = _text(100_000)
    bomb = zstandard.ZstdCompressor().compress(data + data)
    with pytest.raises(CorruptChunkError, match="declares 200000 bytes"):
        decode_chunk(digest_of(data), ChunkPayload(ChunkEncoding.ZSTD, bomb))
    with pytest.raises(CorruptChunkError, match="does not decompress"):
        decode_chunk(digest_of(data), ChunkPayload(ChunkEncoding.ZSTD, b"not zstd at all"))


async def test_a_sha256_session_moves_sha256_chunks(
    tmp_path: Path, remote: StoreChunkRemote
) -> None:
    data = _random(900_000)
    manager = _manager(remote, DigestFunction.SHA256)
    report = await manager.upload_file(_write(tmp_path / "in", data))
    assert report.blob.function is DigestFunction.SHA256
    assert {c.function for c in report.manifest.chunks} == {DigestFunction.SHA256}
    assert await remote.find_missing(list(report.manifest.chunks)) == []
    # a BLAKE3 session has other addresses for the same bytes: it sends everything again
    again = await _manager(remote).upload_file(tmp_path / "in")
    assert len(again.moved) == len(set(again.manifest.chunks))
    await _manager(remote).download_file(report.blob, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == data


async def test_small_and_empty_files_move_as_one_chunk(
    tmp_path: Path, remote: StoreChunkRemote
) -> None:
    manager = _manager(remote)
    for name, data in (("small", _random(5000)), ("empty", b"")):
        report = await manager.upload_file(_write(tmp_path / name, data))
        assert report.manifest.chunks == (report.blob,)
        await manager.download_file(report.blob, tmp_path / f"{name}.out")
        assert (tmp_path / f"{name}.out").read_bytes() == data


async def test_a_failing_worker_cancels_the_others_and_raises_plainly(
    tmp_path: Path, remote: StoreChunkRemote
) -> None:
    blob = (await _manager(remote).upload_file(_write(tmp_path / "in", _random(1_000_000)))).blob
    manifest = await remote.get_manifest(blob)
    assert manifest is not None
    watched = Watched(remote)
    watched.tamper[manifest.chunks[0]] = ChunkPayload(ChunkEncoding.ZSTD, b"junk")
    with pytest.raises(CorruptChunkError, match="does not decompress"):
        await _manager(watched, concurrency=8).download_file(blob, tmp_path / "out")
    assert len(watched.gets) < len(set(manifest.chunks))
    assert _leftovers(tmp_path) == []
