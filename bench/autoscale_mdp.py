"""The fewest idle and starting workers any scaling policy that obeys the pool's cooldowns
can keep, when it also knows the true arrival rate: an average-cost Markov decision
process solved by relative value iteration (numpy; ``pip install numpy``).

The model is the simulator's, with 40 s exponential actions (the simulator's are lognormal
with a coefficient of variation of 0.95; see ``bench/autoscale_bound.py`` for the
correction) on one slot per worker, FIFO:

* a decision every 15 s (the pool's evaluation interval) sees the number of actions in the
  system ``n``, the ready workers ``c``, the workers asked for at the last decision ``p``
  (they join at the end of this interval: a start-up of 30 s), the decisions since the
  last change ``d``, and the **true** arrival rate;
* it holds, grows by ``r`` workers (joining after 30 s, each billed from the request: 30 s
  of start-up), or shrinks to a target, which takes starting workers first, then idle
  ones, then drains busy ones: a drained worker finishes its action and exits, so its
  action leaves the queue's system at once (exact: the action is paid as busy time either
  way, and the queue only sees the workers that take new work);
* the pool's cooldowns: no grow at the decision after a grow (30 s), no shrink within 8
  decisions (2 minutes) of any change. ``cooldowns=False`` drops both.

The cost of an interval is its idle worker-seconds, the start-up worker-seconds, and
``beta`` per action that will wait longer than ``wait_s`` (computed exactly for an arrival
that finds ``n``: it waits for ``n - c + 1`` departures of the ``c`` busy workers, or for
the workers joining at the end of the interval). For any ``beta >= 0``, the optimal
average of that cost minus ``beta`` times the allowed late actions (5% of arrivals) is a
lower bound on the idle-and-starting workers of any policy keeping at most 5% of actions
later than ``wait_s`` (Lagrangian weak duality); the bound is the largest over ``beta``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SERVICE_S = 40.0
INTERVAL_S = 15.0
#: A grow waits this many decisions after a grow; a shrink this many after any change.
UP_COOLDOWN = 2
DOWN_COOLDOWN = 8
#: The arrival rates the tables of a day are solved for (``diurnal``'s, 0.05 to 0.5/s).
RATE_GRID = [round(0.05 + 0.0125 * i, 4) for i in range(37)]
#: The most workers one decision asks for, by default: enough for a steady rate (more
#: changes no bound here by 0.001); a jump of the rate needs more.
MAX_STARTS = 6


@dataclass(frozen=True)
class RateModel:
    """One arrival rate: per interval, from ``n`` actions with ``c`` ready workers."""

    rate: float
    idle: np.ndarray  # [n, c] idle worker-seconds
    late: np.ndarray  # [n, c, p] expected late arrivals, with p workers joining at the end
    step: np.ndarray  # [c, n, n'] where the number of actions goes


def sizes(rate: float) -> tuple[int, int]:
    """State space bounds (actions, ready workers) wide enough for ``rate``."""
    load = rate * SERVICE_S
    return int(load + 6 * math.sqrt(load) + 12), int(load + 4 * math.sqrt(load) + 8)


def _transition(generator: np.ndarray, t: float) -> np.ndarray:
    """``exp(generator * t)`` by uniformization (a birth-death chain: all terms >= 0)."""
    uniform = max(-generator.diagonal().min(), 1e-12)
    jump = np.eye(len(generator)) + generator / uniform
    weight = math.exp(-uniform * t)
    term = np.eye(len(generator))
    total = weight * term
    k = 0
    while weight > 1e-16 or k < uniform * t:
        k += 1
        term = term @ jump
        weight *= uniform * t / k
        total += weight * term
    return total


def _poisson_below(counts: np.ndarray, mean: float) -> np.ndarray:
    """P(Poisson(mean) < counts), elementwise."""
    top = int(counts.max(initial=0))
    if top <= 0:
        return np.zeros(counts.shape)
    pmf = np.empty(top)
    pmf[0] = math.exp(-mean)
    for k in range(1, top):
        pmf[k] = pmf[k - 1] * mean / k
    below = np.concatenate([[0.0], np.cumsum(pmf)])
    return below[np.clip(counts, 0, top)]


def rate_model(rate: float, wait_s: float, substeps: int = 10,
               sized_for: float | None = None, max_starts: int = MAX_STARTS) -> RateModel:
    """``sized_for``: a higher rate whose state space to use (to pair the two models of
    a load that swaps between rates); ``max_starts``: the most workers one decision may
    ask for."""
    n_max, c_max = sizes(rate if sized_for is None else sized_for)
    mu, h = 1 / SERVICE_S, INTERVAL_S / substeps
    ns = np.arange(n_max + 1)
    idle = np.zeros((n_max + 1, c_max + 1))
    late = np.zeros((n_max + 1, c_max + 1, max_starts + 1))
    step = np.zeros((c_max + 1, n_max + 1, n_max + 1))
    for c in range(c_max + 1):
        generator = np.zeros((n_max + 1, n_max + 1))
        generator[ns[:-1], ns[:-1] + 1] = rate
        generator[ns[1:], ns[1:] - 1] = mu * np.minimum(ns[1:], c)
        generator[ns, ns] = -generator.sum(axis=1)
        sub = _transition(generator, h)
        ahead = ns - c + 1  # departures an arrival finding n waits for (<= 0: none)
        idle_now = np.maximum(c - ns, 0).astype(float)
        at = np.eye(n_max + 1)  # the distribution of n at each sub-step, from each n
        for s in range(substeps + 1):
            t = s * h
            weight = h * (0.5 if s in (0, substeps) else 1.0)  # trapezoid
            idle[:, c] += weight * (at @ idle_now)
            if t + wait_s <= INTERVAL_S:  # no worker joins before the wait is up
                late_if = _poisson_below(np.maximum(ahead, 0), c * mu * wait_s)
                late[:, c, :] += (weight * rate * (at @ late_if))[:, None]
            else:  # the joining workers count as departures, then serve too
                before = INTERVAL_S - t
                for joining in range(max_starts + 1):
                    mean = c * mu * before + (c + joining) * mu * (wait_s - before)
                    late_if = _poisson_below(np.maximum(ahead - joining, 0), mean)
                    late[:, c, joining] += weight * rate * (at @ late_if)
            if s < substeps:
                at = at @ sub
        step[c] = at
    return RateModel(rate, idle, late, step)


def _shrink_targets(n_max: int, c_max: int, p_max: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every state ``(n, c, p)`` and size below ``c + p``: the flat index of the state,
    that of the state the shrink leaves (starting workers go first, then idle ones, then
    busy ones drain), and the size."""

    def flat(n: int, c: int, p: int) -> int:
        return (n * (c_max + 1) + c) * (p_max + 1) + p

    source, target, sizes_ = [], [], []
    for n in range(n_max + 1):
        for c in range(c_max + 1):
            busy = min(n, c)
            for p in range(p_max + 1):
                for size in range(c + p):
                    if size >= c:
                        after = (n, c, size - c)
                    else:
                        after = (n - max(0, busy - size), size, 0)
                    source.append(flat(n, c, p))
                    target.append(flat(*after))
                    sizes_.append(size)
    return np.array(source), np.array(target), np.array(sizes_)


