"""The worker protocol: one ``synchronize`` call, over ``POST /v1/workers/synchronize``.

The worker says who it is, what it can run, what it finished, and how long it may wait;
the coordinator answers with work (or nothing, after holding the call up to
``wait_s`` seconds when the worker has a free slot), operations to cancel, and whether to
drain. Each call renews the worker's lease; a worker that stops calling for
``lease_s`` loses its operations, which are requeued (bounded retries).
"""

from __future__ import annotations

import attrs

from rexcore.artifacts.digest import Digest
from rexcore.serialization.action import Action, Command
from rexcore.serialization.action_result import ActionResult

__all__ = ["Assignment", "Completion", "SyncRequest", "SyncResponse"]


@attrs.frozen
class Completion:
    """A finished operation: a result, or an error when the worker could not run it."""

    operation: str
    result: ActionResult | None = None
    error: str = ""
    #: The action itself broke the rules (bad output path...): fail without retrying.
    error_is_permanent: bool = False


@attrs.frozen
class SyncRequest:
    worker_id: str
    token: str = ""
    properties: tuple[tuple[str, str], ...] = ()
    slots: int = 1
    #: Operations this worker is executing right now (renews their leases).
    executing: tuple[str, ...] = ()
    completed: tuple[Completion, ...] = ()
    draining: bool = False
    wait_s: float = 20.0


@attrs.frozen
class Assignment:
    operation: str
    action_digest: Digest
    action: Action
    command: Command
    timeout_s: float
    queued_at: float
    attempt: int = 1


@attrs.frozen
class SyncResponse:
    assignments: tuple[Assignment, ...] = ()
    cancel: tuple[str, ...] = ()
    lease_s: float = 30.0
