"""The built-in ``process`` sandbox: each action is a plain child process of the worker.

It runs on every OS and it is **not hermetic**: the action sees the host's file system,
network and processes, and ``SandboxSpec.network``, ``cpus`` and ``pids`` are not
enforced. Use it where nothing better is installed (``rex-sandbox-linux`` and friends
rank higher for ``sandbox = "auto"``). What it does guarantee:

- the command runs in ``exec_root/working_directory`` with exactly the given
  environment (nothing inherited), stdin from /dev/null, stdout/stderr into the given
  files, in a session of its own, with no core dumps;
- limits where the OS has them: ``RLIMIT_AS`` from ``SandboxSpec.memory_bytes``, and
  ``RLIMIT_CPU`` derived from the timeout as a backstop that only bites if the worker
  itself is gone;
- the whole process tree dies on timeout, on cancellation and after the command exits.
  On Linux the action's first process is a *child subreaper*
  (``prctl(PR_SET_CHILD_SUBREAPER)``, set between fork and exec; it survives ``execve``),
  so a daemonized grandchild (``setsid`` plus a double fork) is re-parented to it rather
  than to init and stays findable through ``/proc/<pid>/task/*/children``. Stopping walks
  that tree, sends SIGTERM, waits ``kill_grace_s``, then SIGKILLs whatever is left, over
  and over until nothing is left. After the first process exits, its process group is
  killed and, with ``adopt_orphans`` (the default), the worker process is a subreaper as
  well and kills every process that is re-parented to it: only an orphan of a finished
  action can be;
- when the worker runs as root, actions run as an unprivileged user (``user = "auto"``
  picks ``nobody``), so an action cannot write to, or chmod, the inputs it shares with
  the blob store by hardlink; the worker hands the exec root's directories (never its
  files) to that user first. The command starts inside its working directory, so relative
  paths work even where the user may not traverse the directories above the exec root;
  absolute ones (``$PWD/...``, as Bazel's test runner uses) do not, and the sandbox logs a
  warning naming the blocking directory the first time it sees such an exec dir (as root
  the default data dir is ``/var/lib/rex`` for this reason).

Gaps, by platform: elsewhere than Linux a stop kills the action's process group only, so
a grandchild that started a session of its own escapes; without ``adopt_orphans``, a
daemon left behind by a command that exited on its own escapes too. On Windows there are
no rlimits and a stop kills the first process only: use ``rex-sandbox-windows`` (job
objects). With a worker that is not root, actions run as the worker's user: read-only
inputs stop accidental writes, but an action that chmods an input first could change a
cached blob; run the worker as root or use a hermetic sandbox where that matters.

Starting an action costs one fork of a tiny C helper, ``rex-spawn`` (``rex_spawn.c``
next to this module, compiled once per machine into the user's cache dir with the
system's C compiler), which sets the rlimits, the subreaper flag and the user, runs the
command as its child and reports how it ended. On Linux a resident copy of the helper
(``-S``, started on first use, one per sandbox) forks it with ``CLONE_PARENT``, so it is
the worker's own child exactly as if the worker had started it, without the exec of the
helper (about 0.5 ms of CPU per action); elsewhere, or when that copy cannot be started,
each action is one vfork+exec of the helper. Without a C compiler the
sandbox falls back to forking the worker and doing that work in Python between fork and
exec, which is correct but costs about 10 ms per action on a 2-core machine (a fork of a
large Python process, then the interpreter's after-fork work), against about 1 ms.

Peak memory is the largest resident set of any one process of the tree that was waited
for (``ru_maxrss``), not their sum; CPU time covers the processes that were waited for.
Without the helper both also count the worker's own memory at the fork (the kernel
charges the pre-exec copy to the child).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from rexcore.plugins.descriptors import ComponentContext, ProbeResult
from rexcore.sandbox.interface import SandboxError, SandboxRequest, SandboxResult

__all__ = [
    "ProcessSandbox",
    "ProcessSandboxOptions",
    "create_process_sandbox",
    "probe_process_sandbox",
]

log = logging.getLogger(__name__)

_LINUX = sys.platform.startswith("linux")
_POSIX = os.name == "posix"
_PR_SET_CHILD_SUBREAPER = 36
# The descriptor the helper reports on (posix_spawn moves the pipe there).
_REPORT_FD = 3
# os.cpu_count() reads /sys on every call; asked once per action otherwise.
_CPU_COUNT = os.cpu_count() or 1
# How long the resident spawner may take to answer (it only forks).
_SPAWNER_TIMEOUT_S = 30.0
# Requests up to this size go to the spawner in the message itself (rex_spawn.c's
# INLINE_MAX), bigger ones in a memfd.
_INLINE_REQUEST = 65536
# How long finishing keeps SIGKILLing a tree that will not go away (processes stuck in
# uninterruptible sleep) before it gives up and says so.
_KILL_PATIENCE_S = 30.0
_FS_ENCODING, _FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()
# /proc reads: the buffer, and how near its end a read may stop while text is left.
_PROC_READ, _PROC_MARGIN = 65536, 1024
_SPAWNER_SUPPORTED = (_LINUX and hasattr(os, "memfd_create") and hasattr(socket, "send_fds")
                      and hasattr(os, "posix_spawn"))


@attrs.frozen
class ProcessSandboxOptions:
    """Options of the ``process`` sandbox."""

    #: Seconds between SIGTERM and SIGKILL when a tree is stopped (timeout, cancellation).
    kill_grace_s: float = attrs.field(default=2.0, validator=attrs.validators.ge(0))
    #: Who actions run as: ``"auto"`` is ``nobody`` when the worker runs as root (so no
    #: action can change the cached files it gets as hardlinks) and the worker's own user
    #: otherwise; ``"self"`` always the worker's user; else a user name or uid (needs root).
    user: str = "auto"
    #: Linux: make the worker process a child subreaper too and kill every process that is
    #: re-parented to it and is not in the worker's own session: only leftovers of finished
    #: actions can be. Leave it on for ``rexd worker``; turn it off when the sandbox runs
    #: inside a process that starts children of its own in other sessions.
    adopt_orphans: bool = True
    #: ``"auto"``: start actions through the ``rex-spawn`` helper, compiled on first use
    #: when a C compiler is installed (else fork the worker, about 10 ms slower);
    #: ``"off"``: always fork; or the path of a prebuilt helper.
    spawn_helper: str = "auto"


def probe_process_sandbox() -> ProbeResult:
    """The ``process`` sandbox runs wherever processes can be started."""
    return ProbeResult.ok()


# -- /proc: process trees on Linux -----------------------------------------------------


def _read_proc(path: str) -> bytes | None:
    """A /proc file's text, or None if it cannot be read (its process or thread is gone).
    Plain ``os`` calls: ``open()`` costs twice the system calls (fstat, ioctl, lseek)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return _pread_all(fd)
    except OSError:
        return None
    finally:
        os.close(fd)


