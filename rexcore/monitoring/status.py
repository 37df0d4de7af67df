"""The worker pool as ``GET /v1/status``, the health checks and the metrics see it."""

from __future__ import annotations

import time
import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from rexcore.pool.provisioner import WorkerState
from rexcore.providers.interface import ProvidedWorker, ProvidedWorkerState, ProviderError
from rexcore.serialization.operation import PoolStatus

if TYPE_CHECKING:
    from rexcore.pool.pool import WorkerPool

__all__ = ["pool_status"]

#: A provider's listing is reused this long: one ``/healthz`` runs several checks, and
#: ``/v1/status`` and the metrics collector ask too; for a cloud provider each listing is
#: an API call.
_LISTING_TTL_S = 1.0
_listings: weakref.WeakKeyDictionary[WorkerPool, tuple[float, Sequence[ProvidedWorker]]] = (
    weakref.WeakKeyDictionary())


async def _listed_workers(pool: WorkerPool) -> Sequence[ProvidedWorker]:
    now = time.monotonic()
    cached = _listings.get(pool)
    if cached is not None and now - cached[0] < _LISTING_TTL_S:
        return cached[1]
    workers = await pool.workers()
    _listings[pool] = (now, workers)
    return workers


async def pool_status(pool: WorkerPool, running_by_worker: Mapping[str, int]) -> PoolStatus:
    """``pool``'s workers by state; ``running_by_worker`` is the scheduler's
    :meth:`~rexcore.scheduler.scheduler.Scheduler.worker_loads` (joined workers)."""
    stats = pool.statistics()
    config = pool.config
    counts = {"starting": stats.starting, "idle": stats.idle, "busy": stats.busy,
              "draining": stats.draining, "failed": stats.failed}
    last_error = stats.last_provider_error
    if not config.autoscales:
        # Nothing refreshes the provisioner of a fixed-size pool: ask the provider, and
        # the scheduler which of its workers have joined. Read-only: nothing is released.
        counts = dict.fromkeys(counts, 0)
        try:
            workers = await _listed_workers(pool)
        except ProviderError as exc:
            workers, last_error = [], f"listing workers: {exc}"
        for worker in workers:
            counts[_state_of(worker.state, running_by_worker.get(worker.worker_id)).value] += 1
    return PoolStatus(
        autoscale=config.autoscales,
        policy=config.policy_name if config.autoscales else "",
        min_workers=config.min_workers, max_workers=config.max_workers,
        desired=stats.desired, reason=stats.reason, **counts,
        scale_ups=stats.scale_ups, scale_downs=stats.scale_downs,
        provider_errors=stats.provider_errors, last_provider_error=last_error,
        startup_s=stats.startup_s,
    )


def _state_of(provided: ProvidedWorkerState, running: int | None) -> WorkerState:
    if provided is ProvidedWorkerState.FAILED:
        return WorkerState.FAILED
    if provided in (ProvidedWorkerState.DRAINING, ProvidedWorkerState.STOPPED):
        return WorkerState.DRAINING
    if running is None:  # not joined the coordinator (yet, or again after a crash)
        return WorkerState.STARTING
    return WorkerState.BUSY if running else WorkerState.IDLE
