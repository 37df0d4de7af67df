"""How few workers any policy that knows only the arrival *rate* could use, against the
issue's cost budget (0.90x the HPA-style policy's worker-seconds at HPA-style's p95).

For ``diurnal`` and ``step`` (Poisson arrivals of a known rate, 40 s actions), runs the
HPA-style baseline and ``predictive`` in the simulator, then computes a lower bound: the
pool over time (one size per 5-minute slice, each slice an M/M/c queue in steady state
with the *true* rate) that keeps the arrival-weighted share of actions waiting longer than
HPA-style's p95 at 5% or less, with the fewest worker-seconds (greedy: each added worker
goes where it removes the most late actions; the tail is convex in c, so greedy is
optimal). Prints JSON: per workload, start-up delay and seed, the average workers of
HPA-style, of ``predictive``, the budget (0.90x HPA-style) and the bound.

    python bench/autoscale_bound.py [--seeds 0 1] [--startups 30 120]

The bound ignores start-up delays and cooldowns (both only add workers) and the lognormal
service times of the simulator (coefficient of variation 0.95: close to M/M/c's 1). A
policy that also sees the queue can beat it by a little (the number in the system a
start-up ahead is less uncertain than the stationary one); one that knows the future
(the oracle) by more.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rexcore.pool.simulator import (  # noqa: E402
    WORKLOADS,
    diurnal_rate,
    simulate,
    step_rate,
)

SERVICE_S = 40.0
SLICE_S = 300.0
RATES: dict[str, Callable[[float], float]] = {"diurnal": diurnal_rate, "step": step_rate}


def late_share(servers: int, load: float, wait_s: float) -> float:
    """M/M/c: P(wait > wait_s) with ``load`` Erlangs on ``servers`` servers."""
    if servers <= load:
        return 1.0
    blocking = 1.0
    for k in range(1, servers + 1):
        blocking = load * blocking / (k + load * blocking)
    waits = servers * blocking / (servers - load * (1 - blocking))
    return waits * math.exp(-(servers - load) * wait_s / SERVICE_S)


def bound_workers(rate: Callable[[float], float], duration_s: float, wait_s: float,
                  late: float = 0.05) -> float:
    """Average workers of the cheapest slice-by-slice pool meeting the objective."""
    slices = max(1, round(duration_s / SLICE_S))
    rates = [rate((i + 0.5) * duration_s / slices) for i in range(slices)]
    total = sum(rates)
    sizes = [math.floor(r * SERVICE_S) + 1 for r in rates]
    shares = [late_share(c, r * SERVICE_S, wait_s) for c, r in zip(sizes, rates)]
    excess = sum(r * s for r, s in zip(rates, shares)) - late * total
    gains: list[tuple[float, int]] = []

    def push(i: int) -> None:
        after = late_share(sizes[i] + 1, rates[i] * SERVICE_S, wait_s)
        heapq.heappush(gains, (-(rates[i] * (shares[i] - after)), i))

    for i in range(slices):
        push(i)
    while excess > 0:
        _, i = heapq.heappop(gains)
        after = late_share(sizes[i] + 1, rates[i] * SERVICE_S, wait_s)
        excess -= rates[i] * (shares[i] - after)
        sizes[i], shares[i] = sizes[i] + 1, after
        push(i)
    return sum(sizes) / slices


def _row(job: tuple[str, int, float]) -> dict:
    name, seed, startup_s = job
    workload = WORKLOADS[name](seed)
    hpa = simulate(workload, "hpa", startup_s=startup_s, seed=seed)
    predictive = simulate(workload, "predictive", startup_s=startup_s, seed=seed)
    duration = workload.duration_s
    hpa_avg = hpa.worker_seconds / duration
    bound = bound_workers(RATES[name], duration, hpa.wait_p95_s)
    return {
        "workload": name, "startup_s": startup_s, "seed": seed,
        "hpa_p95_s": round(hpa.wait_p95_s, 2),
        "hpa_avg_workers": round(hpa_avg, 2),
        "predictive_avg_workers": round(predictive.worker_seconds / duration, 2),
        "predictive_p95_s": round(predictive.wait_p95_s, 2),
        "budget_avg_workers": round(0.9 * hpa_avg, 2),
        "rate_known_bound_avg_workers": round(bound, 2),
        "bound_vs_hpa": round(bound / hpa_avg, 3),
        "budget_below_bound": 0.9 * hpa_avg < bound,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--startups", type=float, nargs="+", default=[30.0, 120.0])
    parser.add_argument("--workloads", nargs="+", default=list(RATES), choices=list(RATES))
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    jobs = [(w, s, u) for w in args.workloads for u in args.startups for s in args.seeds]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(_row, jobs))
    print(json.dumps({"service_s": SERVICE_S, "slice_s": SLICE_S, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
