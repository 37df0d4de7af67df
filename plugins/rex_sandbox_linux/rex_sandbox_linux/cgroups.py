"""Per-action cgroups, v2 (unified) or v1 (one hierarchy per controller), detected.

Every action runs in a cgroup of its own below ``rex-linux-<worker pid>``, which sits in
the worker's own cgroup of each hierarchy (so whatever limits the worker lives under still
hold for its actions): one action at a time per cgroup, each cgroup a *slot* reused from
action to action while it comes back clean (no process but its spawner, memory back near
where it started). Joining a cgroup costs an RCU grace period (several ms on a busy host),
so a slot's spawner joins once and forks every action inside it. Before each action the
limits (memory without swap, cpu quota, pids) are written if they changed and the usage
counters are reset or noted; after it, usage is read back as the difference.

cgroup v2 needs the worker's cgroup to delegate the controllers: a cgroup that holds
processes cannot enable controllers for its children (the "no internal processes" rule),
so the worker must run in a cgroup of its own with a delegated subtree (systemd
``Delegate=yes``) or as the only process of its cgroup's parent; otherwise detection fails
and says so.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterable
from pathlib import Path

import attrs

from rex_sandbox_linux.errors import CgroupError

__all__ = ["ActionCgroup", "CgroupLayout", "CgroupUsage", "detect_cgroups"]

#: Controllers an action's limits need; ``cpuacct`` (v1) only adds CPU usage.
REQUIRED = ("memory", "cpu", "pids")
_CPU_PERIOD_US = 100_000


@attrs.frozen
class CgroupLayout:
    """Where this process's cgroups are: ``bases`` maps a controller to the directory of
    the worker's own cgroup in the hierarchy carrying it (v2: one directory for all)."""

    version: int
    bases: dict[str, Path]

    def describe(self) -> str:
        where = sorted({str(p) for p in self.bases.values()})
        return f"cgroup v{self.version} ({', '.join(where)})"


@attrs.frozen
class CgroupUsage:
    cpu_s: float | None
    peak_memory_bytes: int | None
    oom_killed: bool


def _mounts(mountinfo: str) -> list[tuple[str, str, str, set[str]]]:
    """``(root, mount point, fstype, super options)`` of every cgroup mount."""
    found = []
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        root, point = (f.replace("\\040", " ") for f in fields[3:5])
        found.append((root, point, tail[0], set(tail[2].split(","))))
    return found


def _inside(point: str, root: str, path: str) -> Path | None:
    """The directory of cgroup ``path`` under a mount of ``root`` at ``point``."""
    if root == "/":
        return Path(point + path) if path != "/" else Path(point)
    if path == root or path.startswith(root.rstrip("/") + "/"):
        return Path(point + path[len(root):])
    return None


def detect_cgroups(mountinfo: str | None = None, self_cgroup: str | None = None) -> CgroupLayout:
    """The usable layout: v2 when its mount offers every controller in :data:`REQUIRED`,
    else v1 when each has a hierarchy. Raises :class:`CgroupError` naming what is missing."""
    if mountinfo is None:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    if self_cgroup is None:
        self_cgroup = Path("/proc/self/cgroup").read_text()
    paths: dict[str, str] = {}  # controller (v2: "") -> this process's cgroup path
    for line in self_cgroup.splitlines():
        _hierarchy, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path
    mounts = _mounts(mountinfo)
    problems = []
    for root, point, fstype, _options in mounts:
        if fstype != "cgroup2" or "" not in paths:
            continue
        base = _inside(point, root, paths[""])
        if base is None:
            continue
        try:
            offered = set((base / "cgroup.controllers").read_text().split())
        except OSError as exc:
            problems.append(f"cgroup v2 at {base}: {exc.strerror}")
            continue
        missing = [c for c in REQUIRED if c not in offered]
        if not missing:
            return CgroupLayout(2, {c: base for c in REQUIRED})
        problems.append(f"cgroup v2 at {point} offers no {', '.join(missing)} controller "
                        "(bound to v1 hierarchies or not delegated)")
    bases: dict[str, Path] = {}
    for root, point, fstype, options in mounts:
        if fstype != "cgroup":
            continue
        for controller in (*REQUIRED, "cpuacct"):
            if controller in options and controller in paths:
                base = _inside(point, root, paths[controller])
                if base is not None:
                    bases[controller] = base
    missing = [c for c in REQUIRED if c not in bases]
    if not missing:
        return CgroupLayout(1, bases)
    problems.append(f"no cgroup v1 hierarchy for {', '.join(missing)}")
    raise CgroupError(
        "cgroups: no usable memory, cpu and pids controllers: " + "; ".join(problems)
        + "; mount them (cgroup v2 with those controllers delegated to the worker, or v1 "
        "hierarchies) or choose another sandbox")


