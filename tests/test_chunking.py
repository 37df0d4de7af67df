"""FastCDC 2020 chunking and chunk manifests: the REAPI test vectors, edits, validation."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import orjson
import pytest

from rexcore.artifacts import chunking
from rexcore.artifacts.chunking import (
    REAPI_CHUNKING,
    ChunkingParams,
    chunk_bytes,
    chunk_digests,
    chunk_file,
)
from rexcore.artifacts.digest import Digest, DigestFunction, digest_of
from rexcore.artifacts.manifest import (
    ChunkingParamsError,
    ChunkManifest,
    InvalidManifestError,
    TransferError,
)

DATA = Path(__file__).parent / "data" / "fastcdc2020"
IMAGE = DATA / "SekienAkashita.jpg"
# The parameters the published vectors were computed with.
VECTOR_PARAMS = {"avg_size": 16384, "min_size": 4096, "max_size": 65535, "normalization": 2}
SMALL = ChunkingParams(avg_size=16 << 10)  # 4 KiB / 16 KiB / 64 KiB: many chunks, fast tests


def _vectors() -> dict[int, list[tuple[int, int, str, int]]]:
    by_seed: dict[int, list[tuple[int, int, str, int]]] = {}
    seed = None
    for line in (DATA / "test_vectors.txt").read_text().splitlines():
        if line.startswith("# Seed:"):
            seed = int(line.split(":")[1])
            by_seed[seed] = []
        elif line.strip() and not line.startswith("#"):
            assert seed is not None
            offset, length, sha256, fingerprint = line.split()
            by_seed[seed].append((int(offset), int(length), sha256, int(fingerprint)))
    return by_seed


VECTORS = _vectors()


def _random(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def test_the_test_data_is_the_published_input() -> None:
    data = IMAGE.read_bytes()
    assert len(data) == 109466
    assert hashlib.sha256(data).hexdigest() == (
        "d9e749d9367fc908876749d6502eb212fee88c9a94892fb07da5ef3ba8bc39ed"
    )
    assert sorted(VECTORS) == [0, 666] and all(len(v) == 6 for v in VECTORS.values())


@pytest.mark.parametrize("seed", sorted(VECTORS))
@pytest.mark.parametrize("source", ["bytes", "file"])
def test_reproduces_every_boundary_of_the_fastcdc2020_vectors(seed: int, source: str) -> None:
    params = ChunkingParams(**VECTOR_PARAMS, seed=seed)
    if source == "bytes":
        manifest = chunk_bytes(IMAGE.read_bytes(), params, DigestFunction.SHA256)
    else:
        manifest = chunk_file(IMAGE, params, DigestFunction.SHA256)
    got = [(offset, chunk.size, chunk.hash) for offset, chunk in manifest]
    assert got == [(offset, length, sha) for offset, length, sha, _ in VECTORS[seed]]
    assert manifest.blob == digest_of(IMAGE.read_bytes(), DigestFunction.SHA256)


@pytest.mark.parametrize("seed", sorted(VECTORS))
def test_cutter_reports_the_vectors_gear_fingerprints(seed: int) -> None:
    params = ChunkingParams(**VECTOR_PARAMS, seed=seed)
    cuts = chunking._cutter(params).cut_buf(IMAGE.read_bytes())
    assert [c.gear_hash for c in cuts] == [fp for *_, fp in VECTORS[seed]]


def test_blake3_session_uses_the_same_boundaries_with_blake3_chunk_digests() -> None:
    data = IMAGE.read_bytes()
    params = ChunkingParams(**VECTOR_PARAMS)
    manifest = chunk_bytes(data, params, DigestFunction.BLAKE3)
    assert [(o, c.size) for o, c in manifest] == [(o, n) for o, n, _, _ in VECTORS[0]]
    for offset, chunk in manifest:
        assert chunk == digest_of(data[offset : offset + chunk.size], DigestFunction.BLAKE3)
    assert manifest.blob == digest_of(data, DigestFunction.BLAKE3)


def test_default_parameters_are_the_reapi_ones() -> None:
    assert REAPI_CHUNKING == ChunkingParams()
    assert (REAPI_CHUNKING.avg_size, REAPI_CHUNKING.min_size, REAPI_CHUNKING.max_size) == (
        512 << 10,
        128 << 10,
        2 << 20,
    )
    assert (REAPI_CHUNKING.normalization, REAPI_CHUNKING.seed) == (2, 0)
    tuned = ChunkingParams(avg_size=64 << 10)
    assert (tuned.min_size, tuned.max_size) == (16 << 10, 256 << 10)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"avg_size": 500_000}, "power of two"),
        ({"avg_size": 512}, "power of two"),
        ({"avg_size": 8 << 20}, "power of two"),
        ({"avg_size": 16384, "min_size": 32}, "min_size"),
        ({"avg_size": 16384, "max_size": 8192}, "max_size"),
        ({"normalization": 4}, "normalization"),
        ({"seed": -1}, "seed"),
        ({"seed": 1 << 63}, "seed"),
    ],
)
def test_invalid_chunking_parameters_are_refused_with_the_field_named(
    fields: dict[str, int], named: str
) -> None:
    with pytest.raises(ChunkingParamsError, match=named) as caught:
        ChunkingParams(**fields)
    assert isinstance(caught.value, TransferError) and isinstance(caught.value, ValueError)


@pytest.mark.parametrize("function", list(DigestFunction))
def test_blobs_smaller_than_max_size_are_one_chunk(function: DigestFunction) -> None:
    # FastCDC would cut this prefix at 19186; below max_size the blob stays whole.
    data = IMAGE.read_bytes()[:65534]
    params = ChunkingParams(**VECTOR_PARAMS)
    manifest = chunk_bytes(data, params, function)
    assert manifest.chunks == (manifest.blob,) == (digest_of(data, function),)
    assert chunk_digests(data, params, function) == [manifest.blob]
    assert len(chunk_bytes(IMAGE.read_bytes()[:65535], params, function).chunks) > 1


def test_empty_blob_is_one_empty_chunk(tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    for manifest in (chunk_bytes(b""), chunk_file(tmp_path / "empty")):
        assert manifest.chunks == (DigestFunction.BLAKE3.empty,)
        assert manifest.blob.is_empty


def test_inserting_1kib_at_the_front_changes_only_the_first_chunks() -> None:
    original = _random(16 << 20)
    edited = _random(1024, seed=1) + original
    before = chunk_bytes(original).chunks
    after = chunk_bytes(edited).chunks
    changed = [i for i, chunk in enumerate(after) if chunk not in set(before)]
    assert changed and max(changed) < 3
    assert after[len(changed) :] == before[-(len(after) - len(changed)) :]


def test_changing_one_byte_in_place_changes_one_or_two_chunks() -> None:
    original = bytearray(_random(16 << 20))
    before = set(chunk_bytes(original).chunks)
    original[9_000_000] ^= 0xFF
    after = chunk_bytes(original).chunks
    assert 1 <= sum(chunk not in before for chunk in after) <= 2


def test_a_file_chunks_like_the_same_bytes_across_read_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chunking, "_READ_BLOCK", 1)  # blocks of 4 * max_size
    monkeypatch.setattr(chunking, "_PIPELINE_MIN", 1)
    data = _random(3_000_000, seed=3)
    (tmp_path / "blob").write_bytes(data)
    assert chunk_file(tmp_path / "blob", SMALL) == chunk_bytes(data, SMALL)
    assert len(chunk_bytes(data, SMALL).chunks) > 100


def test_cutting_in_a_helper_thread_gives_the_same_manifest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = _random(2_000_000, seed=4)
    serial = chunk_bytes(data, SMALL, DigestFunction.SHA256)
    monkeypatch.setattr(chunking, "_PIPELINE_MIN", 1)
    assert chunk_bytes(data, SMALL, DigestFunction.SHA256) == serial
    assert chunk_digests(data, SMALL, DigestFunction.SHA256) == list(serial.chunks)


def test_chunk_sizes_respect_the_limits() -> None:
    manifest = chunk_bytes(_random(4_000_000, seed=5), SMALL)
    sizes = [chunk.size for chunk in manifest.chunks]
    assert max(sizes) <= SMALL.max_size
    assert min(sizes[:-1]) >= SMALL.min_size - 1
    assert sum(sizes) == manifest.blob.size == 4_000_000


# -- manifests ---------------------------------------------------------------------------


def _manifest(function: DigestFunction = DigestFunction.BLAKE3) -> ChunkManifest:
    return chunk_bytes(_random(300_000, seed=6), SMALL, function)


@pytest.mark.parametrize("function", list(DigestFunction))
def test_manifest_round_trips_through_the_json_codec(function: DigestFunction) -> None:
    manifest = _manifest(function)
    assert ChunkManifest.from_json(manifest.to_json()) == manifest
    raw = orjson.loads(manifest.to_json())
    assert raw["blob"] == str(manifest.blob) and raw["params"]["avg_size"] == 16 << 10


def test_manifest_whose_chunks_do_not_add_up_to_the_blob_is_refused() -> None:
    manifest = _manifest()
    with pytest.raises(InvalidManifestError, match="add up to"):
        ChunkManifest(manifest.blob, SMALL, manifest.chunks[:-1])
    raw = orjson.loads(manifest.to_json())
    raw["blob"] = str(Digest(manifest.blob.function, manifest.blob.hash, 299_999))
    with pytest.raises(InvalidManifestError, match="add up to 300000 bytes, the blob has 299999"):
        ChunkManifest.from_json(orjson.dumps(raw))


def test_manifest_mixing_digest_functions_is_refused() -> None:
    manifest = _manifest()
    stranger = digest_of(b"x" * manifest.chunks[0].size, DigestFunction.SHA256)
    with pytest.raises(InvalidManifestError, match="mixes digest functions"):
        ChunkManifest(manifest.blob, SMALL, (stranger, *manifest.chunks[1:]))


def test_manifest_with_a_chunk_over_max_size_is_refused() -> None:
    data = _random(200_000, seed=7)
    halves = (digest_of(data[:130_000]), digest_of(data[130_000:]))
    with pytest.raises(InvalidManifestError, match="max_size"):
        ChunkManifest(digest_of(data), SMALL, halves)


def test_manifest_splitting_a_small_blob_or_naming_a_stranger_is_refused() -> None:
    data = _random(1000, seed=8)
    blob = digest_of(data)
    with pytest.raises(InvalidManifestError, match="smaller than max_size"):
        ChunkManifest(blob, SMALL, (digest_of(data[:500]), digest_of(data[500:])))
    with pytest.raises(InvalidManifestError, match="not the blob itself"):
        ChunkManifest(blob, SMALL, (digest_of(_random(1000, seed=9)),))
    with pytest.raises(InvalidManifestError, match="no chunks"):
        ChunkManifest(blob, SMALL, ())


def test_undecodable_manifest_is_an_invalid_manifest_error() -> None:
    with pytest.raises(InvalidManifestError, match="required field missing"):
        ChunkManifest.from_json(b'{"blob": "x"}')
    with pytest.raises(InvalidManifestError, match="not JSON"):
        ChunkManifest.from_json(b"{")
