"""The ``linux`` sandbox: each action in fresh namespaces (bubblewrap) and its own cgroup.

One action costs one fork of a tiny C helper (``rex_linux_exec.c``, compiled once per
machine into ``~/.cache/rex``), made by that helper's resident copy in the action's cgroup
slot (the *spawner*, see ``cgroups.py`` for why): the forked child, still the worker's
own child, sets rlimits, drops to the action's user and closes every descriptor above 2,
then execs bubblewrap in place. Bubblewrap unshares the user, mount, pid, ipc, uts and
cgroup namespaces (and the network one, unless the action may use the network: when
the worker runs as root, the slot's spawner has made that one ahead of time, while the
previous action ran, and the action is born in it), builds a root of its own (system directories read-only, a
minimal /etc, fresh /proc, minimal /dev, tmpfs /tmp and temp dirs, the exec root
writable), sets no_new_privs, drops every capability and runs the command as pid 1 of
the new pid namespace (``--as-pid-1``: no reaper process in between): when the command
exits, or is killed, the kernel kills everything else in the namespace, and bubblewrap's
outer process ends only after that, so the cgroup is empty by then. As pid 1 the command
gets a SIGTERM only if it handles it (the kernel's rule for a namespace's init); at a
timeout an unhandled one is followed by the SIGKILL after ``kill_grace_s``.

When the worker runs as root, actions run as ``nobody`` on the host (bubblewrap itself
runs unprivileged), so they own no staged input: a hardlink of a cached blob can be
neither written nor chmodded. See ``docs/sandbox-linux.md`` for what is and is not
isolated.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import itertools
import logging
import os
import platform
import pwd
import resource
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rexcore.plugins.descriptors import ComponentContext, ProbeResult
from rexcore.sandbox.interface import SandboxRequest, SandboxResult
from rex_sandbox_linux.cgroups import ActionCgroup, CgroupLayout, WorkerCgroups, detect_cgroups
from rex_sandbox_linux.cgroups import remove_stale
from rex_sandbox_linux.errors import CgroupError, LinuxSandboxError
from rex_sandbox_linux.options import SYSTEM_PATHS, LinuxSandboxOptions

__all__ = ["LinuxSandbox", "create_linux_sandbox", "probe_linux_sandbox"]

log = logging.getLogger(__name__)

_HELPER_SOURCE = Path(__file__).with_name("rex_linux_exec.c")
# Descriptors the helper gets: its report pipe and the exec root (an O_PATH fd).
_REPORT_FD, _EXEC_ROOT_FD = 3, 4
# A slot serves the next action only if the last one left at most this much memory charged
# to it (page cache of its files): the next action's limit must not pay for it.
_CLEAN_SLOT_BYTES = 4 << 20
# How long a spawner may take to answer (it only forks).
_SPAWNER_TIMEOUT_S = 30.0
# Slot names, unique in the process: every sandbox of it shares rex-linux-<pid>.
_slot_numbers = itertools.count(1)
# How long a tree that will not die (uninterruptible sleep) is SIGKILLed over and over
# before the run is reported as a sandbox failure.
_KILL_PATIENCE_S = 30.0


# -- the helper ------------------------------------------------------------------------


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rex"


@functools.cache
def build_helper() -> str:
    """The path of ``rex-linux-exec`` built from the source next to this module, compiled
    into the cache dir unless a build of this very source is there."""
    source = _HELPER_SOURCE.read_bytes()
    tag = hashlib.sha256(source + platform.machine().encode()).hexdigest()[:16]
    compiler = next((c for c in (os.environ.get("CC"), "cc", "gcc", "clang")
                     if c and shutil.which(c)), None)
    last_error = "no C compiler (cc, gcc or clang) on PATH"
    for directory in (_cache_dir(), Path(tempfile.gettempdir()) / f"rex-{os.getuid()}"):
        target = directory / f"rex-linux-exec-{tag}"
        if os.access(target, os.X_OK):
            return str(target)
        if compiler is None:
            continue
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            last_error = f"cannot create {directory}: {exc.strerror}"
            continue
        temp = directory / f".rex-linux-exec-{tag}.{os.getpid()}.tmp"
        done = subprocess.run([compiler, "-O2", "-o", str(temp), str(_HELPER_SOURCE)],
                              capture_output=True, text=True, check=False)
        if done.returncode == 0:
            os.chmod(temp, 0o755)
            os.replace(temp, target)
            return str(target)
        last_error = f"{compiler} failed: {done.stderr.strip()[-300:]}"
        with contextlib.suppress(OSError):
            temp.unlink()
    raise LinuxSandboxError(f"linux sandbox: cannot build its helper rex-linux-exec: "
                            f"{last_error}; install a C compiler (Debian: gcc)")


def _resolve_user(value: str) -> tuple[int, int] | None:
    """``(uid, gid)`` to drop to before bubblewrap, or None to stay the worker's user."""
    euid = os.geteuid()
    if value in ("", "self") or (value == "auto" and euid != 0):
        return None
    try:
        name = "nobody" if value == "auto" else value
        entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except KeyError:
        raise LinuxSandboxError(f"linux sandbox: no user {value!r} on this host; set the "
                                "sandbox option user to an existing user") from None
    if entry.pw_uid == 0:
        raise LinuxSandboxError("linux sandbox: actions must not run as root on the host "
                                "(they would own the cached inputs); set user to another user")
    if euid != 0:
        if entry.pw_uid == euid:
            return None
        raise LinuxSandboxError(f"linux sandbox: running actions as {entry.pw_name!r} needs "
                                f"a worker running as root, this one is uid {euid}")
    return entry.pw_uid, entry.pw_gid


