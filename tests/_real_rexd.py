"""Real rexd processes for end-to-end tests: ``rexd serve`` subprocesses with local
workers, actions submitted through the native API, and a clean-up that kills every process
a test started (the coordinator, its workers, even ones orphaned by a SIGKILL, and what
their actions left behind).

Processes are found through ``/proc`` by a marker only this test uses (its tmp dir and its
shared dir appear in their command lines), and killed by pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tomli_w

from rexcore.artifacts.digest import Digest, digest_of
from rexcore.protocol.client import RexClient
from rexcore.serialization.action import Action, Command, Directory, canonical_bytes
from rexcore.serialization.operation import OperationView

__all__ = [
    "REPO",
    "WORKER_PID",
    "RexdProcesses",
    "RexdServe",
    "alive",
    "lines",
    "rexd_environment",
    "stdout_of",
    "submit",
    "wait_until",
]

REPO = Path(__file__).resolve().parent.parent

#: A shell function printing the pid of the ``rexd worker`` running this action: the first
#: ancestor whose command line says so (the process sandbox is not hermetic: /proc shows).
#: (The pattern is split so that this script's own command line does not match it.)
WORKER_PID = (
    "worker_pid() { m=rexcore.cli.rexd; p=$$; while [ \"$p\" -gt 1 ]; do "
    "case \"$(tr '\\0' ' ' < /proc/$p/cmdline)\" in *\"$m worker \"*) "
    "echo $p; return;; esac; p=$(cut -d' ' -f4 /proc/$p/stat); done; echo none; }; "
)


def rexd_environment() -> dict[str, str]:
    """The environment of rexd (and so of its workers): this checkout importable, no
    installed plugin loaded (nothing else listens), no stray rex settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("REXCORE_") and not k.startswith("REX_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["REXCORE_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    return env


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            raw = file.read()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0")]


def _pids_mentioning(markers: tuple[str, ...]) -> list[int]:
    me = os.getpid()
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) != me:
            args = _cmdline(int(entry.name))
            if any(marker in arg for arg in args for marker in markers):
                found.append(int(entry.name))
    return found


def _with_descendants(pids: list[int]) -> set[int]:
    """``pids`` and every process below them (collected before any is killed, since the
    children of a killed process are re-parented away)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                with open(f"/proc/{entry.name}/stat") as file:
                    parent = int(file.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry.name))
    found, pending = set(), list(pids)
    while pending:
        pid = pending.pop()
        if pid not in found and pid != os.getpid():
            found.add(pid)
            pending.extend(children.get(pid, ()))
    return found


def alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped is dead)."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False


def lines(path: Path) -> list[str]:
    """The complete lines of a file actions append to (none while it does not exist)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]


async def wait_until(predicate: Callable[[], Any], what: str, patience_s: float = 90.0,
                     interval_s: float = 0.05) -> Any:
    """Poll ``predicate`` (sync or async) until it returns something true; return that."""
    deadline = time.monotonic() + patience_s
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {patience_s:g}s waiting for {what}")
        await asyncio.sleep(interval_s)