def _pread_all(fd: int) -> bytes:
    """Everything in a /proc file from its start (a seq_file is generated afresh by a
    read at offset 0, so an fd kept open can be read again and again). A read stops
    short of the buffer's end only at the end of the text, or when the next record (a
    line of stat, a pid of children: far less than the margin) does not fit."""
    data = os.pread(fd, _PROC_READ, 0)
    if len(data) < _PROC_READ - _PROC_MARGIN:
        return data
    chunks, offset = [data], len(data)
    while chunk := os.pread(fd, _PROC_READ, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """``(state, ppid, starttime)`` of a process, or None if it is gone."""
    data = _read_proc(f"/proc/{pid}/stat")
    if not data:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    return fields[0].decode(), int(fields[1]), int(fields[19])


def _children_files_exist() -> bool:
    return os.path.exists(f"/proc/self/task/{threading.get_native_id()}/children")


_CHILDREN_FILES: bool | None = None


def _children(pid: int) -> list[int]:
    """The children of every thread of ``pid`` (``CONFIG_PROC_CHILDREN``; else a scan)."""
    global _CHILDREN_FILES
    if _CHILDREN_FILES is None:
        _CHILDREN_FILES = _children_files_exist()
    if not _CHILDREN_FILES:
        return _children_by_scan(pid)
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    found: list[int] = []
    for task in tasks:
        data = _read_proc(f"/proc/{pid}/task/{task}/children")
        if data:
            found.extend(map(int, data.split()))
    return found


def _children_by_scan(pid: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            info = _proc_stat(int(name))
            if info is not None and info[1] == pid:
                found.append(int(name))
    return found


def _send(pid: int, start: int | None, sig: int) -> None:
    """Signal ``pid`` if it is still the process that started at ``start`` (pidfd: no
    window in which the pid could be reused between the check and the signal)."""
    try:
        if hasattr(os, "pidfd_open"):
            fd = os.pidfd_open(pid)
            try:
                if start is None or _same_process(pid, start):
                    signal.pidfd_send_signal(fd, sig)
            finally:
                os.close(fd)
        elif start is None or _same_process(pid, start):
            os.kill(pid, sig)
    except OSError:
        pass  # gone already


def _same_process(pid: int, start: int) -> bool:
    info = _proc_stat(pid)
    return info is not None and info[2] == start


def _kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(OSError):
        os.killpg(pgid, sig)


class _Tree:
    """The processes descended from ``top``, remembered across re-parenting: a member
    whose parent died stays a member, found by pid (and checked by start time)."""

    def __init__(self, top: int) -> None:
        self.top = top
        self.members: dict[int, int] = {}

    def refresh(self) -> list[tuple[int, int]]:
        """Find new members; the live ones (not zombies) as ``(pid, starttime)``."""
        frontier = [self.top, *self.members]
        seen: set[int] = set()
        live: list[tuple[int, int]] = []
        while frontier:
            pid = frontier.pop()
            if pid in seen:
                continue
            seen.add(pid)
            info = _proc_stat(pid)
            known = self.members.get(pid)
            if info is None or (known is not None and known != info[2]):
                self.members.pop(pid, None)
                continue
            state, _parent, start = info
            self.members[pid] = start
            if state in "ZXx":
                continue  # dead; its children were re-parented at its exit
            live.append((pid, start))
            frontier.extend(_children(pid))
        return live


# -- process-wide: action tops and orphans ---------------------------------------------


class _Orphans:
    """Which children of this process are actions' first processes, and the sweep that
    kills any other child re-parented here (when this process is a subreaper).

    Where a re-parented process lands: the kernel gives an orphan to the first live
    thread of the subreaper (``find_alive_thread``: the thread group leader) since Linux
    4.1, and before that to the very thread whose child died (``real_parent``), which
    for an action's first process is the thread that started it or, through
    ``CLONE_PARENT``, the resident spawner. So the sweep reads the children of the leader
    and of the threads that ever started one of those (:meth:`starting`), not of every
    thread; the leader's list through a descriptor kept open (one ``pread`` a sweep)."""

    def __init__(self) -> None:
        self.tops: set[int] = set()
        #: Other children of this process that are known not to be leftovers (resident
        #: spawners): skipped without a look at their session.
        self.own: set[int] = set()
        self.adopting = False
        self._starters: set[int] = set()
        self._leader: tuple[int, int] | None = None  # (pid, fd of its children file)

    def adopt(self) -> None:
        if self.adopting or not _LINUX:
            return
        if _prctl is None or _prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            err = ctypes.get_errno() if _prctl is not None else 0
            log.warning("cannot make the worker a child subreaper (%s); leftovers of actions "
                        "that exit on their own may survive them", os.strerror(err) or "no libc")
            return
        self.adopting = True

    def starting(self) -> None:
        """The calling thread is about to start an action's first process or a spawner."""
        self._starters.add(threading.get_native_id())

    def _children(self, me: int) -> list[int]:
        """The children of this process's leader and of the threads that start actions."""
        global _CHILDREN_FILES
        if _CHILDREN_FILES is None:
            _CHILDREN_FILES = _children_files_exist()
        if not _CHILDREN_FILES:
            return _children_by_scan(me)
        found: list[int] = []
        leader = self._leader
        if leader is None or leader[0] != me:  # first use, or a fork's child
            try:
                fd = os.open(f"/proc/{me}/task/{me}/children", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return _children(me)
            leader = self._leader = (me, fd)
        try:
            found.extend(map(int, _pread_all(leader[1]).split()))
        except OSError:
            return _children(me)
        for tid in list(self._starters):
            if tid != me:
                data = _read_proc(f"/proc/{me}/task/{tid}/children")
                if data is None:
                    self._starters.discard(tid)  # the thread is gone
                elif data:
                    found.extend(map(int, data.split()))
        return found

    async def sweep(self) -> None:
        """Kill and reap every child that is neither an action's first process nor in
        this process's own session. Finding and signalling happen without a pause, so no
        action can be started (and be mistaken for an orphan) in between."""
        me, my_session = os.getpid(), None
        deadline = time.monotonic() + _KILL_PATIENCE_S
        while True:
            orphans = []
            for pid in self._children(me):
                if pid in self.tops or pid in self.own:
                    continue
                try:
                    if my_session is None:
                        my_session = os.getsid(0)
                    if os.getsid(pid) == my_session:
                        continue  # started by this process itself, not left by an action
                except OSError:
                    continue
                orphans.append(pid)
            if not orphans:
                return
            for pid in orphans:
                _send(pid, None, signal.SIGKILL)  # our child: its pid cannot be reused yet
                for member, start in _Tree(pid).refresh():
                    _send(member, start, signal.SIGKILL)
            await asyncio.sleep(0.002)
            for pid in orphans:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)  # noqa: ASYNC222 (WNOHANG: never blocks)
            if time.monotonic() > deadline:
                log.warning("orphaned processes %s of finished actions do not die; giving up",
                            orphans)
                return


_orphans = _Orphans()


def _load_prctl() -> Callable[..., int] | None:
    if not _LINUX:
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


_prctl = _load_prctl()


def _pre_exec(limits: list[tuple[int, int, int]], subreaper: bool) -> Callable[[], None]:
    """What the child runs between fork and exec: as little as possible, all prepared."""
    import resource

    setrlimit = resource.setrlimit
    prctl = _prctl

    def pre_exec() -> None:
        if subreaper and prctl is not None:
            prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        for which, soft, hard in limits:
            setrlimit(which, (soft, hard))

    return pre_exec


# -- the exec helper -------------------------------------------------------------------

_HELPER_SOURCE = Path(__file__).with_name("rex_spawn.c")
_helpers: dict[str, str | None] = {}


def _helper_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rex"


def _compile_helper() -> str | None:
    """The path of ``rex-spawn`` built from the source shipped here, compiling it into the
    cache dir unless a build of this very source is there; None without a compiler."""
    import hashlib
    import platform
    import shutil
    import tempfile

    source = _HELPER_SOURCE.read_bytes()
    tag = hashlib.sha256(source + platform.machine().encode()).hexdigest()[:16]
    for directory in (_helper_cache_dir(), Path(tempfile.gettempdir()) / f"rex-{os.getuid()}"):
        target = directory / f"rex-spawn-{tag}"
        if os.access(target, os.X_OK):
            return str(target)
        compiler = next((c for c in (os.environ.get("CC"), "cc", "gcc", "clang")
                         if c and shutil.which(c)), None)
        if compiler is None:
            return None
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        temp = directory / f".rex-spawn-{tag}.{os.getpid()}.tmp"
        for flags in (["-O2", "-static"], ["-O2"]):
            done = subprocess.run([compiler, *flags, "-o", str(temp), str(_HELPER_SOURCE)],
                                  capture_output=True, text=True, check=False)
            if done.returncode == 0:
                os.chmod(temp, 0o755)
                os.replace(temp, target)
                return str(target)
        log.warning("cannot compile the process sandbox's helper with %s: %s", compiler,
                    done.stderr.strip()[-500:])
        with contextlib.suppress(OSError):
            temp.unlink()
        return None
    return None


def _spawn_helper(setting: str) -> str | None:
    """The helper to start actions with, per the ``spawn_helper`` option (memoized)."""
    if not _POSIX or setting == "off":
        return None
    if setting not in _helpers:
        if setting == "auto":
            try:
                _helpers[setting] = _compile_helper()
            except OSError as exc:
                log.warning("cannot build the process sandbox's helper: %s", exc)
                _helpers[setting] = None
            if _helpers[setting] is None:
                log.warning("no C compiler for the process sandbox's helper: each action "
                            "forks the worker instead (about 10 ms more per action); "
                            "install cc to avoid that")
        elif os.access(setting, os.X_OK):
            _helpers[setting] = setting
        else:
            raise SandboxError(f"process sandbox: spawn_helper {setting!r} is not an "
                               "executable file; use 'auto', 'off' or a rex-spawn binary")
    return _helpers[setting]


def _read_report(fd: int) -> dict[str, list[str]]:
    """The helper's report lines by kind; the write end is closed by now."""
    chunks = []
    with contextlib.suppress(OSError):
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
            if chunk.startswith(b"done ") or b"\ndone " in chunk:
                break  # the helper's last word: no need to read up to the end
    os.close(fd)
    report: dict[str, list[str]] = {}
    for line in b"".join(chunks).decode(errors="replace").splitlines():
        kind, _, rest = line.partition(" ")
        report[kind] = rest.split(" ", 1) if kind == "setup" else rest.split()
    return report


class _Usage:
    """``ru_utime``/``ru_stime``/``ru_maxrss`` as the helper reported them."""

    def __init__(self, user_us: str, system_us: str, max_rss: str) -> None:
        self.ru_utime = int(user_us) / 1e6
        self.ru_stime = int(system_us) / 1e6
        self.ru_maxrss = int(max_rss)


class _Spawner:
    """A resident ``rex-spawn -S`` (Linux): it forks each action's helper, with
    ``CLONE_PARENT`` so that the helper is this process's own child, as if it had been
    started with ``posix_spawn``, minus the exec of the helper (about half a millisecond
    of CPU per action, and as much wall time on a busy host)."""

    def __init__(self, helper: str) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.pid = 0
        try:
            self.pid = os.posix_spawn(helper, [helper, "-S3"], {}, file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                (os.POSIX_SPAWN_DUP2, 1, 2),
                (os.POSIX_SPAWN_DUP2, theirs.fileno(), 3)])
            _orphans.own.add(self.pid)
            theirs.close()
            # Blocking, with the kernel's timeouts: no poll before each send and receive.
            try:
                timeout = struct.pack("ll", int(_SPAWNER_TIMEOUT_S), 0)
                ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeout)
                ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeout)
            except OSError:  # another layout of struct timeval: Python's timeout then
                ours.settimeout(_SPAWNER_TIMEOUT_S)
            ready = ours.recv(16)
            if ready not in (struct.pack("i", 0), struct.pack("i", 1)):
                raise OSError(0, "it exited at once (a helper without -S?)")
        except BaseException:
            theirs.close()
            ours.close()
            self._end()
            raise
        self.channel = ours
        #: Requests travel in the message itself (else in a memfd: an older helper).
        self.inline = ready == struct.pack("i", 1)
        self.devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        # A sandbox dropped without close(): the spawner ends with its socket, reaped here.
        self._finalizer = weakref.finalize(self, _end_spawner, ours, self.devnull, self.pid)

    def spawn(self, environment: tuple[tuple[str, str], ...], argv: list[str],
              fds: tuple[int, int, int]) -> int:
        """Start ``rex-spawn argv`` (its options and the command) with ``environment`` and
        ``fds`` (stdout, stderr, report); the pid of the new child of this process.
        OSError when the spawner is gone or failed (then it is of no further use)."""
        # One encode of the whole text: what os.fsencode does to each string, at once.
        text = "".join([*(f"{name}={value}\0" for name, value in environment), "\0",
                        *(f"{a}\0" for a in argv)])
        data = text.encode(_FS_ENCODING, _FS_ERRORS)
        sent = False
        if self.inline and len(data) <= _INLINE_REQUEST:
            try:
                self.channel.sendmsg([b"b", data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                     struct.pack("3i", *fds))])
                sent = True
            except OSError as exc:
                if exc.errno != errno.EMSGSIZE:  # a small socket buffer: a memfd below
                    raise
        if not sent:
            memfd = os.memfd_create("rex-spawn-request", os.MFD_CLOEXEC)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(memfd, view):]
                socket.send_fds(self.channel, [b"a"], [memfd, self.devnull, *fds])
            finally:
                os.close(memfd)
        reply = self.channel.recv(16)
        if len(reply) != 4:
            raise OSError(0, "the spawner is gone")
        (pid,) = struct.unpack("i", reply)
        if pid <= 0:
            raise OSError(-pid, os.strerror(-pid))
        return pid

    def close(self) -> None:
        self._finalizer()

    def _end(self) -> None:
        if self.pid:
            _end_spawner(None, None, self.pid)
            self.pid = 0


