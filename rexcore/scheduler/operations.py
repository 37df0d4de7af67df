"""Operations: one client's request to execute one action, and the scheduler's errors.

An operation is named ``operations/<uuid4 hex>`` and moves forward only:
``queued`` -> ``executing`` -> ``completed``. When it completes, ``status`` says how it
ended (:data:`~rexcore.serialization.operation.OPERATION_STATUSES`); ``ok`` with a
``result`` means the action ran (its exit code may still be non-zero).
"""

from __future__ import annotations

import uuid

import attrs

from rexcore.artifacts.digest import Digest
from rexcore.serialization.action import Action, Command
from rexcore.serialization.action_result import ActionResult
from rexcore.serialization.operation import OperationView

__all__ = [
    "OPERATION_PREFIX",
    "MissingInputsError",
    "Operation",
    "OperationNotFoundError",
    "QueueFullError",
    "SchedulerError",
    "SchedulerStoppedError",
    "WorkerNotAuthorizedError",
    "new_operation_name",
]

OPERATION_PREFIX = "operations/"


def new_operation_name() -> str:
    return f"{OPERATION_PREFIX}{uuid.uuid4().hex}"


class SchedulerError(Exception):
    """The coordinator refused or failed a request; ``status`` is the operation status
    code that describes it (``resource_exhausted``, ``failed_precondition``...)."""

    status = "internal"

    def __init__(self, message: str, *, status: str | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


class QueueFullError(SchedulerError):
    """``scheduler.max_queued`` actions already wait; try again later."""

    status = "resource_exhausted"


class OperationNotFoundError(SchedulerError, KeyError):
    """No operation has that name (never existed, or completed too long ago)."""

    status = "not_found"

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class MissingInputsError(SchedulerError):
    """The Action, its Command or its input root is not in the CAS; ``missing`` lists them."""

    status = "failed_precondition"

    def __init__(self, message: str, missing: list[Digest]) -> None:
        super().__init__(message)
        self.missing = missing


class WorkerNotAuthorizedError(SchedulerError):
    """A worker may not join: ``unauthenticated`` (wrong or missing join token) or
    ``permission_denied`` (no join token is configured and it is not on loopback)."""


class SchedulerStoppedError(SchedulerError):
    """The coordinator is stopping or stopped."""

    status = "unavailable"


@attrs.define(eq=False)
class Operation:
    """One submitted action and how it fares; identical in-flight actions share one
    execution (``execution``), so several operations may carry the same result."""

    name: str
    action_digest: Digest
    #: The parsed Action and Command; None for a completed operation read back from disk.
    action: Action | None
    command: Command | None
    priority: int = 0
    state: str = "queued"
    attempts: int = 0
    worker: str = ""
    queued_at: float = 0.0
    started_at: float | None = None
    completed_at: float | None = None
    result: ActionResult | None = None
    status: str = "ok"
    message: str = ""
    cached: bool = False
    skip_cache_lookup: bool = False
    #: The name of the execution (the first operation of the merged group) this one
    #: waits on; empty once completed.
    execution: str = ""

    @property
    def done(self) -> bool:
        return self.state == "completed"

    @property
    def do_not_cache(self) -> bool:
        return self.action is not None and self.action.do_not_cache

    @property
    def platform(self) -> tuple[tuple[str, str], ...]:
        return self.action.platform if self.action is not None else ()

    def view(self) -> OperationView:
        return OperationView(
            name=self.name,
            action_digest=self.action_digest,
            state=self.state,
            done=self.done,
            status=self.status,
            message=self.message,
            cached=self.cached,
            result=self.result,
            priority=self.priority,
            attempts=self.attempts,
            worker=self.worker,
            queued_at=self.queued_at,
            started_at=self.started_at,
            completed_at=self.completed_at,
        )