def _write(path: Path, value: str) -> None:
    try:
        with open(path, "w") as file:
            file.write(value)
    except OSError as exc:
        raise CgroupError(f"cgroups: cannot write {value!r} to {path}: {exc.strerror}; "
                          "the worker needs write access to its cgroups (run it as root "
                          "or delegate a cgroup to it)") from exc


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _stat_field(text: str | None, key: str) -> int | None:
    for line in (text or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return None


class WorkerCgroups:
    """The worker's ``rex-linux-<pid>`` cgroup in each hierarchy, parent of every
    action's; removed with :meth:`remove` once its actions' cgroups are gone."""

    def __init__(self, layout: CgroupLayout, name: str | None = None) -> None:
        self.layout = layout
        self.name = name or f"rex-linux-{os.getpid()}"
        self.dirs = {c: base / self.name for c, base in layout.bases.items()}
        for directory in set(self.dirs.values()):
            try:
                directory.mkdir(exist_ok=True)
            except OSError as exc:
                raise CgroupError(f"cgroups: cannot create {directory}: {exc.strerror}; run "
                                  "the worker as root or delegate a cgroup to it") from exc
        if layout.version == 2:
            enable = " ".join(f"+{c}" for c in REQUIRED)
            base = layout.bases["memory"]
            try:
                if base != Path("/sys/fs/cgroup"):
                    _write(base / "cgroup.subtree_control", enable)
                _write(self.dirs["memory"] / "cgroup.subtree_control", enable)
            except CgroupError as exc:
                if isinstance(exc.__cause__, OSError) and exc.__cause__.errno == errno.EBUSY:
                    raise CgroupError(
                        f"cgroups: {base} holds processes, so cgroup v2 cannot delegate "
                        "controllers to its children; start the worker in a cgroup of its "
                        "own with a delegated subtree (systemd-run -p Delegate=yes ...)"
                    ) from exc
                raise

    def remove(self) -> None:
        for directory in set(self.dirs.values()):
            with contextlib.suppress(OSError):
                for child in directory.iterdir():
                    if child.is_dir():
                        child.rmdir()
                directory.rmdir()


class ActionCgroup:
    """An action slot's cgroup: limits in, processes born or joined in it, usage out.

    ``resident`` is the pid of a process that stays in it between actions (the slot's
    spawner): :meth:`pids` leaves it out and the pids limit counts it on top."""

    def __init__(self, parent: WorkerCgroups, name: str) -> None:
        self.name = name
        self._suffix = f"/{parent.name}/{name}"
        self.version = parent.layout.version
        self.dirs = {c: d / name for c, d in parent.dirs.items()}
        self.resident: int | None = None
        self._limits: tuple[int | None, float | None, int | None] | None = None
        self._used = False
        self._start_cpu_s, self._start_oom_kills = 0.0, 0
        self._created: list[Path] = []
        # Descriptors of the files read (and the peak reset written) for every action:
        # a pread on a kept descriptor costs a microsecond or two, opening the file each
        # time tens of microseconds, and an action reads about ten of them.
        self._kept: dict[tuple[Path, int], int] = {}
        for directory in dict.fromkeys(self.dirs.values()):
            try:
                directory.mkdir()
            except OSError as exc:
                self.remove()
                raise CgroupError(f"cgroups: cannot create {directory}: {exc.strerror}; "
                                  "check the worker's cgroup permissions") from exc
            self._created.append(directory)

    @property
    def procs_files(self) -> list[str]:
        """Every ``cgroup.procs`` the helper must join (one per hierarchy)."""
        return [str(d / "cgroup.procs") for d in self._created]

    def limit(self, memory_bytes: int | None, cpus: float | None, pids: int | None) -> None:
        """Set the limits (``None``: none); a slot keeps them, so only changes are written."""
        if self._limits == (memory_bytes, cpus, pids):
            return
        self._limits = None  # until every write below has gone through
        memory, cpu, tasks = self.dirs["memory"], self.dirs["cpu"], self.dirs["pids"]
        unlimited = "max" if self.version == 2 else "-1"
        if memory_bytes is None:
            # v1 refuses a memory limit below the memsw one: lift memsw first.
            for name in (("memory.swap.max", "memory.max") if self.version == 2 else
                         ("memory.memsw.limit_in_bytes", "memory.limit_in_bytes")):
                if (memory / name).exists():
                    _write(memory / name, unlimited)
        if cpus is None:
            if self.version == 2:
                _write(cpu / "cpu.max", f"max {_CPU_PERIOD_US}")
            else:
                _write(cpu / "cpu.cfs_quota_us", "-1")
        if pids is None:
            _write(tasks / "pids.max", "max")
        if self.version == 2:
            if memory_bytes is not None:
                _write(memory / "memory.max", str(memory_bytes))
                if (memory / "memory.swap.max").exists():
                    _write(memory / "memory.swap.max", "0")
            if cpus is not None:
                _write(cpu / "cpu.max", f"{max(1000, int(cpus * _CPU_PERIOD_US))} "
                                        f"{_CPU_PERIOD_US}")
        else:
            if memory_bytes is not None:
                memsw = memory / "memory.memsw.limit_in_bytes"
                # Without swap accounting the limit is on RAM alone; with it, on both
                # (memsw never below the RAM limit: lowered last, raised first).
                if memsw.exists():
                    _write(memsw, "-1")
                _write(memory / "memory.limit_in_bytes", str(memory_bytes))
                if memsw.exists():
                    _write(memsw, str(memory_bytes))
            if cpus is not None:
                _write(cpu / "cpu.cfs_period_us", str(_CPU_PERIOD_US))
                _write(cpu / "cpu.cfs_quota_us", str(max(1000, int(cpus * _CPU_PERIOD_US))))
        if pids is not None:
            _write(tasks / "pids.max", str(pids + (self.resident is not None)))
        self._limits = (memory_bytes, cpus, pids)

    def _descriptor(self, path: Path, flags: int) -> int:
        fd = self._kept.get((path, flags))
        if fd is None:
            fd = self._kept[path, flags] = os.open(path, flags | os.O_CLOEXEC)
        return fd

    def _read(self, path: Path, keep: bool = True) -> str | None:
        """The file's whole text, read afresh; through a kept descriptor with ``keep``
        (not for a list of processes: v1 reuses the list an open file first read)."""
        fd = -1
        try:
            fd = self._descriptor(path, os.O_RDONLY) if keep else \
                os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            chunks = [os.pread(fd, 65536, 0)]
            while len(chunks[-1]) == 65536:
                chunks.append(os.pread(fd, 65536, 65536 * len(chunks)))
        except OSError:
            return None
        finally:
            if not keep and fd >= 0:
                os.close(fd)
        return b"".join(chunks).decode()

    def _write(self, path: Path, value: str) -> None:
        try:
            os.pwrite(self._descriptor(path, os.O_WRONLY), value.encode(), 0)
        except OSError as exc:
            raise CgroupError(f"cgroups: cannot write {value!r} to {path}: "
                              f"{exc.strerror}") from exc

    def pids(self) -> list[int]:
        """The processes in it, but its resident."""
        text = self._read(self.dirs["pids"] / "cgroup.procs", keep=False) or ""
        return [pid for pid in map(int, text.split()) if pid != self.resident]

    def memory_in_use(self) -> int | None:
        """Bytes charged to it now (page cache included)."""
        name = "memory.current" if self.version == 2 else "memory.usage_in_bytes"
        text = self._read(self.dirs["memory"] / name)
        return int(text) if text and text.strip().isdigit() else None

    def start_usage(self) -> bool:
        """Begin an action's accounting: the peak is reset, the counters noted (usage is
        then read as a difference). False if the peak cannot be reset (v2 before Linux
        6.12): then the cgroup must serve a single action."""
        if self._used:
            memory = self.dirs["memory"]
            try:
                if self.version == 2:
                    self._write(memory / "memory.peak", "reset")
                else:
                    self._write(memory / "memory.max_usage_in_bytes", "0")
            except CgroupError:
                return False
        self._used = True
        cpu_s, _, oom_kills = self._counters()
        self._start_cpu_s, self._start_oom_kills = cpu_s or 0.0, oom_kills or 0
        return True

    def holds(self, pid: int) -> bool:
        """Whether ``pid`` is in this cgroup (checked after a pidfd pinned it)."""
        text = _read(Path(f"/proc/{pid}/cgroup")) or ""
        return f"{self._suffix}\n" in text or text.endswith(self._suffix)

    def usage(self) -> CgroupUsage:
        """What the action used since :meth:`start_usage`."""
        cpu_s, peak, oom_kills = self._counters()
        if cpu_s is not None:
            cpu_s = max(0.0, cpu_s - self._start_cpu_s)
        return CgroupUsage(cpu_s, peak, (oom_kills or 0) > self._start_oom_kills)

    def _counters(self) -> tuple[float | None, int | None, int | None]:
        memory = self.dirs["memory"]
        read = self._read
        if self.version == 2:
            usec = _stat_field(read(self.dirs["cpu"] / "cpu.stat"), "usage_usec")
            cpu_s = usec / 1e6 if usec is not None else None
            peak_text = read(memory / "memory.peak")
            oom = _stat_field(read(memory / "memory.events"), "oom_kill")
        else:
            cpu_s = None
            if "cpuacct" in self.dirs:
                nanos = read(self.dirs["cpuacct"] / "cpuacct.usage")
                cpu_s = int(nanos) / 1e9 if nanos else None
            peak_text = read(memory / "memory.max_usage_in_bytes")
            oom = _stat_field(read(memory / "memory.oom_control"), "oom_kill")
        peak = int(peak_text) if peak_text and peak_text.strip().isdigit() else None
        return cpu_s, peak, oom

    def remove(self) -> list[str]:
        """Remove the directories; the ones that would not go (with the reason)."""
        for fd in self._kept.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._kept.clear()
        left = []
        for directory in reversed(self._created):
            try:
                directory.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                left.append(f"{directory}: {exc.strerror}")
        self._created = []
        return left


def remove_stale(layout: CgroupLayout, alive: Iterable[int] = ()) -> None:
    """Remove the empty ``rex-linux-<pid>`` cgroups of workers that are gone."""
    keep = {f"rex-linux-{pid}" for pid in alive}
    for base in set(layout.bases.values()):
        with contextlib.suppress(OSError):
            for directory in base.glob("rex-linux-*"):
                pid = directory.name.rpartition("-")[2]
                if directory.name in keep or (pid.isdigit() and _alive(int(pid))):
                    continue
                with contextlib.suppress(OSError):
                    for child in directory.iterdir():
                        if child.is_dir():
                            child.rmdir()
                    directory.rmdir()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
