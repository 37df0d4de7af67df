"""The linux sandbox on its own: real bubblewrap and cgroups, one ``run`` at a time."""

from __future__ import annotations

import os
import socket
import stat
import sys
from pathlib import Path

import pytest

from rexcore.artifacts.digest import digest_of
from rexcore.artifacts.disk import DiskBlobStore
from rexcore.core.daemon import DaemonError
from rexcore.plugins.descriptors import ProbeResult, SandboxDescriptor
from rexcore.plugins.manager import PluginManager
from rexcore.sandbox.interface import SandboxRequest
from rexcore.sandbox.select import SandboxUnavailableError, create_sandbox, select_sandbox
from rexcore.serialization.action import Directory, FileNode, canonical_bytes
from rexcore.serialization.sandbox_spec import SandboxSpec
from rexcore.testing import start_rexd
from rexcore.worker.staging import InputStager
from rex_sandbox_linux import plugin
from rex_sandbox_linux.cgroups import detect_cgroups
from rex_sandbox_linux.errors import CgroupError
from rex_sandbox_linux.options import LinuxSandboxOptions
from rex_sandbox_linux.sandbox import LinuxSandbox, probe_linux_sandbox
from tests_linux_support import host_namespace

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


def request(root: Path, script: str, **spec: object) -> SandboxRequest:
    return SandboxRequest(exec_root=root, arguments=("/bin/sh", "-c", script),
                          environment=(("PATH", "/usr/bin:/bin"), ("ONLY", "this")),
                          working_directory="", spec=SandboxSpec(**spec),
                          stdout_path=root.parent / "stdout", stderr_path=root.parent / "stderr")


def out(root: Path) -> str:
    return (root.parent / "stdout").read_text()


def err(root: Path) -> str:
    return (root.parent / "stderr").read_text()


async def test_the_probe_passes_here_and_auto_picks_linux_over_process():
    assert probe_linux_sandbox() == ProbeResult.ok()
    plugins = PluginManager()
    plugins.register_builtins()
    plugins.register(plugin, name="rex-sandbox-linux")
    assert select_sandbox(plugins, "auto").descriptor.name == "linux"


async def test_every_namespace_is_new_and_the_action_is_unprivileged(linux_sandbox, exec_root):
    kinds = ["user", "mnt", "pid", "ipc", "uts", "net", "cgroup"]
    script = ("for k in " + " ".join(kinds) + "; do readlink /proc/self/ns/$k; done; "
              "hostname; id -u; grep -E '^(NoNewPrivs|CapEff|CapPrm|CapBnd)' /proc/self/status; "
              "ls /proc/self/fd; env | sort; ls /proc | grep -cE '^[0-9]+$'")
    result = await linux_sandbox.run(request(exec_root, script))
    assert result.exit_code == 0, err(exec_root)
    lines = out(exec_root).splitlines()
    for kind, seen in zip(kinds, lines, strict=False):
        assert seen != host_namespace(kind), kind
    hostname, uid, *rest = lines[len(kinds):]
    assert hostname == "rex-sandbox" and uid != "0"
    status = dict(line.split(":\t") for line in rest[:4])
    assert status["NoNewPrivs"] == "1"
    assert status["CapEff"] == status["CapPrm"] == status["CapBnd"] == "0000000000000000"
    fds, env = rest[4:8], rest[8:]
    assert fds[:3] == ["0", "1", "2"] and fds[3] == "3"  # 3 is ls's own directory
    assert env[:3] == ["ONLY=this", "PATH=/usr/bin:/bin", "PWD=" + str(exec_root)]
    assert int(env[-1]) <= 4  # the pid namespace holds only the action's few processes


async def test_system_dirs_are_read_only_and_etc_is_minimal(linux_sandbox, exec_root):
    script = ("touch /usr/x 2>&1; ls /etc; test -e /etc/shadow && echo SHADOW; "
              "ls /root /home /var 2>&1 | head -3; echo tmp > /tmp/t && cat /tmp/t")
    result = await linux_sandbox.run(request(exec_root, script))
    text = out(exec_root)
    assert "Read-only file system" in text
    assert "SHADOW" not in text and "shadow" not in text
    assert "passwd" in text and "ld.so.cache" in text
    assert "No such file or directory" in text and text.endswith("tmp\n")
    assert result.exit_code == 0


