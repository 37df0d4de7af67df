"""Autoscaling policies in the seeded simulator: queue wait, cost and stability.

Runs every workload (diurnal, step, spike, ci_storm; or ``--trace FILE.csv`` with the
columns ``arrival_s,duration_s``) for every worker start-up delay and policy
(``predictive`` and the baselines ``reactive``, ``static`` sized for the peak, ``hpa`` and
``oracle``), through the real pool, provisioner and policies with the ``mock`` provider,
and prints one JSON document: every run, then per workload, delay and seed how
``predictive`` compares with ``hpa`` and ``static`` against the issue's targets.

    python bench/autoscale.py [--seeds 0 1 2] [--jobs 2] [--trace FILE.csv]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import attrs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rexcore.pool.simulator import POLICIES, WORKLOADS, read_trace, simulate  # noqa: E402


def _run(job: tuple[str, str | None, int, float, str]) -> dict:
    workload_name, trace, seed, startup_s, policy = job
    workload = read_trace(trace) if trace else WORKLOADS[workload_name](seed)
    result = simulate(workload, policy, startup_s=startup_s, seed=seed)
    return attrs.asdict(result)


_TARGETS = ("cost_target_met", "p95_equal_or_better", "never_5pct_worse")


def _compare(runs: list[dict]) -> list[dict]:
    by_key = {(r["workload"], r["startup_s"], r["seed"], r["policy"]): r for r in runs}
    rows = []
    for (workload, startup_s, seed, policy), run in sorted(by_key.items()):
        if policy != "predictive":
            continue
        hpa = by_key.get((workload, startup_s, seed, "hpa"))
        static = by_key.get((workload, startup_s, seed, "static"))
        if hpa is None or static is None:
            continue
        cost_vs_hpa = run["worker_seconds"] / hpa["worker_seconds"]
        cost_vs_static = run["worker_seconds"] / static["worker_seconds"]
        p95_vs_hpa = (run["wait_p95_s"] + 1) / (hpa["wait_p95_s"] + 1)  # +1 s: 0 vs 0.1 is a tie
        rows.append({
            "workload": workload, "startup_s": startup_s, "seed": seed,
            "cost_vs_hpa": round(cost_vs_hpa, 3), "cost_vs_static": round(cost_vs_static, 3),
            "p95_vs_hpa": round(p95_vs_hpa, 3),
            "cost_target_met": cost_vs_hpa <= 0.90 and cost_vs_static <= 0.75,
            "p95_equal_or_better": p95_vs_hpa <= 1.0,
            "never_5pct_worse": p95_vs_hpa <= 1.05 and cost_vs_hpa <= 1.05,
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--startups", type=float, nargs="+", default=[30.0, 120.0, 300.0])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--trace", help="CSV with arrival_s,duration_s instead of the workloads")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    workloads = ["trace"] if args.trace else args.workloads
    jobs = [(w, args.trace, seed, startup, policy) for w in workloads for seed in args.seeds
            for startup in args.startups for policy in args.policies]
    # The longest runs first, so that the last job does not run alone.
    jobs.sort(key=lambda job: (job[0] not in ("ci_storm", "diurnal"), job[3] != 300.0))
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        runs = list(pool.map(_run, jobs))
    elapsed = time.perf_counter() - started
    for run in runs:
        for key in ("wait_p50_s", "wait_p95_s", "wait_p99_s", "worker_seconds", "over_objective"):
            run[key] = round(run[key], 3)
    comparison = _compare(runs)
    print(json.dumps({
        "elapsed_s": round(elapsed, 1), "jobs": args.jobs, "runs": runs,
        "predictive_vs_baselines": comparison,
        "targets_met": {
            "cost": sum(r["cost_target_met"] for r in comparison),
            "p95_equal_or_better": sum(r["p95_equal_or_better"] for r in comparison),
            "never_5pct_worse": sum(r["never_5pct_worse"] for r in comparison),
            "all": sum(all(r[k] for k in _TARGETS) for r in comparison),
            "of": len(comparison),
        },
        # Which comparisons miss which part of the target, with their ratios.
        "misses": [
            {"workload": r["workload"], "startup_s": r["startup_s"], "seed": r["seed"],
             "missed": [k for k in _TARGETS if not r[k]],
             "cost_vs_hpa": r["cost_vs_hpa"], "p95_vs_hpa": r["p95_vs_hpa"]}
            for r in comparison if not all(r[k] for k in _TARGETS)
        ],
    }, indent=1))


if __name__ == "__main__":
    main()