@dataclass(frozen=True)
class Solution:
    #: Long-run idle + starting workers + ``beta`` x late arrivals, per second.
    gain: float
    #: For one rate: the size (ready + starting) to ask for in each state ``[n, c, p, d]``.
    sizes: np.ndarray | None = None


def average_cost(models: list[RateModel], beta: float, *, cooldowns: bool = True,
                 switch: float = 0.0, tol: float = 1e-5, max_iter: int = 10_000) -> float:
    """The optimal long-run idle + starting workers + ``beta`` x late arrivals per second.

    Several models are rates that swap with probability ``switch`` at each decision (a
    Markov-modulated load); the policy sees which one is on. All must share one size.
    """
    return solve(models, beta, cooldowns=cooldowns, switch=switch, tol=tol,
                 max_iter=max_iter).gain


def solve(models: list[RateModel], beta: float, *, cooldowns: bool = True,
          switch: float = 0.0, tol: float = 1e-5, max_iter: int = 10_000,
          policy: bool = False) -> Solution:
    """:func:`average_cost`, and with ``policy`` the optimal sizes of the first model."""
    n_max, c_max = models[0].idle.shape[0] - 1, models[0].idle.shape[1] - 1
    p_max = models[0].late.shape[2] - 1
    # d: decisions since the last change, up to the shrink cooldown; a change makes it 1
    # at the next decision (a shrink is allowed again DOWN_COOLDOWN decisions later)
    d_count, fresh = (DOWN_COOLDOWN + 1, 1) if cooldowns else (1, 0)
    ps = np.arange(p_max + 1)
    joined = np.minimum(np.arange(c_max + 1)[:, None] + ps[None, :], c_max)  # [c, p]
    older = np.minimum(np.arange(d_count) + 1, d_count - 1)
    source, target, shrink_sizes = _shrink_targets(n_max, c_max, p_max)
    values = np.zeros((len(models), n_max + 1, c_max + 1, p_max + 1, d_count))

    def bellman(i: int, model: RateModel, ahead: np.ndarray, choose: bool):
        base = model.idle[:, :, None] + beta * model.late  # [n, c, p]
        # hold: the p workers join, the decisions since a change count one more
        held = ahead[:, :, 0, :][:, joined, :][:, :, :, older]
        best = (base[:, :, :, None] + INTERVAL_S * ps[None, None, :, None]
                + np.einsum("cnm,mcpd->ncpd", model.step, held))
        sizes_ = np.broadcast_to((np.arange(c_max + 1)[:, None] + ps[None, :])[None, :, :, None],
                                 best.shape).copy() if choose else None
        # shrink: the value of the state it leaves
        after = (base + INTERVAL_S * ps[None, None, :]
                 + np.einsum("cnm,mcp->ncp", model.step, ahead[:, :, 0, fresh][:, joined]))
        candidates = after.ravel()[target]
        shrink = np.full(base.size, np.inf)
        np.minimum.at(shrink, source, candidates)
        shrink = shrink.reshape(base.shape)
        shrink_to = None
        if choose:
            order = np.lexsort((candidates, source))
            first = np.ones(len(order), bool)
            first[1:] = source[order][1:] != source[order][:-1]
            shrink_to = np.zeros(base.size, int)
            shrink_to[source[order][first]] = shrink_sizes[order][first]
            shrink_to = shrink_to.reshape(base.shape)
        if cooldowns:
            # grow only when the last decision was no grow (p == 0): r join later
            grown = np.einsum("cnm,mcr->ncr", model.step, ahead[:, :, :, fresh])
            grow = (base[:, :, 0, None] + INTERVAL_S * ps[None, None, :] + grown)[:, :, 1:]
            if choose:
                better = grow.min(axis=2)[:, :, None] < best[:, :, 0, :]
                size = np.arange(c_max + 1)[None, :] + 1 + grow.argmin(axis=2)
                sizes_[:, :, 0, :] = np.where(better, size[:, :, None], sizes_[:, :, 0, :])
                better = shrink < best[:, :, :, -1]
                sizes_[:, :, :, -1] = np.where(better, shrink_to, sizes_[:, :, :, -1])
            best[:, :, 0, :] = np.minimum(best[:, :, 0, :], grow.min(axis=2)[:, :, None])
            best[:, :, :, -1] = np.minimum(best[:, :, :, -1], shrink)
        else:
            grown = np.einsum("cnm,mcpr->ncpr", model.step, ahead[:, :, :, 0][:, joined, :])
            grow = (base[:, :, :, None] + INTERVAL_S * (ps[None, None, :, None]
                                                        + ps[None, None, None, :]) + grown)
            if choose:
                # without cooldowns the joining workers count in c + r
                size = joined[None, :, :] + grow.argmin(axis=3)
                better = grow.min(axis=3) < best[:, :, :, 0]
                sizes_[:, :, :, 0] = np.where(better, size, sizes_[:, :, :, 0])
                better = shrink < np.minimum(best[:, :, :, 0], grow.min(axis=3))
                sizes_[:, :, :, 0] = np.where(better, shrink_to, sizes_[:, :, :, 0])
            best[:, :, :, 0] = np.minimum(np.minimum(best[:, :, :, 0], grow.min(axis=3)), shrink)
        return best, sizes_

    def ahead_of(i: int) -> np.ndarray:
        if len(models) == 1:
            return values[i]
        return (1 - switch) * values[i] + switch * values[(i + 1) % len(models)]

    for _ in range(max_iter):
        updated = np.empty_like(values)
        for i, model in enumerate(models):
            updated[i] = bellman(i, model, ahead_of(i), False)[0]
        change = updated - values
        values = updated - updated.flat[0]
        if change.max() - change.min() < tol:
            break
    gain = float((change.max() + change.min()) / 2 / INTERVAL_S)
    if not policy:
        return Solution(gain)
    return Solution(gain, bellman(0, models[0], ahead_of(0), True)[1])