async def test_host_gcc_builds_and_runs_a_program(linux_sandbox, exec_root):
    (exec_root / "hello.c").write_text('#include <stdio.h>\nint main(){puts("hi");}\n')
    script = "gcc -o hello hello.c && ./hello"
    result = await linux_sandbox.run(request(exec_root, script, timeout_s=60))
    assert result.exit_code == 0, err(exec_root)
    assert out(exec_root) == "hi\n"


async def test_staged_inputs_cannot_be_modified_and_the_cached_blob_stays_intact(
        linux_sandbox, tmp_path):
    store = await DiskBlobStore(tmp_path / "cas").open()
    try:
        data = b"precious"
        await store.put(digest_of(data), data)
        root_dir = canonical_bytes(Directory((FileNode("input.txt", digest_of(data)),), (), ()))
        await store.put(digest_of(root_dir), root_dir)
        stager = InputStager(store, None)  # type: ignore[arg-type]
        exec_root = tmp_path / "exec" / "root"
        staged = await stager.stage(digest_of(root_dir), exec_root)
        cached = store.local_path(digest_of(data))
        assert cached is not None and os.path.samefile(exec_root / "input.txt", cached)
        attack = ("echo evil > input.txt; chmod 666 input.txt; echo evil >> input.txt; "
                  "truncate -s 0 input.txt; rm -f input.txt; echo new > input.txt; "
                  "cat input.txt")
        result = await linux_sandbox.run(request(exec_root, attack))
        assert "Permission denied" in err(exec_root) or "Operation not permitted" in err(exec_root)
        assert result.exit_code == 0  # the exec root itself is writable: a new file is fine
        assert out(exec_root) == "new\n"
        assert cached.read_bytes() == data
        assert stat.S_IMODE(cached.stat().st_mode) == 0o444
        staged.release()
    finally:
        await store.close()


async def test_an_oom_kill_is_reported_and_counted(linux_sandbox, exec_root):
    script = "python3 -c 'x = bytearray(400 << 20); print(len(x))'"
    result = await linux_sandbox.run(request(exec_root, script, memory_bytes=128 << 20))
    assert result.oom_killed and result.exit_code == 137
    assert "out of memory" in result.message
    assert result.peak_memory_bytes is not None and result.peak_memory_bytes <= 128 << 20
    fine = await linux_sandbox.run(request(exec_root, "echo fine"))
    assert fine.exit_code == 0 and not fine.oom_killed and fine.cpu_s is not None


async def test_usage_is_counted_per_action_on_a_reused_slot(linux_sandbox, exec_root):
    big = await linux_sandbox.run(request(
        exec_root, "python3 -c 'x = bytearray(96 << 20); x[::4096] = b\"x\" * len(x[::4096])'"))
    small = await linux_sandbox.run(request(exec_root, "true"))
    assert big.exit_code == 0 and small.exit_code == 0
    assert len(linux_sandbox._free_slots) == 1  # both ran in the same slot
    assert big.peak_memory_bytes is not None and big.peak_memory_bytes >= 96 << 20
    assert small.peak_memory_bytes is not None and small.peak_memory_bytes < 48 << 20
    assert big.cpu_s is not None and small.cpu_s is not None and small.cpu_s < big.cpu_s


async def test_each_action_gets_a_fresh_network_namespace_it_cannot_change(
        linux_sandbox, exec_root):
    """As root, a slot's spawner makes each action's network namespace ahead of time:
    a new one per action all the same, only loopback, up, and not the action's to
    reconfigure."""
    (exec_root / "down.py").write_text(
        "import fcntl, socket, struct\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "try:\n"
        "    fcntl.ioctl(s, 0x8914, struct.pack('16sh14x', b'lo', 0))  # SIOCSIFFLAGS: down\n"
        "    print('changed')\n"
        "except OSError as e:\n"
        "    print('refused', e.errno)\n")
    script = ("readlink /proc/self/ns/net; tail -n +3 /proc/net/dev | cut -d: -f1 | "
              "tr -d ' '; python3 down.py; python3 -c 'import socket; s = socket.socket(); "
              "s.bind((\"127.0.0.1\", 40123)); s.listen(); "
              "socket.create_connection((\"127.0.0.1\", 40123)); print(\"loopback\")'")
    seen = []
    for _ in range(3):
        result = await linux_sandbox.run(request(exec_root, script))
        assert result.exit_code == 0, err(exec_root)
        namespace, *rest = out(exec_root).split("\n")
        assert rest == ["lo", "refused 1", "loopback", ""]  # EPERM
        seen.append(namespace)
    assert len(linux_sandbox._free_slots) == 1  # all three in the same slot
    # Each was made while the one before still ran, so the two cannot be one namespace
    # (a freed namespace's number may come back later, so only neighbours are compared).
    assert all(a != b for a, b in zip(seen, seen[1:]))
    assert os.readlink("/proc/self/ns/net") not in seen