def _end_spawner(channel: socket.socket | None, devnull: int | None, pid: int) -> None:
    if channel is not None:
        channel.close()
    if devnull is not None:
        with contextlib.suppress(OSError):
            os.close(devnull)
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)  # it holds nothing; our child, so its pid is still ours
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    _orphans.own.discard(pid)


def _environment_problem(environment: tuple[tuple[str, str], ...],
                         argv: list[str]) -> str:
    """What ``posix_spawn`` would refuse in an environment or argv (the spawner takes
    them as NUL-separated text), or ""."""
    for name, value in environment:
        if not name or "=" in name or "\0" in name or "\0" in value:
            return f"illegal environment variable name or value {name!r}"
    if any("\0" in a for a in argv):
        return "embedded null byte"
    return ""


# -- one running action ----------------------------------------------------------------


class _Spawned:
    """What :class:`_Execution` needs of a Popen, for a process ``posix_spawn`` started."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def wait(self) -> int:
        _, status = os.waitpid(self.pid, 0)
        self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGKILL)


class _Execution:
    """An action's first process: when it exits, stopping its tree, reaping it."""

    def __init__(self, popen: subprocess.Popen[bytes] | _Spawned, grace_s: float,
                 report_fd: int | None = None) -> None:
        self.popen = popen
        self.report_fd = report_fd
        #: What the helper reported, once the first process exited (None: no helper).
        self.report: dict[str, list[str]] | None = None
        self.pid = popen.pid
        self.grace_s = grace_s
        self.tree = _Tree(self.pid) if _LINUX else None
        self.reaped = False
        self._status: tuple[int, Any] = (0, None)
        loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[None] = loop.create_future()
        #: Called right when ``exited`` is resolved (a waiter: one turn of the event loop
        #: sooner than a done callback of ``exited``).
        self.on_exit: Callable[[], None] | None = None
        self._watch(loop)

    def _exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)
            if self.on_exit is not None:
                self.on_exit()

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Resolve ``exited`` when the process has exited but is not reaped yet, so its
        pid (and process group id) stay ours until :meth:`finish`."""
        if _LINUX and hasattr(os, "pidfd_open"):
            try:
                fd = os.pidfd_open(self.pid)
            except OSError:
                fd = -1
            if fd >= 0:
                def exited() -> None:
                    loop.remove_reader(fd)
                    os.close(fd)
                    self._exited()

                loop.add_reader(fd, exited)
                return

        def wait() -> None:
            with contextlib.suppress(ChildProcessError):
                if _POSIX:
                    os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)
                else:
                    self.popen.wait()
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                loop.call_soon_threadsafe(self._exited)

        threading.Thread(target=wait, name=f"rex-process-{self.pid}", daemon=True).start()

    async def stop(self) -> None:
        """SIGTERM the tree, give it ``grace_s``, then SIGKILL it until it is empty."""
        if self.reaped:
            return
        if not _POSIX:
            self.popen.kill()
            return
        if self.tree is None:  # elsewhere than Linux the process group is all we can name
            _kill_group(self.pid, signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.exited), self.grace_s)
            _kill_group(self.pid, signal.SIGKILL)
            return
        deadline = time.monotonic() + self.grace_s
        sig, signalled, pause = signal.SIGTERM, set[int](), 0.005
        while live := self.tree.refresh():
            if time.monotonic() >= deadline:
                sig = signal.SIGKILL
            # The group first, in one go (not reaped yet, so its id is still ours): one
            # by one, a shell could see its child die and exit 0 before its own turn.
            _kill_group(self.pid, sig)
            for pid, start in live:
                if sig == signal.SIGKILL or pid not in signalled:
                    _send(pid, start, sig)
                    signalled.add(pid)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.05)

    async def finish(self) -> tuple[int, Any]:
        """Once exited: kill what is left of the tree, then reap; ``(status, rusage)``.

        Cancelled half-way it reaps nothing, so calling it again finishes the job."""
        if not self.exited.done():
            await asyncio.shield(self.exited)
        if self.reaped:
            return self._status
        if _POSIX:
            _kill_group(self.pid, signal.SIGKILL)
        if self.report_fd is not None and self.report is None:
            self.report = _read_report(self.report_fd)
            self.report_fd = None
        # Always walked, even when the helper reports no child left: a process can slip
        # between its last look and its exit (a daemon leaked in CI with that shortcut).
        if self.tree is not None:
            deadline = time.monotonic() + _KILL_PATIENCE_S
            while live := self.tree.refresh():
                for pid, start in live:
                    _send(pid, start, signal.SIGKILL)
                if time.monotonic() > deadline:
                    log.warning("processes %s of action process %d do not die; giving up",
                                [pid for pid, _ in live], self.pid)
                    break
                await asyncio.sleep(0.002)
        if _orphans.adopting:
            await _orphans.sweep()
        if not self.reaped:
            self._status = self._reap()
            self.reaped = True
        return self._status

    def _reap(self) -> tuple[int, Any]:
        try:
            if not _POSIX:
                return self.popen.wait(), None
            try:
                _, status, usage = os.wait4(self.pid, 0)
            except ChildProcessError:
                return 255 << 8, None  # reaped behind our back: no status to report
            self.popen.returncode = os.waitstatus_to_exitcode(status)
            return status, usage
        finally:
            _orphans.tops.discard(self.pid)


# -- the sandbox -----------------------------------------------------------------------


class _ExecFailed(Exception):
    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _resolve_user(value: str) -> tuple[int, int] | None:
    """``(uid, gid)`` to switch to, or None to run as the worker's own user."""
    if not _POSIX or value in ("", "self"):
        return None
    import pwd

    euid = os.geteuid()
    if value == "auto":
        if euid != 0:
            return None
        try:
            entry = pwd.getpwnam("nobody")
        except KeyError:
            log.warning("the worker runs as root and there is no user 'nobody': actions run "
                        "as root and could change cached inputs; set the process sandbox's "
                        "user option")
            return None
    else:
        try:
            entry = pwd.getpwuid(int(value)) if value.isdigit() else pwd.getpwnam(value)
        except KeyError:
            raise SandboxError(
                f"process sandbox: no user {value!r} on this host; set the sandbox option "
                "user to an existing user, 'self' or 'auto'"
            ) from None
    if entry.pw_uid == euid:
        return None
    if euid != 0:
        raise SandboxError(
            f"process sandbox: running actions as {entry.pw_name!r} needs a worker running "
            f"as root, this one runs as uid {euid}; set the sandbox option user to 'self'"
        )
    return entry.pw_uid, entry.pw_gid