# -- probe -----------------------------------------------------------------------------


@functools.cache
def _probe(bwrap: str) -> ProbeResult:
    if not sys.platform.startswith("linux"):
        return ProbeResult.unavailable(f"needs Linux, this host is {sys.platform}")
    if not os.access(bwrap, os.X_OK):
        return ProbeResult.unavailable(
            f"bubblewrap is not installed ({bwrap} missing); install it (Debian: apt-get "
            "install bubblewrap) or set the sandbox option bwrap")
    try:
        layout = detect_cgroups()
        helper = build_helper()
        owner = _resolve_user("auto")
        cgroups = WorkerCgroups(layout, f"rex-linux-probe-{os.getpid()}")
    except LinuxSandboxError as exc:
        return ProbeResult.unavailable(str(exc).removeprefix("linux sandbox: "))
    try:
        cgroup = ActionCgroup(cgroups, "probe")
        try:
            cgroup.limit(256 << 20, 1.0, 64)
            # The helper applies its options in order: join the cgroup while still root.
            # As root it also tries the spawners' empty network namespace (-e).
            argv = [helper, "-r2", *(f"-g{p}" for p in cgroup.procs_files),
                    *(["-e"] if os.geteuid() == 0 else []), *_helper_user(owner), "--",
                    bwrap, *_NAMESPACES, "--unshare-net", "--die-with-parent",
                    "--cap-drop", "ALL", *_system_mounts(SYSTEM_PATHS), "--proc", "/proc",
                    "--dev", "/dev", "--", "/bin/true"]
            done = subprocess.run(argv, capture_output=True, text=True, timeout=30, env={},
                                  check=False)
        finally:
            cgroup.remove()
    except (LinuxSandboxError, OSError, subprocess.TimeoutExpired) as exc:
        return ProbeResult.unavailable(f"a trial action failed: {exc}")
    finally:
        cgroups.remove()
    if done.returncode != 0:
        cause = done.stderr.strip() or f"exit code {done.returncode}"
        return ProbeResult.unavailable(
            f"bubblewrap cannot create the namespaces ({cause}); the kernel must allow "
            "unprivileged user namespaces (sysctl user.max_user_namespaces > 0, "
            "kernel.unprivileged_userns_clone=1 where it exists)")
    return ProbeResult.ok()