def test_directories_are_handed_over_past_the_inline_budget(tmp_path):
    from rex_sandbox_linux.sandbox import _give_directories

    root = tmp_path / "root"
    for n in range(40):
        (root / f"d{n}" / "inner").mkdir(parents=True)
    (root / "file").write_text("cached")
    owner = (65534, 65534)
    left = _give_directories([str(root)], owner, budget=16)
    assert left
    assert _give_directories(left, owner) == []
    every = [root, *root.glob("d*"), *root.glob("d*/inner")]
    assert len(every) == 81 and all(p.stat().st_uid == 65534 for p in every)
    assert (root / "file").stat().st_uid == os.geteuid()  # files are never handed over


async def test_a_memory_request_above_the_maximum_gets_the_maximum(tmp_path, exec_root):
    sandbox = LinuxSandbox(LinuxSandboxOptions(max_memory=128 << 20), data_dir=tmp_path)
    try:
        script = "python3 -c 'x = bytearray(300 << 20)'"
        result = await sandbox.run(request(exec_root, script, memory_bytes=4 << 30))
        assert result.oom_killed
    finally:
        await sandbox.close()


async def test_the_pids_limit_contains_a_fork_bomb(linux_sandbox, exec_root):
    # Guard first: own pid namespace, so the bomb can only ever hit the sandbox.
    check = await linux_sandbox.run(request(exec_root, "readlink /proc/self/ns/pid"))
    assert check.exit_code == 0 and out(exec_root).strip() != host_namespace("pid")
    bomb = "b() { b | b & }; b; sleep 2; echo survived"
    result = await linux_sandbox.run(request(exec_root, bomb, pids=64, timeout_s=20))
    assert "fork" in err(exec_root) or "Resource temporarily unavailable" in err(exec_root)
    assert result.exit_code is not None and not result.timed_out


async def test_a_cpu_quota_bounds_the_cpu_time_of_two_burners(linux_sandbox, exec_root):
    script = "(while :; do :; done) & (while :; do :; done) & sleep 1.5; kill 0"
    result = await linux_sandbox.run(request(exec_root, script, cpus=0.2, timeout_s=20))
    assert result.cpu_s is not None
    assert result.cpu_s < 0.9  # unlimited, two burners would use up to 3 CPU seconds


async def test_a_timeout_stops_a_tree_that_ignores_sigterm_and_empties_the_cgroup(
        linux_sandbox, exec_root):
    script = ("trap '' TERM; (trap '' TERM; setsid sh -c 'trap \"\" TERM; sleep 300' &) ; "
              "echo started; sleep 300")
    result = await linux_sandbox.run(request(exec_root, script, timeout_s=0.5))
    assert result.timed_out and result.exit_code == 137
    assert out(exec_root) == "started\n"
    spawners = {slot.pid for slot in linux_sandbox._free_slots}
    leftovers = [(p, pid) for d in linux_sandbox._cgroups.dirs.values() for p in d.iterdir()
                 if p.is_dir() for pid in (p / "cgroup.procs").read_text().split()
                 if int(pid) not in spawners]
    assert not leftovers  # each action's cgroup holds nothing but its slot's spawner


