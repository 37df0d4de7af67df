"""The ``linux`` sandbox: each action in fresh namespaces (bubblewrap) and its own cgroup.

One action costs one ``posix_spawn`` of a tiny C helper (``rex_linux_exec.c``, compiled
once per machine into ``~/.cache/rex``) that joins the action's cgroup, sets rlimits,
drops to the action's user and closes every descriptor above 2, then execs bubblewrap in
place. Bubblewrap unshares the user, mount, pid, ipc, uts, cgroup and (unless the action
may use it) network namespaces, builds a root of its own (system directories read-only, a
minimal /etc, fresh /proc, minimal /dev, tmpfs /tmp and temp dirs, the exec root
writable), sets no_new_privs, drops every capability and runs the command under a
reaper that is pid 1 of the new pid namespace: when the command exits, or that reaper is
killed, the kernel kills everything else in the namespace.

When the worker runs as root, actions run as ``nobody`` on the host (bubblewrap itself
runs unprivileged), so they own no staged input: a hardlink of a cached blob can be
neither written nor chmodded. See ``docs/sandbox-linux.md`` for what is and is not
isolated.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
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
            argv = [helper, "-r2", *(f"-g{p}" for p in cgroup.procs_files),
                    *_helper_user(owner), "--", bwrap, *_NAMESPACES, "--unshare-net", "--die-with-parent",
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


def _write_identity_files(directory: Path, owner: tuple[int, int] | None) -> tuple[Path, Path]:
    """A passwd and a group that name only root, nobody and the action's user."""
    uid, gid = owner if owner is not None else (os.geteuid(), os.getegid())
    users = {0: ("root", 0), 65534: ("nobody", 65534)}
    users.setdefault(uid, ("rex", gid))
    groups = {0: "root", 65534: "nogroup"}
    groups.setdefault(gid, "rex")
    passwd = "".join(f"{n}:x:{u}:{g}:{n}:/:/bin/sh\n"
                     for u, (n, g) in sorted(users.items()))
    group = "".join(f"{n}:x:{g}:\n" for g, n in sorted(groups.items()))
    paths = directory / "passwd", directory / "group"
    for path, text in zip(paths, (passwd, group), strict=True):
        if not path.exists() or path.read_text() != text:
            temp = path.with_suffix(f".{os.getpid()}")
            temp.write_text(text)
            os.chmod(temp, 0o644)
            os.replace(temp, path)
    return paths


# -- one running action ----------------------------------------------------------------


class _Run:
    """Bubblewrap's outer process, the action's cgroup, and the end of both."""

    def __init__(self, pid: int, cgroup: ActionCgroup, report_fd: int) -> None:
        self.pid = pid
        self.cgroup = cgroup
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
        the command's end; it goes when the namespace's pid 1 does). Each is pinned by a
        pidfd and checked to still be in the cgroup, so a reused pid is never hit."""
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
        pause = 0.0005
        while left and time.monotonic() < deadline:
            self.signal_tree(signal.SIGKILL)
            await asyncio.sleep(pause)
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


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _clamp(wanted: float | None, default: float | None, maximum: float | None) -> Any:
    value = default if wanted is None else wanted
    if maximum is not None and (value is None or value > maximum):
        return maximum
    return value


def _give_directories(root: str, owner: tuple[int, int]) -> None:
    """Hand the exec root's directories (never a file: it may be a hardlink of a cached
    blob; never a symlink) to the action's user, so it can create files there."""
    pending = [root]
    while pending:
        path = pending.pop()
        os.chown(path, *owner, follow_symlinks=False)
        with os.scandir(path) as entries:
            pending.extend(e.path for e in entries if e.is_dir(follow_symlinks=False))


def _high(fd: int) -> int:
    """``fd`` moved above the descriptors the helper gets, so that moving one of them
    into place can never overwrite another that is still to be moved."""
    if fd > _EXEC_ROOT_FD:
        return fd
    try:
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, _EXEC_ROOT_FD + 1)
    finally:
        os.close(fd)


