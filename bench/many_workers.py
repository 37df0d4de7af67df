"""One coordinator, 1,000 simulated workers: how fast it dispatches; prints one JSON object.

    python bench/many_workers.py [--workers 1000] [--processes 2] [--submitters 64]
                                 [--seconds 10] [--unique] [--dir DIR]

Starts ``rexd serve --workers 0`` and ``--processes`` helper processes that each run
their share of ``--workers`` simulated workers as asyncio tasks over one aiohttp session
without a connection limit. Each speaks the real synchronize protocol (``SyncRequest`` in,
``SyncResponse`` out, one held long poll per worker, one slot): it "runs" an assignment
instantly and reports, in its next call, a trivial ActionResult whose blobs exist (empty
stdout and stderr). Once every worker holds a lease, ``--submitters`` clients submit
``/bin/true`` actions through ``POST /v1/execute`` (waiting for the result in the same
request) for ``--seconds``:

- ``workers``: workers holding a lease at the end (``GET /v1/status``);
- ``dispatch_actions_per_s``: actions submitted, handed to a worker, reported and
  answered per second;
- ``coordinator_cpu_percent``: CPU time of the rexd process over the window (user +
  system, all threads, from ``/proc/<pid>/stat``) in percent of one core.

By default every submission is the same ``do_not_cache`` action (never merged, so each is
its own execution, queued, persisted, dispatched and completed, but no blob or action-cache
entry is written per action): this measures dispatch. ``--unique`` makes every action a
new cacheable one (a new Command and Action stored per action, a result cached per
action), as in ``bench/execute.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _rexd import start_rexd, stop_rexd

from rexcore.artifacts.digest import Digest, DigestFunction, digest_of
from rexcore.protocol.client import RexClient
from rexcore.serialization.action import Action, Command, Directory, canonical_bytes
from rexcore.serialization.action_result import ActionResult, ExecutionMetadata
from rexcore.serialization.codec import decode, encode
from rexcore.serialization.worker_protocol import (
    Completion,
    SyncRequest,
    SyncResponse,
)

_JSON = {"Content-Type": "application/json"}
_LONG_POLL_S = 20.0


def _raise_open_files_limit() -> int:
    """Each held call is a socket on both sides: lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _cpu_seconds(pid: int) -> float:
    """User plus system time of every thread of ``pid``."""
    with open(f"/proc/{pid}/stat", "rb") as file:
        fields = file.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the simulated workers (in helper processes) ---------------------------------------


async def _simulated_worker(session: aiohttp.ClientSession, url: str, worker_id: str, result: ActionResult,
                            stats: dict[str, int]) -> None:
    completed: tuple[Completion, ...] = ()
    while True:
        request = SyncRequest(worker_id=worker_id, slots=1, completed=completed,
                              wait_s=_LONG_POLL_S)
        try:
            async with session.post(f"{url}/v1/workers/synchronize", data=encode(request),
                                    headers=_JSON) as answer:
                body = await answer.read()
                status = answer.status
        except (OSError, TimeoutError, aiohttp.ClientError) as exc:
            stats["errors"] += 1
            print(f"many_workers: {worker_id}: {exc!r}", file=sys.stderr)
            await asyncio.sleep(1.0)
            continue
        if status != 200:
            stats["errors"] += 1
            await asyncio.sleep(1.0)
            continue
        response = decode(body, SyncResponse)
        # "Run" each assignment at once; the next call reports it (and waits for more).
        completed = tuple(Completion(a.operation, result=result) for a in response.assignments)
        stats["runs"] += len(completed)


async def _simulate(url: str, first: int, count: int, stagger_s: float) -> None:
    _raise_open_files_limit()
    empty = DigestFunction.BLAKE3.empty
    stats = {"runs": 0, "errors": 0}
    connector = aiohttp.TCPConnector(limit=0)  # one connection per held call
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=_LONG_POLL_S + 30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = []
        for number in range(first, first + count):
            worker_id = f"sim-{number:05d}"
            result = ActionResult(exit_code=0, stdout_digest=empty, stderr_digest=empty,
                                  execution_metadata=ExecutionMetadata(worker=worker_id))
            tasks.append(asyncio.ensure_future(
                _simulated_worker(session, url, worker_id, result, stats)))
            await asyncio.sleep(stagger_s)  # no thundering herd on the listen backlog
        stop = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set_result, None)
        await stop
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    print(json.dumps(stats), file=sys.stderr)


# -- the submitters (in this process) ----------------------------------------------------


