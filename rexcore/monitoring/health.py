"""Health checks that ``GET /healthz`` runs: built-in ones and those plugins offer."""

from __future__ import annotations

import asyncio
import math
import shutil
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from rexcore.monitoring.status import pool_status

if TYPE_CHECKING:
    from rexcore.core.runtime import ServiceRuntime
    from rexcore.serialization.operation import PoolStatus

__all__ = [
    "HealthCheck",
    "HealthReport",
    "coordinator_check",
    "disk_space_check",
    "failed_workers_check",
    "queue_depth_check",
    "run_health_checks",
    "workers_check",
]


@attrs.frozen
class HealthCheck:
    """A named async check returning ``(healthy, detail)``."""

    name: str
    check: Callable[[], Awaitable[tuple[bool, str]]] = attrs.field(repr=False)
    timeout_s: float = 2.0


@attrs.frozen
class HealthReport:
    healthy: bool
    checks: dict[str, dict[str, object]]


async def _run_one(check: HealthCheck) -> tuple[bool, str]:
    try:
        return await asyncio.wait_for(check.check(), check.timeout_s)
    except TimeoutError:
        return False, f"no answer within {check.timeout_s:g} s"
    except Exception as exc:  # a failing check is a finding, not a crash
        return False, f"{type(exc).__name__}: {exc}"


async def run_health_checks(checks: Sequence[HealthCheck]) -> HealthReport:
    results = await asyncio.gather(*(_run_one(c) for c in checks))
    report = {c.name: {"healthy": ok, "detail": detail} for c, (ok, detail) in zip(checks, results)}
    return HealthReport(all(ok for ok, _ in results), report)


def disk_space_check(path: Path, min_free_bytes: int = 64 * 1024 * 1024) -> HealthCheck:
    """Unhealthy when the file system holding ``path`` has less than ``min_free_bytes`` free."""

    async def check() -> tuple[bool, str]:
        usage = await asyncio.to_thread(shutil.disk_usage, path)
        detail = f"{usage.free // (1024 * 1024)} MiB free at {path}"
        return usage.free >= min_free_bytes, detail

    return HealthCheck(name="data_dir_disk_space", check=check)


async def _pool_of(runtime: ServiceRuntime) -> PoolStatus | None:
    pool, scheduler = runtime.pool, runtime.scheduler
    if pool is None:
        return None
    return await pool_status(pool, scheduler.worker_loads() if scheduler is not None else {})


_NO_SCHEDULER = "no scheduler on this rexd (scheduler.enabled = false): nothing to run"


def workers_check(runtime: ServiceRuntime) -> HealthCheck:
    """Unhealthy when no worker has joined while work is queued, or while the pool wants
    workers and none is even starting."""

    async def check() -> tuple[bool, str]:
        scheduler = runtime.scheduler
        if scheduler is None:
            return True, _NO_SCHEDULER
        status = scheduler.status()
        if status.workers_total:
            return True, f"{status.workers_total} worker(s) joined, {status.workers_busy} busy"
        pool = await _pool_of(runtime)
        starting = pool.starting if pool is not None else 0
        if status.queued:
            return False, (
                f"{status.queued} operation(s) queued and no worker has joined ({starting} "
                "starting); start workers (pool.target_workers, or `rexd worker` on another "
                "host) or check the rexd log for why they do not join"
            )
        if pool is not None and pool.desired and not starting:
            return False, (
                f"the pool wants {pool.desired} worker(s) but none has joined or is starting"
                f"{': ' + pool.last_provider_error if pool.last_provider_error else ''}; "
                "check the provider's options and the rexd log"
            )
        return True, f"no worker joined, {starting} starting; no work is waiting"

    return HealthCheck(name="workers", check=check)


def queue_depth_check(runtime: ServiceRuntime, max_per_worker: int = 10) -> HealthCheck:
    """Unhealthy when more than ``max_per_worker`` operations wait per joined worker."""

    async def check() -> tuple[bool, str]:
        scheduler = runtime.scheduler
        if scheduler is None:
            return True, _NO_SCHEDULER
        status = scheduler.status()
        limit = max_per_worker * status.workers_total
        detail = (f"{status.queued} operation(s) queued for {status.workers_total} "
                  f"worker(s) (at most {max_per_worker} per worker: {limit})")
        if status.queued > limit:
            return False, (f"{detail}; add workers (pool.target_workers, pool.max_workers) or "
                           "check that the workers offer the platform the actions ask for")
        return True, detail

    return HealthCheck(name="queue_depth", check=check)


def failed_workers_check(runtime: ServiceRuntime, recent_s: float = 300.0) -> HealthCheck:
    """Unhealthy while the provider reports failed workers, or for ``recent_s`` seconds
    after a worker failed or the provider failed a call."""
    seen = {"failed": 0, "provider_errors": 0}
    changed_at = {"failed": -math.inf, "provider_errors": -math.inf}

    async def check() -> tuple[bool, str]:
        pool = await _pool_of(runtime)
        if pool is None:
            return True, "no worker pool on this rexd"
        now = time.monotonic()
        for key, before in seen.items():
            value = getattr(pool, key)
            if value > before:
                changed_at[key] = now
            seen[key] = value
        # A fixed-size pool's count is of workers failed right now; an autoscaled pool
        # replaces them, so its count only grows and a recent rise is the finding.
        failing_now = pool.failed and not pool.autoscale
        recent_failure = now - changed_at["failed"] < recent_s
        recent_provider_error = now - changed_at["provider_errors"] < recent_s
        detail = (f"{pool.failed} worker(s) failed, {pool.provider_errors} provider "
                  "error(s) since the pool started")
        if failing_now or recent_failure or recent_provider_error:
            cause = f"; last provider error: {pool.last_provider_error}" if (
                recent_provider_error and pool.last_provider_error) else ""
            return False, (f"{detail}, within the last {recent_s:g} s{cause}; see the rexd "
                           "log for why workers fail, and the provider's options and quota")
        return True, detail

    return HealthCheck(name="failed_workers", check=check)


def _probe_database(db: sqlite3.Connection) -> None:
    db.execute("SELECT 1 FROM operations LIMIT 1").fetchall()


def coordinator_check(runtime: ServiceRuntime) -> HealthCheck:
    """Unhealthy when the scheduler is stopped or its database does not answer a read."""

    async def check() -> tuple[bool, str]:
        scheduler = runtime.scheduler
        if scheduler is None:
            return True, _NO_SCHEDULER
        database = scheduler.database
        if not scheduler.accepting:
            return False, "the scheduler is stopped or stopping; restart rexd if it stays so"
        try:
            await database.call(_probe_database)
        except Exception as exc:  # noqa: BLE001 - SchedulerError (closed), sqlite3.Error...
            return False, (f"the scheduler database {database.path} fails: {exc}; check the "
                           "data dir's disk and permissions, see the rexd log")
        return True, (f"scheduler running; database {database.path.name} answers "
                      f"({database.transactions} write transaction(s))")

    return HealthCheck(name="coordinator", check=check)