def _unsearchable_ancestor(directory: Path,
                           owner: tuple[int, int]) -> tuple[Path, int] | None:
    """The first of ``directory`` and the directories above it that ``owner`` (a uid and
    its only group) may not search, by their mode bits, with its mode; None when it can
    reach it."""
    import stat

    uid, gid = owner
    for path in (directory, *directory.parents):
        try:
            info = os.stat(path)
        except OSError:
            return None  # nothing to tell: the action will report it
        if info.st_uid == uid:
            allowed = info.st_mode & stat.S_IXUSR
        elif info.st_gid == gid:
            allowed = info.st_mode & stat.S_IXGRP
        else:
            allowed = info.st_mode & stat.S_IXOTH
        if not allowed:
            return path, info.st_mode & 0o7777
    return None


def _hand_over(pending: list[str], owner: tuple[int, int], budget: int | None) -> list[str]:
    """Give the directories in ``pending`` and every directory below them (never a file:
    files may be hardlinks of cached blobs; never a symlink: its target is not ours) to
    the action's user. Stops after about ``budget`` entries; what is left to do."""
    uid, gid = owner
    while pending:
        path = pending.pop()
        os.chown(path, uid, gid, follow_symlinks=False)
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                if budget is not None:
                    budget -= 1
        if budget is not None and budget <= 0:
            break
    return pending


