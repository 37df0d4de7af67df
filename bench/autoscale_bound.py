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

    python bench/autoscale_bound.py [--seeds 0 1] [--startups 30 120] [--mdp]

The bound ignores start-up delays and cooldowns (both only add workers) and the lognormal
service times of the simulator (coefficient of variation 0.95: close to M/M/c's 1). A
policy that also sees the queue can beat it by a little (the number in the system a
start-up ahead is less uncertain than the stationary one); one that knows the future
(the oracle) by more.

``--mdp`` adds, for the 30 s start-up, the bound of ``bench/autoscale_mdp.py`` (numpy): the
fewest idle and starting workers of any policy that obeys the pool's cooldowns and sees
the queue and the true rate every 15 s. ``diurnal``: one average-cost problem per rate on
a grid of 37 (interpolated per 5-minute slice). ``step``: its two rates, plus what its two
jumps cost, taken from a load that swaps between them every 15 minutes on average (the
policy learns of a jump at the next decision, not before; up to 20 workers per
decision). Compared with the budget on the part that is not busy time (0.90x
HPA-style's worker-seconds minus the busy seconds of the simulated actions);
``service_correction`` is how many workers fewer the simulator's lognormal actions need
than exponential ones at the same late share (simulated for a static pool at the cell's
mean and peak rates), subtracted from the bound before ``budget_below_mdp_bound`` is
decided.
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

from rexcore.pool.simulator import (
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


STEP_RATES = (0.05, 0.5)
SWAP_S = 900.0  # the mean time between the swaps of the load that prices step's jumps
SWAP_STARTS = 20  # the most workers one decision may ask for after a jump (a steady rate: 6)
BETAS = (90.0, 110.0, 130.0)


def _mdp_job(job: tuple) -> tuple[tuple, list[float]]:
    import autoscale_mdp as mdp

    kind, rate, wait_s = job
    if kind == "rate":
        model = mdp.rate_model(rate, wait_s)
        return job, [mdp.average_cost([model], beta) for beta in BETAS]
    # two rates swapping, on the state space of the higher one
    low, high = rate
    models = [mdp.rate_model(low, wait_s, sized_for=high, max_starts=SWAP_STARTS),
              mdp.rate_model(high, wait_s, max_starts=SWAP_STARTS)]
    swap = 1 - math.exp(-mdp.INTERVAL_S / SWAP_S)
    return job, [mdp.average_cost(models, beta, switch=swap) for beta in BETAS]


def _mdp_jobs(name: str, wait_s: float) -> list[tuple]:
    if name == "diurnal":
        from autoscale_mdp import RATE_GRID

        return [("rate", rate, wait_s) for rate in RATE_GRID]
    return [("rate", STEP_RATES[0], wait_s), ("rate", STEP_RATES[1], wait_s),
            ("swap", STEP_RATES, wait_s)]


def _slice_rates(name: str, duration_s: float) -> list[float]:
    """The workload's arrival rate in the middle of each 5-minute slice."""
    slices = max(1, round(duration_s / SLICE_S))
    return [RATES[name]((i + 0.5) * duration_s / slices) for i in range(slices)]


def _mdp_nonbusy(name: str, duration_s: float, wait_s: float,
                 costs: dict[tuple, list[float]]) -> tuple[float, float]:
    """The bound on idle + starting workers, and the beta that gives it."""
    import numpy as np
    from autoscale_mdp import RATE_GRID

    rates = _slice_rates(name, duration_s)
    mean_rate = sum(rates) / len(rates)
    best = (-math.inf, 0.0)
    for b, beta in enumerate(BETAS):
        if name == "diurnal":
            grid_costs = [costs[("rate", rate, wait_s)][b] for rate in RATE_GRID]
            cost = float(np.mean(np.interp(rates, RATE_GRID, grid_costs)))
        else:
            low = costs[("rate", STEP_RATES[0], wait_s)][b]
            high = costs[("rate", STEP_RATES[1], wait_s)][b]
            per_jump = (costs[("swap", STEP_RATES, wait_s)][b] - (low + high) / 2) * SWAP_S
            # step: an hour low, two high, an hour low: two jumps in four hours
            cost = (low + high) / 2 + 2 * per_jump / duration_s
        best = max(best, (cost - beta * 0.05 * mean_rate, beta))
    return best


def service_correction(rate: float, wait_s: float, arrivals: int = 300_000) -> float:
    """Workers a static FIFO pool at ``rate`` needs fewer, for 5% of actions waiting over
    ``wait_s``, with the simulator's lognormal 40 s actions than with exponential ones."""
    import random

    def late_share(servers: int, lognormal: bool) -> float:
        rng, free, t, late = random.Random(1), [0.0] * servers, 0.0, 0
        for _ in range(arrivals):
            t += rng.expovariate(rate)
            duration = (rng.lognormvariate(math.log(SERVICE_S) - 0.32, 0.8) if lognormal
                        else rng.expovariate(1 / SERVICE_S))
            start = max(t, heapq.heappop(free))
            late += start - t > wait_s
            heapq.heappush(free, start + duration)
        return late / arrivals

    def servers_for(lognormal: bool) -> float:
        c = math.floor(rate * SERVICE_S) + 1
        before, share = None, late_share(c, lognormal)
        while share > 0.05:
            c, before, share = c + 1, share, late_share(c + 1, lognormal)
        if before is None:  # met at the first size: the share one below
            before = late_share(c - 1, lognormal)
        return c - math.log(0.05 / share) / math.log(before / share)  # on log(share)

    return servers_for(False) - servers_for(True)


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
    parser.add_argument("--mdp", action="store_true",
                        help="add the cooldown-aware MDP bound for the 30 s start-up")
    args = parser.parse_args()
    jobs = [(w, s, u) for w in args.workloads for u in args.startups for s in args.seeds]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(_row, jobs))
        if args.mdp:
            _add_mdp(rows, pool)
    print(json.dumps({"service_s": SERVICE_S, "slice_s": SLICE_S, "rows": rows}, indent=1))


def _add_mdp(rows: list[dict], pool: ProcessPoolExecutor) -> None:
    """The MDP bound for the rows with a 30 s start-up (the model's start-up)."""
    rows = [row for row in rows if row["startup_s"] == 30.0]
    needed = sorted({job for row in rows
                     for job in _mdp_jobs(row["workload"], row["hpa_p95_s"])},
                    key=lambda job: job[0] == "rate")  # the slow swapping ones first
    costs = dict(pool.map(_mdp_job, needed))
    corrections = {}
    for row in rows:
        name, seed, wait_s = row["workload"], row["seed"], row["hpa_p95_s"]
        workload = WORKLOADS[name](seed)
        duration = workload.duration_s
        busy = sum(d for _, d in workload.arrivals) / duration
        bound, beta = _mdp_nonbusy(name, duration, wait_s, costs)
        key = (name, wait_s)
        if key not in corrections:
            rates = _slice_rates(name, duration)
            corrections[key] = max(service_correction(sum(rates) / len(rates), wait_s),
                                   service_correction(max(rates), wait_s))
        budget = row["budget_avg_workers"] - busy
        row.update({
            "busy_avg_workers": round(busy, 3),
            "budget_nonbusy": round(budget, 3),
            "predictive_nonbusy": round(row["predictive_avg_workers"] - busy, 3),
            "mdp_nonbusy_bound": round(bound, 3),
            "mdp_beta": beta,
            "service_correction": round(corrections[key], 3),
            "budget_below_mdp_bound": budget < bound - corrections[key],
        })


if __name__ == "__main__":
    main()
