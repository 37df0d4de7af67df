"""CPU seconds per process for a real Bazel build, local and remote on rex.

    python bench/bazel_cpu.py [--slots 8] [--jobs 16] [--repeat 2] [BAZEL_FLAG ...]

Builds the workspace of ``bench/bazel_build.py`` (200 genrules) locally, then remotely
against ``rexd serve`` (2 workers of ``--slots`` slots, sandbox ``auto``), ``--repeat``
times each, and prints one JSON object per build pair: wall times, the Bazel server's CPU
(its own and its reaped children's: locally that includes the actions and Bazel's
sandboxing), and for the remote build the CPU of the coordinator and of each worker (its
own, and its reaped children: the sandbox helpers and the actions). Extra arguments go to
the remote build (e.g. ``--remote_download_toplevel``). Use the later pairs (the JVM is
warm). Needs ``bazel`` (Debian: bazel-bootstrap) and rex-reapi installed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from _rexd import start_rexd, stop_rexd
from bazel_build import write_workspace

_TICK = os.sysconf("SC_CLK_TCK")


def _cpu(pid: int) -> tuple[float, float]:
    """(own, reaped children's) CPU seconds of ``pid``."""
    with open(f"/proc/{pid}/stat") as file:
        fields = file.read().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(x) / _TICK for x in fields[11:15])
    return utime + stime, cutime + cstime


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as file:
                found += [int(c) for c in file.read().split()]
        except OSError:
            pass
    return found


def _rexd_cpu(coordinator: int) -> dict[str, tuple[float, float]]:
    """CPU of the coordinator and of its worker processes (``rexd worker``)."""
    cpu = {"coordinator": _cpu(coordinator)}
    for child in _children(coordinator):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as file:
                if b"worker" in file.read():
                    cpu[f"worker-{child}"] = _cpu(child)
        except OSError:
            pass
    return cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=2)
    args, remote_flags = parser.parse_known_args()
    bazel = shutil.which("bazel")
    if bazel is None:
        raise SystemExit("bench: bazel is not installed (apt-get install bazel-bootstrap)")
    with tempfile.TemporaryDirectory(prefix="rex-bazel-cpu-") as tmp:
        base = Path(tmp)
        workspace = base / "workspace"
        write_workspace(workspace, 200, 20)
        startup = [bazel, f"--output_user_root={base / 'bazel-root'}", "--max_idle_secs=300"]
        env = {**os.environ, "HOME": str(base)}

        def run(*command: str) -> float:
            started = time.perf_counter()
            done = subprocess.run([*startup, *command], cwd=workspace, env=env,
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"bench: bazel {' '.join(command)} failed:\n{done.stderr[-3000:]}")
            return time.perf_counter() - started

        process, url = start_rexd(base / "rex-data", "--listen", "127.0.0.1:0", "--workers", "2",
                                  "--worker-slots", str(args.slots), "--sandbox", "auto",
                                  protocol="reapi", workers=2)
        try:
            run("build", "--nobuild", "//:all")
            server = int(subprocess.run(
                ["pgrep", "-f", f"output_user_root={base / 'bazel-root'}"],
                capture_output=True, text=True).stdout.split()[0])
            remote = [f"--remote_executor={url}", "--spawn_strategy=remote",
                      "--noremote_local_fallback", *remote_flags]
            for repetition in range(args.repeat):
                env_flag = f"--action_env=REX_BENCH_RUN={repetition}"
                run("clean")
                before = sum(_cpu(server))
                local_s = run("build", f"--jobs={args.jobs}", env_flag, "//:all")
                local_cpu = sum(_cpu(server)) - before
                run("clean")
                before, rex_before = sum(_cpu(server)), _rexd_cpu(process.pid)
                remote_s = run("build", f"--jobs={args.jobs}", env_flag, *remote, "//:all")
                remote_cpu = sum(_cpu(server)) - before
                rex_after = _rexd_cpu(process.pid)
                rex = {name: {"own_s": round(own - rex_before[name][0], 2),
                              "children_s": round(kids - rex_before[name][1], 2)}
                       for name, (own, kids) in rex_after.items() if name in rex_before}
                print(json.dumps({
                    "repetition": repetition, "remote_flags": remote_flags,
                    "local_s": round(local_s, 2), "local_bazel_cpu_s": round(local_cpu, 2),
                    "remote_s": round(remote_s, 2), "remote_bazel_cpu_s": round(remote_cpu, 2),
                    "rexd_cpu": rex,
                    "remote_total_cpu_s": round(remote_cpu + sum(
                        v["own_s"] + v["children_s"] for v in rex.values()), 2),
                    "load_average": round(os.getloadavg()[0], 2),
                }), flush=True)
        finally:
            subprocess.run([*startup, "shutdown"], cwd=workspace, env=env, capture_output=True)
            stop_rexd(process)


if __name__ == "__main__":
    main()