def _open_output(path: Path) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
    return os.open(path, flags | getattr(os, "O_BINARY", 0), 0o600)


def _exit_code(status: int) -> int:
    if not _POSIX:
        return status
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


class ProcessSandbox:
    """The ``process`` sandbox; see the module docstring for what it does and does not."""

    name = "process"
    hermetic = False

    def __init__(self, options: ProcessSandboxOptions | None = None) -> None:
        self.options = options or ProcessSandboxOptions()
        self._owner = _resolve_user(self.options.user)
        #: Exec dirs already checked for the action user's access (see _check_reach).
        self._reach_checked: set[Path] = set()
        self._helper = _spawn_helper(self.options.spawn_helper)
        self._running: set[_Execution] = set()
        self._cleanups: set[asyncio.Task[Any]] = set()
        self._spawner: _Spawner | None = None
        # A spawner that keeps dying is replaced this many times, then actions exec the
        # helper (a broken spawner must not cost every action a failed attempt).
        self._spawner_starts = 3
        self._limit_options: dict[tuple[Any, ...], list[str]] = {}
        if self.options.adopt_orphans:
            _orphans.adopt()

    def _check_reach(self, exec_dir: Path) -> None:
        """Warn once per exec dir when the action user cannot traverse the directories
        above it: the action still starts in its exec root, but whatever it reaches by
        absolute path (``$PWD/...``, as Bazel's test runner does) is out of its reach."""
        if exec_dir in self._reach_checked or self._owner is None:
            return
        self._reach_checked.add(exec_dir)
        blocked = _unsearchable_ancestor(exec_dir, self._owner)
        if blocked is not None:
            path, mode = blocked
            log.warning(
                "process sandbox: actions run as uid %d, which may not search %s (mode %o) "
                "above the exec dir %s: an action that reaches its own files by absolute path "
                "(Bazel's test runner does, through $PWD) fails with 'Permission denied'. "
                "Keep the data dir where that user can traverse (as root the default is "
                "/var/lib/rex), set the sandbox option user = \"self\", or use the linux "
                "sandbox (rex-sandbox-linux)", self._owner[0], path, mode, exec_dir)

    def _limits(self, request: SandboxRequest) -> list[tuple[int, int, int]]:
        import resource

        wanted: list[tuple[int, int, int]] = [(resource.RLIMIT_CORE, 0, 0)]
        spec = request.spec
        if spec.memory_bytes is not None and hasattr(resource, "RLIMIT_AS"):
            wanted.append((resource.RLIMIT_AS, spec.memory_bytes, spec.memory_bytes))
        if spec.timeout_s is not None and hasattr(resource, "RLIMIT_CPU"):
            # A backstop for a worker that died without stopping the tree: CPU seconds one
            # process could legitimately use before the timeout, plus the grace.
            cores = max(1.0, float(spec.cpus or _CPU_COUNT))
            soft = math.ceil(spec.timeout_s * cores + self.options.kill_grace_s) + 5
            wanted.append((resource.RLIMIT_CPU, soft, soft + 5))
        limits = []
        for which, soft, hard in wanted:
            _, current_hard = resource.getrlimit(which)
            if current_hard != resource.RLIM_INFINITY:
                soft, hard = min(soft, current_hard), min(hard, current_hard)
            limits.append((which, soft, hard))
        return limits

    def _spawn(self, request: SandboxRequest, cwd: Path, stdout: int, stderr: int) -> _Execution:
        """Start the action, then register its pid before anything else can run (an
        orphan sweep must never mistake a new action for a leftover)."""
        argv = list(request.arguments)
        kwargs: dict[str, Any] = {}
        report_fd = None
        _orphans.starting()
        if self._helper is not None:
            report_fd, write_fd = os.pipe()
            os.set_blocking(report_fd, False)
            if min(stdout, stderr, write_fd) > _REPORT_FD:
                try:
                    popen: subprocess.Popen[bytes] | _Spawned = self._posix_spawn(
                        request, cwd, stdout, stderr, write_fd)
                except BaseException:
                    os.close(report_fd)
                    raise
                finally:
                    os.close(write_fd)
                _orphans.tops.add(popen.pid)
                return _Execution(popen, self.options.kill_grace_s, report_fd)
            options = [f"-r{write_fd}"] + self._helper_options(request)
            command = [self._helper, *options, "--", *argv]
            kwargs.update(start_new_session=True, pass_fds=(write_fd,))
        elif _POSIX:
            command = argv
            kwargs["start_new_session"] = True
            kwargs["preexec_fn"] = _pre_exec(self._limits(request), subreaper=_LINUX)
            if self._owner is not None:
                kwargs.update(user=self._owner[0], group=self._owner[1], extra_groups=[])
        else:
            command = argv
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined]
        try:
            popen = subprocess.Popen(
                command, cwd=cwd, env=dict(request.environment), stdin=subprocess.DEVNULL,
                stdout=stdout, stderr=stderr, close_fds=True, **kwargs,
            )
        except OSError as exc:
            if report_fd is not None:
                os.close(report_fd)
            if exc.filename is not None and str(exc.filename) == str(cwd):
                raise SandboxError(
                    f"process sandbox: cannot start the action in {cwd}: "
                    f"{exc.strerror or exc}; check the exec root"
                ) from exc
            if self._helper is not None or exc.errno in (None, 0) or exc.filename is None:
                raise SandboxError(
                    f"process sandbox: cannot start a process ({command[0]}): {exc}; check "
                    "the worker's limits (processes, open files, memory)"
                ) from exc
            code = 127 if isinstance(exc, FileNotFoundError) else 126
            raise _ExecFailed(code, f"cannot execute {argv[0]!r}: {exc.strerror}") from exc
        except ValueError as exc:  # a NUL byte in an argument or the environment
            if report_fd is not None:
                os.close(report_fd)
            raise _ExecFailed(126, f"cannot execute {argv[0]!r}: {exc}") from exc
        except subprocess.SubprocessError as exc:
            raise SandboxError(f"process sandbox: preparing the action failed: {exc}") from exc
        finally:
            if report_fd is not None:
                os.close(write_fd)
        _orphans.tops.add(popen.pid)
        return _Execution(popen, self.options.kill_grace_s, report_fd)

    def _resident_spawner(self) -> _Spawner | None:
        """The resident spawner, started on first use (Linux, with the helper)."""
        if self._spawner is None and self._spawner_starts > 0 and _SPAWNER_SUPPORTED:
            self._spawner_starts -= 1
            assert self._helper is not None
            try:
                self._spawner = _Spawner(self._helper)
            except OSError as exc:
                log.warning("cannot start the process sandbox's resident spawner (%s): each "
                            "action execs %s instead (about 0.5 ms more)",
                            exc.strerror or exc, self._helper)
        return self._spawner

    def _helper_options(self, request: SandboxRequest) -> list[str]:
        spec = request.spec
        key = (spec.memory_bytes, spec.timeout_s, spec.cpus)
        options = self._limit_options.get(key)
        if options is None:  # the same few specs come again and again
            options = ["-s"] if _LINUX else []
            options += [f"-l{which}:{soft}:{hard}" for which, soft, hard in self._limits(request)]
            if self._owner is not None:
                options.append(f"-u{self._owner[0]}:{self._owner[1]}")
            if len(self._limit_options) >= 256:
                self._limit_options.clear()
            self._limit_options[key] = options
        return options

    def _posix_spawn(self, request: SandboxRequest, cwd: Path, stdout: int, stderr: int,
                     write_fd: int) -> _Spawned:
        """Start the helper with ``posix_spawn``: no Python between fork and exec at all,
        about a third of what ``subprocess.Popen`` costs (the helper changes directory).
        Needs every descriptor handed over above the ones it is moved to."""
        assert self._helper is not None
        argv = list(request.arguments)
        options = [f"-r{_REPORT_FD}", f"-c{cwd}", *self._helper_options(request), "--", *argv]
        spawner = self._resident_spawner()
        if spawner is not None:
            problem = _environment_problem(request.environment, argv)
            if problem:
                raise _ExecFailed(126, f"cannot execute {argv[0]!r}: {problem}")
            try:
                return _Spawned(spawner.spawn(request.environment, options,
                                              (stdout, stderr, write_fd)))
            except OSError as exc:  # gone or failing: a new one next time; this one as below
                log.warning("the process sandbox's resident spawner failed (%s); starting "
                            "a new one", exc.strerror or exc)
                self._spawner = None
                spawner.close()
        command = [self._helper, *options]
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, stdout, 1),
            (os.POSIX_SPAWN_DUP2, stderr, 2),
            (os.POSIX_SPAWN_DUP2, write_fd, _REPORT_FD),
        ]
        try:
            return _Spawned(os.posix_spawn(self._helper, command, dict(request.environment),
                                           file_actions=actions, setsid=True))
        except OSError as exc:
            raise SandboxError(
                f"process sandbox: cannot start a process ({self._helper}): {exc}; check "
                "the worker's limits (processes, open files, memory)"
            ) from exc
        except ValueError as exc:  # a NUL byte or '=' in an argument or the environment
            raise _ExecFailed(126, f"cannot execute {argv[0]!r}: {exc}") from exc

    async def run(self, request: SandboxRequest) -> SandboxResult:
        cwd = request.exec_root / request.working_directory if request.working_directory \
            else request.exec_root
        try:
            for temp in request.spec.temp_dirs:
                (request.exec_root / temp).mkdir(parents=True, exist_ok=True)
            if self._owner is not None:
                self._check_reach(request.exec_root.parent)
                # A small exec root right here; the rest of a big one in a thread.
                pending = _hand_over([str(request.exec_root)], self._owner, budget=256)
                if pending:
                    await asyncio.to_thread(_hand_over, pending, self._owner, None)
            if not cwd.is_dir():
                raise SandboxError(
                    f"process sandbox: the working directory {cwd} does not exist; the worker "
                    "must create it before running the action"
                )
            stdout = _open_output(request.stdout_path)
        except OSError as exc:
            raise SandboxError(f"process sandbox: cannot prepare {request.exec_root}: {exc}") \
                from exc
        try:
            stderr = _open_output(request.stderr_path)
        except OSError as exc:
            os.close(stdout)
            raise SandboxError(f"process sandbox: cannot open {request.stderr_path}: {exc}") \
                from exc
        started = time.monotonic()
        try:
            execution = self._spawn(request, cwd, stdout, stderr)
        except _ExecFailed as exc:
            with contextlib.suppress(OSError):
                os.write(stderr, f"rex: {exc}\n".encode())
            return SandboxResult(exit_code=exc.exit_code, wall_s=time.monotonic() - started,
                                 message=str(exc))
        finally:
            os.close(stdout)
            os.close(stderr)
        self._running.add(execution)
        try:
            timed_out = await self._wait(execution, request.spec.timeout_s)
            status, usage = await execution.finish()
        except BaseException:  # cancelled, most likely: the tree must go all the same
            self._clean_up_in_background(execution)
            raise
        self._running.discard(execution)
        wall_s = time.monotonic() - started
        message = ""
        report = execution.report
        if report is not None:
            if "setup" in report:
                errno_text, what = (report["setup"] + ["?"])[:2]
                cause = os.strerror(int(errno_text)) if errno_text.isdigit() else errno_text
                if what == "chdir":
                    raise SandboxError(f"process sandbox: cannot start the action in {cwd}: "
                                       f"{cause}; check the exec root")
                raise SandboxError(f"process sandbox: preparing the action failed: {what}: {cause}")
            if "exec" in report:
                number = report["exec"][0]
                message = (f"cannot execute {request.arguments[0]!r}: "
                           f"{os.strerror(int(number)) if number.isdigit() else number}")
            if "done" in report:  # the command's own end and usage, not the helper's
                done = report["done"]
                status, usage = int(done[0]), _Usage(*done[1:4])
        cpu_s = peak = None
        if usage is not None:
            cpu_s = usage.ru_utime + usage.ru_stime
            peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        if timed_out:
            message = (f"timed out after {request.spec.timeout_s:g}s; the process tree was "
                       "stopped")
        return SandboxResult(exit_code=_exit_code(status), wall_s=wall_s, timed_out=timed_out,
                             cpu_s=cpu_s, peak_memory_bytes=peak, message=message)

    async def _wait(self, execution: _Execution, timeout_s: float | None) -> bool:
        """Wait for the first process to exit; on timeout stop the tree. Whether it timed out."""
        exited = execution.exited
        if not exited.done():
            # asyncio.wait, minus its sets and its extra callbacks; a cancellation must
            # not cancel ``exited`` itself (finishing still waits for it).
            woken = asyncio.get_running_loop().create_future()

            def wake(_: object = None) -> None:
                if not woken.done():
                    woken.set_result(None)

            execution.on_exit = wake
            timer = None if timeout_s is None else woken.get_loop().call_later(timeout_s, wake)
            try:
                await woken
            finally:
                if timer is not None:
                    timer.cancel()
                execution.on_exit = None
        if exited.done():
            return False
        await execution.stop()
        return True

    def _clean_up_in_background(self, execution: _Execution) -> None:
        """A cancelled run still stops and reaps its tree, even if cancelled again."""

        async def clean_up() -> None:
            try:
                await execution.stop()
            finally:
                await execution.finish()

        task = asyncio.ensure_future(clean_up())
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)
        task.add_done_callback(lambda _: self._running.discard(execution))

    async def wait_cleanups(self) -> None:
        """Wait until every cancelled action's tree is gone (for tests and shutdown)."""
        while self._cleanups:
            await asyncio.wait(set(self._cleanups))

    async def close(self) -> None:
        """Stop every running action's tree (and the resident spawner)."""
        for execution in list(self._running):
            self._clean_up_in_background(execution)
        await self.wait_cleanups()
        if self._spawner is not None:
            self._spawner.close()
            self._spawner = None


def create_process_sandbox(options: ProcessSandboxOptions, context: ComponentContext) -> ProcessSandbox:
    """The ``process`` descriptor's factory."""
    return ProcessSandbox(options)
