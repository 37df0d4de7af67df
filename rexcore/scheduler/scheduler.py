"""The coordinator: operations in, work out to workers, results back to every waiter.

Operations and executions
    Each :meth:`Scheduler.submit` makes one :class:`Operation`. Operations of the same
    action (same digest, not ``do_not_cache``) submitted while one is in flight share one
    *execution*: one queue entry, one worker, one result. An execution is named after its
    first operation; workers see that name. Cancelling one operation of a shared execution
    detaches it; the execution is stopped only when no operation waits on it any more.

Queue and matching
    Queued executions wait in one priority heap per distinct platform (lower ``priority``
    first, FIFO within a priority). A worker may take an execution when every platform
    property of the action is among the worker's properties (a worker may offer several
    values for one name); ``memory``, ``cpus``, ``pids`` and ``network`` are the action's
    limits, not matched. A worker whose synchronize call is held (long poll) is handed a
    matching execution the moment it is submitted, never by polling.

Leases, retries, deadlines
    Every synchronize call renews the worker's lease, and a held call keeps it alive. A
    worker silent for ``lease_s`` is lost: its executions are requeued, or failed with
    ``unavailable`` once they were handed out ``max_attempts`` times. A transient error a
    worker reports counts the same way; a permanent one fails the operation at once. An
    execution running longer than its timeout plus ``lease_s`` ends ``deadline_exceeded``
    even if its worker never reports.

Completions (late and duplicate ones)
    The first *result* reported for an execution wins, whichever worker sends it: the worker
    it is assigned to, or an earlier holder whose lease had expired (its run is as good as
    any, and the action is not run again). Every later report for it is ignored, and a
    worker still running it is told to cancel. Errors count only from the worker the
    execution is assigned to. So an operation never completes twice or with two results.

Persistence
    State is written through :class:`~rexcore.scheduler.persistence.SchedulerDatabase`.
    ``submit`` and ``cancel`` answer after their write has committed (a submitted action
    is handed to a worker while its write commits: a crash in between loses only an
    operation nobody was told of); a completion is committed before any waiter hears of
    it and before the worker's call is answered. The
    hand-out of work to a worker is written without waiting (dispatch stays fast): after a
    crash such an execution may come back queued and, if its worker still reports it as
    executing, is adopted by that worker again instead of being run twice.
    After a restart, queued operations are queued again; executing ones wait
    ``restart_grace_s`` for their worker to synchronize and report them, then are requeued.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import hmac
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import attrs

from rexcore.artifacts.action_cache import MissingBlobsError
from rexcore.artifacts.digest import Digest
from rexcore.artifacts.store import BlobNotFoundError, StorageError
from rexcore.protocol.auth import is_loopback
from rexcore.scheduler.config import SchedulerConfig
from rexcore.scheduler.operations import (
    MissingInputsError,
    Operation,
    OperationNotFoundError,
    QueueFullError,
    SchedulerError,
    SchedulerStoppedError,
    WorkerNotAuthorizedError,
    new_operation_name,
)
from rexcore.scheduler.persistence import (
    DATABASE_FILE,
    SchedulerDatabase,
    StoredOperation,
    operation_row,
)
from rexcore.serialization.action import Action, Command, Directory, InvalidActionError
from rexcore.serialization.action_result import ActionResult
from rexcore.serialization.codec import WireFormatError, decode
from rexcore.serialization.operation import SchedulerMetrics, SchedulerStatus
from rexcore.serialization.worker_protocol import (
    Assignment,
    Completion,
    SyncRequest,
    SyncResponse,
)

if TYPE_CHECKING:
    from rexcore.core.runtime import ServiceRuntime

__all__ = ["Scheduler"]

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Completed operations kept in memory; older ones are read back from the database.
_COMPLETED_IN_MEMORY = 10_000
#: Parsed Actions, Commands and Directories kept, so a repeated action is parsed once.
_PARSED_IN_MEMORY = 4096
#: Seconds between removals of expired completed operations from the database.
_PRUNE_EVERY_S = 600.0

_Platform = frozenset[tuple[str, str]]
#: Platform properties that carry an action's limits to the sandbox (``rex run --memory``,
#: ``SandboxSpec.max_memory``...): requests to the worker, not properties it must offer.
_LIMIT_PROPERTIES = frozenset({"memory", "cpus", "pids", "network"})


@attrs.define(eq=False)
class _Execution:
    """One run of an action that one or more operations wait on."""

    name: str
    action_digest: Digest
    action: Action
    command: Command
    action_bytes: bytes
    command_bytes: bytes
    timeout_s: float
    priority: int
    seq: int
    queued_at: float
    operations: list[Operation]
    state: str = "queued"  # queued, executing, finished
    attempts: int = 0
    worker: str = ""
    started_at: float | None = None
    #: Monotonic time by which the worker must have reported (timeout plus a lease).
    deadline: float = math.inf
    #: The number of the worker's synchronize call whose answer carried it; None until an
    #: answer does. -1: delivered before a coordinator restart.
    delivered_in: int | None = None
    #: After a restart: monotonic time by which its worker must synchronize again.
    grace_until: float | None = None
    queue_version: int = 0
    last_error: str = ""
    #: Whether its result goes into rex's action cache (see ``Scheduler.submit``).
    native_cache: bool = True

    @property
    def platform(self) -> _Platform:
        return frozenset(p for p in self.action.platform if p[0] not in _LIMIT_PROPERTIES)

    @property
    def cacheable(self) -> bool:
        return not self.action.do_not_cache


@attrs.define(eq=False)
class _Worker:
    id: str
    properties: _Platform = frozenset()
    slots: int = 1
    draining: bool = False
    lease_expires: float = 0.0
    calls: int = 0
    #: Synchronize calls of this worker being handled right now (it is alive meanwhile).
    in_call: int = 0
    executing: dict[str, _Execution] = attrs.field(factory=dict)
    #: Executions handed to it that no answer has carried yet.
    undelivered: list[_Execution] = attrs.field(factory=list)
    cancels: set[str] = attrs.field(factory=set)
    #: Set while a synchronize call is held open; resolving it wakes the call.
    waiter: asyncio.Future[None] | None = None
    is_connected: Callable[[], bool] | None = None

    @property
    def free_slots(self) -> int:
        return self.slots - len(self.executing)


@attrs.define
class _Counters:
    total: int = 0
    successful: int = 0
    failed: int = 0
    cache_hits: int = 0
    cache_lookups: int = 0
    arrivals: int = 0
    busy_s: float = 0.0


class Scheduler:
    """The coordinator of one rexd: ``await start()``, serve, ``await stop()``."""

    def __init__(self, runtime: ServiceRuntime, config: SchedulerConfig | None = None) -> None:
        self.runtime = runtime
        self.config = config or runtime.config.scheduler
        self.database = SchedulerDatabase(runtime.data_dir / DATABASE_FILE)
        self._operations: dict[str, Operation] = {}  # not completed
        self._completed: OrderedDict[str, Operation] = OrderedDict()
        #: Completed operations whose completion is not committed yet (not shown as done).
        self._uncommitted: set[str] = set()
        self._executions: dict[str, _Execution] = {}  # by name
        self._in_flight: dict[Digest, _Execution] = {}  # cacheable ones, by action digest
        self._queues: dict[_Platform, list[tuple[int, int, int, _Execution]]] = {}
        self._queued: set[_Execution] = set()
        #: Queued platforms no joined worker offers, and since when (monotonic).
        self._unmatched: dict[_Platform, float] = {}
        self._being_queued = 0  # submissions between the cap check and the queue
        self._seq = 0
        self._workers: dict[str, _Worker] = {}
        self._waiting: dict[str, _Worker] = {}  # held synchronize calls, oldest first
        #: Executions restored as executing whose worker has not synchronized yet.
        self._orphans: dict[str, dict[str, _Execution]] = {}
        self._watchers: dict[str, set[asyncio.Future[None]]] = {}
        self._parsed: OrderedDict[tuple[type, Digest], tuple[Any, bytes]] = OrderedDict()
        self._counters = _Counters()
        self._started_at = time.time()
        self._reaper: asyncio.Task[None] | None = None
        self._reaper_wake = asyncio.Event()
        self._reaper_at = math.inf
        self._background: set[asyncio.Task[Any]] = set()
        #: Rows of :meth:`_save_later` not handed to the database yet, in order.
        self._unsaved: list[tuple[Any, ...]] = []
        self._unsaved_flush = False
        self._running = False
        self._accepting = False

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the database and restore every queued and executing operation."""
        if self._running:
            return
        stored = await self.database.open()
        self._restore(stored)
        self._started_at = time.time()
        self._running = self._accepting = True
        self._reaper = asyncio.create_task(self._reap(), name="rex-scheduler-reaper")
        log.info(
            "scheduler started: %d queued and %d executing operation(s) restored",
            sum(len(e.operations) for e in self._queued),
            sum(len(e.operations) for e in self._executions.values() if e.state == "executing"),
        )

    def stop_waiting(self) -> None:
        """Answer every held long poll now and hold no new ones (the server is stopping)."""
        self._accepting = False
        for worker in list(self._waiting.values()):
            self._wake(worker)
        for futures in self._watchers.values():
            for future in futures:
                if not future.done():
                    future.set_result(None)

    async def stop(self) -> None:
        """Stop serving; queued and executing operations stay in the database."""
        if not self._running:
            return
        self.stop_waiting()
        self._running = False
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.wait(self._background)
        self._flush_unsaved()
        await self.database.close()

    @property
    def accepting(self) -> bool:
        """Whether waits and long polls are held: false once the coordinator is stopping."""
        return self._accepting

    def _check_running(self) -> None:
        if not self._running:
            raise SchedulerStoppedError(
                "the scheduler is not running (rexd is starting or stopping); retry shortly"
            )

    # -- submit ---------------------------------------------------------------------------

    async def submit(
        self,
        action_digest: Digest,
        *,
        priority: int = 0,
        skip_cache_lookup: bool = False,
        blobs: Mapping[Digest, bytes] | None = None,
        blobs_stored: asyncio.Future[None] | None = None,
        native_cache: bool = True,
    ) -> Operation:
        """Queue an execution of the action ``action_digest`` (already in the CAS).

        Returns its operation: completed already on an action-cache hit, else queued (or
        executing, when merged into an identical running action). Raises
        :class:`MissingInputsError`, :class:`InvalidActionError` or :class:`QueueFullError`.
        ``blobs`` are bytes of CAS blobs the caller has at hand, verified against their
        digests: the Action, Command or input root among them are parsed without reading
        them back. If the caller is still storing them, ``blobs_stored`` resolves once it
        has (raising a StorageError if it could not): the operation is persisted
        meanwhile and queued only then, since workers read the input root from the CAS.
        ``native_cache=False`` is for a protocol that keeps an action cache of its own
        (rex-reapi caches REAPI results by the REAPI action digest): the operation neither
        looks in rex's action cache nor adds its result to it (unless an identical action
        merged with it wants that), and its Action and Command need not be in the CAS when
        ``blobs`` carry them (workers get both with the assignment).
        """
        self._check_running()
        action, action_bytes, command, command_bytes = await self._read_action(
            action_digest, blobs or {}
        )
        timeout_s = self._timeout_of(action)
        if timeout_s is None:
            raise InvalidActionError(
                f"action {action_digest} has timeout_s {action.timeout_s}; use a positive "
                "number of seconds, or none for the default"
            )
        op = Operation(
            name=new_operation_name(), action_digest=action_digest, action=action,
            command=command, priority=priority, queued_at=time.time(),
            skip_cache_lookup=skip_cache_lookup,
        )
        cache_enabled = self.runtime.config.storage.action_cache.enabled
        if native_cache and not skip_cache_lookup and not action.do_not_cache and cache_enabled:
            self._counters.cache_lookups += 1
            cached = await self.runtime.action_cache.get(action_digest)
            if cached is not None:
                self._counters.cache_hits += 1
                self._complete(op, result=cached, cached=True)
                await self._durable(self._persist([operation_row(op, 0, None, None)], [op]))
                return op
        self._check_running()
        shared = self._in_flight.get(action_digest) if not action.do_not_cache else None
        if shared is not None:
            shared.native_cache = shared.native_cache or native_cache
            return await self._merge(op, shared)
        if len(self._queued) + self._being_queued >= self.config.max_queued:
            raise QueueFullError(
                f"the queue is full: {self.config.max_queued} actions wait for a worker "
                "(scheduler.max_queued); retry later, add workers, or raise the cap"
            )
        self._seq += 1
        execution = _Execution(
            name=op.name, action_digest=action_digest, action=action, command=command,
            action_bytes=action_bytes, command_bytes=command_bytes, timeout_s=timeout_s,
            priority=priority, seq=self._seq, queued_at=op.queued_at, operations=[op],
            native_cache=native_cache,
        )
        op.execution = execution.name
        self._executions[execution.name] = execution
        self._operations[op.name] = op
        self._counters.arrivals += 1
        if execution.cacheable:
            self._in_flight[action_digest] = execution
        self._being_queued += 1
        committed = self._persist([self._row(one, execution) for one in execution.operations], [])
        try:
            if blobs_stored is not None:
                await asyncio.shield(blobs_stored)
        except StorageError as exc:
            if self._executions.get(execution.name) is execution:
                self._finish(execution, status="internal",
                             message=f"the blobs of action {action_digest} could not be "
                             f"stored: {exc}")
            raise
        finally:
            self._being_queued -= 1
        # Queued while its row commits: a worker may start on it at once, and the caller
        # hears of the operation only once it is committed. A crash in between loses an
        # operation nobody was told of; its worker is told to cancel it.
        if execution.state == "queued" and self._executions.get(execution.name) is execution:
            self._enqueue(execution)
        try:
            await self._durable(committed)
        except SchedulerError as exc:
            if self._executions.get(execution.name) is execution:
                if execution.state == "executing" and execution.worker:
                    self._cancel_on_worker(execution.worker, execution.name)
                self._retire(execution)
                for other in list(execution.operations):
                    self._complete(other, status="internal", message=str(exc))
                self._notify(execution.operations)
            raise
        return op

    async def _merge(self, op: Operation, execution: _Execution) -> Operation:
        op.execution = execution.name
        execution.operations.append(op)
        self._operations[op.name] = op
        self._mirror(execution, [op])
        if op.priority < execution.priority:
            execution.priority = op.priority
            if execution in self._queued:  # move it up: the old heap entry goes stale
                self._push(execution)
        await self._durable(self._persist([self._row(op, execution)], []))
        return op

    async def _read_action(
        self, digest: Digest, at_hand: Mapping[Digest, bytes]
    ) -> tuple[Action, bytes, Command, bytes]:
        """The Action and its Command parsed, and its input root checked: at most two
        reads from the CAS (the Action, then the Command and the input root together),
        none for what was parsed before or is ``at_hand``."""
        loaded = await self._load([(digest, Action)], at_hand)
        if isinstance(loaded.get(digest), BlobNotFoundError):
            raise MissingInputsError(
                f"action {digest} is not in the CAS; upload the Action (and its Command "
                "and input root) with PUT /v1/cas/..., then execute again",
                [digest],
            )
        action, action_bytes = self._parse(digest, Action, "action", loaded)
        wanted = [(action.command_digest, Command), (action.input_root_digest, Directory)]
        loaded = await self._load(wanted, at_hand)
        missing = [d for d, _ in wanted if isinstance(loaded.get(d), BlobNotFoundError)]
        if missing:
            listed = ", ".join(str(d) for d in missing)
            raise MissingInputsError(
                f"action {digest} refers to blobs the CAS does not hold: {listed}; upload "
                "them (PUT /v1/cas/...) and execute again",
                missing,
            )
        command, command_bytes = self._parse(action.command_digest, Command, "command", loaded)
        self._parse(action.input_root_digest, Directory, "input root", loaded)
        try:
            command.validate()
        except InvalidActionError as exc:
            raise InvalidActionError(f"action {digest}: {exc}") from None
        return action, action_bytes, command, command_bytes

    async def _load(
        self, wanted: list[tuple[Digest, type]], at_hand: Mapping[Digest, bytes]
    ) -> dict[Digest, bytes | StorageError]:
        """The bytes of the ``wanted`` blobs (those parsed before are only checked to be in
        the CAS still), or a StorageError for one that cannot be read.

        Blobs with files in the store are read in one thread hop, the rest through
        ``store.get``."""
        store = self.runtime.blob_store
        loaded: dict[Digest, bytes | StorageError] = {}
        to_read: list[Digest] = []
        for digest, cls in wanted:
            if digest in loaded:
                continue
            parsed = self._parsed.get((cls, digest))
            if digest in at_hand:  # stored by the caller (it may still be storing it)
                loaded[digest] = at_hand[digest]
            elif parsed is not None:
                present = cls is Action or not await store.find_missing([digest])
                loaded[digest] = parsed[1] if present else BlobNotFoundError(digest)
            else:
                to_read.append(digest)
        if not to_read:
            return loaded
        paths = [store.local_path(digest) for digest in to_read]
        if all(path is not None for path in paths):
            read = await asyncio.to_thread(_read_files, paths)  # type: ignore[arg-type]
            for digest, data in zip(to_read, read):
                if data is not None:
                    loaded[digest] = data
            to_read = [digest for digest in to_read if digest not in loaded]
        outcomes = await asyncio.gather(*(store.get(d) for d in to_read), return_exceptions=True)
        for digest, outcome in zip(to_read, outcomes):
            if isinstance(outcome, StorageError):
                loaded[digest] = outcome
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                loaded[digest] = outcome
        return loaded

    def _parse(
        self, digest: Digest, cls: type[T], what: str,
        loaded: dict[Digest, bytes | StorageError],
    ) -> tuple[T, bytes]:
        """The blob ``digest`` parsed as ``cls``; parsed once, then remembered."""
        key = (cls, digest)
        data = loaded[digest]
        if isinstance(data, StorageError):
            raise data
        known = self._parsed.get(key)
        if known is not None:
            self._parsed.move_to_end(key)
            return known  # type: ignore[return-value]
        try:
            value = decode(data, cls)
            if isinstance(value, Directory):
                value.validate("input root")
        except (WireFormatError, InvalidActionError) as exc:
            raise InvalidActionError(f"the {what} {digest} is malformed: {exc}") from None
        self._parsed[key] = (value, data)
        if len(self._parsed) > _PARSED_IN_MEMORY:
            self._parsed.popitem(last=False)
        return value, data

    def _timeout_of(self, action: Action) -> float | None:
        """The action's timeout, defaulted and capped; None if it makes no sense."""
        timeout = action.timeout_s
        if timeout is None or timeout == 0:
            return min(self.config.default_timeout_s, self.config.max_timeout_s)
        if math.isnan(timeout) or timeout < 0:
            return None
        return min(timeout, self.config.max_timeout_s)

    # -- waiting and cancelling -----------------------------------------------------------

    async def get(self, name: str) -> Operation:
        """The operation ``name`` as it is now; raises :class:`OperationNotFoundError`."""
        op = self._operations.get(name) or self._completed.get(name)
        if op is not None:
            return op
        if not self._running:
            self._check_running()
        stored = await self.database.get(name)
        if stored is None or not stored.operation.done:
            raise OperationNotFoundError(
                f"no operation {name!r}: it never existed, or completed more than "
                f"{self.config.completed_retention_s:g}s ago or beyond the newest "
                f"{self.config.max_completed} (scheduler.completed_retention_s, max_completed)"
            )
        return stored.operation

    async def wait(self, name: str, timeout_s: float) -> Operation:
        """The operation once it completes, or as it is after ``timeout_s`` seconds."""
        op = await self.get(name)
        if (op.done and name not in self._uncommitted) or timeout_s <= 0 or not self._accepting:
            return op
        future = asyncio.get_running_loop().create_future()
        watchers = self._watchers.setdefault(name, set())
        watchers.add(future)
        try:
            await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            pass
        finally:
            watchers.discard(future)
            if not watchers and self._watchers.get(name) is watchers:
                del self._watchers[name]
        return self._operations.get(name) or self._completed.get(name) or op

    async def cancel(self, name: str) -> Operation:
        """Cancel ``name``: it completes as ``cancelled`` at once; its action is stopped on
        its worker unless other operations still wait on it. Finished ones stay as they are."""
        self._check_running()
        op = self._operations.get(name)
        if op is None:
            return await self.get(name)
        execution = self._executions[op.execution]
        execution.operations.remove(op)
        if not execution.operations:
            if execution.state == "executing" and execution.worker:
                self._cancel_on_worker(execution.worker, execution.name)
            self._retire(execution)
        self._complete(op, status="cancelled", message=f"operation {name} was cancelled")
        await self._durable(self._persist([self._row(op, execution)], [op]))
        return op

    # -- workers --------------------------------------------------------------------------

    async def synchronize(
        self,
        request: SyncRequest,
        *,
        remote: str | None = None,
        is_connected: Callable[[], bool] | None = None,
    ) -> SyncResponse:
        """One worker call: record what it finished and runs, then give it work.

        ``remote`` is the worker's address (None: an in-process caller, trusted);
        ``is_connected`` tells whether its connection is still open, so that no work is
        handed to a held call whose worker has gone away.
        """
        self._check_running()
        self._authorize(request, remote)
        if not request.worker_id:
            raise SchedulerError(
                "a worker must name itself: worker_id is empty; give each worker a unique id",
                status="invalid_argument",
            )
        worker = self._register(request, is_connected)
        worker.calls += 1
        call = worker.calls
        worker.in_call += 1
        try:
            commits: list[asyncio.Future[None]] = []
            for completion in request.completed:
                commit = await self._record_completion(worker, completion)
                if commit is not None:
                    commits.append(commit)
            self._reconcile(worker, call, request)
            self._hand_out(worker)
            if (
                not worker.undelivered and not worker.cancels and not worker.draining
                and worker.free_slots > 0 and request.wait_s > 0 and self._accepting
            ):
                await self._hold(worker, min(request.wait_s, self.config.max_long_poll_s))
            if worker.calls != call:  # a newer call of this worker answers instead
                return SyncResponse(lease_s=self.config.lease_s)
            response = self._answer(worker, call)
            if commits:
                await asyncio.gather(*commits, return_exceptions=True)
            return response
        finally:
            worker.in_call -= 1
            worker.lease_expires = time.monotonic() + self.config.lease_s
            self._poke_reaper(worker.lease_expires)
            if worker.draining and not worker.executing and not worker.in_call:
                self._forget_worker(worker)

    def _authorize(self, request: SyncRequest, remote: str | None) -> None:
        token = self.config.join_token
        if token:
            if not hmac.compare_digest(request.token.encode(), token.encode()):
                cause = "no join token" if not request.token else "a wrong join token"
                raise WorkerNotAuthorizedError(
                    f"worker {request.worker_id!r} presented {cause}; give it the "
                    "coordinator's scheduler.join_token",
                    status="unauthenticated",
                )
            return
        if remote is not None and not _is_loopback(remote):
            raise WorkerNotAuthorizedError(
                f"worker {request.worker_id!r} connects from {remote}, but without a join "
                "token only workers on this host may join; set scheduler.join_token on the "
                "coordinator and give the same token to the worker",
                status="permission_denied",
            )

    def _register(self, request: SyncRequest, is_connected: Callable[[], bool] | None) -> _Worker:
        worker = self._workers.get(request.worker_id)
        if worker is None:
            worker = self._workers[request.worker_id] = _Worker(request.worker_id)
            log.info("worker %s joined (%d slot(s))", worker.id, request.slots)
            for execution in self._orphans.pop(worker.id, {}).values():
                worker.executing[execution.name] = execution
        elif worker.waiter is not None:
            self._wake(worker)  # its held call is superseded by this one
        worker.properties = frozenset(request.properties)
        worker.slots = max(request.slots, 0)
        worker.draining = request.draining
        worker.is_connected = is_connected
        worker.lease_expires = time.monotonic() + self.config.lease_s
        return worker

    async def _record_completion(
        self, worker: _Worker, completion: Completion
    ) -> asyncio.Future[None] | None:
        execution = self._executions.get(completion.operation)
        if execution is None:
            return None  # finished, cancelled or forgotten: a repeat or a late report
        holder = execution.state == "executing" and execution.worker == worker.id
        result = completion.result
        if result is not None and not completion.error:
            self._adopt_outputs(result)
            if completion.timed_out:
                return self._finish(
                    execution, result=result, status="deadline_exceeded", ran=True,
                    message=f"action {execution.action_digest} ran past its timeout of "
                    f"{execution.timeout_s:g}s on worker {worker.id} and was killed",
                )
            if result.execution_metadata.oom_killed:  # the action's fault, never cached
                peak = result.execution_metadata.peak_memory_bytes
                return self._finish(
                    execution, result=result, status="resource_exhausted", ran=True,
                    message=f"action {execution.action_digest} ran out of memory on worker "
                    f"{worker.id} and was killed (peak {peak or 0} bytes); raise its memory "
                    "limit (the memory platform property, SandboxSpec.max_memory) or the "
                    "sandbox's maximum",
                )
            cache = self.runtime.config.storage.action_cache.enabled
            caching = None
            if result.exit_code == 0 and execution.cacheable and execution.native_cache and cache:
                # Written beside the scheduler's own commit; the waiters hear of the
                # result once both are done, so an identical action submitted next hits.
                caching = self._track(self._cache_result(
                    worker.id, execution.action_digest, result))
            if execution.state == "executing" and execution.worker != worker.id:
                self._cancel_on_worker(execution.worker, execution.name)
            return self._finish(execution, result=result, ran=True, after=caching)
        if not holder:
            return None
        error = completion.error or "it reported neither a result nor an error"
        if completion.error_is_permanent:
            return self._finish(
                execution, status="failed_precondition", ran=True,
                message=f"worker {worker.id} could not run action "
                f"{execution.action_digest}: {error}",
            )
        self._lose(execution, f"worker {worker.id} failed to run it: {error}")
        return None

    def _adopt_outputs(self, result: ActionResult) -> None:
        """Local workers publish outputs straight into the shared disk store, which does
        not look on disk for blobs it did not write itself; one stat each shows them."""
        refresh = getattr(self.runtime.blob_store, "refresh", None)
        if refresh is not None:
            for digest in result.blob_digests():
                refresh(digest)

    async def _cache_result(self, worker_id: str, digest: Digest, result: ActionResult) -> None:
        try:
            # A small entry is written right on the loop: cheaper than a thread hop.
            await self.runtime.action_cache.put(digest, result, inline=True)
        except MissingBlobsError as exc:
            log.warning("worker %s: %s", worker_id, exc)
        except StorageError as exc:
            log.error("cannot cache the result of %s: %s", digest, exc)

    def _reconcile(self, worker: _Worker, call: int, request: SyncRequest) -> None:
        """Renew what the worker runs, cancel what it should not, requeue what it lost."""
        finished = {completion.operation for completion in request.completed}
        running = set(request.executing) - finished
        for name in running:
            execution = self._executions.get(name)
            if execution is not None and execution.worker == worker.id:
                execution.grace_until = None
            elif execution is not None and execution.state == "queued":
                # Handed to this worker before a crash lost that record: let it carry on.
                self._start(execution, worker, delivered_in=call)
            else:
                worker.cancels.add(name)
        # Given in answer k, it must show up from call k + 2 on: call k + 1 may have been
        # sent before answer k arrived (a worker replacing its held call).
        for execution in list(worker.executing.values()):
            delivered = execution.delivered_in
            reported = execution.name in running or execution.name in finished
            if delivered is not None and delivered < call - 1 and not reported:
                self._lose(execution, f"worker {worker.id} no longer reports running it")

    def _hand_out(self, worker: _Worker) -> None:
        if worker.draining or not self._accepting:
            return
        for execution in self._take(worker, worker.free_slots):
            self._start(execution, worker)

    async def _hold(self, worker: _Worker, wait_s: float) -> None:
        waiter = worker.waiter = asyncio.get_running_loop().create_future()
        self._waiting[worker.id] = worker
        try:
            await asyncio.wait_for(waiter, wait_s)
        except TimeoutError:
            pass
        finally:
            # Only while this call is still the held one: a newer call of the same worker
            # may hold by now, and must stay findable by _enqueue.
            if worker.waiter is waiter:
                worker.waiter = None
                self._waiting.pop(worker.id, None)

    def _wake(self, worker: _Worker) -> None:
        waiter, worker.waiter = worker.waiter, None
        self._waiting.pop(worker.id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _answer(self, worker: _Worker, call: int) -> SyncResponse:
        assignments = []
        for execution in worker.undelivered:
            if execution.worker != worker.id or execution.state != "executing":
                continue  # cancelled or finished while it waited to be delivered
            execution.delivered_in = call
            assignments.append(Assignment(
                operation=execution.name, action_digest=execution.action_digest,
                action=execution.action, command=execution.command,
                timeout_s=execution.timeout_s, queued_at=execution.queued_at,
                attempt=execution.attempts,
            ))
        worker.undelivered.clear()
        cancels, worker.cancels = tuple(sorted(worker.cancels)), set()
        return SyncResponse(
            assignments=tuple(assignments), cancel=cancels, lease_s=self.config.lease_s
        )

    def _cancel_on_worker(self, worker_id: str, name: str) -> None:
        worker = self._workers.get(worker_id)
        if worker is not None:
            worker.cancels.add(name)
            if worker.waiter is not None:
                self._wake(worker)

    def _forget_worker(self, worker: _Worker) -> None:
        if self._workers.get(worker.id) is worker:
            del self._workers[worker.id]
        self._waiting.pop(worker.id, None)

    # -- the queue ------------------------------------------------------------------------

    def _enqueue(self, execution: _Execution) -> None:
        """Hand ``execution`` to a held worker that can run it, or queue it."""
        execution.state = "queued"
        for worker in list(self._waiting.values()):
            waiter = worker.waiter
            if waiter is None or waiter.done():
                continue
            if worker.is_connected is not None and not worker.is_connected():
                self._wake(worker)  # gone: answer nobody, give it nothing
                continue
            if worker.free_slots > 0 and not worker.draining and (
                execution.platform <= worker.properties
            ):
                self._start(execution, worker)
                self._wake(worker)
                return
        self._push(execution)

    def _push(self, execution: _Execution) -> None:
        execution.queue_version += 1
        entry = (execution.priority, execution.seq, execution.queue_version, execution)
        heap = self._queues.get(execution.platform)
        if heap is None:
            heap = self._queues[execution.platform] = []
            if execution.platform and self.config.unmatched_timeout_s > 0:
                self._poke_reaper(time.monotonic())  # is there a worker for it at all?
        heapq.heappush(heap, entry)
        self._queued.add(execution)

    def _take(self, worker: _Worker, count: int) -> list[_Execution]:
        taken: list[_Execution] = []
        while len(taken) < count and self._queued:
            best: list[tuple[int, int, int, _Execution]] | None = None
            for platform, heap in list(self._queues.items()):
                while heap and not _is_current(heap[0]):
                    heapq.heappop(heap)
                if not heap:
                    del self._queues[platform]
                elif platform <= worker.properties and (best is None or heap[0] < best[0]):
                    best = heap
            if best is None:
                break
            taken.append(heapq.heappop(best)[3])
            self._queued.discard(taken[-1])
        return taken

    def _start(
        self, execution: _Execution, worker: _Worker, delivered_in: int | None = None
    ) -> None:
        self._queued.discard(execution)
        execution.state = "executing"
        execution.worker = worker.id
        execution.attempts += 1
        execution.started_at = time.time()
        execution.deadline = time.monotonic() + execution.timeout_s + self.config.lease_s
        execution.delivered_in = delivered_in
        execution.grace_until = None
        worker.executing[execution.name] = execution
        if delivered_in is None:
            worker.undelivered.append(execution)
        self._mirror(execution)
        self._save_later(execution)
        self._poke_reaper(execution.deadline)

    def _lose(self, execution: _Execution, reason: str) -> None:
        """Its worker lost it: requeue it, or fail it once it was tried ``max_attempts``."""
        self._detach(execution)
        execution.last_error = reason
        if execution.attempts >= self.config.max_attempts:
            log.warning("action %s failed after %d attempts: %s",
                        execution.action_digest, execution.attempts, reason)
            self._finish(
                execution, status="unavailable", ran=True,
                message=f"action {execution.action_digest} was given to a worker "
                f"{execution.attempts} time(s), the retry cap (scheduler.max_attempts = "
                f"{self.config.max_attempts}), and never finished; last: {reason}",
            )
            return
        log.info("requeueing %s (attempt %d of %d): %s", execution.name, execution.attempts,
                 self.config.max_attempts, reason)
        execution.state = "queued"
        execution.worker = ""
        execution.started_at = None
        execution.deadline = math.inf
        execution.delivered_in = None
        self._mirror(execution)
        self._save_later(execution)
        self._enqueue(execution)

    def _detach(self, execution: _Execution) -> None:
        """Take ``execution`` off its worker (or the restart orphans)."""
        worker = self._workers.get(execution.worker)
        if worker is not None:
            worker.executing.pop(execution.name, None)
        orphans = self._orphans.get(execution.worker)
        if orphans is not None:
            orphans.pop(execution.name, None)
            if not orphans:
                del self._orphans[execution.worker]

    def _retire(self, execution: _Execution) -> None:
        """Remove ``execution`` from every index; its operations are dealt with apart."""
        execution.state = "finished"
        self._executions.pop(execution.name, None)
        if self._in_flight.get(execution.action_digest) is execution:
            del self._in_flight[execution.action_digest]
        self._queued.discard(execution)
        self._detach(execution)

    def _finish(
        self,
        execution: _Execution,
        *,
        result: ActionResult | None = None,
        status: str = "ok",
        message: str = "",
        ran: bool = False,
        after: asyncio.Future[None] | None = None,
    ) -> asyncio.Future[None]:
        """Complete every operation of ``execution``; the future resolves once that is
        committed and ``after`` is done (and the waiters have been told)."""
        self._retire(execution)
        if ran:
            self._counters.total += 1
            if execution.started_at is not None:  # service times feed the pool's policy
                self._counters.busy_s += max(0.0, time.time() - execution.started_at)
            if status == "ok" and result is not None and result.exit_code == 0:
                self._counters.successful += 1
            else:
                self._counters.failed += 1
        ops = list(execution.operations)
        for op in ops:
            self._complete(op, result=result, status=status, message=message)
        return self._persist([self._row(op, execution) for op in ops], ops, after)

    def _complete(
        self,
        op: Operation,
        *,
        result: ActionResult | None = None,
        status: str = "ok",
        message: str = "",
        cached: bool = False,
    ) -> None:
        op.state = "completed"
        op.completed_at = time.time()
        op.result, op.status, op.message, op.cached = result, status, message, cached
        op.execution = ""
        self._uncommitted.add(op.name)
        self._operations.pop(op.name, None)
        self._completed[op.name] = op
        while len(self._completed) > _COMPLETED_IN_MEMORY:
            self._completed.popitem(last=False)

    # -- persistence ----------------------------------------------------------------------

    def _row(self, op: Operation, execution: _Execution) -> tuple[Any, ...]:
        return operation_row(op, execution.seq, execution.action_bytes, execution.command_bytes)

    def _mirror(self, execution: _Execution, ops: Iterable[Operation] | None = None) -> None:
        for op in execution.operations if ops is None else ops:
            op.state = execution.state if execution.state != "finished" else op.state
            op.worker, op.attempts = execution.worker, execution.attempts
            op.started_at = execution.started_at

    def _save_later(self, execution: _Execution) -> None:
        """Write the execution's rows as they are now, without waiting: in the next turn
        of the loop, after the callbacks already due (a worker call woken with this very
        work is answered first), together with other such rows. When rows saved in this
        turn still wait to go to the database (a submission handed to a held worker at
        once), they join those: one transaction for both."""
        self._unsaved.extend(self._row(op, execution) for op in execution.operations)
        if self.database.batch_open:
            self._flush_unsaved()
            return
        if not self._unsaved_flush:
            self._unsaved_flush = True
            asyncio.get_running_loop().call_later(0, self._flush_unsaved)

    def _flush_unsaved(self) -> None:
        self._unsaved_flush = False
        count = len(self._unsaved)
        if count:
            try:
                self._persist([], [])
            except SchedulerError as exc:  # the database is closed: rexd is stopping
                log.error("scheduler: %d row(s) not written: %s", count, exc)
                self._unsaved.clear()

    def _persist(
        self, rows: list[tuple[Any, ...]], completed: list[Operation],
        after: asyncio.Future[None] | None = None,
    ) -> asyncio.Future[None]:
        """Write ``rows``; once committed (and ``after`` is done), tell the waiters of the
        ``completed`` operations."""
        if self._unsaved:  # rows written later go first: writes keep their order
            rows, self._unsaved = [*self._unsaved, *rows], []
        if not rows:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            if after is None:
                self._notify(completed)
                return done
            future = _when_both(done, after)
        else:
            future = self.database.save(rows)
            if after is not None:
                future = _when_both(future, after)
        future.add_done_callback(functools.partial(self._committed, completed))
        return future

    def _committed(self, completed: list[Operation], future: asyncio.Future[None]) -> None:
        if not future.cancelled() and future.exception() is not None:
            log.error("scheduler: %s", future.exception())
        self._notify(completed)

    @staticmethod
    async def _durable(future: asyncio.Future[None]) -> None:
        """Wait until ``future`` (a write) has committed; its error, if any, is raised."""
        await asyncio.shield(future)

    def _notify(self, ops: Iterable[Operation]) -> None:
        for op in ops:
            self._uncommitted.discard(op.name)
            for future in self._watchers.get(op.name, ()):
                if not future.done():
                    future.set_result(None)

    def _restore(self, stored: list[StoredOperation]) -> None:
        groups: dict[str, list[StoredOperation]] = {}
        for entry in stored:
            groups.setdefault(entry.operation.execution or entry.operation.name, []).append(entry)
            self._seq = max(self._seq, entry.seq)
        now = time.monotonic()
        wall = time.time()
        for name, entries in groups.items():
            first = entries[0]
            ops = [entry.operation for entry in entries]
            if first.action_bytes is None or first.command_bytes is None:
                log.error("scheduler database: operation %s lacks its action; dropped", name)
                continue
            assert first.operation.action is not None and first.operation.command is not None
            for op in ops:
                op.execution = name
                op.action, op.command = first.operation.action, first.operation.command
                self._operations[op.name] = op
            execution = _Execution(
                name=name, action_digest=first.operation.action_digest,
                action=first.operation.action, command=first.operation.command,
                action_bytes=first.action_bytes, command_bytes=first.command_bytes,
                timeout_s=self._timeout_of(first.operation.action) or self.config.default_timeout_s,
                priority=min(op.priority for op in ops), seq=first.seq,
                queued_at=min(op.queued_at for op in ops), operations=ops,
                attempts=max(op.attempts for op in ops),
            )
            self._executions[name] = execution
            if execution.cacheable:
                self._in_flight[execution.action_digest] = execution
            running = next((op for op in ops if op.state == "executing" and op.worker), None)
            if running is None:
                self._mirror(execution)
                self._push(execution)
                continue
            execution.state = "executing"
            execution.worker = running.worker
            execution.started_at = running.started_at
            elapsed = max(wall - (running.started_at or wall), 0.0)
            execution.deadline = now + execution.timeout_s + self.config.lease_s - elapsed
            execution.delivered_in = -1
            execution.grace_until = now + self.config.restart_grace_s
            self._orphans.setdefault(running.worker, {})[name] = execution
            self._mirror(execution)

    # -- the reaper: leases, deadlines, restart grace, retention --------------------------

    def _poke_reaper(self, when: float) -> None:
        if when < self._reaper_at:
            self._reaper_wake.set()

    async def _reap(self) -> None:
        next_prune = 0.0
        while True:
            now = time.monotonic()
            wake_at = now + _PRUNE_EVERY_S
            try:
                wake_at = min(wake_at, self._expire(now))
            except Exception:
                log.exception("scheduler: lease and deadline check failed")
            if now >= next_prune:
                next_prune = now + _PRUNE_EVERY_S
                self._spawn(self._prune())
            self._reaper_at = wake_at
            self._reaper_wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reaper_wake.wait(), max(wake_at - now, 0.005))

    def _expire(self, now: float) -> float:
        """Act on every lease, deadline and grace period that ran out; the next one due."""
        wake_at = math.inf
        for worker in list(self._workers.values()):
            if worker.in_call:
                continue
            if worker.lease_expires > now:
                wake_at = min(wake_at, worker.lease_expires)
                continue
            log.warning("worker %s lost: no synchronize call for %gs (scheduler.lease_s)",
                        worker.id, self.config.lease_s)
            self._forget_worker(worker)
            for execution in list(worker.executing.values()):
                self._lose(execution, f"worker {worker.id} stopped synchronizing (lease of "
                           f"{self.config.lease_s:g}s expired)")
        for worker_id, orphans in list(self._orphans.items()):
            for execution in list(orphans.values()):
                grace = execution.grace_until if execution.grace_until is not None else now
                if grace > now:
                    wake_at = min(wake_at, grace)
                    continue
                self._lose(execution, f"worker {worker_id} did not synchronize within "
                           f"{self.config.restart_grace_s:g}s of the coordinator's restart "
                           "(scheduler.restart_grace_s)")
        wake_at = min(wake_at, self._fail_unmatched(now))
        for execution in list(self._executions.values()):
            if execution.state != "executing":
                continue
            if execution.deadline > now:
                wake_at = min(wake_at, execution.deadline)
                continue
            self._cancel_on_worker(execution.worker, execution.name)
            self._finish(
                execution, status="deadline_exceeded", ran=True,
                message=f"action {execution.action_digest} did not finish within its "
                f"timeout of {execution.timeout_s:g}s (worker {execution.worker} never "
                "reported it)",
            )
        return wake_at

    def _fail_unmatched(self, now: float) -> float:
        """Fail what waits for a platform no joined worker has offered for
        ``unmatched_timeout_s``; the next time one is due. With no worker joined at all
        nothing fails: the pool may be starting the first ones."""
        timeout = self.config.unmatched_timeout_s
        if timeout <= 0 or not self._workers or not self._queues:
            self._unmatched.clear()
            return math.inf
        offered = {worker.properties for worker in self._workers.values()}
        self._unmatched = unmatched = {
            platform: self._unmatched.get(platform, now) for platform in self._queues
            if not any(platform <= properties for properties in offered)
        }
        wake_at = math.inf
        for platform, since in list(unmatched.items()):
            if now < since + timeout:
                wake_at = min(wake_at, since + timeout)
                continue
            del unmatched[platform]
            waiting = [entry[3] for entry in self._queues.pop(platform) if _is_current(entry)]
            if not waiting:
                continue  # only entries already taken or finished were left
            wanted = ", ".join(f"{name}={value}" for name, value in sorted(platform))
            kinds = sorted(", ".join(f"{n}={v}" for n, v in sorted(p)) or "(none)"
                           for p in offered)
            shown = "; ".join(f"[{kind}]" for kind in kinds[:5])
            if len(kinds) > 5:
                shown += f"; and {len(kinds) - 5} more"
            log.warning("failing %d queued action(s): no worker offers %s", len(waiting), wanted)
            for execution in waiting:
                self._finish(
                    execution, status="failed_precondition",
                    message=f"no worker offers the platform properties action "
                    f"{execution.action_digest} asks for ({wanted}): none of the "
                    f"{len(self._workers)} joined worker(s) did within {timeout:g}s "
                    f"(scheduler.unmatched_timeout_s); they offer {shown}. Start workers "
                    "with those properties (rexd worker --property NAME=VALUE, or "
                    "[pool] properties for the local ones), or drop them from the client's "
                    "platform (Bazel: exec_properties, --remote_default_exec_properties)",
                )
        return wake_at

    async def _prune(self) -> None:
        config = self.config
        try:
            removed = await self.database.prune(
                time.time() - config.completed_retention_s, config.max_completed
            )
        except SchedulerError as exc:
            log.error("%s", exc)
            return
        if removed:
            log.info("scheduler: forgot %d completed operation(s)", removed)

    def _spawn(self, coroutine: Any) -> None:
        self._track(coroutine)

    def _track(self, coroutine: Any) -> asyncio.Task[Any]:
        """Run ``coroutine`` in the background (cancelled when the scheduler stops)."""
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # -- observation ----------------------------------------------------------------------

    def status(self) -> SchedulerStatus:
        """Workers total/busy, queued and executing operations, and :meth:`metrics`."""
        executing = sum(
            len(e.operations) for e in self._executions.values() if e.state == "executing"
        )
        return SchedulerStatus(
            workers_total=len(self._workers),
            workers_busy=sum(1 for w in self._workers.values() if w.executing),
            queued=sum(len(e.operations) for e in self._queued),
            executing=executing,
            metrics=self.metrics(),
        )

    def metrics(self) -> SchedulerMetrics:
        counters = self._counters
        lookups = counters.cache_lookups
        return SchedulerMetrics(
            total_executions=counters.total,
            successful_executions=counters.successful,
            failed_executions=counters.failed,
            cache_hits=counters.cache_hits,
            cache_lookups=lookups,
            cache_hit_rate=counters.cache_hits / lookups if lookups else 0.0,
            uptime_s=time.time() - self._started_at if self._running else 0.0,
            arrivals=counters.arrivals,
            busy_s=counters.busy_s,
        )

    def worker_loads(self) -> dict[str, int]:
        """Actions each joined worker runs right now, by worker id (what the pool drains by)."""
        return {worker.id: len(worker.executing) for worker in self._workers.values()}


def _when_both(first: asyncio.Future[Any], second: asyncio.Future[Any]) -> asyncio.Future[None]:
    """Resolves once both are done, as ``first`` did; ``second`` reports its own errors."""
    both: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def done(_: object) -> None:
        if not (first.done() and second.done()) or both.done():
            return
        if first.cancelled():
            both.cancel()
        elif first.exception() is not None:
            both.set_exception(first.exception())  # type: ignore[arg-type]
        else:
            both.set_result(None)

    first.add_done_callback(done)
    second.add_done_callback(done)
    return both


def _read_files(paths: list[Path]) -> list[bytes | None]:
    """Each file's bytes, or None for one that is gone (evicted meanwhile)."""
    contents: list[bytes | None] = []
    for path in paths:
        try:
            with open(path, "rb", buffering=0) as file:
                contents.append(file.readall())
        except FileNotFoundError:
            contents.append(None)
    return contents


def _is_current(entry: tuple[int, int, int, _Execution]) -> bool:
    execution = entry[3]
    return execution.state == "queued" and execution.queue_version == entry[2]


#: Whether a worker's address is loopback (remembered: every worker call asks).
_is_loopback = functools.lru_cache(maxsize=1024)(is_loopback)
