"""Remote execution latency and throughput through the native API; prints one JSON object.

    python bench/execute.py [--runs 300] [--workers 2] [--slots 1] [--seconds 10] [--dir DIR]

Starts ``rexd serve --workers N --worker-slots N`` (process sandbox, local workers sharing
the store) and measures what a client sees for a trivial action (``/bin/true``, no inputs)
through ``execute_remotely`` (what ``rex run`` does), each run a cache miss (the
environment carries a counter, so every action digest is new):

- ``trivial_p50_ms`` / ``trivial_p99_ms``: one client, one action at a time, end to end
  (the Command and Action sent with the execute request, which waits for the result;
  empty stdout and stderr need no download);
- ``actions_per_s_c8``: 8 clients submitting such actions concurrently for ``--seconds``.

The data dir (blob store, action cache, scheduler database, exec roots) goes under
``--dir`` (default: the system's temp dir); ``data_dir_fs`` names its file system. Each
action creates a few files there (its Action and Command blobs, an action-cache entry, an
exec root), so on a file system where creating a file is slow the figures show it.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _rexd import start_rexd, stop_rexd

from rexcore.core.remote_action import execute_remotely
from rexcore.protocol.client import RexClient
from rexcore.serialization.sandbox_spec import SandboxSpec

_SPEC = SandboxSpec()
_counter = itertools.count()


async def _trivial(client: RexClient, workdir: Path) -> float:
    started = time.perf_counter()
    result = await execute_remotely(
        client, ["/bin/true"], workdir=workdir, spec=_SPEC,
        environment={"PATH": "/usr/bin:/bin", "REX_BENCH_RUN": str(next(_counter))},
    )
    elapsed = time.perf_counter() - started
    if result.status != "ok" or result.exit_code != 0 or result.cached:
        raise SystemExit(f"bench: unexpected result {result.status} {result.exit_code} "
                         f"cached={result.cached}: {result.message}")
    return elapsed


async def bench(url: str, runs: int, seconds: float, workdir: Path) -> dict[str, float]:
    async with RexClient(url) as client:
        for _ in range(20):  # warm up connections, workers, caches
            await _trivial(client, workdir)
        latencies = sorted([await _trivial(client, workdir) for _ in range(runs)])
    done = 0
    deadline = time.perf_counter() + seconds

    async def submitter() -> None:
        nonlocal done
        async with RexClient(url) as client:
            while time.perf_counter() < deadline:
                await _trivial(client, workdir)
                done += 1

    started = time.perf_counter()
    await asyncio.gather(*(submitter() for _ in range(8)))
    elapsed = time.perf_counter() - started
    return {
        "trivial_p50_ms": round(statistics.median(latencies) * 1000, 2),
        "trivial_p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 2),
        "trivial_mean_ms": round(statistics.fmean(latencies) * 1000, 2),
        "actions_per_s_c8": round(done / elapsed, 1),
    }


def _file_system(path: Path) -> str:
    """The type of the file system holding ``path`` (from /proc/mounts), or "unknown"."""
    try:
        with open("/proc/mounts") as mounts:
            entries = [line.split() for line in mounts]
    except OSError:
        return "unknown"
    real = os.path.realpath(path)
    best = max((e for e in entries if len(e) > 2 and (real == e[1] or real.startswith(
        e[1].rstrip("/") + "/"))), key=lambda e: len(e[1]), default=None)
    return best[2] if best else "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    # On 2 cores: two single-slot workers keep every core busy at c8 (more processes or
    # slots measured no faster), and a single-slot worker needs one synchronize call per
    # action where a multi-slot one needs two (its held call is superseded).
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--slots", type=int, default=1, help="actions per worker at once")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--dir", type=Path, default=None,
                        help="where the data dir goes (default: the system's temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rex-bench-", dir=args.dir) as temp:
        work = Path(temp)
        (work / "client").mkdir()
        process, url = start_rexd(work / "data", "--workers", str(args.workers),
                                  "--worker-slots", str(args.slots), "--sandbox", "process")
        try:
            figures = asyncio.run(bench(url, args.runs, args.seconds, work / "client"))
        finally:
            stop_rexd(process)
        file_system = _file_system(work)
    print(json.dumps({**figures, "runs": args.runs, "workers": args.workers,
                      "slots_per_worker": args.slots, "sandbox": "process",
                      "data_dir_fs": file_system, "cpus": os.cpu_count()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
