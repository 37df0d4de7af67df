"""Moving the pool to a size through a provider: create, drain, and only then terminate.

The provisioner is tick-driven (it never sleeps): each :meth:`refresh` folds what the
provider and the scheduler report into one record per worker, and each :meth:`move_to`
creates or drains the difference. A failing provider is retried on a later tick after a
doubling backoff, so the daemon and the simulator drive it the same way.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Callable, Mapping

import attrs

from rexcore.providers.interface import (
    ProvidedWorkerState,
    ProviderError,
    WorkerLaunch,
    WorkerProvider,
)

__all__ = ["WorkerProvisioner", "WorkerRecord", "WorkerState"]

log = logging.getLogger(__name__)


class WorkerState(enum.Enum):
    STARTING = "starting"  # asked for, not joined the coordinator yet
    IDLE = "idle"
    BUSY = "busy"
    DRAINING = "draining"  # finishing its actions; terminated once it has exited
    FAILED = "failed"

    # Members are singletons: identity hashing is consistent with Enum's equality and
    # spares the pool a Python-level Enum.__hash__ per worker per tick (counts, active).
    __hash__ = object.__hash__


#: Which workers a scale-in drains first: those not serving yet, then idle ones.
_DRAIN_ORDER = {WorkerState.STARTING: 0, WorkerState.IDLE: 1, WorkerState.BUSY: 2}


@attrs.define(eq=False)
class WorkerRecord:
    worker_id: str
    state: WorkerState
    created_at: float
    joined_at: float | None = None
    drain_started_at: float | None = None
    running: int = 0
    reason: str = ""


class WorkerProvisioner:
    def __init__(
        self,
        provider: WorkerProvider,
        launch: WorkerLaunch,
        *,
        clock: Callable[[], float],
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
    ) -> None:
        self.provider = provider
        self.launch = launch
        self.clock = clock
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.workers: dict[str, WorkerRecord] = {}
        #: Seconds from create to join, smoothed over the workers that joined (None: none yet).
        self.startup_s: float | None = None
        self.failed_total = 0
        self.provider_errors = 0
        self.last_error = ""
        self._failures_in_a_row = 0
        self._retry_at = -math.inf

    @property
    def active(self) -> list[WorkerRecord]:
        """Workers that count towards the size: starting, idle or busy."""
        return [r for r in self.workers.values() if r.state in _DRAIN_ORDER]

    async def refresh(self, running_by_worker: Mapping[str, int]) -> None:
        """Fold in the provider's list and the actions each joined worker runs; terminate
        (release) workers that exited after a drain or failed."""
        provided = await self.provider.list_workers()
        now = self.clock()
        listed = set()
        for worker in provided:
            listed.add(worker.worker_id)
            record = self.workers.get(worker.worker_id)
            if record is None:  # started before us, or by the provider replacing one
                record = self.workers[worker.worker_id] = WorkerRecord(
                    worker.worker_id, WorkerState.STARTING, now)
            if worker.state is ProvidedWorkerState.FAILED:
                await self._release(record, f"failed: {worker.reason or 'no reason given'}")
                continue
            record.running = running_by_worker.get(worker.worker_id, 0)
            if record.state is WorkerState.DRAINING or worker.state in (
                ProvidedWorkerState.DRAINING, ProvidedWorkerState.STOPPED
            ):
                record.state = WorkerState.DRAINING
            elif worker.worker_id in running_by_worker:
                if record.joined_at is None:
                    record.joined_at = now
                    sample = now - record.created_at
                    self.startup_s = sample if self.startup_s is None else (
                        0.3 * sample + 0.7 * self.startup_s)
                record.state = WorkerState.BUSY if record.running else WorkerState.IDLE
            else:
                record.state = WorkerState.STARTING
        for record in [r for r in self.workers.values() if r.worker_id not in listed]:
            await self._release(record, "exited")

    async def _release(self, record: WorkerRecord, why: str) -> None:
        """A worker that is gone or failed: let the provider free what is left of it."""
        del self.workers[record.worker_id]
        if why != "exited" or record.state is not WorkerState.DRAINING:
            self.failed_total += 1
            log.warning("pool: worker %s %s; the pool replaces it if it still needs it",
                        record.worker_id, why)
        try:
            await self.provider.terminate(record.worker_id)
        except ProviderError as exc:  # already gone is what we wanted
            log.debug("pool: terminating %s after it %s: %s", record.worker_id, why, exc)

    async def move_to(self, desired: int) -> int:
        """Create or drain workers towards ``desired`` active ones; returns the change
        made (0 while a failing provider is backing off)."""
        active = self.active
        now = self.clock()
        if desired > len(active):
            if now < self._retry_at:
                return 0
            count = desired - len(active)
            try:
                created = await self.provider.create_workers(count, self.launch)
            except ProviderError as exc:
                self._failed(exc, f"creating {count} worker(s)")
                return 0
            self._failures_in_a_row = 0
            for worker in created:
                self.workers.setdefault(worker.worker_id, WorkerRecord(
                    worker.worker_id, WorkerState.STARTING, now))
            return len(created)
        drained = 0
        if desired < len(active):
            victims = sorted(active, key=lambda r: (_DRAIN_ORDER[r.state], r.running,
                                                    -r.created_at))
            for record in victims[:len(active) - desired]:
                try:
                    await self.provider.drain(record.worker_id)
                except ProviderError as exc:
                    self._failed(exc, f"draining worker {record.worker_id}")
                    break
                record.state, record.drain_started_at = WorkerState.DRAINING, now
                drained += 1
        return -drained

    def _failed(self, exc: ProviderError, doing: str) -> None:
        self.provider_errors += 1
        self._failures_in_a_row += 1
        backoff = min(self.max_backoff_s, self.backoff_s * 2 ** (self._failures_in_a_row - 1))
        self._retry_at = self.clock() + backoff
        self.last_error = f"{doing}: {exc}"
        log.warning("pool: the provider failed %s: %s; retrying in %.3gs (failure %d in a "
                    "row); check the provider's options and quota", doing, exc, backoff,
                    self._failures_in_a_row)
