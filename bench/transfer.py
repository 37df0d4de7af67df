"""Chunked transfer: what each edit of a large file re-sends, and what chunking costs.

    python bench/transfer.py [--size 64MiB] [--seed 1] [--seeds 1] [--runs 7]

For a random file (seeded, so runs are reproducible) and each edit, the original is
uploaded through ``TransferManager`` (REAPI FastCDC parameters, BLAKE3) to a fresh
in-process remote, then the edited file. ``sent`` is the share of the edited file's bytes
the second upload moved, everything included; ``resent`` leaves out the bytes the edit
itself introduced (1 byte, 1 KiB, 1 MiB, the rewritten pages), so it is the unchanged
data that moved again. ``fixed_256KiB_*`` are the same shares for a fixed 256 KiB chunker.
With ``--seeds N`` every edit is repeated for N seeds and means and worst cases are added.

Speed, medians of ``--runs`` interleaved runs over the same in-memory data:
``chunk_hash_MBps`` cuts and hashes every chunk (``chunk_digests``); ``manifest_MBps`` also
hashes the whole blob (``chunk_bytes``); ``blake3_MBps`` is one blake3 call over the data
with ``max_threads=AUTO`` (what rex's ``digest_of`` does for blobs of 1 MiB and more);
``blake3_1thread_MBps`` is one plain, single-threaded blake3 call.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import blake3

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rexcore.artifacts.chunk_store import StoreChunkRemote
from rexcore.artifacts.chunking import REAPI_CHUNKING, chunk_bytes, chunk_digests
from rexcore.artifacts.memory import MemoryBlobStore
from rexcore.artifacts.transfer import TransferManager
from rexcore.config.types import parse_size

FIXED_CHUNK = 256 << 10
PAGE = 4 << 10

# An edit returns the edited bytes and how many new bytes it introduced.
Edit = Callable[[bytes, random.Random], tuple[bytes, int]]


def _flip_one_byte(data: bytes, rng: random.Random) -> tuple[bytes, int]:
    edited = bytearray(data)
    edited[rng.randrange(len(data))] ^= 0xFF
    return bytes(edited), 1


def _insert(where: Callable[[int], int]) -> Edit:
    def edit(data: bytes, rng: random.Random) -> tuple[bytes, int]:
        at = where(len(data))
        return data[:at] + rng.randbytes(1024) + data[at:], 1024

    return edit


def _append_1mib(data: bytes, rng: random.Random) -> tuple[bytes, int]:
    return data + rng.randbytes(1 << 20), 1 << 20


def _rewrite_pages(data: bytes, rng: random.Random) -> tuple[bytes, int]:
    edited = bytearray(data)
    pages = len(data) // PAGE
    chosen = rng.sample(range(pages), max(1, pages // 100))
    for page in chosen:
        edited[page * PAGE : (page + 1) * PAGE] = rng.randbytes(PAGE)
    return bytes(edited), len(chosen) * PAGE


EDITS: dict[str, Edit] = {
    "one_byte_changed_in_place": _flip_one_byte,
    "1KiB_inserted_at_front": _insert(lambda size: 0),
    "1KiB_inserted_in_middle": _insert(lambda size: size // 2),
    "1MiB_appended": _append_1mib,
    "1pct_of_4KiB_pages_rewritten": _rewrite_pages,
}
TARGETS = {  # share of the edited file re-sent, at most
    "1KiB_inserted_at_front": 0.02,
    "1KiB_inserted_in_middle": 0.02,
    "1MiB_appended": 0.02,
}


def _fixed_sent(original: bytes, edited: bytes) -> int:
    def blocks(data: bytes) -> list[bytes]:
        view = memoryview(data)
        return [
            blake3.blake3(view[i : i + FIXED_CHUNK]).digest()
            for i in range(0, len(data), FIXED_CHUNK)
        ]

    known = set(blocks(original))
    return sum(
        min(FIXED_CHUNK, len(edited) - i * FIXED_CHUNK)
        for i, block in enumerate(blocks(edited))
        if block not in known
    )


async def _edit_figures(root: Path, original: bytes, edit: Edit, seed: int) -> dict:
    edited, new_bytes = edit(original, random.Random(seed * 7919 + 1))
    (root / "original").write_bytes(original)
    (root / "edited").write_bytes(edited)
    remote = StoreChunkRemote(MemoryBlobStore(max_size=None))
    manager = TransferManager(remote, params=REAPI_CHUNKING)
    await manager.upload_file(root / "original")
    report = await manager.upload_file(root / "edited")
    fixed = _fixed_sent(original, edited)
    return {
        "sent": report.bytes_moved / len(edited),
        "resent": max(0, report.bytes_moved - new_bytes) / len(edited),
        "chunks_sent": len(report.moved),
        "fixed_256KiB_sent": fixed / len(edited),
        "fixed_256KiB_resent": max(0, fixed - new_bytes) / len(edited),
    }


async def _upload_MBps(root: Path, data: bytes) -> float:
    (root / "fresh").write_bytes(data)
    manager = TransferManager(StoreChunkRemote(MemoryBlobStore(max_size=None)))
    started = time.perf_counter()
    await manager.upload_file(root / "fresh")
    return len(data) / 1e6 / (time.perf_counter() - started)


def _speed_figures(data: bytes, runs: int) -> dict:
    contenders: dict[str, Callable[[], object]] = {
        "chunk_hash_MBps": lambda: chunk_digests(data),
        "manifest_MBps": lambda: chunk_bytes(data),
        "blake3_MBps": lambda: blake3.blake3(data, max_threads=blake3.blake3.AUTO).digest(),
        "blake3_1thread_MBps": lambda: blake3.blake3(data).digest(),
    }
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(runs):
        for name, run in contenders.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    mb = len(data) / 1e6
    median = {name: round(mb / statistics.median(spent)) for name, spent in times.items()}
    best = {name: round(mb / min(spent)) for name, spent in times.items()}
    return {
        **median,
        "best_runs": best,
        "chunk_hash_share_of_blake3": round(median["chunk_hash_MBps"] / median["blake3_MBps"], 2),
        "chunk_hash_share_of_blake3_1thread": round(
            median["chunk_hash_MBps"] / median["blake3_1thread_MBps"], 2
        ),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="64MiB")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--seeds", type=int, default=1, help="repeat the edits for N seeds")
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    size = parse_size(args.size)
    seeds = range(args.seed, args.seed + args.seeds)
    originals = {seed: random.Random(seed).randbytes(size) for seed in seeds}
    figures: dict = {
        "file_bytes": size,
        "seeds": list(seeds),
        "chunking": {
            "avg": REAPI_CHUNKING.avg_size,
            "min": REAPI_CHUNKING.min_size,
            "max": REAPI_CHUNKING.max_size,
            "normalization": 2,
        },
    }
    edits: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("REX_BENCH_DIR")) as tmp:
        root = Path(tmp)
        for name, edit in EDITS.items():
            per_seed = [await _edit_figures(root, originals[s], edit, s) for s in seeds]
            entry = {key: round(value, 4) for key, value in per_seed[0].items()}
            if len(per_seed) > 1:
                for key in ("sent", "resent", "fixed_256KiB_sent"):
                    values = [f[key] for f in per_seed]
                    entry[f"{key}_mean"] = round(statistics.mean(values), 4)
                    entry[f"{key}_worst"] = round(max(values), 4)
            edits[name] = entry
        figures["upload_MBps"] = round(await _upload_MBps(root, originals[args.seed]))
    figures["edits"] = edits
    figures |= _speed_figures(originals[args.seed], args.runs)
    figures["targets_met"] = {
        **{
            f"{name}_{share}_le_{limit:.0%}": edits[name][share] <= limit
            for name, limit in TARGETS.items()
            for share in ("sent", "resent")
        },
        "chunk_hash_ge_45pct_of_blake3": figures["chunk_hash_share_of_blake3"] >= 0.45,
    }
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
