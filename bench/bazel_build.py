"""A real Bazel building a workspace of genrules: locally vs remotely on rex.

    python bench/bazel_build.py [--genrules 200] [--workers 2] [--slots 4] [--jobs 8] [--sandbox auto]

Generates a workspace of ``--genrules`` genrules (chains of small text transformations,
``--width`` chains side by side), then on one Bazel server (its own output root):

1. ``local_s``: a clean local build with Bazel's default strategy on Linux
   (``linux-sandbox``);
2. ``remote_s``: ``bazel clean``, then the same build with ``--remote_executor`` against
   ``rexd serve --workers N --worker-slots S`` on this machine (every action runs: each
   repetition sets a new ``--action_env``, so its action digests are new);
3. ``warm_s``: ``bazel clean`` again, then the remote build, now served entirely from the
   remote cache.

``--repeat`` pairs run interleaved (the machine is shared and noisy); both builds use the
same ``--jobs``. Prints one JSON object: medians, and ``ratio``, the median of each pair's
``remote_s / local_s``. Needs ``bazel`` (Debian: bazel-bootstrap) and rex-reapi installed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from _rexd import start_rexd, stop_rexd


def write_workspace(root: Path, genrules: int, width: int) -> None:
    root.mkdir(parents=True)
    (root / "WORKSPACE").write_text('workspace(name = "bench")\n')
    (root / "seed.txt").write_text("".join(f"line {i} of the seed\n" for i in range(200)))
    rules = []
    for index in range(genrules):
        chain, depth = index % width, index // width
        src = '"seed.txt"' if depth == 0 else f'":g{index - width}"'
        rules.append(
            f'genrule(name = "g{index}", srcs = [{src}], outs = ["g{index}.txt"],\n'
            f'        cmd = "sed -e \'s/line/l{chain}.{depth}/\' $< | sort -r | '
            f'head -c 20000 > $@ && md5sum $< >> $@")\n'
        )
    (root / "BUILD").write_text("".join(rules))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--genrules", type=int, default=200)
    parser.add_argument("--width", type=int, default=20, help="independent chains")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--slots", type=int, default=4,
                        help="actions each worker runs at once (workers x slots ~ jobs)")
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--sandbox", default="auto", help="rex sandbox of the workers")
    parser.add_argument("--repeat", type=int, default=3,
                        help="local/remote pairs, interleaved; medians are reported")
    parser.add_argument("--remote-flag", action="append", default=[],
                        help="extra Bazel flag for the remote builds (repeatable), e.g. "
                             "--remote-flag=--remote_download_toplevel")
    args = parser.parse_args()
    bazel = shutil.which("bazel")
    if bazel is None:
        raise SystemExit("bench: bazel is not installed (apt-get install bazel-bootstrap)")
    with tempfile.TemporaryDirectory(prefix="rex-bazel-bench-") as tmp:
        base = Path(tmp)
        workspace = base / "workspace"
        write_workspace(workspace, args.genrules, args.width)
        startup = [bazel, f"--output_user_root={base / 'bazel-root'}", "--max_idle_secs=300"]
        env = {**os.environ, "HOME": str(base)}

        def run(*command: str) -> float:
            started = time.perf_counter()
            result = subprocess.run([*startup, *command], cwd=workspace, env=env,
                                    capture_output=True, text=True)
            elapsed = time.perf_counter() - started
            if result.returncode != 0:
                raise SystemExit(f"bench: bazel {' '.join(command)} failed:\n"
                                 f"{result.stderr[-3000:]}")
            return elapsed

        process, url = start_rexd(
            base / "rex-data", "--listen", "127.0.0.1:0", "--workers", str(args.workers),
            "--worker-slots", str(args.slots), "--sandbox", args.sandbox,
            protocol="reapi", workers=args.workers)
        local_runs: list[float] = []
        remote_runs: list[float] = []
        warm_runs: list[float] = []
        try:
            jobs = f"--jobs={args.jobs}"
            remote = [f"--remote_executor={url}", "--spawn_strategy=remote",
                      "--noremote_local_fallback", *args.remote_flag]
            run("build", "--nobuild", "//:all")  # server up, packages loaded: timed builds
            for repetition in range(args.repeat):  # compare only the execution phase
                # A new action env per repetition: new action digests, a cold remote cache.
                env_flag = f"--action_env=REX_BENCH_RUN={repetition}"
                run("clean")
                local_runs.append(run("build", jobs, env_flag, "//:all"))
                run("clean")
                remote_runs.append(run("build", jobs, env_flag, *remote, "//:all"))
                run("clean")
                warm_runs.append(run("build", jobs, env_flag, *remote, "//:all"))
        finally:
            subprocess.run([*startup, "shutdown"], cwd=workspace, env=env, capture_output=True)
            stop_rexd(process)
    local_s, remote_s = statistics.median(local_runs), statistics.median(remote_runs)
    ratios = [r / l for l, r in zip(local_runs, remote_runs)]
    print(json.dumps({
        "genrules": args.genrules,
        "workers": args.workers,
        "slots": args.slots,
        "jobs": args.jobs,
        "sandbox": args.sandbox,
        "remote_flags": args.remote_flag,
        "repeat": args.repeat,
        "local_s": round(local_s, 2),
        "remote_s": round(remote_s, 2),
        "ratio": round(statistics.median(ratios), 3),
        "ratios": [round(r, 3) for r in ratios],
        "local_runs_s": [round(t, 2) for t in local_runs],
        "remote_runs_s": [round(t, 2) for t in remote_runs],
        "warm_s": round(statistics.median(warm_runs), 2),
        "load_average": round(os.getloadavg()[0], 2),
    }))


if __name__ == "__main__":
    main()
