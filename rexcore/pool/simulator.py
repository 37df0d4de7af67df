"""A seeded discrete-event simulator that judges scaling policies on a simulated clock.

It runs the real :class:`~rexcore.pool.pool.WorkerPool` (provisioner, policy, cooldowns)
against the ``mock`` provider, whose workers start ``startup_s`` after they are asked
for; only the coordinator is simulated: a FIFO queue handing each action to an idle joined
worker (one slot each). Time is a number the simulator advances from event to event, so a
simulated day takes well under a second.

Workloads (:data:`WORKLOADS`) and the baselines that are not components (an HPA-style
policy and an oracle that knows the future) live here too, with :func:`simulate`, which
returns the figures ``bench/autoscale.py`` prints.
"""

from __future__ import annotations

import asyncio
import bisect
import heapq
import math
import random
from collections import deque
from collections.abc import Callable, Iterable, Sequence

import attrs

from rexcore.pool.config import PoolConfig
from rexcore.pool.pool import SchedulerLoad, WorkerPool
from rexcore.pool.scaling import PoolObservation, ScalingDecision, ScalingPolicy
from rexcore.pool.scaling.policies import (
    PredictiveOptions,
    ReactiveOptions,
    StaticOptions,
    create_predictive_policy,
    create_reactive_policy,
    create_static_policy,
)
from rexcore.providers.interface import ProvidedWorker, ProvidedWorkerState, WorkerLaunch
from rexcore.providers.mock import MockProvider, MockProviderOptions, MockWorker

__all__ = [
    "BASELINES",
    "POLICIES",
    "WORKLOADS",
    "Arrival",
    "HpaPolicy",
    "OraclePolicy",
    "SimulationResult",
    "Workload",
    "read_trace",
    "simulate",
]

#: ``(arrival_s, duration_s)`` of one action.
Arrival = tuple[float, float]


@attrs.frozen
class Workload:
    name: str
    arrivals: tuple[Arrival, ...]
    duration_s: float


def _lognormal(rng: random.Random, mean_s: float, sigma: float = 0.8) -> float:
    return rng.lognormvariate(math.log(mean_s) - sigma**2 / 2, sigma)


def _poisson(rng: random.Random, rate: Callable[[float], float], peak: float,
             end_s: float, mean_s: float) -> list[Arrival]:
    """A non-homogeneous Poisson process by thinning (``rate(t) <= peak``)."""
    arrivals, t = [], 0.0
    while True:
        t += rng.expovariate(peak)
        if t >= end_s:
            return arrivals
        if rng.random() * peak < rate(t):
            arrivals.append((t, _lognormal(rng, mean_s)))


def diurnal_rate(t: float) -> float:
    """Arrivals per second of :func:`diurnal` at ``t``."""
    return 0.05 + 0.45 * math.sin(math.pi * t / 86_400.0) ** 2


def step_rate(t: float) -> float:
    """Arrivals per second of :func:`step` at ``t``."""
    return 0.5 if 3600 <= t < 10_800 else 0.05


def diurnal(seed: int) -> Workload:
    """One day: 0.05 actions/s at night to 0.5/s at noon, 40 s each on average."""
    rng, day = random.Random(seed), 86_400.0
    arrivals = _poisson(rng, diurnal_rate, 0.5, day, 40.0)
    return Workload("diurnal", tuple(arrivals), day)


def step(seed: int) -> Workload:
    """Four hours; the rate jumps from 0.05/s to 0.5/s for the middle two."""
    rng = random.Random(seed)
    arrivals = _poisson(rng, step_rate, 0.5, 14_400.0, 40.0)
    return Workload("step", tuple(arrivals), 14_400.0)


def spike(seed: int) -> Workload:
    """Four hours at 0.1/s with three five-minute spikes at 1.5/s."""
    rng = random.Random(seed)
    arrivals = _poisson(rng, lambda t: 1.5 if t % 3600 < 300 and t >= 3600 else 0.1, 1.5,
                        14_400.0, 40.0)
    return Workload("spike", tuple(arrivals), 14_400.0)


def ci_storm(seed: int) -> Workload:
    """Eight hours of pushes (one per 15 min on average), each a build of 100 to 300
    actions of 20 s fanning out over about a minute, over a trickle of 0.02/s."""
    rng, end = random.Random(seed), 28_800.0
    arrivals = _poisson(rng, lambda t: 0.02, 0.02, end, 20.0)
    push = rng.expovariate(1 / 900)
    while push < end - 600:
        for _ in range(rng.randint(100, 300)):
            arrivals.append((push + rng.expovariate(1 / 20), _lognormal(rng, 20.0)))
        push += rng.expovariate(1 / 900)
    arrivals.sort()
    return Workload("ci_storm", tuple(arrivals), end)


