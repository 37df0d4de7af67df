"""Remote execution latency and throughput through the native API; prints one JSON object.

    python bench/execute.py [--runs 300] [--workers 2] [--seconds 10]

Starts ``rexd serve --workers N`` (process sandbox, local workers sharing the store) and
measures what a client sees for a trivial action (``/bin/true``, no inputs), each run a
cache miss (the environment carries a counter, so every action digest is new):

- ``trivial_p50_ms`` / ``trivial_p99_ms``: one client, one action at a time, end to end
  (upload of the missing Command and Action, execute, wait, fetch stdout and stderr);
- ``actions_per_s_c8``: 8 clients submitting such actions concurrently for ``--seconds``.
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

from _rexd import start_rexd, stop_rexd  # noqa: E402

from rexcore.core.remote_action import execute_remotely  # noqa: E402
from rexcore.protocol.client import RexClient  # noqa: E402
from rexcore.serialization.sandbox_spec import SandboxSpec  # noqa: E402

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--slots", type=int, default=4, help="actions per worker at once")
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rex-bench-") as temp:
        work = Path(temp)
        (work / "client").mkdir()
        process, url = start_rexd(work / "data", "--workers", str(args.workers),
                                  "--worker-slots", str(args.slots), "--sandbox", "process")
        try:
            figures = asyncio.run(bench(url, args.runs, args.seconds, work / "client"))
        finally:
            stop_rexd(process)
    print(json.dumps({**figures, "runs": args.runs, "workers": args.workers,
                      "slots_per_worker": args.slots, "sandbox": "process",
                      "cpus": os.cpu_count()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
