"""Hostile actions through a real worker (in-process rexd, a WorkerAgent serving it with
the linux sandbox). Each case asserts containment and that the worker keeps serving.

Destructive cases (fork bomb, ``kill -9 -1``, memory and disk fillers) first run a guard
action in the same test: it must show its own pid namespace and its limits holding
(a small fork flood fails at the pids limit); if not, the test fails before the
destructive action is ever submitted.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

from rexcore.core.remote_action import ExecutionResult, execute_remotely
from rexcore.serialization.sandbox_spec import SandboxSpec
from tests_linux_support import host_namespace

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")]


async def run(served, script: str, *, inputs: dict[str, object] | None = None,
              outputs: tuple[str, ...] = (), timeout_s: float = 30,
              properties: dict[str, str] | None = None, **limits: object) -> ExecutionResult:
    for name, content in (inputs or {}).items():
        path = served.workdir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, tuple):  # ("symlink", target)
            os.symlink(content[1], path)
        else:
            path.write_bytes(content)  # type: ignore[arg-type]
    spec = SandboxSpec(inputs=tuple(inputs or ()), outputs=outputs, timeout_s=timeout_s,
                       **limits)  # type: ignore[arg-type]
    return await execute_remotely(
        served.client, ["/bin/sh", "-c", script], workdir=served.workdir, spec=spec,
        environment={"PATH": "/usr/bin:/bin", "CASE": script}, properties=properties,
        do_not_cache=True, skip_cache_lookup=True, fetch_outputs=False)


async def still_serving(served) -> None:
    result = await run(served, "echo alive")
    assert result.status == "ok" and result.stdout == b"alive\n", result.message
    assert not served.task.done()


async def guard(served) -> None:
    """The action is in a pid namespace of its own and under its pids limit."""
    result = await run(served, "readlink /proc/self/ns/pid; (for i in $(seq 40); do "
                               "sleep 5 & done) 2>/dev/null; set -- /proc/[0-9]*; echo $#",
                       pids=16)
    lines = result.stdout.decode().split()
    assert result.status == "ok" and lines, result.message
    assert lines[0] != host_namespace("pid"), "not in a pid namespace of its own"
    assert 5 < int(lines[1]) <= 16, "the pids limit does not hold"


# -- resources -------------------------------------------------------------------------


async def test_fork_bomb(served):
    await guard(served)
    result = await run(served, "b() { b | b & }; b; sleep 1; echo contained", pids=64)
    assert result.status == "ok"
    await still_serving(served)


async def test_memory_hog(served):
    await guard(served)
    result = await run(served, "python3 -c 'x = bytearray(1 << 30)'", memory_bytes=128 << 20)
    assert result.result.execution_metadata.oom_killed and result.exit_code == 137
    assert result.status == "resource_exhausted" and "out of memory" in result.message
    await still_serving(served)


async def test_filling_tmp(served):
    await guard(served)
    result = await run(served, "dd if=/dev/zero of=/tmp/fill bs=1M count=1000 2>&1; df -k /tmp")
    # /tmp is a 64 MiB tmpfs here (and files are capped at 64 MiB): either limit stops it.
    assert b"File too large" in result.stdout or b"No space left" in result.stdout
    assert b"tmpfs              65536" in result.stdout
    await still_serving(served)


async def test_filling_the_disk(served):
    await guard(served)
    result = await run(served, "dd if=/dev/zero of=big bs=1M count=1000 2>&1; ls -l big")
    assert b"File too large" in result.stdout
    assert b" 67108864 " in result.stdout  # max_file_size (64 MiB) stopped it
    await still_serving(served)


async def test_cpu_burner_under_a_quota(served):
    result = await run(served, "(while :; do :; done) & (while :; do :; done) & sleep 1; "
                               "kill 0", cpus=0.2)
    assert result.result.execution_metadata.cpu_seconds < 0.9
    await still_serving(served)


async def test_megabytes_of_stdout(served):
    result = await run(served, "head -c 20000000 /dev/zero | tr '\\0' x")
    assert result.exit_code == 0 and len(result.stdout) == 20_000_000
    await still_serving(served)


# -- time and processes ----------------------------------------------------------------


async def test_sleeping_past_the_timeout(served):
    result = await run(served, "sleep 300", timeout_s=0.5)
    assert result.status == "deadline_exceeded"
    await still_serving(served)


async def test_a_child_that_ignores_sigterm(served):
    result = await run(served, "trap '' TERM; (trap '' TERM; sleep 300) & sleep 300",
                       timeout_s=0.5)
    assert result.status == "deadline_exceeded"
    await still_serving(served)


async def test_a_daemonized_grandchild_outliving_its_parent(served):
    marker = served.workdir / "daemon-pid"
    # 297: a duration no other test uses, so that only this action's daemon is looked for.
    result = await run(served, "(setsid sh -c 'sleep 297 & echo $! ' &) ; sleep 0.2")
    assert result.exit_code == 0
    # Its pid namespace died with the action: nothing of it is left on the host.
    leftovers = [p for p in os.listdir("/proc") if p.isdigit()
                 and b"sleep\x00297" in _cmdline(p)]
    assert not leftovers
    assert not marker.exists()
    await still_serving(served)


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


async def test_zombies(served):
    result = await run(served, "for i in 1 2 3; do (sleep 0.01 &) ; done; sh -c 'exec sleep 0.2' "
                               "& sleep 0.5; ps -eo stat 2>/dev/null | grep -c Z || true")
    assert result.exit_code == 0
    await still_serving(served)


async def test_kill_minus_nine_minus_one(served):
    await guard(served)
    result = await run(served, "kill -9 -1; echo still here")
    assert result.status == "ok"  # killed itself at most; the worker (this process) lives
    await still_serving(served)


async def test_waiting_on_stdin(served):
    result = await run(served, "cat; echo eof")
    assert result.exit_code == 0 and result.stdout == b"eof\n"
    await still_serving(served)


# -- files -----------------------------------------------------------------------------


async def test_writing_outside_the_declared_outputs(served):
    result = await run(served, "echo x > /usr/evil; echo y > /evil; echo z > ../evil; "
                               "echo ok > declared", outputs=("declared",))
    assert [f.path for f in result.result.output_files] == ["declared"]
    assert not Path("/usr/evil").exists() and not Path("/evil").exists()
    await still_serving(served)


async def test_modifying_a_staged_input(served):
    result = await run(served, "chmod 666 in.txt; echo evil > in.txt; cat in.txt",
                       inputs={"in.txt": b"precious input"})
    assert result.stdout == b"precious input"
    cas = served.rexd.runtime.data_dir / "cas"
    blobs = [p for p in cas.rglob("*") if p.is_file() and p.read_bytes() == b"precious input"]
    assert blobs and all(os.stat(p).st_mode & 0o777 == 0o444 for p in blobs)
    await still_serving(served)


async def test_reading_etc_shadow(served):
    result = await run(served, "cat /etc/shadow")
    assert result.exit_code != 0 and result.stdout == b""
    await still_serving(served)


async def test_reading_the_workers_blob_store(served):
    cas = served.rexd.runtime.data_dir / "cas"
    result = await run(served, f"ls {cas} 2>&1; ls -a {served.agent.data_dir} 2>&1")
    # Only the path down to the exec root exists: no store, no streams, no lock file.
    assert b"No such file or directory" in result.stdout
    assert result.stdout.split()[-3:] == [b".", b"..", b"exec"], result.stdout
    await still_serving(served)


async def test_an_input_symlink_pointing_outside_the_exec_root(served):
    result = await run(served, "cat link", inputs={"link": ("symlink", "/etc/shadow")})
    assert result.exit_code != 0 and result.stdout == b""
    await still_serving(served)


async def test_an_output_path_with_dotdot(served):
    with pytest.raises(Exception, match=r"\.\."):
        await run(served, "echo x > ../x", outputs=("../x",))
    await still_serving(served)


async def test_an_output_symlink_to_a_secret_is_uploaded_as_a_symlink(served):
    result = await run(served, "ln -s /etc/shadow secret", outputs=("secret",))
    assert [(s.path, s.target) for s in result.result.output_symlinks] == [
        ("secret", "/etc/shadow")]
    assert not result.result.output_files
    await still_serving(served)


async def test_a_fifo_as_an_output(served):
    result = await run(served, "mkfifo pipe", outputs=("pipe",))
    assert result.status != "ok" and "FIFO" in result.message
    await still_serving(served)


async def test_a_setuid_binary_gains_nothing(served):
    result = await run(served, "ls -l /usr/bin/su /usr/bin/passwd 2>/dev/null | head -1; "
                               "su -c id root </dev/null 2>&1; grep NoNewPrivs /proc/self/status; "
                               "cp /bin/true t && chmod u+s t && ls -l t")
    assert b"NoNewPrivs:\t1" in result.stdout
    assert b"uid=0" not in result.stdout
    await still_serving(served)


# -- the host --------------------------------------------------------------------------


async def test_reading_proc_1(served):
    result = await run(served, "cat /proc/1/cmdline | tr '\\0' ' '; ls /proc/1/root 2>&1")
    # pid 1 is the action's own command (bubblewrap's --as-pid-1), not the host's init
    assert result.stdout.startswith(b"/bin/sh -c cat /proc/1/cmdline")
    assert b"systemd" not in result.stdout and b"/sbin/init" not in result.stdout
    await still_serving(served)


async def test_connecting_to_a_host_port_with_the_network_off(served):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        result = await run(served, f"python3 -c 'import socket; socket.create_connection("
                                   f"(\"127.0.0.1\", {port}), timeout=2)' 2>&1; echo rc=$?")
        assert b"rc=1" in result.stdout and b"refused" in result.stdout.lower()
        asked = await run(served, "echo never", properties={"network": "on"})
        assert asked.exit_code == 126 and b"allow_network" in asked.stderr
    finally:
        listener.close()
    await still_serving(served)


async def test_reading_the_workers_environment_secrets(served, monkeypatch):
    monkeypatch.setenv("REX_TEST_SECRET", "hunter2")
    result = await run(served, "env; cat /proc/*/environ 2>/dev/null | tr '\\0' '\\n'")
    assert b"hunter2" not in result.stdout and b"REX_TEST_SECRET" not in result.stdout
    await still_serving(served)


async def test_inherited_file_descriptors(served):
    leaked = os.open("/etc/hostname", os.O_RDONLY)
    os.set_inheritable(leaked, True)
    try:
        result = await run(served, "ls /proc/self/fd")
        assert result.stdout.split() == [b"0", b"1", b"2", b"3"]  # 3: ls's own directory
    finally:
        os.close(leaked)
    await still_serving(served)