class _Actions:
    """The actions to submit: one do_not_cache action over and over, or new ones."""

    def __init__(self, unique: bool) -> None:
        self.unique = unique
        self.counter = itertools.count()
        root = canonical_bytes(Directory())
        self.root = digest_of(root)
        self.base: dict[Digest, bytes] = {self.root: root}
        self.fixed = None if unique else self._make(do_not_cache=True)

    def _make(self, do_not_cache: bool) -> tuple[Digest, dict[Digest, bytes]]:
        environment = (("PATH", "/bin"), ("RUN", str(next(self.counter))))
        command = canonical_bytes(Command(arguments=("/bin/true",), environment=environment))
        command_digest = digest_of(command)
        action = canonical_bytes(Action(command_digest=command_digest,
                                        input_root_digest=self.root, do_not_cache=do_not_cache))
        action_digest = digest_of(action)
        return action_digest, {**self.base, command_digest: command, action_digest: action}

    def next(self) -> tuple[Digest, dict[Digest, bytes]]:
        return self._make(do_not_cache=False) if self.fixed is None else self.fixed


async def _submit_for(url: str, actions: _Actions, submitters: int, warm_up_s: float,
                      seconds: float, rexd_pid: int) -> dict[str, float]:
    done_at: list[float] = []
    latencies: list[float] = []
    failures: list[str] = []
    start = time.perf_counter()
    window = (start + warm_up_s, start + warm_up_s + seconds)
    cpu: dict[str, float] = {}

    async def submitter(client: RexClient) -> None:
        while time.perf_counter() < window[1]:
            digest, blobs = actions.next()
            began = time.perf_counter()
            op = await client.execute(digest, blobs=blobs, wait_s=60.0)
            while not op.done:
                op = await client.wait_operation(op.name, wait_s=60.0)
            ended = time.perf_counter()
            if op.status != "ok" or op.result is None or op.result.exit_code != 0:
                failures.append(f"{op.status}: {op.message}")
            elif window[0] <= ended <= window[1]:
                done_at.append(ended)
                latencies.append(ended - began)

    async def sample_cpu() -> None:
        await asyncio.sleep(max(window[0] - time.perf_counter(), 0))
        cpu["start"] = _cpu_seconds(rexd_pid)
        await asyncio.sleep(max(window[1] - time.perf_counter(), 0))
        cpu["end"] = _cpu_seconds(rexd_pid)

    async with RexClient(url) as client:
        await asyncio.gather(sample_cpu(), *(submitter(client) for _ in range(submitters)))
        status = await client.status()
    if failures:
        raise SystemExit(f"bench: {len(failures)} action(s) failed, e.g. {failures[0]}")
    latencies.sort()
    return {
        "workers": status.workers_total,
        "dispatch_actions_per_s": round(len(done_at) / seconds, 1),
        "coordinator_cpu_percent": round((cpu["end"] - cpu["start"]) / seconds * 100, 1),
        "submit_to_result_p50_ms": round(statistics.median(latencies) * 1000, 2),
        "submit_to_result_p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 2),
    }


async def _wait_for_workers(url: str, count: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    async with RexClient(url) as client:
        while True:
            joined = (await client.status()).workers_total
            if joined >= count:
                return
            if time.monotonic() > deadline:
                raise SystemExit(f"bench: only {joined} of {count} workers joined in "
                                 f"{timeout_s:g}s")
            await asyncio.sleep(0.25)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=2,
                        help="helper processes the simulated workers are spread over")
    parser.add_argument("--submitters", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warm-up", type=float, default=3.0)
    parser.add_argument("--unique", action="store_true",
                        help="a new cacheable action each time (default: one do_not_cache "
                             "action over and over)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where the data dir goes (default: the system's temp dir)")
    parser.add_argument("--simulate", nargs=3, metavar=("URL", "FIRST", "COUNT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.simulate:
        url, first, count = args.simulate
        asyncio.run(_simulate(url, int(first), int(count), stagger_s=0.002))
        return 0
    limit = _raise_open_files_limit()  # inherited by rexd and the helper processes
    if limit < 2 * args.workers + 256:
        raise SystemExit(f"bench: the open-files limit ({limit}) is too low for "
                         f"{args.workers} workers; raise the hard limit (ulimit -Hn)")
    with tempfile.TemporaryDirectory(prefix="rex-bench-", dir=args.dir) as temp:
        rexd, url = start_rexd(Path(temp) / "data", "--workers", "0")
        helpers: list[subprocess.Popen[bytes]] = []
        try:
            share = -(-args.workers // args.processes)
            for first in range(0, args.workers, share):
                count = min(share, args.workers - first)
                helpers.append(subprocess.Popen(
                    [sys.executable, __file__, "--simulate", url, str(first), str(count)],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL))
            asyncio.run(_wait_for_workers(url, args.workers, timeout_s=120))
            figures = asyncio.run(_submit_for(
                url, _Actions(args.unique), args.submitters, args.warm_up, args.seconds,
                rexd.pid))
        finally:
            for helper in helpers:
                helper.send_signal(signal.SIGTERM)
            for helper in helpers:
                try:
                    helper.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    helper.kill()
                    helper.wait()
            stop_rexd(rexd)
    print(json.dumps({
        **figures,
        "workers_simulated": args.workers,
        "worker_processes": args.processes,
        "submitters": args.submitters,
        "seconds": args.seconds,
        "actions": "unique, cacheable" if args.unique else "one do_not_cache action",
        "cpus": os.cpu_count(),
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
