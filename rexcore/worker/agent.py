"""The worker agent: synchronize with the coordinator, run what it assigns, report back.

One :class:`WorkerAgent` per worker process (``rexd worker``). Its loop keeps one
``synchronize`` call open as a long poll while it has a free slot, so a new action
reaches it at once; whenever it has news (an action finished, a drain began) it sends a
new call straight away, which supersedes the held one (the coordinator answers that one
empty), unless a call with news is still unanswered: then the news waits for its answer.
A call that fails is retried with backoff; finished results stay queued until a
call carrying them succeeds, so a coordinator that was unreachable for a while still gets
every result.

Each assignment runs in ``<data_dir>/exec/<operation>``: inputs staged there
(:mod:`rexcore.worker.staging`), the sandbox runs the command with stdout/stderr in a pair
of files under ``<data_dir>/streams``, outputs are collected
(:mod:`rexcore.worker.outputs`), and the directory is removed. Stream files that come back
empty (most do) are kept for the next assignment: truncating a file costs far less than
creating one, which on a busy ext4 volume can take a millisecond.
The report is a :class:`Completion`: a result with timing metadata, or an error that the
coordinator retries elsewhere (the worker's or the network's fault) or not
(``error_is_permanent``: the action's fault).

A local worker passes ``shared_store_root`` (the coordinator's ``<data_dir>/cas``): it
stages from that store and publishes outputs straight into it; nothing is uploaded, and
the coordinator keeps owning eviction (the worker's view has no cap). Otherwise the
worker keeps a capped store of its own under its data dir, fetches what it lacks and
uploads only the blobs the coordinator lacks.

SIGTERM (or SIGINT) drains: no new work is taken (the coordinator is told), running
actions finish and are reported, then :meth:`WorkerAgent.run` returns. A second signal
stops at once, killing running actions.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
import re
import secrets
import shutil
import signal
import socket
import stat
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Self

from rexcore.artifacts.digest import Digest
from rexcore.artifacts.disk import DiskBlobStore
from rexcore.artifacts.store import StorageError
from rexcore.config.types import parse_size
from rexcore.protocol.client import BlobNotFound, NotAuthorized, RexClient, RexClientError
from rexcore.sandbox.interface import Sandbox, SandboxError, SandboxRequest
from rexcore.serialization.action import InvalidActionError
from rexcore.serialization.action_result import ActionResult, ExecutionMetadata
from rexcore.serialization.sandbox_spec import SandboxSpec
from rexcore.serialization.worker_protocol import (
    Assignment,
    Completion,
    SyncRequest,
    SyncResponse,
)
from rexcore.worker.errors import InputError, OutputError, WorkerError
from rexcore.worker.outputs import collect_outputs, copy_into
from rexcore.worker.staging import InputStager

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["WorkerAgent", "default_worker_id"]

log = logging.getLogger("rexcore.worker")

# Blobs up to this size move through memory; larger ones through files.
_SMALL_BLOB = 1 << 20
_FETCH_CONCURRENCY = 16
_UPLOAD_CONCURRENCY = 8
_UPLOAD_ATTEMPTS = 5
_BACKOFF_MIN_S, _BACKOFF_MAX_S = 0.2, 10.0
_RETRY_LOG_INTERVAL_S = 30.0
# Finished exec dirs are removed this long after the first of a batch finished.
_REMOVAL_PAUSE_S = 0.05
# Values of the platform property ``network`` (what ``rex run --network`` sends is "on").
_SWITCH = {"on": True, "true": True, "1": True, "yes": True,
           "off": False, "false": False, "0": False, "no": False}


def default_worker_id() -> str:
    """``<host>-<pid>-<random>``: unique per process, readable in coordinator logs."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


_UNSAFE_IN_NAMES = re.compile(r"[^A-Za-z0-9._-]")


def _operation_dir_name(operation: str) -> str:
    safe = _UNSAFE_IN_NAMES.sub("_", operation)[-80:]
    if safe != operation:
        safe += "-" + hashlib.sha256(operation.encode()).hexdigest()[:8]
    return safe


