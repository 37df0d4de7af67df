"""Throughput of the native HTTP CAS and latency of find-missing; prints one JSON object.

    python bench/http_cas.py                      # starts its own server on 127.0.0.1:0
    python bench/http_cas.py --server URL         # against a running rexd

Figures (MB = 10^6 bytes; each is the median of ``--runs`` runs, ``*_best`` the best):

- ``put_MBps``: ``RexClient.put_blob`` of a fresh random blob held in memory;
- ``get_MBps``: ``RexClient.get_blob`` of it, digest verification included;
- ``upload_file_MBps`` / ``download_file_MBps``: the same through files, hashing included;
- ``find_missing_10k_ms``: ``RexClient.find_missing`` of 10,000 digests never asked before
  (1% present), end to end; ``..._repeat_ms`` asks the same 10,000 again, as a build tool
  does; the ``..._server_ms`` figures are the server's own time (its Server-Timing header).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import aiohttp
import orjson

from rexcore.artifacts.digest import Digest, DigestFunction, digest_of
from rexcore.config.types import parse_size
from rexcore.protocol.client import RexClient, tune_malloc_for_streaming

from _rexd import start_rexd, stop_rexd  # noqa: E402  (bench/ is on sys.path when run)


# The fallback when `rexd serve` does not start: the parts the tests build, announcing
# itself with the line rexd prints. start_server() is the one place that knows either.
async def timed(action: Awaitable[Any]) -> tuple[float, Any]:
    """Seconds ``action`` took, and its result."""
    started = time.perf_counter()
    result = await action
    return time.perf_counter() - started, result


def summary(name: str, seconds: list[float], size: int) -> dict[str, float]:
    rates = [size / s / 1e6 for s in seconds]
    return {
        f"{name}_MBps": round(statistics.median(rates), 1),
        f"{name}_MBps_best": round(max(rates), 1),
    }


def _digests(count: int, present: list[bytes]) -> list[Digest]:
    digests = [digest_of(os.urandom(16)) for _ in range(count)]
    step = max(1, count // len(present))
    for index, blob in zip(range(0, count, step), present):
        digests[index] = digest_of(blob)
    return digests


async def bench(url: str, size: int, runs: int, work: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    async with RexClient(url) as client:
        warm = os.urandom(1 << 20)
        await client.put_blob(digest_of(warm), warm)
        await client.get_blob(digest_of(warm))

        put, get = [], []
        for _ in range(runs):
            data = os.urandom(size)
            digest = digest_of(data)
            put.append((await timed(client.put_blob(digest, data)))[0])
            get.append((await timed(client.get_blob(digest)))[0])
        results |= summary("put", put, size) | summary("get", get, size)

        upload, download = [], []
        source, target = work / "source.bin", work / "target.bin"
        for _ in range(runs):
            source.write_bytes(os.urandom(size))
            seconds, digest = await timed(client.upload_file(source))
            upload.append(seconds)
            download.append((await timed(client.download_file(digest, target)))[0])
        results |= summary("upload_file", upload, size) | summary("download_file", download, size)

        cold, repeat, cold_server, repeat_server = [], [], [], []
        async with aiohttp.ClientSession() as http:

            async def server_ms(digests: list[Digest]) -> float:
                body = orjson.dumps({"digests": [str(d) for d in digests]})
                async with http.post(
                    f"{url}/v1/cas/find-missing",
                    data=body,
                    headers={"Content-Type": "application/json"},
                ) as response:
                    await response.read()
                    timing = response.headers.get("Server-Timing", "")
                match = re.search(r"dur=([\d.]+)", timing)
                return float(match.group(1)) if match else float("nan")

            for _ in range(runs):
                blobs = [os.urandom(16) for _ in range(100)]  # 1% present
                for blob in blobs:
                    await client.put_blob(digest_of(blob), blob)
                asked = _digests(10_000, blobs)
                cold.append((await timed(client.find_missing(asked)))[0])
                repeat.append((await timed(client.find_missing(asked)))[0])
                fresh = _digests(10_000, blobs)
                cold_server.append(await server_ms(fresh))
                repeat_server.append(await server_ms(fresh))
        results["find_missing_10k_ms"] = round(statistics.median(cold) * 1000, 2)
        results["find_missing_10k_server_ms"] = round(statistics.median(cold_server), 2)
        results["find_missing_10k_repeat_ms"] = round(statistics.median(repeat) * 1000, 2)
        results["find_missing_10k_repeat_server_ms"] = round(statistics.median(repeat_server), 2)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", help="URL of a running server (default: start one)")
    parser.add_argument("--size", default="64MiB", help="blob size (default 64MiB)")
    parser.add_argument("--runs", type=int, default=5, help="runs per figure (default 5)")
    args = parser.parse_args()
    size = parse_size(args.size)
    tune_malloc_for_streaming()  # as the rex CLI does
    with tempfile.TemporaryDirectory(prefix="rex-bench-") as temp:
        work = Path(temp)
        process = None
        launched = "external"
        url = args.server
        if url is None:
            process, url = start_rexd(work / "data", "--workers", "0")
            launched = "rexd serve"
        try:
            results = asyncio.run(bench(url, size, args.runs, work))
        finally:
            if process is not None:
                stop_rexd(process)
    print(
        json.dumps(
            {
                **results,
                "blob_bytes": size,
                "runs": args.runs,
                "digest_function": DigestFunction.BLAKE3.value,
                "server": launched,
                "cpus": os.cpu_count(),
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