def probe_linux_sandbox(bwrap: str = "/usr/bin/bwrap") -> ProbeResult:
    """Available when bubblewrap, a C compiler (for the helper), usable cgroups (v2 with
    memory, cpu and pids delegated, or v1 hierarchies) and user namespaces all are: a
    trial action is run inside a fresh cgroup to prove it. The reason names the piece."""
    return _probe(bwrap)


# -- bubblewrap arguments --------------------------------------------------------------

_NAMESPACES = ("--unshare-user", "--unshare-ipc", "--unshare-pid", "--unshare-uts",
               "--unshare-cgroup")


def _system_mounts(paths: tuple[str, ...]) -> list[str]:
    args: list[str] = []
    for path in paths:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    return args


def _helper_user(owner: tuple[int, int] | None) -> list[str]:
    return [] if owner is None else [f"-u{owner[0]}:{owner[1]}"]


def _identity_files(owner: tuple[int, int] | None) -> dict[str, str]:
    """A passwd and a group that name only root, nobody and the action's user."""
    uid, gid = owner if owner is not None else (os.geteuid(), os.getegid())
    users = {0: ("root", 0), 65534: ("nobody", 65534)}
    users.setdefault(uid, ("rex", gid))
    groups = {0: "root", 65534: "nogroup"}
    groups.setdefault(gid, "rex")
    passwd = "".join(f"{n}:x:{u}:{g}:{n}:/:/bin/sh\n"
                     for u, (n, g) in sorted(users.items()))
    group = "".join(f"{n}:x:{g}:\n" for g, n in sorted(groups.items()))
    return {"passwd": passwd, "group": group}


def _etc_signature(names: tuple[str, ...]) -> tuple[object, ...]:
    """What changes when the host replaces one of these /etc entries (or, for a directory,
    an entry in it or in its subdirectories: tools rename into place)."""
    seen: list[object] = []
    for name in names:
        path = f"/etc/{name}"
        try:
            info = os.stat(path)
        except OSError:
            seen.append(None)
            continue
        seen.append((info.st_ino, info.st_mtime_ns, info.st_size))
        if stat.S_ISDIR(info.st_mode):
            with contextlib.suppress(OSError), os.scandir(path) as entries:
                seen.extend((e.name, e.stat().st_mtime_ns) for e in entries
                            if e.is_dir(follow_symlinks=False))
    return tuple(seen)


def _world_readable(info: os.stat_result) -> bool:
    needed = stat.S_IROTH | (stat.S_IXOTH if stat.S_ISDIR(info.st_mode) else 0)
    return info.st_mode & needed == needed


def _copy_public(source: str, target: str) -> None:
    """Copy what any user may read of ``source`` (a file, or a tree whose symlinks stay
    symlinks) to ``target``; the rest (``/etc/ssl/private``) is left out."""
    info = os.stat(source)
    if not _world_readable(info):
        return
    if not stat.S_ISDIR(info.st_mode):
        shutil.copyfile(source, target)
        os.chmod(target, 0o444)
        return
    os.mkdir(target, 0o755)
    with os.scandir(source) as entries:
        for entry in entries:
            into = os.path.join(target, entry.name)
            if entry.is_symlink():
                os.symlink(os.readlink(entry.path), into)
            else:
                with contextlib.suppress(OSError):
                    _copy_public(entry.path, into)


def _build_etc(directory: Path, names: tuple[str, ...],
               owner: tuple[int, int] | None) -> None:
    """The action's /etc: copies of the host's ``names`` plus a passwd and a group of its
    own; mounted as one read-only directory (a bind mount per entry costs ~0.5 ms)."""
    directory.mkdir(mode=0o755)
    for name in names:
        with contextlib.suppress(OSError):
            _copy_public(f"/etc/{name}", str(directory / name))
    for name, text in _identity_files(owner).items():
        (directory / name).write_text(text)
        os.chmod(directory / name, 0o444)


# -- action slots ----------------------------------------------------------------------


