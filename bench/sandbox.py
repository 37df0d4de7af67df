"""Per-action cost of the sandboxes for ``/bin/true``; prints one JSON object.

    python bench/sandbox.py [--runs 200] [--parallel 8]

Interleaved, so the noise of a shared machine hits every figure alike:

- ``bare_ms``: ``posix_spawn`` of /bin/true from Python, waited for;
- ``bwrap_ms``: plain bubblewrap with every namespace (user, mount, pid, ipc, uts, net,
  cgroup), /usr read-only, fresh /proc and /dev, no rex code;
- ``process_ms``: rex's ``process`` sandbox (``ProcessSandbox.run``);
- ``rex_linux_ms``: rex's ``linux`` sandbox with limits on (memory, cpu, pids);
- ``rex_linux_parallel_ms``: wall time of ``--parallel`` linux actions started at once,
  divided by their number (throughput on this host's cores).

Each figure is a median (``*_p99_ms`` the 99th percentile) over ``--runs`` runs; the
ratios are of medians. Needs root (cgroups) and bubblewrap.
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

from rexcore.sandbox.interface import SandboxRequest
from rexcore.sandbox.process import ProcessSandbox, ProcessSandboxOptions
from rexcore.serialization.sandbox_spec import SandboxSpec

BWRAP = ["/usr/bin/bwrap", "--unshare-all", "--die-with-parent", "--ro-bind", "/usr", "/usr",
         "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib",
         "--symlink", "usr/lib64", "/lib64", "--proc", "/proc", "--dev", "/dev", "--",
         "/bin/true"]
LIMITS = SandboxSpec(memory_bytes=512 << 20, cpus=1.0, pids=256, timeout_s=60)


def spawn_and_wait(argv: list[str]) -> float:
    started = time.perf_counter()
    pid = os.posix_spawn(argv[0], argv, {})
    _, status = os.waitpid(pid, 0)
    elapsed = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"bench: {argv[0]} failed with status {status}")
    return elapsed


def request(base: Path, number: int) -> SandboxRequest:
    root = base / f"root-{number}"
    root.mkdir(exist_ok=True)
    return SandboxRequest(exec_root=root, arguments=("/bin/true",),
                          environment=(("PATH", "/usr/bin:/bin"),), working_directory="",
                          spec=LIMITS, stdout_path=base / f"out-{number}",
                          stderr_path=base / f"err-{number}")


async def timed(sandbox, req: SandboxRequest) -> float:
    started = time.perf_counter()
    result = await sandbox.run(req)
    elapsed = time.perf_counter() - started
    if result.exit_code != 0:
        raise SystemExit(f"bench: {sandbox.name} sandbox: exit {result.exit_code} "
                         f"{result.message} {req.stderr_path.read_text()[-300:]}")
    return elapsed


def summary(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return round(statistics.median(ordered) * 1000, 3), round(p99 * 1000, 3)


async def bench(runs: int, parallel: int, base: Path) -> dict[str, object]:
    from rex_sandbox_linux.options import LinuxSandboxOptions
    from rex_sandbox_linux.sandbox import LinuxSandbox

    linux = LinuxSandbox(LinuxSandboxOptions(), data_dir=base)
    # adopt_orphans off: the bench is not a worker; it must not reap others' children.
    process = ProcessSandbox(ProcessSandboxOptions(adopt_orphans=False))
    samples: dict[str, list[float]] = {"bare": [], "bwrap": [], "process": [],
                                       "rex_linux": [], "rex_linux_parallel": []}
    try:
        for _ in range(5):  # warm up: helpers compiled, caches hot
            await timed(linux, request(base, 0))
            await timed(process, request(base, 0))
        for _ in range(runs):
            samples["bare"].append(spawn_and_wait(["/bin/true"]))
            samples["bwrap"].append(spawn_and_wait(BWRAP))
            samples["process"].append(await timed(process, request(base, 0)))
            samples["rex_linux"].append(await timed(linux, request(base, 0)))
        for _ in range(max(1, runs // parallel)):
            started = time.perf_counter()
            await asyncio.gather(*(timed(linux, request(base, n)) for n in range(parallel)))
            samples["rex_linux_parallel"].append((time.perf_counter() - started) / parallel)
    finally:
        await linux.close()
        await process.close()
    result: dict[str, object] = {"runs": runs, "parallel": parallel, "cpus": os.cpu_count(),
                                 "load_avg_1m": round(os.getloadavg()[0], 2)}
    for name, values in samples.items():
        result[f"{name}_ms"], result[f"{name}_p99_ms"] = summary(values)
    result["linux_over_bwrap"] = round(result["rex_linux_ms"] / result["bwrap_ms"], 3)
    result["linux_over_process"] = round(result["rex_linux_ms"] / result["process_ms"], 3)
    result["process_over_bare"] = round(result["process_ms"] / result["bare_ms"], 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--parallel", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rex-bench-sandbox-") as directory:
        os.chmod(directory, 0o755)  # the linux sandbox's actions run as nobody
        print(json.dumps(asyncio.run(bench(args.runs, args.parallel, Path(directory))),
                         indent=2))


if __name__ == "__main__":
    main()
