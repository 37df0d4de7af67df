"""Blob store and action cache alone, no HTTP: prints one JSON object.

    python bench/blob_store.py [--size 64MiB] [--runs 5]

Streamed write (64 KiB chunks, as a socket delivers them) and full read of one blob
through ``DiskBlobStore`` per digest function, and the action cache's hit/miss latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rexcore.artifacts.action_cache import create_action_cache
from rexcore.artifacts.digest import DigestFunction, digest_of
from rexcore.artifacts.disk import DiskBlobStore
from rexcore.config.types import parse_size
from rexcore.serialization.action_result import ActionResult, OutputFile

CHUNK = 64 * 1024


async def _store_figures(root: Path, data: bytes, function: DigestFunction, runs: int) -> dict:
    writes, reads = [], []
    for run in range(runs):
        store = DiskBlobStore(root / f"{function.value}-{run}", max_size=None)
        await store.open()
        payload = data[:-8] + run.to_bytes(8, "big")
        digest = digest_of(payload, function)
        view = memoryview(payload)
        started = time.perf_counter()
        async with store.open_write(digest) as writer:
            for offset in range(0, len(view), CHUNK):
                await writer.write(view[offset:offset + CHUNK])
        writes.append(time.perf_counter() - started)
        started = time.perf_counter()
        size = 0
        async for chunk in store.read(digest):
            size += len(chunk)
        reads.append(time.perf_counter() - started)
        assert size == len(payload)
        await store.close()
    mb = len(data) / 1e6
    return {
        f"{function.value}_write_MBps": round(mb / statistics.median(writes), 1),
        f"{function.value}_read_MBps": round(mb / statistics.median(reads), 1),
    }


async def _cache_figures(root: Path) -> dict:
    store = DiskBlobStore(root / "ac-store", max_size=None)
    await store.open()
    cache = create_action_cache(root / "ac-data", store)
    await cache.open()
    blob = b"output"
    blob_digest = digest_of(blob)
    await store.put(blob_digest, blob)
    keys = [digest_of(f"action {i}".encode()) for i in range(1000)]
    result = ActionResult(output_files=(OutputFile("out", blob_digest),))
    for key in keys:
        await cache.put(key, result)
    hits, misses = [], []
    for key in keys:
        started = time.perf_counter()
        assert await cache.get(key) is not None
        hits.append(time.perf_counter() - started)
        missing = digest_of(key.hash.encode())
        started = time.perf_counter()
        assert await cache.get(missing) is None
        misses.append(time.perf_counter() - started)
    await cache.close()
    await store.close()
    return {
        "action_cache_hit_p50_us": round(statistics.median(hits) * 1e6, 1),
        "action_cache_miss_p50_us": round(statistics.median(misses) * 1e6, 1),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="64MiB")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    data = os.urandom(parse_size(args.size))
    figures: dict = {"blob_bytes": len(data), "runs": args.runs}
    with tempfile.TemporaryDirectory(dir=os.environ.get("REX_BENCH_DIR")) as tmp:
        root = Path(tmp)
        for function in DigestFunction:
            figures |= await _store_figures(root, data, function, args.runs)
        figures |= await _cache_figures(root)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