class _Slot:
    """A reusable action cgroup and its spawner (the helper's ``-S`` mode), which lives in
    it and forks each action there: no action pays for joining a cgroup."""

    def __init__(self, cgroup: ActionCgroup, pid: int, channel: socket.socket,
                 baseline: int | None) -> None:
        self.cgroup = cgroup
        self.pid = pid
        self.channel = channel
        self.baseline = baseline
        self.reusable = True
        self.retired = False

    @classmethod
    def start(cls, helper: str, parent: WorkerCgroups, name: str,
              mount_namespace: bool, private_network: bool) -> _Slot:
        """Create the cgroup and start its spawner (blocking: run it in a thread); with
        ``mount_namespace``, in a mount namespace of its own (for the helper's -b); with
        ``private_network``, making each action's network namespace ahead of time (-e)."""
        cgroup = ActionCgroup(parent, name)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = None
        try:
            argv = [helper, "-r3", *(f"-g{p}" for p in cgroup.procs_files),
                    *(["-n"] if mount_namespace else []),
                    *(["-e"] if private_network else []), "-S3"]
            pid = os.posix_spawn(helper, argv, {}, setpgroup=0, file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                (os.POSIX_SPAWN_DUP2, 1, 2),
                (os.POSIX_SPAWN_DUP2, theirs.fileno(), 3)])
            theirs.close()
            ours.settimeout(_SPAWNER_TIMEOUT_S)
            ready = ours.recv(4096)
            if ready != struct.pack("i", 0):
                report = ready.decode(errors="replace").strip() or "it exited"
                raise LinuxSandboxError(f"linux sandbox: the spawner of {cgroup.dirs['pids']} "
                                        f"did not start: {report}")
        except BaseException:
            theirs.close()
            ours.close()
            if pid is not None:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
            cgroup.remove()
            raise
        cgroup.resident = pid
        return cls(cgroup, pid, ours, cgroup.memory_in_use())

    def spawn(self, argv: list[str], fds: list[int]) -> int:
        """Fork ``rex-linux-exec argv`` in the slot with ``fds`` (stdin, stdout, stderr,
        report, exec root); its pid (a child of this process)."""
        data = b"".join(os.fsencode(a) + b"\0" for a in argv)
        if data.count(b"\0") != len(argv):
            raise ValueError("embedded null byte")
        memfd = os.memfd_create("rex-action-argv", os.MFD_CLOEXEC)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(memfd, view):]
            socket.send_fds(self.channel, [b"a"], [memfd, *fds])
        finally:
            os.close(memfd)
        reply = self.channel.recv(16)
        if len(reply) != 4:
            self.reusable = False
            raise OSError(0, "the slot's spawner is gone")
        (pid,) = struct.unpack("i", reply)
        if pid <= 0:
            raise OSError(-pid, os.strerror(-pid))
        return pid

    def clean(self) -> bool:
        """Whether it may serve another action: back to (nearly) what it held before."""
        if not self.reusable or self.cgroup.pids():
            return False
        used = self.cgroup.memory_in_use()
        return used is None or used <= (self.baseline or 0) + _CLEAN_SLOT_BYTES

    def close(self) -> list[str]:
        """End the spawner and remove the cgroup; the directories that would not go."""
        self.channel.close()
        with contextlib.suppress(ChildProcessError):
            os.kill(self.pid, signal.SIGKILL)  # our unreaped child: the pid is still its
            os.waitpid(self.pid, 0)
        return self.cgroup.remove()


# -- one running action ----------------------------------------------------------------


