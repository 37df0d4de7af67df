"""The coordinator's state in SQLite: ``<data_dir>/scheduler.sqlite3`` (WAL).

One row per operation. The event loop never touches SQLite: every statement runs on one
writer thread. Writes use *group commit* (DESIGN.md section 8): the rows saved during one
turn of the event loop go to the thread together (one wake-up), writes that arrive while a
transaction is running queue up, the thread runs all of them in the next transaction, and
each caller's future resolves only once that transaction has committed. Under load, many
concurrent submissions share one transaction; alone, a write costs one transaction.

``synchronous=NORMAL`` with WAL: a committed transaction survives the process being killed
(SIGKILL); an OS crash or power loss may lose the last transactions, never corrupt the file.

What is kept: every queued and executing operation with its Action and Command (so a
restarted coordinator needs nothing else), and completed operations with their result so
that waits by name still work, until they are older than ``completed_retention_s`` or
beyond the newest ``max_completed`` (see :meth:`SchedulerDatabase.prune`).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import attrs

from rexcore.artifacts.digest import parse_digest
from rexcore.scheduler.operations import Operation, SchedulerError
from rexcore.serialization.action import Action, Command
from rexcore.serialization.action_result import ActionResult
from rexcore.serialization.codec import decode, encode

__all__ = ["DATABASE_FILE", "SchedulerDatabase", "StoredOperation"]

log = logging.getLogger(__name__)
T = TypeVar("T")

DATABASE_FILE = "scheduler.sqlite3"
_SCHEMA_VERSION = 1
_COLUMNS = (
    "name", "action_digest", "execution", "state", "priority", "seq", "attempts", "worker",
    "queued_at", "started_at", "completed_at", "status", "message", "cached",
    "skip_cache_lookup", "result", "action", "command",
)
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS operations (
    name TEXT PRIMARY KEY,
    action_digest TEXT NOT NULL,
    execution TEXT NOT NULL,
    state TEXT NOT NULL,
    priority INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    worker TEXT NOT NULL,
    queued_at REAL NOT NULL,
    started_at REAL,
    completed_at REAL,
    status TEXT NOT NULL,
    message TEXT NOT NULL,
    cached INTEGER NOT NULL,
    skip_cache_lookup INTEGER NOT NULL,
    result BLOB,
    action BLOB,
    command BLOB
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS operations_by_completion ON operations (state, completed_at);
PRAGMA user_version = {_SCHEMA_VERSION};
"""
_UPSERT = (
    f"INSERT OR REPLACE INTO operations ({', '.join(_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in _COLUMNS)})"
)
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM operations"


@attrs.frozen
class StoredOperation:
    """An operation read back from the database, with what rebuilds its execution."""

    operation: Operation
    seq: int
    action_bytes: bytes | None
    command_bytes: bytes | None


def operation_row(
    op: Operation, seq: int, action_bytes: bytes | None, command_bytes: bytes | None
) -> tuple[Any, ...]:
    """The row of ``op`` as it is now (taken on the event loop, written later)."""
    done = op.done
    return (
        op.name, str(op.action_digest), op.execution, op.state, op.priority, seq,
        op.attempts, op.worker, op.queued_at, op.started_at, op.completed_at, op.status,
        op.message, int(op.cached), int(op.skip_cache_lookup),
        encode(op.result) if op.result is not None else None,
        None if done else action_bytes, None if done else command_bytes,
    )


def _from_row(row: Sequence[Any]) -> StoredOperation:
    values = dict(zip(_COLUMNS, row))
    action_bytes, command_bytes = values["action"], values["command"]
    op = Operation(
        name=values["name"],
        action_digest=parse_digest(values["action_digest"]),
        action=decode(action_bytes, Action) if action_bytes is not None else None,
        command=decode(command_bytes, Command) if command_bytes is not None else None,
        priority=values["priority"],
        state=values["state"],
        attempts=values["attempts"],
        worker=values["worker"],
        queued_at=values["queued_at"],
        started_at=values["started_at"],
        completed_at=values["completed_at"],
        result=decode(values["result"], ActionResult) if values["result"] is not None else None,
        status=values["status"],
        message=values["message"],
        cached=bool(values["cached"]),
        skip_cache_lookup=bool(values["skip_cache_lookup"]),
        execution=values["execution"],
    )
    return StoredOperation(op, values["seq"], action_bytes, command_bytes)


class _Job:
    __slots__ = ("call", "future", "requests", "rows")

    def __init__(
        self,
        future: asyncio.Future[Any],
        rows: list[tuple[Any, ...]] | None = None,
        call: Callable[[sqlite3.Connection], Any] | None = None,
    ) -> None:
        self.future, self.rows, self.call = future, rows, call
        #: The ``save`` calls whose rows this job carries.
        self.requests = 0


