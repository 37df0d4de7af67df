"""Operations as the native API shows them: ``OperationView``, one action's execution.

``POST /v1/execute`` answers one, ``GET /v1/operations/{id}`` long-polls one, and
``POST /v1/operations/{id}/cancel`` cancels one. An operation's ``name`` is
``operations/<32 hex digits>`` and its URL is ``/v1/`` followed by the name.
"""

from __future__ import annotations

import attrs

from rexcore.artifacts.digest import Digest
from rexcore.serialization.action_result import ActionResult

__all__ = [
    "OPERATION_STATES",
    "OPERATION_STATUSES",
    "OperationView",
    "PoolStatus",
    "SchedulerMetrics",
    "SchedulerStatus",
]

#: The life of an operation: it only ever moves forward through these.
OPERATION_STATES = ("queued", "executing", "completed")
#: How a completed operation ended (``ok`` while it has not ended, or ended well: the
#: action ran and ``result`` holds its exit code, which may be non-zero).
OPERATION_STATUSES = (
    "ok",
    "cancelled",
    "deadline_exceeded",
    "resource_exhausted",
    "unavailable",
    "failed_precondition",
    "invalid_argument",
    "internal",
)


@attrs.frozen
class OperationView:
    """One operation as clients see it; ``done`` is ``state == "completed"``."""

    name: str
    action_digest: Digest
    state: str
    done: bool
    #: One of :data:`OPERATION_STATUSES`; ``ok`` with a ``result`` means the action ran.
    status: str = "ok"
    #: Why the operation failed, for a person (empty when ``status`` is ``ok``).
    message: str = ""
    #: The result came from the action cache; no worker ran the action.
    cached: bool = False
    result: ActionResult | None = None
    priority: int = 0
    #: How many times a worker was given this operation (retries after a lost worker).
    attempts: int = 0
    #: The worker running (or that ran) the operation, if any.
    worker: str = ""
    #: Unix seconds.
    queued_at: float = 0.0
    started_at: float | None = None
    completed_at: float | None = None


@attrs.frozen
class SchedulerMetrics:
    """Counters since the coordinator started (not persisted across restarts)."""

    #: Executions that ran on a worker and ended (with a result, an error, or lost).
    total_executions: int = 0
    #: ... of which ended with exit code 0.
    successful_executions: int = 0
    #: ... of which did not (non-zero exit, timeout, worker errors, retry cap).
    failed_executions: int = 0
    #: Submissions answered from the action cache, of ``cache_lookups``.
    cache_hits: int = 0
    cache_lookups: int = 0
    #: ``cache_hits / cache_lookups`` (0 before the first lookup).
    cache_hit_rate: float = 0.0
    uptime_s: float = 0.0
    #: Executions queued (merged and cached submissions excluded): the pool's arrival rate.
    arrivals: int = 0
    #: Seconds workers spent running the ``total_executions``: the pool's service time.
    busy_s: float = 0.0


@attrs.frozen(kw_only=True)
class PoolStatus:
    """The worker pool in ``GET /v1/status``: its workers by state and its scaling."""

    autoscale: bool = False
    #: The scaling policy in use ("" without autoscaling).
    policy: str = ""
    min_workers: int = 0
    max_workers: int = 0
    #: Workers the pool is sizing towards, and why (the policy's last reason).
    desired: int = 0
    reason: str = ""
    #: The pool's workers by state: asked for and not joined yet, joined and idle, joined
    #: and running an action, finishing their actions before they stop.
    starting: int = 0
    idle: int = 0
    busy: int = 0
    draining: int = 0
    #: Workers that failed or vanished without a drain since the pool started (without
    #: autoscaling, the provider replaces crashed workers itself: those it reports failed).
    failed: int = 0
    scale_ups: int = 0
    scale_downs: int = 0
    provider_errors: int = 0
    last_provider_error: str = ""
    #: Measured seconds from asking for a worker to its joining (None: none joined yet).
    startup_s: float | None = None


@attrs.frozen
class SchedulerStatus:
    """``GET /v1/status``: the pool and the queue right now, and counters since start."""

    #: Workers holding a lease; busy ones are executing at least one action.
    workers_total: int = 0
    workers_busy: int = 0
    #: Operations waiting for a worker, and operations running on one.
    queued: int = 0
    executing: int = 0
    metrics: SchedulerMetrics = attrs.field(factory=SchedulerMetrics)
    #: The worker pool this rexd runs (None when it starts no workers).
    pool: PoolStatus | None = None