def _open_output(path: Path) -> int:
    return _high(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600))


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
        self._layout = layout or detect_cgroups()
        remove_stale(self._layout)
        self._cgroups = WorkerCgroups(self._layout)
        self._numbers = itertools.count(1)
        self._running: set[_Run] = set()
        self._cleanups: set[asyncio.Task[Any]] = set()
        # Files bubblewrap mounts must sit where the action's user may traverse: a
        # directory of this worker's own (random name, so nobody can plant it).
        self._view = Path(tempfile.mkdtemp(prefix="rex-linux-"))
        os.chmod(self._view, 0o755)
        (self._view / "exec-root").mkdir(mode=0o755)
        passwd, group = _write_identity_files(self._view, self._owner)
        self._static = [
            options.bwrap, *_NAMESPACES, "--die-with-parent", "--new-session",
            "--cap-drop", "ALL", "--hostname", options.hostname,
            *_system_mounts(options.system_paths), "--dir", "/etc",
            *itertools.chain.from_iterable(
                ("--ro-bind-try", f"/etc/{name}", f"/etc/{name}") for name in options.etc_files),
            "--ro-bind", str(passwd), "/etc/passwd", "--ro-bind", str(group), "/etc/group",
            "--proc", "/proc", "--dev", "/dev",
            "--size", str(options.tmp_size), "--tmpfs", "/tmp",
        ]

    def _limits(self) -> list[str]:
        wanted = [(resource.RLIMIT_CORE, 0)]
        if self.options.max_file_size is not None:
            wanted.append((resource.RLIMIT_FSIZE, self.options.max_file_size))
        return [f"-l{which}:{value}:{value}" for which, value in wanted]

    def _arguments(self, request: SandboxRequest, cwd: Path, network: bool,
                   cgroup: ActionCgroup) -> list[str]:
        root = str(request.exec_root)
        argv = [self._helper, f"-r{_REPORT_FD}", *(f"-g{p}" for p in cgroup.procs_files)]
        if self._owner is None:  # bubblewrap runs as the worker's user: it can reach it
            argv += [f"-k{_EXEC_ROOT_FD}", *self._limits(), "--", *self._static,
                     "--bind-fd", str(_EXEC_ROOT_FD), root]
        else:
            mount_point = str(self._view / "exec-root")
            argv += [f"-m{mount_point}", *self._limits(), *_helper_user(self._owner), "--",
                     *self._static, "--bind", mount_point, root]
        if not network:
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
                await asyncio.to_thread(_give_directories, str(request.exec_root),
                                        self._owner)
        except OSError as exc:
            raise LinuxSandboxError(f"linux sandbox: cannot prepare {request.exec_root}: "
                                    f"{exc}") from exc
        cgroup = ActionCgroup(self._cgroups, f"action-{next(self._numbers)}")
        try:
            cgroup.limit(_clamp(spec.memory_bytes, options.default_memory, options.max_memory),
                         _clamp(spec.cpus, options.default_cpus, options.max_cpus),
                         _clamp(spec.pids, options.default_pids, options.max_pids))
            run = self._spawn(request, cwd, spec.network, cgroup)
        except BaseException:
            cgroup.remove()
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

    def _spawn(self, request: SandboxRequest, cwd: Path, network: bool,
               cgroup: ActionCgroup) -> _Run:
        report_read, report_write = (_high(fd) for fd in os.pipe2(os.O_CLOEXEC))
        fds = []
        try:
            fds.append(_open_output(request.stdout_path))
            fds.append(_open_output(request.stderr_path))
            fds.append(_high(os.open(request.exec_root,
                                     os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)))
            stdout, stderr, root_fd = fds
            actions = [
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, stdout, 1),
                (os.POSIX_SPAWN_DUP2, stderr, 2),
                (os.POSIX_SPAWN_DUP2, report_write, _REPORT_FD),
                (os.POSIX_SPAWN_DUP2, root_fd, _EXEC_ROOT_FD),
            ]
            argv = self._arguments(request, cwd, network, cgroup)
            # Its own process group (a Ctrl-C at the worker's terminal is the worker's to
            # handle), same session: the process sandbox's orphan sweep leaves it alone.
            pid = os.posix_spawn(self._helper, argv, {}, file_actions=actions, setpgroup=0)
        except ValueError as exc:  # a NUL byte in an argument or the environment
            os.close(report_read)
            raise LinuxSandboxError(f"linux sandbox: cannot pass the command on: {exc}") \
                from exc
        except OSError as exc:
            os.close(report_read)
            raise LinuxSandboxError(f"linux sandbox: cannot start {self._helper}: {exc}; "
                                    "check the worker's limits (processes, open files)") \
                from exc
        finally:
            os.close(report_write)
            for fd in fds:
                os.close(fd)
        os.set_blocking(report_read, False)
        return _Run(pid, cgroup, report_read)

    def _result(self, request: SandboxRequest, run: _Run, left: list[int], timed_out: bool,
                wall_s: float) -> SandboxResult:
        report = run.report()
        usage = run.cgroup.usage()
        problems = run.cgroup.remove()
        if left:
            raise CgroupError(f"linux sandbox: processes {left} of the action would not die "
                              f"within {_KILL_PATIENCE_S:g}s of SIGKILL (uninterruptible "
                              "sleep?); check the host")
        if problems:
            log.warning("linux sandbox: cannot remove cgroup(s): %s", "; ".join(problems))
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
                run.cgroup.remove()
                self._running.discard(run)

        task = asyncio.ensure_future(clean_up())
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def wait_cleanups(self) -> None:
        while self._cleanups:
            await asyncio.wait(set(self._cleanups))

    async def close(self) -> None:
        """Stop every running action and remove the worker's cgroups."""
        for run in list(self._running):
            self._clean_up_in_background(run)
        await self.wait_cleanups()
        self._cgroups.remove()
        shutil.rmtree(self._view, ignore_errors=True)


def create_linux_sandbox(options: LinuxSandboxOptions, context: ComponentContext) -> LinuxSandbox:
    """The ``linux`` descriptor's factory."""
    return LinuxSandbox(options, data_dir=context.data_dir)