class SchedulerDatabase:
    """Operations in SQLite, written by one thread with group commit.

    ``transactions`` counts committed write transactions and ``writes`` the write
    requests they carried: ``writes / transactions`` is the batching achieved.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.transactions = 0
        self.writes = 0
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        #: Rows saved in this turn of the event loop, not handed to the thread yet.
        self._batch: _Job | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle ------------------------------------------------------------------------

    async def open(self) -> list[StoredOperation]:
        """Open (creating) the database; every operation not completed, oldest first."""
        if self._thread is not None:
            raise SchedulerError(f"the scheduler database {self.path} is already open")
        self._loop = asyncio.get_running_loop()
        opened: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._run, args=(opened,), name="rex-scheduler-db", daemon=True
        )
        self._thread.start()
        await opened
        return await self.call(_load_pending)

    async def close(self) -> None:
        """Finish every queued write, then close the database."""
        if self._thread is None:
            return
        self._send_batch()
        thread, self._thread = self._thread, None
        self._jobs.put(None)
        await asyncio.to_thread(thread.join)

    # -- requests -------------------------------------------------------------------------

    def save(self, rows: Iterable[tuple[Any, ...]]) -> asyncio.Future[None]:
        """Queue rows (from :func:`operation_row`) for the next transaction; the future
        resolves once that transaction has committed.

        Rows saved during one turn of the event loop travel to the thread together, at
        the end of that turn: one wake-up of the thread (and one answer back) for all of
        them, rather than one per caller."""
        if self._batch is None:
            self._batch = _Job(self._future(), rows=[])
            assert self._loop is not None
            self._loop.call_soon(self._send_batch)
        self._batch.rows.extend(rows)  # type: ignore[union-attr]
        self._batch.requests += 1
        return self._batch.future

    def call(self, function: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Run ``function(connection)`` on the database thread, after queued writes."""
        self._send_batch()
        return self._submit(_Job(self._future(), call=function))

    @property
    def batch_open(self) -> bool:
        """Whether rows saved in this turn of the event loop still wait to go to the
        thread (a row saved now joins their transaction)."""
        return self._batch is not None

    def _send_batch(self) -> None:
        batch, self._batch = self._batch, None
        if batch is not None:
            self._submit(batch)

    async def get(self, name: str) -> StoredOperation | None:
        return await self.call(lambda db: _load_one(db, name))

    async def prune(self, older_than: float, keep: int) -> int:
        """Forget completed operations completed before ``older_than`` (unix seconds) or
        beyond the newest ``keep``; how many were removed."""
        return await self.call(lambda db: _prune(db, older_than, keep))

    def _future(self) -> asyncio.Future[Any]:
        if self._loop is None or self._thread is None:
            raise SchedulerError(
                f"the scheduler database {self.path} is not open; the scheduler is stopped"
            )
        return self._loop.create_future()

    def _submit(self, job: _Job) -> asyncio.Future[Any]:
        self._jobs.put(job)
        return job.future

    # -- the thread -----------------------------------------------------------------------

    def _run(self, opened: asyncio.Future[None]) -> None:
        try:
            db = _connect(self.path)
        except (sqlite3.Error, OSError) as exc:
            error = SchedulerError(
                f"cannot open the scheduler database {self.path}: {exc}; check that the data "
                "dir is writable, or move a damaged file aside to start with an empty queue"
            )
            self._resolve([(opened, None, error)])
            return
        self._resolve([(opened, None, None)])
        try:
            while True:
                job = self._jobs.get()
                batch = [job]
                while True:  # everything that queued up while the last transaction ran
                    try:
                        batch.append(self._jobs.get_nowait())
                    except queue.Empty:
                        break
                stop = None in batch
                jobs = [j for j in batch if j is not None]
                self._resolve(self._write([j for j in jobs if j.rows is not None], db))
                self._resolve([self._call(j, db) for j in jobs if j.call is not None])
                if stop:
                    break
        finally:
            db.close()

    def _write(self, jobs: list[_Job], db: sqlite3.Connection) -> list[tuple[Any, Any, Any]]:
        if not jobs:
            return []
        try:
            with db:  # one transaction; commits, or rolls back on error
                for job in jobs:
                    db.executemany(_UPSERT, job.rows)  # type: ignore[arg-type]
        except sqlite3.Error as exc:
            error = SchedulerError(
                f"cannot write the scheduler database {self.path}: {exc}; check free disk "
                "space and that the data dir is writable"
            )
            return [(job.future, None, error) for job in jobs]
        self.transactions += 1
        self.writes += sum(job.requests for job in jobs)
        return [(job.future, None, None) for job in jobs]

    def _call(self, job: _Job, db: sqlite3.Connection) -> tuple[Any, Any, Any]:
        try:
            return (job.future, job.call(db), None)  # type: ignore[misc]
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            return (job.future, None, exc)

    def _resolve(self, outcomes: list[tuple[Any, Any, Any]]) -> None:
        if outcomes and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(_settle, outcomes)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass


def _settle(outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for future, value, error in outcomes:
        if future.done():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version not in (0, _SCHEMA_VERSION):
        db.close()
        raise sqlite3.DatabaseError(
            f"schema version {version} is not {_SCHEMA_VERSION} (a newer rex wrote it)"
        )
    db.executescript(_SCHEMA)
    # Python's sqlite3 then opens a transaction per ``with db:`` block.
    db.isolation_level = "DEFERRED"
    return db


def _load_pending(db: sqlite3.Connection) -> list[StoredOperation]:
    rows = db.execute(f"{_SELECT} WHERE state != 'completed' ORDER BY seq, queued_at").fetchall()
    stored: list[StoredOperation] = []
    for row in rows:
        try:
            stored.append(_from_row(row))
        except (ValueError, TypeError) as exc:
            log.error("scheduler database: dropping unreadable operation %s: %s", row[0], exc)
    return stored


def _load_one(db: sqlite3.Connection, name: str) -> StoredOperation | None:
    row = db.execute(f"{_SELECT} WHERE name = ?", (name,)).fetchone()
    return _from_row(row) if row is not None else None


def _prune(db: sqlite3.Connection, older_than: float, keep: int) -> int:
    with db:
        removed = db.execute(
            "DELETE FROM operations WHERE state = 'completed' AND completed_at < ?",
            (older_than,),
        ).rowcount
        removed += db.execute(
            "DELETE FROM operations WHERE name IN (SELECT name FROM operations "
            "WHERE state = 'completed' ORDER BY completed_at DESC LIMIT -1 OFFSET ?)",
            (keep,),
        ).rowcount
    return removed
