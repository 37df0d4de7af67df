"""The worker pool: keeps workers through a provider and, with autoscaling, sizes them.

Without ``enable_autoscale`` the pool starts ``target_workers`` and the provider replaces
crashed ones. With it, every ``evaluation_interval_s`` the pool observes the scheduler,
asks its :class:`~rexcore.pool.scaling.ScalingPolicy` for a size, clamps it to
``[min_workers, max_workers]`` and lets the :class:`WorkerProvisioner` move there. The
clock and the load source are injected, so the simulator drives this very code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import attrs

from rexcore.pool.config import PoolConfig
from rexcore.pool.errors import PoolError
from rexcore.pool.provisioner import WorkerProvisioner, WorkerState
from rexcore.pool.scaling import PoolObservation, ScalingDecision, ScalingPolicy
from rexcore.providers.interface import ProvidedWorker, ProviderError, WorkerLaunch, WorkerProvider

if TYPE_CHECKING:
    from rexcore.scheduler.scheduler import Scheduler

__all__ = ["PoolStatistics", "SchedulerLoad", "WorkerPool", "scheduler_load"]

log = logging.getLogger(__name__)


@attrs.frozen(kw_only=True)
class SchedulerLoad:
    """What the pool reads from the coordinator each tick."""

    queued: int
    running: int
    #: Cumulative: executions queued, finished on a worker, and their seconds on it.
    arrivals: int
    completions: int
    busy_s: float
    #: Joined workers and the actions each runs now.
    running_by_worker: Mapping[str, int]


def scheduler_load(scheduler: Scheduler) -> Callable[[], SchedulerLoad]:
    def load() -> SchedulerLoad:
        status = scheduler.status()
        return SchedulerLoad(
            queued=status.queued, running=status.executing,
            arrivals=status.metrics.arrivals, completions=status.metrics.total_executions,
            busy_s=status.metrics.busy_s, running_by_worker=scheduler.worker_loads(),
        )
    return load


@attrs.frozen(kw_only=True)
class PoolStatistics:
    starting: int = 0
    idle: int = 0
    busy: int = 0
    draining: int = 0
    #: Workers that failed or vanished without being drained, since the pool started.
    failed: int = 0
    desired: int = 0
    reason: str = ""
    scale_ups: int = 0
    scale_downs: int = 0
    #: Scaling actions whose direction differs from the one before.
    reversals: int = 0
    provider_errors: int = 0
    last_provider_error: str = ""
    startup_s: float | None = None


class WorkerPool:
    def __init__(
        self,
        config: PoolConfig,
        provider: WorkerProvider,
        launch: WorkerLaunch,
        *,
        policy: ScalingPolicy | None = None,
        load: Callable[[], SchedulerLoad] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if config.autoscales and (policy is None or load is None):
            raise PoolError("pool.enable_autoscale needs a scaling policy and the scheduler's "
                            "load; build the pool with both, or switch autoscaling off")
        self.config = config
        self.provider = provider
        self.launch = launch
        self.policy = policy
        self.load = load
        self.clock = clock
        self.provisioner = WorkerProvisioner(
            provider, launch, clock=clock, backoff_s=config.provider_backoff_s,
            max_backoff_s=config.max_provider_backoff_s)
        self.desired = config.initial_workers
        self.last_decision: ScalingDecision | None = None
        self._scale_ups = self._scale_downs = self._reversals = 0
        self._last_direction = 0
        self._loop: asyncio.Task[None] | None = None

    async def start(self, *, run: bool = True) -> None:
        """Start ``target_workers``; with autoscaling, also evaluate every interval (unless
        ``run`` is false: the caller ticks, as the simulator does)."""
        if not self.config.autoscales:
            if self.config.initial_workers:
                await self.provider.create_workers(self.config.initial_workers, self.launch)
            return
        await self.provisioner.move_to(self.desired)
        if run:
            self._loop = asyncio.create_task(self._run(), name="rex-pool-autoscale")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.config.evaluation_interval_s)
            try:
                await self.tick()
            except ProviderError as exc:
                log.warning("pool: the provider could not list workers: %s; trying again in "
                            "%gs", exc, self.config.evaluation_interval_s)
            except Exception:  # one bad tick must not end autoscaling for good
                log.exception("pool: autoscaling tick failed; trying again next interval")

    async def tick(self) -> ScalingDecision:
        """Observe, decide, move: one evaluation of the policy."""
        assert self.policy is not None and self.load is not None
        load = self.load()
        await self.provisioner.refresh(load.running_by_worker)
        observation = self.observe(load)
        decision = self.policy.decide(observation)
        low, high = self.config.min_workers, self.config.max_workers
        desired = min(max(decision.desired, low), high)
        if desired != decision.desired:
            decision = ScalingDecision(desired, f"{decision.reason}; clamped to "
                                                f"[{low}, {high}]")
        self.desired, self.last_decision = desired, decision
        moved = await self.provisioner.move_to(desired)
        if moved:
            direction = 1 if moved > 0 else -1
            if direction > 0:
                self._scale_ups += 1
            else:
                self._scale_downs += 1
            if self._last_direction and direction != self._last_direction:
                self._reversals += 1
            self._last_direction = direction
            log.info("pool: %s %d worker(s) towards %d: %s",
                     "adding" if moved > 0 else "draining", abs(moved), desired, decision.reason)
        return decision

    def observe(self, load: SchedulerLoad) -> PoolObservation:
        counts = self._counts()
        startup = self.provisioner.startup_s
        return PoolObservation(
            now=self.clock(), queued=load.queued, running=load.running,
            ready=counts[WorkerState.IDLE] + counts[WorkerState.BUSY],
            starting=counts[WorkerState.STARTING], draining=counts[WorkerState.DRAINING],
            slots_per_worker=self.config.slots_per_worker, arrivals=load.arrivals,
            completions=load.completions, busy_s=load.busy_s,
            startup_s=self.config.worker_startup_s if startup is None else startup,
        )

    def _counts(self) -> dict[WorkerState, int]:
        counts = dict.fromkeys(WorkerState, 0)
        for record in self.provisioner.workers.values():
            counts[record.state] += 1
        return counts

    def statistics(self) -> PoolStatistics:
        counts = self._counts()
        provisioner = self.provisioner
        return PoolStatistics(
            starting=counts[WorkerState.STARTING], idle=counts[WorkerState.IDLE],
            busy=counts[WorkerState.BUSY], draining=counts[WorkerState.DRAINING],
            failed=provisioner.failed_total, desired=self.desired,
            reason=self.last_decision.reason if self.last_decision else "",
            scale_ups=self._scale_ups, scale_downs=self._scale_downs,
            reversals=self._reversals, provider_errors=provisioner.provider_errors,
            last_provider_error=provisioner.last_error, startup_s=provisioner.startup_s,
        )

    async def workers(self) -> Sequence[ProvidedWorker]:
        return await self.provider.list_workers()

    async def stop(self) -> None:
        """Stop evaluating, then drain every worker (running actions finish) and stop them."""
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
            self._loop = None
        await self.provider.close()