WORKLOADS: dict[str, Callable[[int], Workload]] = {
    "diurnal": diurnal, "step": step, "spike": spike, "ci_storm": ci_storm,
}


def read_trace(path: str) -> Workload:
    """A CSV arrival trace with the columns ``arrival_s,duration_s`` (a header line)."""
    import csv

    with open(path, newline="") as handle:
        rows = [(float(row["arrival_s"]), float(row["duration_s"]))
                for row in csv.DictReader(handle)]
    rows.sort()
    return Workload(path, tuple(rows), rows[-1][0] if rows else 0.0)


# -- baselines ----------------------------------------------------------------------------


class HpaPolicy:
    """Kubernetes' HPA on a backlog-per-worker metric: ``desired = ceil(current * backlog
    per worker / target)``, a 10% tolerance, growth limited to ``max(2x, +4)`` per
    evaluation, and a scale-down to the largest recommendation of the last 5 minutes."""

    def __init__(self, target_per_worker: float = 1.0, window_s: float = 300.0) -> None:
        self.target = target_per_worker
        self.window_s = window_s
        self._recommended: deque[tuple[float, int]] = deque()

    def decide(self, o: PoolObservation) -> ScalingDecision:
        current = o.current
        if current == 0:
            raw = math.ceil(o.backlog / self.target)
        else:
            ratio = o.backlog / current / self.target
            raw = current if abs(ratio - 1) <= 0.1 else math.ceil(current * ratio)
        raw = min(raw, max(2 * current, current + 4))
        self._recommended.append((o.now, raw))
        while self._recommended[0][0] < o.now - self.window_s:
            self._recommended.popleft()
        desired = raw if raw >= current else max(r for _, r in self._recommended)
        return ScalingDecision(desired, f"hpa: backlog {o.backlog} over {current} workers")


class OraclePolicy:
    """Knows every arrival: asks now for the most actions that will run at once in the
    interval after a worker asked for now would join, were every action started on
    arrival."""

    def __init__(self, arrivals: Sequence[Arrival], interval_s: float) -> None:
        changes = sorted([(a, 1) for a, _ in arrivals] + [(a + d, -1) for a, d in arrivals])
        self.times: list[float] = []
        self.levels: list[int] = []
        level = 0
        for t, delta in changes:
            level += delta
            self.times.append(t)
            self.levels.append(level)
        self.interval_s = interval_s

    def level_at(self, t: float) -> int:
        i = bisect.bisect_right(self.times, t)
        return self.levels[i - 1] if i else 0

    def peak(self, start: float, end: float) -> int:
        i, j = bisect.bisect_right(self.times, start), bisect.bisect_right(self.times, end)
        return max([self.level_at(start), *self.levels[i:j]])

    def decide(self, o: PoolObservation) -> ScalingDecision:
        # Keep what runs until new workers could join, and have what runs then.
        horizon = o.now + o.startup_s + 2 * self.interval_s
        wanted = max(self.peak(o.now, horizon), o.backlog)
        return ScalingDecision(wanted, "oracle: what will run once a new worker joins")


# -- the simulation -----------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class SimulationResult:
    workload: str
    policy: str
    startup_s: float
    seed: int
    actions: int
    wait_p50_s: float
    wait_p95_s: float
    wait_p99_s: float
    #: Share of actions that waited longer than ``wait_objective_s``.
    over_objective: float
    wait_objective_s: float
    worker_seconds: float
    scaling_actions: int
    reversals: int
    peak_workers: int