async def test_the_network_is_off_unless_asked_for_and_allowed(tmp_path, exec_root):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    probe = (f"python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", {port}), "
             "timeout=2); print(\"connected\")'")
    strict = LinuxSandbox(LinuxSandboxOptions(), data_dir=tmp_path / "a")
    open_ = LinuxSandbox(LinuxSandboxOptions(allow_network=True), data_dir=tmp_path / "b")
    try:
        off = await strict.run(request(exec_root, probe))
        assert off.exit_code != 0 and "connected" not in out(exec_root)
        refused = await strict.run(request(exec_root, probe, network=True))
        assert refused.exit_code == 126 and "allow_network" in refused.message
        assert "allow_network" in err(exec_root)
        on = await open_.run(request(exec_root, probe, network=True))
        assert on.exit_code == 0 and out(exec_root) == "connected\n", err(exec_root)
    finally:
        listener.close()
        await strict.close()
        await open_.close()


async def test_the_command_is_pid_1_and_a_sigterm_it_handles_reaches_it(
        linux_sandbox, exec_root):
    script = ("trap 'echo got-term; exit 3' TERM; echo pid $$; "
              "while true; do sleep 0.05; done")
    result = await linux_sandbox.run(request(exec_root, script, timeout_s=1))
    assert result.timed_out
    assert out(exec_root).splitlines()[0] == "pid 1" and "got-term" in out(exec_root)


async def test_temp_dirs_of_the_spec_are_fresh_tmpfs(linux_sandbox, exec_root):
    (exec_root / "scratch").mkdir()
    (exec_root / "scratch" / "old").write_text("stale")
    script = "ls scratch; stat -f -c %T scratch; echo x > scratch/new"
    result = await linux_sandbox.run(request(exec_root, script, temp_dirs=("scratch",)))
    assert result.exit_code == 0, err(exec_root)
    assert out(exec_root) == "tmpfs\n"
    assert not (exec_root / "scratch" / "new").exists()


def test_cgroup_detection_names_the_missing_controllers():
    v1_memory_only = ("30 25 0:26 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n")
    with pytest.raises(CgroupError, match="no cgroup v1 hierarchy for cpu, pids"):
        detect_cgroups(v1_memory_only, "4:memory:/\n")


def test_cgroup_detection_prefers_v2_with_its_controllers(tmp_path):
    (tmp_path / "worker").mkdir()
    (tmp_path / "worker" / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    mountinfo = f"30 25 0:26 / {tmp_path} rw - cgroup2 cgroup2 rw\n"
    layout = detect_cgroups(mountinfo, "0::/worker\n")
    assert layout.version == 2 and layout.bases["memory"] == tmp_path / "worker"


def test_cgroup_detection_finds_this_hosts_v1_hierarchies():
    layout = detect_cgroups()
    assert layout.version == 1  # this machine: v1 memory, cpu and pids, empty v2
    assert {"memory", "cpu", "pids"} <= set(layout.bases)


def _broken_sandboxes(allow: bool):
    import attrs

    @attrs.frozen
    class Options:
        allow_fallback: bool = False

    class Broken:
        @staticmethod
        def rexcore_sandboxes():
            yield SandboxDescriptor(name="broken", factory=lambda o, c: None, options_type=Options,
                                    probe=lambda: ProbeResult.unavailable("no namespaces"),
                                    preference=50)

    from rexcore import hookimpl

    Broken.rexcore_sandboxes = staticmethod(hookimpl(Broken.rexcore_sandboxes))
    plugins = PluginManager()
    plugins.register_builtins()
    plugins.register(Broken, name="broken-sandbox")
    return plugins, {"allow_fallback": allow}


def test_a_sandbox_that_cannot_run_is_refused_unless_it_allows_a_fallback(tmp_path):
    from rexcore.plugins.descriptors import ComponentContext

    plugins, strict = _broken_sandboxes(False)
    with pytest.raises(SandboxUnavailableError, match="no namespaces"):
        select_sandbox(plugins, "broken", strict)
    plugins, lenient = _broken_sandboxes(True)
    assert select_sandbox(plugins, "broken", lenient).descriptor.name == "process"
    sandbox = create_sandbox(plugins, "broken", ComponentContext(data_dir=tmp_path), lenient)
    assert sandbox.name == "process"


async def test_rexd_refuses_to_start_local_workers_with_a_sandbox_that_cannot_run(tmp_path):
    plugins, _ = _broken_sandboxes(False)
    config = {"pool": {"target_workers": 1, "sandbox": "broken"}}
    with pytest.raises(DaemonError, match="pool.sandbox: .*no namespaces"):
        running = await start_rexd(plugins, tmp_path / "rexd", config)
        await running.daemon.stop()
