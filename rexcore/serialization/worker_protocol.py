"""The worker protocol: one ``synchronize`` call, over ``POST /v1/workers/synchronize``.

The worker says who it is, what it can run, what it finished, and how long it may wait;
the coordinator answers with work (or nothing, after holding the call up to
``wait_s`` seconds when the worker has a free slot), operations to cancel, and whether to
drain. Each call renews the worker's lease; a worker that stops calling for
``lease_s`` loses its operations, which are requeued (bounded retries).

Rules a worker follows: every call lists each operation it was given and still runs
(``executing``) and each it finished and has not yet reported in an answered call
(``completed``). An operation given in the answer to one call that neither list names in
the call after next is taken as lost (the worker restarted, or never got the answer) and
requeued; one the worker lists that the coordinator no longer gives it (cancelled, timed
out, finished elsewhere) comes back in ``cancel``. A completion the coordinator already
has is ignored, so re-sending one after a failed call is safe.

The coordinator holds a call (up to ``wait_s``) only while the worker has a free slot and
there is nothing to tell it; new work or a cancel answers it at once. To report a
completion while a call is held, make a new call: it replaces the held one, which is
answered at once, empty (or, if it was answered just before, with work the worker should
then run and list as usual). A busy worker (no free slot) is answered at once, so it calls
again well within ``lease_s`` to keep its lease (a third of it is a good pace).
``worker_id`` must be unique and stable across the worker's restarts.
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
    #: The action ran past its timeout and was killed; ``result`` holds what it left
    #: (exit code, stdout/stderr). The operation ends ``deadline_exceeded``, never cached.
    timed_out: bool = False


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