def _remove_tree(path: Path) -> None:
    """Remove an exec dir whatever the action did to its directories' modes. Only
    directories are ever chmodded: a file there may be a hardlink of a cached blob."""

    def make_writable(function: Any, failed: str, _exc: Any) -> None:
        parent = os.path.dirname(failed)
        info = os.lstat(parent)
        os.chmod(parent, stat.S_IMODE(info.st_mode) | stat.S_IRWXU)
        if os.path.isdir(failed) and not os.path.islink(failed):
            os.chmod(failed, stat.S_IRWXU)
            shutil.rmtree(failed, onerror=make_writable)
        else:
            function(failed)

    if os.path.lexists(path):
        shutil.rmtree(path, onerror=make_writable)


def _remove_trees(paths: list[Path]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            _remove_tree(path)


class _Streams:
    """One assignment's stdout and stderr files."""

    def __init__(self, number: int, paths: tuple[Path, Path]) -> None:
        self.number = number
        self.paths = paths
        #: The sandbox run ended, so no process of the action holds them any more.
        self.ran = False


class _StreamFiles:
    """Pairs of stdout/stderr files under ``directory``; a pair whose files came back
    empty is used again (the sandbox truncates them), others are removed first (a
    non-empty one may now be a blob of the store, by hardlink)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._free: list[int] = []
        self._count = 0
        self._paths: list[tuple[Path, Path]] = []  # by number, made once

    def acquire(self) -> _Streams:
        if self._free:
            number = self._free.pop()
        else:
            number = self._count
            self._count += 1
            stem = self.directory / str(number)
            self._paths.append((stem.with_suffix(".stdout"), stem.with_suffix(".stderr")))
        return _Streams(number, self._paths[number])

    def release(self, streams: _Streams) -> None:
        for path in streams.paths:
            try:
                info = os.lstat(path)
                if (streams.ran and stat.S_ISREG(info.st_mode) and info.st_size == 0
                        and info.st_nlink == 1):
                    if stat.S_IMODE(info.st_mode) != 0o600:  # collecting made it read-only
                        os.chmod(path, 0o600)
                else:
                    os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(path)
        self._free.append(streams.number)


class _Backoff:
    def __init__(self) -> None:
        self.delay = 0.0

    def next(self) -> float:
        self.delay = min(max(self.delay * 2, _BACKOFF_MIN_S), _BACKOFF_MAX_S)
        return self.delay * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self.delay = 0.0


class WorkerAgent:
    """A worker: runs up to ``slots`` assignments of the coordinator at ``coordinator_url``
    at once, in ``sandbox``, with its files under ``data_dir``.

    ``properties`` are matched against actions' platform properties. ``cache_size`` caps
    the worker's own blob store (unused with ``shared_store_root``), ``executables_size``
    the store of executable copies of inputs.
    """

    def __init__(
        self,
        coordinator_url: str,
        *,
        token: str = "",
        slots: int = 1,
        properties: Iterable[tuple[str, str]] | dict[str, str] = (),
        sandbox: Sandbox,
        data_dir: Path,
        shared_store_root: Path | None = None,
        worker_id: str | None = None,
        wait_s: float = 20.0,
        cache_size: int = 10 << 30,
        executables_size: int = 2 << 30,
        client: RexClient | None = None,
        ca_file: str = "",
    ) -> None:
        if slots < 1:
            raise ValueError(f"a worker needs at least one slot, got {slots}")
        self.coordinator_url = coordinator_url.rstrip("/")
        self.token = token
        self.slots = slots
        items = properties.items() if isinstance(properties, dict) else properties
        self.properties = tuple(sorted((str(k), str(v)) for k, v in items))
        self.sandbox = sandbox
        self.data_dir = Path(data_dir)
        self.shared_store_root = shared_store_root
        self.worker_id = worker_id or default_worker_id()
        self.wait_s = wait_s
        # The join token doubles as the bearer token of every request (a coordinator
        # whose native API has auth_tokens_file accepts it).
        self.client = client or RexClient(self.coordinator_url, token=token, ca_file=ca_file)
        self._own_client = client is None
        self.exec_dir = self.data_dir / "exec"
        self._downloads = self.data_dir / "downloads"
        self._streams = _StreamFiles(self.data_dir / "streams")
        self._runs = 0
        if shared_store_root is not None:
            self.store = DiskBlobStore(Path(shared_store_root), max_size=None, scan=False)
        else:
            self.store = DiskBlobStore(self.data_dir / "cas", max_size=cache_size)
        self.executables = DiskBlobStore(self.data_dir / "executables",
                                         max_size=executables_size, file_mode=0o555)
        self.stager = InputStager(self.store, self._fetch, executables=self.executables)
        self._fetching: dict[Digest, asyncio.Future[None]] = {}
        self._removals: set[asyncio.Future[None]] = set()
        self._to_remove: list[Path] = []
        self._remover: asyncio.Future[None] | None = None
        self._fetch_slots = asyncio.Semaphore(_FETCH_CONCURRENCY)
        self._lock_fd: int | None = None
        self._opened = False
        # The synchronize loop's state.
        self._running: dict[str, asyncio.Task[None]] = {}
        self._cancelled: set[str] = set()
        self._unreported: dict[str, Completion] = {}
        self._draining = False
        self._stop_now = False
        self._woken = False
        self._sleeper: asyncio.Future[None] | None = None
        self._lease_s = 30.0
        self._joined = False
        self._specs: dict[tuple[Any, ...], SandboxSpec] = {}

    @property
    def shares_store(self) -> bool:
        return self.shared_store_root is not None

    # -- lifecycle -----------------------------------------------------------------------

    async def open(self) -> WorkerAgent:
        """Lock the data dir, clear what a previous run left, open the stores."""
        if self._opened:
            return self
        await asyncio.to_thread(self._prepare_data_dir)
        try:
            await self.store.open()
            await self.executables.open()
        except StorageError as exc:
            raise WorkerError(f"worker {self.worker_id}: {exc}") from exc
        self._opened = True
        return self

    def _prepare_data_dir(self) -> None:
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            if fcntl is not None:
                fd = os.open(self.data_dir / "worker.lock", os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    raise WorkerError(
                        f"another worker uses the data dir {self.data_dir}; give each worker "
                        "on a host its own --data-dir") from None
                self._lock_fd = fd
            _remove_tree(self.exec_dir)  # what a crashed run left behind
            _remove_tree(self._downloads)
            _remove_tree(self._streams.directory)
            self.exec_dir.mkdir()
            self._downloads.mkdir()
            self._streams.directory.mkdir()
        except OSError as exc:
            raise WorkerError(f"cannot prepare the worker's data dir {self.data_dir}: {exc}; "
                              "choose another with --data-dir") from exc

    async def close(self) -> None:
        for task in list(self._running.values()):
            task.cancel()
        if self._running:
            await asyncio.wait(set(self._running.values()))
        with contextlib.suppress(Exception):
            await self.sandbox.close()
        await self.wait_removals()
        if self._own_client:
            await self.client.close()
        await self.store.close()
        await self.executables.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def drain(self) -> None:
        """Stop taking work; :meth:`run` returns once running actions are reported. A
        second call stops at once, killing what still runs."""
        if self._draining:
            self._stop_now = True
            log.warning("worker %s: stopping now; running actions are killed",
                        self.worker_id)
        else:
            self._draining = True
            log.info("worker %s: draining: %d action(s) still running",
                     self.worker_id, len(self._running))
        self._wake()

    # -- the synchronize loop ------------------------------------------------------------

    async def run(self) -> None:
        """Serve the coordinator until drained (SIGTERM/SIGINT or :meth:`drain`)."""
        await self.open()
        loop = asyncio.get_running_loop()
        handled = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self.drain)
                handled.append(sig)
        try:
            await self._serve()
        finally:
            for sig in handled:
                loop.remove_signal_handler(sig)
            await self.close()

    def _free_slots(self) -> int:
        return max(self.slots - len(self._running), 0)

    def _request(self) -> SyncRequest:
        # The first call is answered at once: it is the join, which the worker confirms
        # (its log line, its lease) without waiting out a long poll on an idle coordinator.
        long_poll = self._joined and self._free_slots() > 0 and not self._draining
        return SyncRequest(
            worker_id=self.worker_id, token=self.token, properties=self.properties,
            slots=self.slots, executing=tuple(sorted(self._running)),
            completed=tuple(self._unreported.values()), draining=self._draining,
            wait_s=self.wait_s if long_poll else 0.0,
        )

    async def _serve(self) -> None:
        calls: dict[asyncio.Task[SyncResponse], SyncRequest] = {}
        backoff = _Backoff()
        news = True  # something to tell the coordinator: send a call now
        retry_at = 0.0
        last_call = 0.0
        failing_since: float | None = None
        last_complaint = 0.0
        drained = False
        try:
            while not drained and not self._stop_now:
                now = time.monotonic()
                heartbeat = last_call + self._lease_s / 3  # a held call renews it too
                idle_and_able = not calls and self._free_slots() > 0 and not self._draining
                # At most two calls in flight (the held one and one with news): a third
                # could be sent before an answer carrying work arrived, and the
                # coordinator takes work that two later calls do not list as lost.
                if now >= retry_at and len(calls) < 2 and (
                        news or idle_and_able or (not calls and now >= heartbeat)):
                    request = self._request()
                    call = asyncio.ensure_future(self._synchronize(request))
                    calls[call] = request
                    news, last_call = False, now
                    heartbeat = now + self._lease_s / 3
                self._woken = False
                if calls:
                    timeout = None  # a call ends by itself (the server bounds its hold)
                else:
                    timeout = max((retry_at if now < retry_at else heartbeat) - now, 0.001)
                await self._sleep(timeout, calls)
                if self._woken:
                    news = True
                for call in [c for c in calls if c.done()]:
                    request = calls.pop(call)
                    try:
                        response = call.result()
                    except NotAuthorized as exc:
                        raise WorkerError(f"the coordinator at {self.coordinator_url} refuses "
                                          f"worker {self.worker_id}: {exc}") from exc
                    except RexClientError as exc:
                        now = time.monotonic()
                        retry_at = now + backoff.next()
                        news = True
                        if failing_since is None:
                            failing_since = now
                        if now - last_complaint >= _RETRY_LOG_INTERVAL_S or last_complaint == 0:
                            last_complaint = now
                            log.warning(
                                "worker %s: cannot synchronize with the coordinator at %s: %s; "
                                "retrying with backoff, %d result(s) kept to report later",
                                self.worker_id, self.coordinator_url, exc,
                                len(self._unreported))
                        continue
                    backoff.reset()
                    if failing_since is not None:
                        log.info("worker %s: the coordinator at %s answers again after %.0fs",
                                 self.worker_id, self.coordinator_url,
                                 time.monotonic() - failing_since)
                        failing_since, last_complaint = None, 0.0
                    self._handle(request, response)
                    if (self._draining and request.draining and not self._running
                            and not self._unreported):
                        drained = True
                    elif not calls and self._free_slots() > 0:
                        news = True  # the long poll ended: hold the next one at once
        finally:
            for call in calls:
                call.cancel()
            if calls:
                await asyncio.wait(set(calls))

    async def _synchronize(self, request: SyncRequest) -> SyncResponse:
        """One call; its end rouses the loop from within the call's last step, one turn
        of the event loop sooner than a done callback of its task would."""
        try:
            return await self.client.synchronize(request)
        finally:
            self._rouse()

    def _wake(self) -> None:
        """There is news for the coordinator (an action finished, a drain began)."""
        self._woken = True
        self._rouse()

    def _rouse(self, _: object = None) -> None:
        """End the loop's sleep (news, or a call ended)."""
        if self._sleeper is not None and not self._sleeper.done():
            self._sleeper.set_result(None)

    async def _sleep(self, timeout: float | None, calls: dict[Any, Any]) -> None:
        """Until news, a call's end or ``timeout``: one future, where ``asyncio.wait``
        on an ``Event`` cost a task and a cancellation per turn of the loop."""
        if self._woken or any(call.done() for call in calls):
            return
        sleeper = self._sleeper = asyncio.get_running_loop().create_future()
        timer = None if timeout is None else sleeper.get_loop().call_later(
            timeout, self._rouse)
        try:
            await sleeper
        finally:
            self._sleeper = None
            if timer is not None:
                timer.cancel()

    def _handle(self, request: SyncRequest, response: SyncResponse) -> None:
        if not self._joined:
            self._joined = True
            log.info("worker %s joined the coordinator at %s (%d slot(s), sandbox %s%s)",
                     self.worker_id, self.coordinator_url, self.slots, self.sandbox.name,
                     "".join(f", {k}={v}" for k, v in self.properties))
        self._lease_s = max(response.lease_s, 1.0)
        for completion in request.completed:
            if self._unreported.get(completion.operation) is completion:
                del self._unreported[completion.operation]
        for name in response.cancel:
            task = self._running.get(name)
            if task is not None:
                log.info("worker %s: the coordinator cancelled %s", self.worker_id, name)
                self._cancelled.add(name)
                task.cancel()
        for assignment in response.assignments:
            if assignment.operation in self._running:
                continue  # delivered twice (a superseded call): it runs already
            if self._stop_now:
                break
            self._running[assignment.operation] = asyncio.ensure_future(
                self._run_assignment(assignment))

    async def _run_assignment(self, assignment: Assignment) -> None:
        name = assignment.operation
        try:
            completion = await self.execute(assignment)
        except asyncio.CancelledError:
            completion = None
            if name not in self._cancelled and not self._stop_now:
                raise
        except Exception as exc:  # a bug here must not take the worker down
            log.exception("worker %s: running %s failed", self.worker_id, name)
            completion = Completion(name, error=f"worker {self.worker_id} failed: "
                                                 f"{type(exc).__name__}: {exc}")
        finally:
            self._cancelled.discard(name)
        if completion is not None:
            self._unreported[name] = completion
        self._running.pop(name, None)
        self._wake()

    # -- one assignment ------------------------------------------------------------------

    async def execute(self, assignment: Assignment) -> Completion:
        """Run one assignment start to end and say how it went (never raises, except
        when cancelled: then the action's processes are killed and its files removed)."""
        await self.open()
        name = assignment.operation
        meta: dict[str, Any] = {"worker": self.worker_id, "queued_at": assignment.queued_at,
                                "worker_start": time.time()}
        # Numbered: a repeated delivery never meets the dir of an earlier run.
        self._runs += 1
        exec_root = self.exec_dir / f"{self._runs}-{_operation_dir_name(name)}"
        streams = self._streams.acquire()
        stdout_path, stderr_path = streams.paths
        staged = None
        try:
            command, action = assignment.command, assignment.action
            try:
                command.validate()
            except InvalidActionError as exc:
                raise WorkerError(f"invalid command: {exc}", permanent=True) from exc
            spec = self._spec(assignment)
            meta["input_fetch_start"] = time.time()
            staged = await self.stager.stage(
                action.input_root_digest, exec_root,
                also_create=self._directories_to_make(command.working_directory,
                                                      command.output_paths))
            meta["input_fetch_end"] = time.time()
            meta["execution_start"] = time.time()
            outcome = await self.sandbox.run(SandboxRequest(
                exec_root=exec_root, arguments=command.arguments,
                environment=command.environment, working_directory=command.working_directory,
                spec=spec, stdout_path=stdout_path, stderr_path=stderr_path,
            ))
            streams.ran = True  # the tree is gone: nothing can write to them any more
            meta["execution_end"] = time.time()
            meta["output_upload_start"] = time.time()
            collected = await collect_outputs(
                exec_root, command, self.store, None if self.shares_store else self._upload,
                function=assignment.action_digest.function,
                stdout_path=stdout_path, stderr_path=stderr_path,
            )
            meta["output_upload_end"] = time.time()
            meta["worker_end"] = time.time()
            result = ActionResult(
                exit_code=outcome.exit_code,
                output_files=collected.output_files,
                output_symlinks=collected.output_symlinks,
                output_directories=collected.output_directories,
                stdout_digest=collected.stdout_digest,
                stderr_digest=collected.stderr_digest,
                execution_metadata=ExecutionMetadata(
                    **meta, cpu_seconds=outcome.cpu_s,
                    peak_memory_bytes=outcome.peak_memory_bytes,
                    oom_killed=outcome.oom_killed),
            )
            return Completion(name, result=result, timed_out=outcome.timed_out)
        except WorkerError as exc:
            return self._failed(name, str(exc), permanent=exc.permanent)
        except SandboxError as exc:
            return self._failed(name, f"sandbox {self.sandbox.name!r} failed: {exc}")
        except (StorageError, RexClientError, OSError) as exc:
            return self._failed(name, f"{type(exc).__name__}: {exc}")
        finally:
            if staged is not None:
                staged.release()
            self._streams.release(streams)
            self._remove_later(exec_root)

    def _remove_later(self, op_dir: Path) -> None:
        """Remove an exec dir off the reporting path (its outputs are stored already):
        after a short pause, so the report goes out first, and in batches, one thread
        hop for all the dirs that finished meanwhile. An empty one (an action without
        inputs that left nothing) goes at once: one rmdir costs less than any hop."""
        try:
            os.rmdir(op_dir)
            return
        except OSError:  # not empty (or never made): the batch below deals with it
            pass
        self._to_remove.append(op_dir)
        if self._remover is None or self._remover.done():
            task = self._remover = asyncio.ensure_future(self._remove_pending())
            self._removals.add(task)
            task.add_done_callback(self._removals.discard)

    async def _remove_pending(self) -> None:
        await asyncio.sleep(_REMOVAL_PAUSE_S)
        while self._to_remove:
            batch, self._to_remove = self._to_remove, []
            await asyncio.to_thread(_remove_trees, batch)

    async def wait_removals(self) -> None:
        """Wait until finished assignments' exec dirs are gone."""
        while self._removals:
            await asyncio.wait(set(self._removals))

    def _failed(self, name: str, message: str, *, permanent: bool = False) -> Completion:
        log.warning("worker %s: %s %s: %s", self.worker_id, name,
                    "failed (the action's fault)" if permanent else "could not run", message)
        return Completion(name, error=message, error_is_permanent=permanent)

    @staticmethod
    def _directories_to_make(workdir: str, outputs: Sequence[str]) -> list[str]:
        """The working directory and the parents of output paths, created before the run
        (REAPI: the worker creates them)."""
        wanted = [workdir] if workdir else []
        for output in outputs:
            parent = output.rpartition("/")[0]
            if parent:
                wanted.append(f"{workdir}/{parent}" if workdir else parent)
        return wanted

    def _spec(self, assignment: Assignment) -> SandboxSpec:
        """The sandbox spec of an assignment's platform properties and timeout (the same
        few come again and again: remembered)."""
        key = (assignment.action.platform, assignment.timeout_s)
        spec = self._specs.get(key)
        if spec is None:
            spec = self._make_spec(assignment)
            if len(self._specs) >= 256:
                self._specs.clear()
            self._specs[key] = spec
        return spec

    def _make_spec(self, assignment: Assignment) -> SandboxSpec:
        properties = dict(assignment.action.platform)
        memory = cpus = pids = None
        try:
            if "memory" in properties:
                memory = parse_size(properties["memory"]) or None
            if "cpus" in properties:
                cpus = float(properties["cpus"]) or None
            if "pids" in properties:
                pids = int(properties["pids"]) or None
            network = properties.get("network", "off").lower()
            if network not in _SWITCH:
                raise ValueError(f"network={properties['network']!r}")
            return SandboxSpec(timeout_s=assignment.timeout_s or None, memory_bytes=memory,
                               cpus=cpus, pids=pids, network=_SWITCH[network])
        except ValueError as exc:
            raise WorkerError(f"invalid platform property: {exc}; memory takes a size "
                              "(e.g. 2GiB), cpus a number, pids an integer, network on or "
                              "off", permanent=True) from exc

    # -- blobs to and from the coordinator -----------------------------------------------

    async def _fetch(self, digests: Sequence[Digest]) -> None:
        """Put ``digests`` into the local store from the coordinator, in parallel; one
        download per blob even when several actions want it at once."""
        waits = []
        for digest in digests:
            running = self._fetching.get(digest)
            if running is None:
                running = self._fetching[digest] = asyncio.ensure_future(self._fetch_one(digest))
                running.add_done_callback(lambda _, d=digest: self._fetching.pop(d, None))
            waits.append(running)
        try:
            await asyncio.gather(*(asyncio.shield(w) for w in waits))
        except BaseException:
            for wait in waits:
                if not wait.done():
                    wait.cancel()
            raise

    async def _fetch_one(self, digest: Digest) -> None:
        async with self._fetch_slots:
            try:
                if digest.size <= _SMALL_BLOB:
                    await self.store.put(digest, await self.client.get_blob(digest))
                    return
                temp = self._downloads / f"{digest.hash}.{secrets.token_hex(4)}"
                try:
                    await self.client.download_file(digest, temp)
                    try:
                        await self.store.link_file(digest, temp)
                    except OSError:  # another file system: copy it in, verified
                        await copy_into(self.store, digest, temp)
                finally:
                    with contextlib.suppress(OSError):
                        temp.unlink()
            except BlobNotFound as exc:
                raise InputError(
                    f"input blob {digest} is in neither this worker's store nor the "
                    f"coordinator's CAS at {self.coordinator_url}; upload it and submit the "
                    "action again", permanent=True) from exc
            except RexClientError as exc:
                raise InputError(f"cannot fetch input blob {digest} from the coordinator at "
                                 f"{self.coordinator_url}: {exc}") from exc

    async def _upload(self, digests: Sequence[Digest]) -> None:
        """Send the coordinator the blobs it lacks, from the local store; retried with
        backoff, since the action's result is worthless without them."""
        digests = [d for d in digests if not d.is_empty]  # every store holds those
        if not digests:
            return
        backoff = _Backoff()
        slots = asyncio.Semaphore(_UPLOAD_CONCURRENCY)

        async def send(digest: Digest) -> None:
            async with slots:
                await self._upload_one(digest)

        for attempt in range(1, _UPLOAD_ATTEMPTS + 1):
            try:
                missing = await self.client.find_missing(digests)

                await asyncio.gather(*(send(d) for d in missing))
                return
            except RexClientError as exc:
                if attempt == _UPLOAD_ATTEMPTS:
                    raise OutputError(f"cannot upload outputs to the coordinator at "
                                      f"{self.coordinator_url}: {exc}") from exc
                log.warning("worker %s: uploading outputs failed (%s); retrying",
                            self.worker_id, exc)
                await asyncio.sleep(backoff.next())

    async def _upload_one(self, digest: Digest) -> None:
        if digest.size <= _SMALL_BLOB:
            await self.client.put_blob(digest, await self.store.get(digest))
            return
        path = self.store.local_path(digest)
        if path is None:
            raise OutputError(f"output blob {digest} left the worker's store before it was "
                              "uploaded; raise the worker's cache size")
        sent = await self.client.upload_file(path, digest.function)
        if sent != digest:
            raise OutputError(f"output blob {digest} changed in the worker's store ({sent}); "
                              "check the worker's disk")