class RexdServe:
    """One ``rexd serve`` with ``workers`` local workers, restartable on the same port and
    data dir. ``config`` is shaped like ``rexd.toml``."""

    def __init__(self, root: Path, *, workers: int, config: dict[str, Any] | None = None) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.data_dir = root / "data"
        self.workers = workers
        self.config_path = root / "rexd.toml"
        self.config_path.write_text(tomli_w.dumps(config or {}))
        self.port = 0
        self.url = ""
        self.process: subprocess.Popen[bytes] | None = None
        self._logs: list[Path] = []

    def start(self, patience_s: float = 60.0) -> RexdServe:
        """Start (again: same port and data dir) and wait until it listens."""
        log_path = self.root / f"rexd-{len(self._logs) + 1}.log"
        self._logs.append(log_path)
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "rexcore.cli.rexd", "serve",
                 "--config", str(self.config_path), "--data-dir", str(self.data_dir),
                 "--http", f"127.0.0.1:{self.port}", "--workers", str(self.workers)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=rexd_environment(),
            )
        deadline = time.monotonic() + patience_s
        while not (found := re.search(r"rexd: native listening on (https?://\S+)", self.log())):
            if self.process.poll() is not None:
                raise AssertionError(f"rexd exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"rexd did not listen within {patience_s:g}s:\n{self.log()}")
            time.sleep(0.05)
        self.url = found.group(1)
        self.port = int(self.url.rsplit(":", 1)[1])
        return self

    def log(self) -> str:
        """What the current run of rexd logged so far."""
        return self._logs[-1].read_text(errors="replace") if self._logs else ""

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/v1/status", timeout=30) as answer:
            return json.loads(answer.read())

    async def wait_for_workers(self, count: int) -> None:
        def joined() -> bool:
            return self.status()["workers_total"] >= count

        await wait_until(joined, f"{count} worker(s) to join")

    def worker_pid(self, worker_id: str) -> int:
        """The pid of this rexd's worker process ``worker_id``."""
        for pid in _pids_mentioning((f"{self.data_dir}{os.sep}",)):
            args = _cmdline(pid)
            if ("worker" in args and "--worker-id" in args
                    and args[args.index("--worker-id") + 1] == worker_id and alive(pid)):
                return pid
        raise AssertionError(f"no running worker process {worker_id!r}")

    def kill(self) -> None:
        """SIGKILL the coordinator alone (its workers run in sessions of their own)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


class RexdProcesses:
    """The servers a test starts, a ``shared`` dir every action may write to (outside any
    exec root; world-writable, since actions of a root worker run as ``nobody``), and the
    clean-up of every process they leave."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.shared = Path(tempfile.mkdtemp(prefix="rex-e2e-"))
        self.shared.chmod(0o777)
        self.servers: list[RexdServe] = []

    def serve(self, *, workers: int, config: dict[str, Any] | None = None,
              name: str = "rexd") -> RexdServe:
        server = RexdServe(self.root / name, workers=workers, config=config)
        self.servers.append(server)
        return server.start()

    def clean_up(self) -> None:
        for server in self.servers:
            server.kill()  # first, so that nobody replaces the workers killed next
        markers = (f"{self.root}{os.sep}", f"{self.shared}{os.sep}")
        for _ in range(10):
            leftovers = _with_descendants(_pids_mentioning(markers) + self._recorded_pids())
            if not leftovers:
                break
            for pid in leftovers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        shutil.rmtree(self.shared, ignore_errors=True)

    def _recorded_pids(self) -> list[int]:
        """Pids actions wrote to ``*.pid`` files in the shared dir, still running a shell
        or a sleep (the test may have failed before they were killed)."""
        found = []
        for path in self.shared.glob("*.pid"):
            with contextlib.suppress(ValueError, OSError):
                pid = int(path.read_text().split()[0])
                name = os.path.basename(_cmdline(pid)[0]) if _cmdline(pid) else ""
                if alive(pid) and name in ("sh", "dash", "bash", "sleep"):
                    found.append(pid)
        return found


async def submit(client: RexClient, script: str, *, timeout_s: float | None = None,
                 skip_cache_lookup: bool = True) -> OperationView:
    """Upload and execute ``/bin/sh -c script`` (no inputs); the operation at once."""
    blobs: dict[Digest, bytes] = {}

    def add(data: bytes) -> Digest:
        digest = digest_of(data)
        blobs[digest] = data
        return digest

    command = Command(arguments=("/bin/sh", "-c", script),
                      environment=(("PATH", "/usr/bin:/bin"),))
    action = Action(command_digest=add(canonical_bytes(command)),
                    input_root_digest=add(canonical_bytes(Directory())), timeout_s=timeout_s)
    action_digest = add(canonical_bytes(action))
    for digest in await client.find_missing(blobs):
        await client.put_blob(digest, blobs[digest])
    return await client.execute(action_digest, skip_cache_lookup=skip_cache_lookup)


async def stdout_of(client: RexClient, view: OperationView) -> str:
    assert view.result is not None, f"{view.name} has no result: {view.status} {view.message}"
    digest = view.result.stdout_digest
    return (await client.get_blob(digest)).decode() if digest is not None else ""