class TablePolicy:
    """The optimal policy of the problem above, told the true arrival rate, as a scaling
    policy the simulator can run (it keeps the cooldowns itself: its tables do)."""

    def __init__(self, rate_of, tables: dict[float, np.ndarray]) -> None:
        self.rate_of = rate_of
        self.tables = tables
        self.grid = np.array(sorted(tables))
        self.since_change = DOWN_COOLDOWN  # a shrink may come at once

    def decide(self, o):
        from rexcore.pool.scaling import ScalingDecision

        rate = float(self.grid[np.abs(self.grid - self.rate_of(o.now)).argmin()])
        table = self.tables[rate]
        n_max, c_max, p_max, d_max = (size - 1 for size in table.shape)
        # actions on draining workers have left the queue's system (see the model)
        n = o.queued + max(0, o.running - o.draining * o.slots_per_worker)
        size = int(table[min(n, n_max), min(o.ready, c_max), min(o.starting, p_max),
                         min(self.since_change, d_max)])
        self.since_change = 1 if size != o.current else self.since_change + 1
        return ScalingDecision(size, f"mdp table at {rate:g}/s")


def main() -> None:
    import argparse
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from rexcore.pool.simulator import WORKLOADS, diurnal_rate, simulate, step_rate

    parser = argparse.ArgumentParser(
        description="Run the optimal policy of the MDP (told the true rate) in the simulator, "
                    "next to HPA-style, at a 30 s start-up.")
    parser.add_argument("--workload", choices=("diurnal", "step"), default="diurnal")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--betas", type=float, nargs="+", default=[110.0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--no-cooldowns", action="store_true",
                        help="the optimal policy without the pool's cooldowns")
    args = parser.parse_args()
    workload = WORKLOADS[args.workload](args.seed)
    rate_of = diurnal_rate if args.workload == "diurnal" else step_rate
    hpa = simulate(workload, "hpa", startup_s=30.0, seed=args.seed)
    grid = RATE_GRID if args.workload == "diurnal" else [0.05, 0.5]
    results = []
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(args.jobs) as pool:
        for beta in args.betas:
            jobs = [(rate, hpa.wait_p95_s, beta, args.workload == "step", not args.no_cooldowns)
                    for rate in grid]
            tables = dict(zip(grid, pool.map(_table, jobs)))
            run = simulate(workload, "mdp", startup_s=30.0, seed=args.seed,
                           policy_factory=lambda _config, t=tables: TablePolicy(rate_of, t))
            results.append({"beta": beta, "wait_p95_s": round(run.wait_p95_s, 2),
                            "avg_workers": round(run.worker_seconds / workload.duration_s, 3),
                            "vs_hpa": round(run.worker_seconds / hpa.worker_seconds, 3),
                            "reversals": run.reversals, "scaling_actions": run.scaling_actions})
    print(json.dumps({"workload": args.workload, "seed": args.seed,
                      "cooldowns": not args.no_cooldowns,
                      "hpa": {"wait_p95_s": round(hpa.wait_p95_s, 2),
                              "avg_workers": round(hpa.worker_seconds / workload.duration_s, 3),
                              "reversals": hpa.reversals},
                      "mdp_policy": results}, indent=1))


def _table(job: tuple[float, float, float, bool, bool]) -> np.ndarray:
    rate, wait_s, beta, jumps, cooldowns = job
    # a load that jumps leaves states (and needs starts) a steady one never sees
    model = (rate_model(rate, wait_s, sized_for=0.5, max_starts=20) if jumps
             else rate_model(rate, wait_s))
    return solve([model], beta, cooldowns=cooldowns, policy=True).sizes


if __name__ == "__main__":
    main()