class _Run:
    """Bubblewrap's outer process, the action's cgroup, and the end of both."""

    def __init__(self, pid: int, slot: _Slot, report_fd: int) -> None:
        self.pid = pid
        self.slot = slot
        self.cgroup = slot.cgroup
        self.report_fd = report_fd
        self.status: int | None = None
        self.rusage: Any = None
        loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[None] = loop.create_future()
        self._pidfd = os.pidfd_open(pid)

        def exited() -> None:
            loop.remove_reader(self._pidfd)
            if not self.exited.done():
                self.exited.set_result(None)

        loop.add_reader(self._pidfd, exited)

    def signal_tree(self, sig: int) -> None:
        """Signal every process in the cgroup but bubblewrap's outer one (it reports
        the command's end; it goes when the namespace's pid 1 does) and the slot's spawner.
        Each is pinned by a pidfd and checked to still be in the cgroup, so a reused pid is
        never hit."""
        for pid in self.cgroup.pids():
            if pid == self.pid:
                continue
            try:
                fd = os.pidfd_open(pid)
            except OSError:
                continue
            try:
                if self.cgroup.holds(pid):
                    signal.pidfd_send_signal(fd, sig)
            except OSError:
                pass
            finally:
                os.close(fd)

    async def stop(self, grace_s: float) -> None:
        """SIGTERM, ``grace_s`` for the tree to go, then SIGKILL."""
        self.signal_tree(signal.SIGTERM)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.exited), grace_s)
        self.signal_tree(signal.SIGKILL)

    async def finish(self) -> list[int]:
        """Reap bubblewrap and empty the cgroup; the pids that would not die, if any."""
        deadline = time.monotonic() + _KILL_PATIENCE_S
        while not self.exited.done() and time.monotonic() < deadline:
            # The namespace's pid 1 died but the outer process did not: kill it too.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.exited), 1.0)
            if not self.exited.done():
                self.signal_tree(signal.SIGKILL)
                if not any(p != self.pid for p in self.cgroup.pids()):
                    with contextlib.suppress(OSError):
                        signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        if self.status is None:
            _, self.status, self.rusage = os.wait4(self.pid, 0)
        loop = asyncio.get_running_loop()
        with contextlib.suppress(ValueError, OSError):
            loop.remove_reader(self._pidfd)
        with contextlib.suppress(OSError):
            os.close(self._pidfd)
        left = self.cgroup.pids()
        pause = 0.005
        while left and time.monotonic() < deadline:
            # Rare with --as-pid-1 (the outer bubblewrap waits for the namespace's pid 1):
            # a process still being torn down, or one that will not die; woken by its
            # exit, not by a polling interval.
            self.signal_tree(signal.SIGKILL)
            await _first_exit(left, pause)
            pause = min(pause * 2, 0.1)
            left = self.cgroup.pids()
        return left

    def report(self) -> str:
        chunks = []
        with contextlib.suppress(OSError):
            while chunk := os.read(self.report_fd, 4096):
                chunks.append(chunk)
        os.close(self.report_fd)
        return b"".join(chunks).decode(errors="replace").strip()