def _quantile(ordered: Sequence[float], q: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class _SimulatedProvider(MockProvider):
    """The ``mock`` provider with the same states and billing, settled incrementally.

    :meth:`MockProvider.settle` looks at every live worker, and it runs on every drain
    and on every action a draining worker finishes: with hundreds of workers that was
    most of a run. Here the starting workers wait in a heap by the time they run and
    the draining ones in a dict, so a settle touches only workers whose state can
    change. A draining worker becomes idle only when it finishes an action, and the
    coordinator settles right then, so no idle draining worker outlives a settle.
    """

    def __init__(self, options: MockProviderOptions, *, clock: Callable[[], float]) -> None:
        super().__init__(options, clock=clock)
        self._starting: list[tuple[float, int, MockWorker]] = []
        self._draining: dict[str, MockWorker] = {}
        self._listed: dict[str, ProvidedWorker] = {}
        self._seen_created = 0

    def settle(self) -> None:
        now = self.clock()
        created = self.created
        for index in range(self._seen_created, len(created)):
            worker = created[index]
            heapq.heappush(self._starting, (worker.running_at, index, worker))
        self._seen_created = len(created)
        while self._starting and self._starting[0][0] <= now:
            worker = heapq.heappop(self._starting)[2]
            if worker.state is ProvidedWorkerState.STARTING:
                worker.state = ProvidedWorkerState.RUNNING
        for worker in [w for w in self._draining.values() if not self.busy(w.worker_id)]:
            if worker.state is ProvidedWorkerState.DRAINING:
                self._stop(worker, now)

    def _stop(self, worker: MockWorker, now: float) -> None:
        self._draining.pop(worker.worker_id, None)
        self._listed.pop(worker.worker_id, None)
        super()._stop(worker, now)

    async def list_workers(self) -> Sequence[ProvidedWorker]:
        # The same answer as the mock's, reusing each worker's last (frozen) entry.
        self.settle()
        listed, entries = self._listed, []
        for worker in self._live.values():
            entry = listed.get(worker.worker_id)
            if entry is None or entry.state is not worker.state:
                entry = listed[worker.worker_id] = ProvidedWorker(worker.worker_id, worker.state)
            entries.append(entry)
        return entries

    @property
    def active_count(self) -> int:
        """Workers not stopped and not draining: what the provisioner counts as active."""
        return len(self._live) - len(self._draining)

    async def drain(self, worker_id: str) -> None:
        worker = self._live.get(worker_id)
        if worker is not None:
            self._draining[worker_id] = worker
        await super().drain(worker_id)


class _SimulatedCoordinator:
    """The scheduler's part: FIFO queue, idle joined workers, the load the pool reads."""

    def __init__(self, provider: MockProvider) -> None:
        self.provider = provider
        self.now = 0.0
        self.queue: deque[Arrival] = deque()
        self.idle: dict[str, None] = {}  # insertion-ordered: the longest idle works first
        self.busy: dict[str, float] = {}
        #: Joined workers that take actions and the actions each runs (what ``load``
        #: reports), kept as they change rather than rebuilt every tick.
        self.running_by_worker: dict[str, int] = {}
        self.events: list[tuple[float, int, str, str]] = []
        self.waits: list[float] = []
        self.arrivals = self.completions = 0
        self.busy_s = 0.0
        self._seq = 0
        self._seen_created = 0
        self._seen_calls = 0

    def push(self, when: float, kind: str, worker_id: str) -> None:
        self._seq += 1
        heapq.heappush(self.events, (when, self._seq, kind, worker_id))

    def load(self) -> SchedulerLoad:
        return SchedulerLoad(queued=len(self.queue), running=len(self.busy),
                             arrivals=self.arrivals, completions=self.completions,
                             busy_s=self.busy_s,
                             running_by_worker=dict(self.running_by_worker))

    def arrive(self, arrival: Arrival) -> None:
        self.arrivals += 1
        self.queue.append(arrival)
        self.dispatch()

    def dispatch(self) -> None:
        while self.queue and self.idle:
            worker_id = next(iter(self.idle))
            del self.idle[worker_id]
            arrived, duration = self.queue.popleft()
            self.waits.append(self.now - arrived)
            self.busy[worker_id] = duration
            self.running_by_worker[worker_id] = 1
            self.push(self.now + duration, "done", worker_id)

    def finish(self, worker_id: str) -> None:
        self.completions += 1
        self.busy_s += self.busy.pop(worker_id)
        if self._draining(worker_id):
            del self.running_by_worker[worker_id]
            self.provider.settle()  # it exits now that it is idle: billing stops here
        else:
            self.idle[worker_id] = None
            self.running_by_worker[worker_id] = 0
            self.dispatch()

    def join(self, worker_id: str) -> None:
        if not self._draining(worker_id):
            self.provider.settle()
            self.idle[worker_id] = None
            self.running_by_worker[worker_id] = 0
            self.dispatch()

    def _draining(self, worker_id: str) -> bool:
        return self.provider.workers[worker_id].state in (
            ProvidedWorkerState.DRAINING, ProvidedWorkerState.STOPPED)

    def after_tick(self) -> None:
        """Schedule the joins of new workers; idle workers told to drain leave."""
        created = self.provider.created
        for worker in created[self._seen_created:]:
            self.push(worker.running_at, "join", worker.worker_id)
        self._seen_created = len(created)
        # Only a drain or a terminate since the last tick can have stopped an idle worker.
        calls = self.provider.calls
        for method, worker_id in calls[self._seen_calls:]:
            if (method in ("drain", "terminate") and worker_id in self.idle
                    and self._draining(worker_id)):  # type: ignore[arg-type]
                del self.idle[worker_id]  # type: ignore[arg-type]
                del self.running_by_worker[worker_id]  # type: ignore[arg-type]
        self._seen_calls = len(calls)
        self.provider.settle()


POLICIES = ("predictive", "reactive", "static", "hpa", "oracle")
BASELINES = ("reactive", "static", "hpa", "oracle")


def simulate(
    workload: Workload,
    policy: str,
    *,
    startup_s: float,
    seed: int = 0,
    pool: PoolConfig | None = None,
    predictive: PredictiveOptions | None = None,
    wait_objective_s: float = 30.0,
    policy_factory: Callable[[PoolConfig], ScalingPolicy] | None = None,
) -> SimulationResult:
    """Run ``workload`` under ``policy`` (one of :data:`POLICIES`) with workers that take
    ``startup_s`` to join; deterministic for a given workload and seed.

    ``policy_factory`` judges a policy of one's own instead (built from the pool's
    config; ``policy`` is then only its name in the result)."""
    return asyncio.run(_simulate(workload, policy, startup_s, seed,
                                 pool or PoolConfig(min_workers=1, max_workers=1000),
                                 predictive or PredictiveOptions(), wait_objective_s,
                                 policy_factory))


async def _simulate(workload: Workload, policy_name: str, startup_s: float, seed: int,
                    pool_config: PoolConfig, predictive: PredictiveOptions,
                    wait_objective_s: float,
                    policy_factory: Callable[[PoolConfig], ScalingPolicy] | None
                    ) -> SimulationResult:
    oracle = OraclePolicy(workload.arrivals, pool_config.evaluation_interval_s)
    peak = max(1, oracle.peak(0.0, workload.duration_s))
    initial = max(pool_config.min_workers, oracle.level_at(0.0), 1)
    static = policy_name == "static"
    config = attrs.evolve(pool_config, enable_autoscale=True, worker_startup_s=startup_s,
                          target_workers=peak if static else initial)
    policies: dict[str, Callable[[], ScalingPolicy]] = {
        "predictive": lambda: create_predictive_policy(predictive, config),
        "reactive": lambda: create_reactive_policy(ReactiveOptions(), config),
        "static": lambda: create_static_policy(StaticOptions(peak), config),
        "hpa": HpaPolicy,
        "oracle": lambda: oracle,
    }
    if policy_factory is not None:
        policies = {policy_name: lambda: policy_factory(config)}
    if policy_name not in policies:
        raise ValueError(f"unknown policy {policy_name!r}; choose one of {', '.join(policies)}")
    clock = [-startup_s]  # the first workers are asked for so as to be ready at 0
    provider = _SimulatedProvider(MockProviderOptions(start_delay_s=startup_s, seed=seed),
                                  clock=lambda: clock[0])
    coordinator = _SimulatedCoordinator(provider)
    provider.busy = coordinator.busy.__contains__
    worker_pool = WorkerPool(config, provider, WorkerLaunch("sim://"),
                             policy=policies[policy_name](), load=coordinator.load,
                             clock=lambda: clock[0])
    await worker_pool.start(run=False)
    coordinator.after_tick()
    interval = config.evaluation_interval_s
    next_tick = clock[0] + interval
    arrivals, index, peak_workers = workload.arrivals, 0, 0
    while True:
        upcoming = [next_tick]
        if index < len(arrivals):
            upcoming.append(arrivals[index][0])
        if coordinator.events:
            upcoming.append(coordinator.events[0][0])
        now = min(upcoming)
        done = index >= len(arrivals) and not coordinator.queue and not coordinator.busy
        if done and now >= workload.duration_s:
            break
        clock[0] = coordinator.now = now
        if coordinator.events and coordinator.events[0][0] == now:
            _, _, kind, worker_id = heapq.heappop(coordinator.events)
            (coordinator.finish if kind == "done" else coordinator.join)(worker_id)
        elif index < len(arrivals) and arrivals[index][0] == now:
            coordinator.arrive(arrivals[index])
            index += 1
        else:
            await worker_pool.tick()
            coordinator.after_tick()
            next_tick += interval
            peak_workers = max(peak_workers, provider.active_count)
    end = clock[0]
    worker_seconds = sum(
        max(0.0, min(end, w.stopped_at if w.stopped_at is not None else end)
            - max(0.0, w.created_at))
        for w in provider.workers.values())
    waits = sorted(coordinator.waits)
    stats = worker_pool.statistics()
    return SimulationResult(
        workload=workload.name, policy=policy_name, startup_s=startup_s, seed=seed,
        actions=len(waits), wait_p50_s=_quantile(waits, 0.50),
        wait_p95_s=_quantile(waits, 0.95), wait_p99_s=_quantile(waits, 0.99),
        over_objective=sum(1 for w in waits if w > wait_objective_s) / max(1, len(waits)),
        wait_objective_s=wait_objective_s, worker_seconds=worker_seconds,
        scaling_actions=stats.scale_ups + stats.scale_downs, reversals=stats.reversals,
        peak_workers=peak_workers,
    )


def run_grid(workloads: Iterable[Workload], policies: Iterable[str],
             startups: Iterable[float], **options: object) -> list[SimulationResult]:
    return [simulate(w, p, startup_s=s, **options)  # type: ignore[arg-type]
            for w in workloads for s in startups for p in policies]
