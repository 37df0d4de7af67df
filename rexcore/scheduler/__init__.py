"""The coordinator: operations, the priority queue, matching, leases and persistence.

``Scheduler`` is imported lazily: ``rexcore.config`` imports :class:`SchedulerConfig`
from here, and the scheduler itself imports from the rest of the core.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rexcore.scheduler.config import SchedulerConfig

if TYPE_CHECKING:
    from rexcore.scheduler.operations import (
        MissingInputsError,
        Operation,
        OperationNotFoundError,
        QueueFullError,
        SchedulerError,
        SchedulerStoppedError,
        WorkerNotAuthorizedError,
    )
    from rexcore.scheduler.scheduler import Scheduler

__all__ = [
    "MissingInputsError",
    "Operation",
    "OperationNotFoundError",
    "QueueFullError",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerError",
    "SchedulerStoppedError",
    "WorkerNotAuthorizedError",
]


def __getattr__(name: str) -> Any:
    if name == "Scheduler":
        from rexcore.scheduler.scheduler import Scheduler

        return Scheduler
    if name in __all__:
        from rexcore.scheduler import operations

        return getattr(operations, name)
    raise AttributeError(f"module 'rexcore.scheduler' has no attribute {name!r}")