async def _first_exit(pids: list[int], timeout_s: float) -> None:
    """Return once one of ``pids`` has exited (left its cgroup), or after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    gone = loop.create_future()
    fds: list[int] = []
    try:
        for pid in pids:
            try:
                fds.append(os.pidfd_open(pid))
            except OSError:
                return  # exited already
            loop.add_reader(fds[-1], lambda: gone.done() or gone.set_result(None))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(gone, timeout_s)
    finally:
        for fd in fds:
            loop.remove_reader(fd)
            os.close(fd)


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _clamp(wanted: float | None, default: float | None, maximum: float | None) -> Any:
    value = default if wanted is None else wanted
    if maximum is not None and (value is None or value > maximum):
        return maximum
    return value


def _give_directories(pending: list[str], owner: tuple[int, int],
                      budget: int | None = None) -> list[str]:
    """Hand the exec root's directories (never a file: it may be a hardlink of a cached
    blob; never a symlink) to the action's user, so it can create files there. With a
    ``budget``, stop after that many directories: the ones left to do."""
    while pending:
        if budget is not None:
            if budget <= 0:
                return pending
            budget -= 1
        path = pending.pop()
        os.chown(path, *owner, follow_symlinks=False)
        with os.scandir(path) as entries:
            pending.extend(e.path for e in entries if e.is_dir(follow_symlinks=False))
    return []


def _open_output(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)


class LinuxSandbox:
    """The ``linux`` sandbox; see the module docstring."""

    name = "linux"
    hermetic = True

    def __init__(self, options: LinuxSandboxOptions | None = None,
                 data_dir: Path | None = None, layout: CgroupLayout | None = None) -> None:
        self.options = options = options or LinuxSandboxOptions()
        if not os.access(options.bwrap, os.X_OK):
            raise LinuxSandboxError(f"linux sandbox: bubblewrap {options.bwrap!r} is not an "
                                    "executable; install bubblewrap or set the option bwrap")
        self._helper = build_helper()
        self._owner = _resolve_user(options.user)
        # A slot's spawner can make each action's network namespace ahead of time (off
        # the action's path) only with CAP_SYS_ADMIN; otherwise bubblewrap makes it.
        self._private_network = os.geteuid() == 0
        self._layout = layout or detect_cgroups()
        remove_stale(self._layout)
        self._cgroups = WorkerCgroups(self._layout)
        self._free_slots: list[_Slot] = []
        self._running: set[_Run] = set()
        self._cleanups: set[asyncio.Task[Any]] = set()
        self._devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        # Files bubblewrap mounts must sit where the action's user may traverse: a
        # directory of this worker's own (random name, so nobody can plant it).
        self._view = Path(tempfile.mkdtemp(prefix="rex-linux-"))
        os.chmod(self._view, 0o755)
        (self._view / "exec-root").mkdir(mode=0o755)
        (self._view / "exec-dir").mkdir(mode=0o755)
        self._etc_generation = itertools.count(1)
        self._etc_signature: tuple[object, ...] | None = None
        self._etc_checked = 0.0
        self._refresh_etc()

    def _refresh_etc(self) -> None:
        """(Re)build the action's /etc when the host's entries changed; checked at most
        once a second. A running action keeps the copy it started with."""
        now = time.monotonic()
        if self._etc_signature is not None and now - self._etc_checked < 1.0:
            return
        self._etc_checked = now
        signature = _etc_signature(self.options.etc_files)
        if signature == self._etc_signature:
            return
        etc = self._view / f"etc-{next(self._etc_generation)}"
        _build_etc(etc, self.options.etc_files, self._owner)
        self._etc_signature = signature
        options = self.options
        self._static = [
            options.bwrap, *_NAMESPACES, "--as-pid-1", "--die-with-parent", "--new-session",
            "--cap-drop", "ALL", "--hostname", options.hostname,
            *_system_mounts(options.system_paths), "--ro-bind", str(etc), "/etc",
            "--proc", "/proc", "--dev", "/dev",
            "--size", str(options.tmp_size), "--tmpfs", "/tmp",
        ]

    def _limits(self) -> list[str]:
        wanted = [(resource.RLIMIT_CORE, 0)]
        if self.options.max_file_size is not None:
            wanted.append((resource.RLIMIT_FSIZE, self.options.max_file_size))
        return [f"-l{which}:{value}:{value}" for which, value in wanted]

    def _arguments(self, request: SandboxRequest, cwd: Path, network: bool) -> list[str]:
        """The helper's options for one action, from its report fd on (see -S)."""
        root = str(request.exec_root)
        argv = [f"-r{_REPORT_FD}"]
        if network and self._private_network:
            argv.append("-h")  # out of the fresh network namespace, into the host's
        if self._owner is None:  # bubblewrap runs as the worker's user: it can reach it
            argv += [f"-k{_EXEC_ROOT_FD}", *self._limits(), "--", *self._static,
                     "--bind-fd", str(_EXEC_ROOT_FD), root]
        elif os.stat(request.exec_root.parent).st_mode & stat.S_IXOTH:
            # The usual case (the worker's exec dir is 0755 under a private data dir): the
            # exec dir is bound once per slot, in its spawner's mount namespace.
            exec_dir = str(self._view / "exec-dir")
            argv += [f"-b{exec_dir}", *self._limits(), *_helper_user(self._owner), "--",
                     *self._static, "--bind", f"{exec_dir}/{request.exec_root.name}", root]
        else:
            mount_point = str(self._view / "exec-root")
            argv += [f"-m{mount_point}", *self._limits(), *_helper_user(self._owner), "--",
                     *self._static, "--bind", mount_point, root]
        if not network and not self._private_network:
            argv.append("--unshare-net")
        for temp in request.spec.temp_dirs:
            argv += ["--size", str(self.options.tmp_size), "--tmpfs", f"{root}/{temp}"]
        argv += ["--chdir", str(cwd), "--clearenv"]
        for key, value in request.environment:
            argv += ["--setenv", key, value]
        return [*argv, "--", *request.arguments]

    async def run(self, request: SandboxRequest) -> SandboxResult:
        spec, options = request.spec, self.options
        cwd = request.exec_root / request.working_directory if request.working_directory \
            else request.exec_root
        started = time.monotonic()
        if spec.network and not options.allow_network:
            message = ("the action asks for the network (platform property network), and "
                       "this worker's linux sandbox does not allow it (sandbox option "
                       "allow_network); run it where that is allowed or drop the property")
            with contextlib.suppress(OSError):
                request.stderr_path.write_text(f"rex: {message}\n")
                os.close(_open_output(request.stdout_path))
            return SandboxResult(exit_code=126, wall_s=time.monotonic() - started,
                                 message=message)
        try:
            for temp in spec.temp_dirs:
                (request.exec_root / temp).mkdir(parents=True, exist_ok=True)
            if not cwd.is_dir():
                raise LinuxSandboxError(f"linux sandbox: the working directory {cwd} does "
                                        "not exist; the worker must create it first")
            if self._owner is not None:
                # A few directories inline (most actions): a thread hop costs more.
                left = _give_directories([str(request.exec_root)], self._owner, budget=16)
                if left:
                    await asyncio.to_thread(_give_directories, left, self._owner)
        except OSError as exc:
            raise LinuxSandboxError(f"linux sandbox: cannot prepare {request.exec_root}: "
                                    f"{exc}") from exc
        self._refresh_etc()
        slot = await self._take_slot()
        try:
            slot.cgroup.limit(
                _clamp(spec.memory_bytes, options.default_memory, options.max_memory),
                _clamp(spec.cpus, options.default_cpus, options.max_cpus),
                _clamp(spec.pids, options.default_pids, options.max_pids))
            if not slot.cgroup.start_usage():
                slot.reusable = False
            run = self._spawn(request, cwd, spec.network, slot)
        except BaseException:
            slot.reusable = False
            self._give_back(slot)
            raise
        self._running.add(run)
        try:
            timed_out = False
            try:
                await asyncio.wait_for(asyncio.shield(run.exited), spec.timeout_s)
            except asyncio.TimeoutError:
                timed_out = True
                await run.stop(options.kill_grace_s)
            left = await run.finish()
        except BaseException:  # cancelled: the tree must go all the same
            self._clean_up_in_background(run)
            raise
        self._running.discard(run)
        return self._result(request, run, left, timed_out, time.monotonic() - started)

    async def _take_slot(self) -> _Slot:
        if self._free_slots:
            return self._free_slots.pop()
        try:
            return await asyncio.to_thread(_Slot.start, self._helper, self._cgroups,
                                           f"slot-{next(_slot_numbers)}",
                                           self._owner is not None,
                                           self._private_network)
        except OSError as exc:
            raise LinuxSandboxError(f"linux sandbox: cannot start an action slot's spawner "
                                    f"{self._helper}: {exc}; check the worker's limits "
                                    "(processes, open files)") from exc

    def _give_back(self, slot: _Slot) -> None:
        """Keep a clean slot for the next action; end any other (in the background).
        Called once per action, however it ended."""
        if slot.retired or slot in self._free_slots:
            return
        if slot.clean():
            self._free_slots.append(slot)
            return
        slot.retired = True

        async def retire() -> None:
            problems = await asyncio.to_thread(slot.close)
            if problems:
                log.warning("linux sandbox: cannot remove cgroup(s): %s", "; ".join(problems))

        task = asyncio.ensure_future(retire())
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    def _spawn(self, request: SandboxRequest, cwd: Path, network: bool, slot: _Slot) -> _Run:
        report_read, report_write = os.pipe2(os.O_CLOEXEC)
        fds = [report_write]
        try:
            fds.append(_open_output(request.stdout_path))
            fds.append(_open_output(request.stderr_path))
            fds.append(os.open(request.exec_root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
            argv = self._arguments(request, cwd, network)
            pid = slot.spawn(argv, [self._devnull, fds[1], fds[2], report_write, fds[3]])
        except ValueError as exc:  # a NUL byte in an argument or the environment
            os.close(report_read)
            raise LinuxSandboxError(f"linux sandbox: cannot pass the command on: {exc}") \
                from exc
        except OSError as exc:
            os.close(report_read)
            slot.reusable = False
            raise LinuxSandboxError(f"linux sandbox: cannot start {self._helper} in "
                                    f"{slot.cgroup.dirs['pids']}: {exc}; check the worker's "
                                    "limits (processes, open files)") from exc
        finally:
            for fd in fds:
                os.close(fd)
        os.set_blocking(report_read, False)
        return _Run(pid, slot, report_read)

    def _result(self, request: SandboxRequest, run: _Run, left: list[int], timed_out: bool,
                wall_s: float) -> SandboxResult:
        report = run.report()
        usage = run.cgroup.usage()
        self._give_back(run.slot)
        if left:
            raise CgroupError(f"linux sandbox: processes {left} of the action would not die "
                              f"within {_KILL_PATIENCE_S:g}s of SIGKILL (uninterruptible "
                              "sleep?); check the host")
        if report.startswith("setup"):
            _, number, what = (report.split(" ", 2) + ["", ""])[:3]
            cause = os.strerror(int(number)) if number.isdigit() else number
            raise LinuxSandboxError(f"linux sandbox: preparing the action failed: {what}: "
                                    f"{cause}")
        assert run.status is not None
        exit_code = _exit_code(run.status)
        cpu_s = usage.cpu_s
        if cpu_s is None and run.rusage is not None:
            cpu_s = run.rusage.ru_utime + run.rusage.ru_stime
        message = ""
        if usage.oom_killed:
            limit = _clamp(request.spec.memory_bytes, self.options.default_memory,
                           self.options.max_memory)
            message = (f"resource exhausted: the action ran out of memory (limit "
                       f"{limit} bytes) and the kernel killed a process of it; ask for "
                       "more with the platform property memory"
                       + ("" if self.options.max_memory is None else
                          f" (at most {self.options.max_memory} here)"))
        if timed_out:
            message = (f"timed out after {request.spec.timeout_s:g}s; the process tree was "
                       "stopped")
        return SandboxResult(exit_code=exit_code, wall_s=wall_s, timed_out=timed_out,
                             oom_killed=usage.oom_killed, cpu_s=cpu_s,
                             peak_memory_bytes=usage.peak_memory_bytes, message=message)

    def _clean_up_in_background(self, run: _Run) -> None:
        async def clean_up() -> None:
            try:
                await run.stop(0)
            finally:
                await run.finish()
                run.report()
                self._give_back(run.slot)
                self._running.discard(run)

        task = asyncio.ensure_future(clean_up())
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def wait_cleanups(self) -> None:
        while self._cleanups:
            await asyncio.wait(set(self._cleanups))

    async def close(self) -> None:
        """Stop every running action, end the slots and remove the worker's cgroups."""
        for run in list(self._running):
            self._clean_up_in_background(run)
        await self.wait_cleanups()
        while self._free_slots:
            slot = self._free_slots.pop()
            slot.reusable = False
            self._give_back(slot)
        await self.wait_cleanups()
        self._cgroups.remove()
        with contextlib.suppress(OSError):
            os.close(self._devnull)
        shutil.rmtree(self._view, ignore_errors=True)


def create_linux_sandbox(options: LinuxSandboxOptions, context: ComponentContext) -> LinuxSandbox:
    """The ``linux`` descriptor's factory."""
    return LinuxSandbox(options, data_dir=context.data_dir)
