"""The built-in ``process`` sandbox, against real processes."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from rexcore import hookimpl
from rexcore.plugins.descriptors import ComponentContext, ProbeResult, SandboxDescriptor
from rexcore.sandbox.interface import Sandbox, SandboxRequest
from rexcore.sandbox.process import ProcessSandbox, ProcessSandboxOptions
from rexcore.sandbox.select import SandboxUnavailableError, create_sandbox, select_sandbox
from rexcore.serialization.sandbox_spec import SandboxSpec

pytestmark = pytest.mark.skipif(os.name != "posix", reason="these actions are POSIX shell")
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="process-tree walking is Linux only")

REPO = Path(__file__).resolve().parent.parent


def alive(pid: int) -> bool:
    """Running (a zombie waiting for init to reap it is dead)."""
    if sys.platform.startswith("linux"):
        try:
            with open(f"/proc/{pid}/stat") as file:
                state = file.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return False
        return state not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def gone(pid: int, patience_s: float = 10.0) -> bool:
    """Dead, or dying: SIGKILL is delivered asynchronously, so allow it a moment."""
    deadline = time.monotonic() + patience_s
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture(params=["auto", "off"], ids=["helper", "fork"])
def sandbox(request) -> ProcessSandbox:
    """Both ways of starting an action: the rex-spawn helper, and forking the worker."""
    sandbox = ProcessSandbox(ProcessSandboxOptions(
        # In-process: the test runner must not become a subreaper that kills its
        # children; as the runner's own user, so the tests may run this very Python.
        kill_grace_s=0.5, adopt_orphans=False, user="self", spawn_helper=request.param))
    if request.param == "auto" and sandbox._helper is None:
        pytest.skip("no C compiler to build the rex-spawn helper")
    return sandbox


@pytest.fixture
def exec_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    return root


def request(exec_root: Path, *argv: str, env: dict[str, str] | None = None,
            workdir: str = "", **limits) -> SandboxRequest:
    return SandboxRequest(
        exec_root=exec_root, arguments=argv, environment=tuple(sorted((env or {}).items())),
        working_directory=workdir, spec=SandboxSpec(**limits),
        stdout_path=exec_root.parent / "stdout", stderr_path=exec_root.parent / "stderr",
    )


def out(exec_root: Path, name: str = "stdout") -> bytes:
    return (exec_root.parent / name).read_bytes()


async def test_the_environment_is_exactly_the_one_given(sandbox, exec_root):
    result = await sandbox.run(request(exec_root, "/usr/bin/env",
                                       env={"B": "two words", "A": "1"}))
    assert result.exit_code == 0
    assert out(exec_root) == b"A=1\nB=two words\n"


async def test_an_empty_environment_inherits_nothing(sandbox, exec_root, monkeypatch):
    monkeypatch.setenv("REX_SECRET_OF_THE_WORKER", "x")
    result = await sandbox.run(request(exec_root, "/usr/bin/env"))
    assert result.exit_code == 0
    assert out(exec_root) == b""


async def test_runs_in_the_working_directory_with_relative_commands(sandbox, exec_root):
    (exec_root / "pkg").mkdir()
    tool = exec_root / "pkg" / "tool.sh"
    tool.write_text("#!/bin/sh\npwd\n")
    tool.chmod(0o755)
    result = await sandbox.run(request(exec_root, "./tool.sh", workdir="pkg"))
    assert result.exit_code == 0
    assert out(exec_root).decode().strip() == str((exec_root / "pkg").resolve())


async def test_stdin_is_dev_null_so_cat_returns_at_once(sandbox, exec_root):
    result = await sandbox.run(request(exec_root, "/bin/cat", timeout_s=60))
    assert not result.timed_out
    assert result.exit_code == 0
    assert out(exec_root) == b""


async def test_stdout_and_stderr_are_captured_including_megabytes(sandbox, exec_root):
    script = "head -c 5000000 /dev/zero; echo oops >&2; head -c 3000000 /dev/zero >&2"
    result = await sandbox.run(request(exec_root, "/bin/sh", "-c", script))
    assert result.exit_code == 0
    assert out(exec_root) == b"\0" * 5_000_000
    assert out(exec_root, "stderr") == b"oops\n" + b"\0" * 3_000_000


async def test_actions_start_with_default_signal_dispositions(sandbox, exec_root):
    # Python ignores SIGPIPE and SIGXFSZ, and an ignored signal stays ignored across exec:
    # `yes | head -1` must end by SIGPIPE, not loop on EPIPE.
    script = "grep -E '^Sig(Ign|Blk)' /proc/self/status; yes | head -1"
    result = await sandbox.run(request(exec_root, "/bin/sh", "-c", script, timeout_s=30))
    assert result.exit_code == 0 and not result.timed_out
    if sys.platform.startswith("linux"):
        fields = dict(line.split(":\t") for line in out(exec_root).decode().splitlines()[:2])
        pipe, xfsz = 1 << (13 - 1), 1 << (25 - 1)  # bits of SIGPIPE and SIGXFSZ
        assert int(fields["SigIgn"], 16) & (pipe | xfsz) == 0
        assert int(fields["SigBlk"], 16) == 0


def _helper_sandbox() -> ProcessSandbox:
    """A sandbox that starts actions through the rex-spawn helper (skips without one)."""
    sandbox = ProcessSandbox(ProcessSandboxOptions(adopt_orphans=False, user="self"))
    if sandbox._helper is None:
        pytest.skip("no C compiler to build the rex-spawn helper")
    return sandbox


@linux_only
async def test_the_resident_spawner_starts_actions_as_children_of_the_worker(exec_root):
    sandbox = _helper_sandbox()
    try:
        script = "echo $PPID; cut -d' ' -f4 /proc/$PPID/stat"  # the helper, its parent
        result = await sandbox.run(request(exec_root, "/bin/sh", "-c", script,
                                           env={"PATH": "/usr/bin:/bin"}))
        assert result.exit_code == 0
        spawner = sandbox._spawner
        assert spawner is not None and spawner.pid > 0
        helper, helpers_parent = (int(word) for word in out(exec_root).split())
        assert helpers_parent == os.getpid()  # CLONE_PARENT: the worker's own child
        assert helper != spawner.pid
        # A spawner that died is replaced; the action runs all the same.
        os.kill(spawner.pid, 9)
        os.waitpid(spawner.pid, 0)  # noqa: ASYNC222 (SIGKILLed: returns at once)
        spawner.pid = 0
        result = await sandbox.run(request(exec_root, "/bin/echo", "again"))
        assert result.exit_code == 0 and out(exec_root) == b"again\n"
        result = await sandbox.run(request(exec_root, "/bin/echo", "and again"))
        assert out(exec_root) == b"and again\n"
        assert sandbox._spawner is not None and sandbox._spawner is not spawner
    finally:
        await sandbox.close()
    assert sandbox._spawner is None


@linux_only
@pytest.mark.parametrize("inline", [True, False], ids=["in-the-message", "in-a-memfd"])
async def test_the_spawner_passes_environments_big_and_small_exactly(exec_root, inline):
    """Requests up to 64 KiB travel in the spawner's message, bigger ones (and all, for a
    helper that only knows memfds) in a memfd: the environment arrives exactly."""
    sandbox = _helper_sandbox()
    try:
        await sandbox.run(request(exec_root, "/bin/true"))  # starts the spawner
        assert sandbox._spawner is not None and sandbox._spawner.inline
        sandbox._spawner.inline = inline
        for size in (10, 120_000):  # a string of execve takes at most 128 KiB
            env = {"A": "1 two", "BIG": "x" * size, "EMPTY": ""}
            result = await sandbox.run(request(exec_root, "/usr/bin/env", env=env))
            assert result.exit_code == 0, out(exec_root, "stderr")
            assert out(exec_root) == b"A=1 two\nBIG=" + b"x" * size + b"\nEMPTY=\n"
            assert sandbox._spawner is not None and sandbox._spawner.inline == inline
    finally:
        await sandbox.close()


async def test_a_file_that_cannot_be_executed_is_exit_126_with_a_message(sandbox, exec_root):
    data = exec_root / "data.txt"
    data.write_text("not a program\n")
    data.chmod(0o644)
    result = await sandbox.run(request(exec_root, "./data.txt"))
    assert result.exit_code == 126
    assert b"data.txt" in out(exec_root, "stderr")
    assert "cannot execute" in result.message


@linux_only
async def test_many_actions_in_a_row_leave_no_process_behind(exec_root):
    sandbox = _helper_sandbox()
    try:
        for number in range(50):
            result = await sandbox.run(request(exec_root, "/bin/sh", "-c", f"exit {number % 3}"))
            assert result.exit_code == number % 3
        spawner = sandbox._spawner
        assert spawner is not None
        me = os.getpid()
        children = {int(pid) for pid in Path(f"/proc/{me}/task/{me}/children").read_text().split()}
        assert spawner.pid in children
        # No helper (a clone of the spawner) outlived its action.
        assert not [pid for pid in children - {spawner.pid} if alive(pid) and _is_rex_spawn(pid)]
    finally:
        await sandbox.close()


def _is_rex_spawn(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return b"rex-spawn" in file.read()
    except OSError:
        return False


def test_proc_files_are_read_whole_with_pread(tmp_path):
    from rexcore.sandbox.process import _pread_all, _proc_stat, _read_proc

    big = tmp_path / "big"
    big.write_bytes(bytes(range(256)) * 1000)  # more than one read's buffer
    fd = os.open(big, os.O_RDONLY)
    try:
        assert _pread_all(fd) == big.read_bytes()
        assert _pread_all(fd) == big.read_bytes()  # again, from the start
    finally:
        os.close(fd)
    assert _read_proc(str(tmp_path / "missing")) is None
    if sys.platform.startswith("linux"):
        state, parent, _ = _proc_stat(os.getpid())
        assert state in "RS" and parent == os.getppid()
        assert _proc_stat(2**22 + 12345) is None


@linux_only
async def test_a_prebuilt_helper_without_a_spawner_mode_still_runs_actions(exec_root, tmp_path):
    sandbox = _helper_sandbox()
    # An older helper: refuses -S as an unknown option.
    old = tmp_path / "old-rex-spawn"
    old.write_text(f"#!/bin/sh\ncase \"$1\" in -S*) exit 125;; esac\nexec {sandbox._helper} \"$@\"\n")
    old.chmod(0o755)
    sandbox = ProcessSandbox(ProcessSandboxOptions(adopt_orphans=False, user="self",
                                                   spawn_helper=str(old)))
    for _ in range(4):  # gives up on the spawner after a few tries
        result = await sandbox.run(request(exec_root, "/bin/echo", "hi"))
        assert result.exit_code == 0 and out(exec_root) == b"hi\n"
    assert sandbox._spawner is None and sandbox._spawner_starts == 0
    await sandbox.close()


async def test_an_environment_name_with_an_equals_sign_cannot_execute(sandbox, exec_root):
    result = await sandbox.run(request(exec_root, "/bin/true", env={"A=B": "1"}))
    assert result.exit_code == 126
    assert "cannot execute" in result.message


@pytest.mark.parametrize(("script", "code"), [
    ("exit 0", 0), ("exit 3", 3), ("exit 255", 255),
    ("kill -TERM $$", 143), ("kill -KILL $$", 137), ("kill -SEGV $$", 139),
])
async def test_exit_codes_and_signals_follow_the_shell_convention(sandbox, exec_root, script,
                                                                   code):
    result = await sandbox.run(request(exec_root, "/bin/sh", "-c", script))
    assert result.exit_code == code
    assert not result.timed_out


async def test_a_missing_command_is_exit_127_with_a_message_on_stderr(sandbox, exec_root):
    result = await sandbox.run(request(exec_root, "no-such-command-anywhere"))
    assert result.exit_code == 127
    assert b"no-such-command-anywhere" in out(exec_root, "stderr")


async def test_cpu_time_and_peak_memory_are_reported(sandbox, exec_root):
    hog = "x = bytearray(64 << 20); sum(range(2_000_000))"
    result = await sandbox.run(request(exec_root, sys.executable, "-c", hog))
    assert result.exit_code == 0
    assert result.cpu_s is not None and result.cpu_s > 0
    assert result.peak_memory_bytes is not None and result.peak_memory_bytes >= 64 << 20


async def test_peak_memory_through_the_helper_is_the_actions_not_the_workers(exec_root):
    sandbox = _helper_sandbox()
    ballast = bytearray(300 << 20)  # the worker grows; a forked child would be charged
    ballast[::4096] = b"x" * len(ballast[::4096])
    result = await sandbox.run(request(exec_root, "/bin/true"))
    assert result.exit_code == 0
    assert result.peak_memory_bytes is not None and result.peak_memory_bytes < 100 << 20


def _daemonizing_script(pid_file: Path, then: str) -> str:
    # setsid + double fork: the daemon ends up in a session of its own, its parent gone.
    return (f"setsid sh -c 'sleep 300 & echo $! > {pid_file}' & "
            f"while [ ! -s {pid_file} ]; do sleep 0.01; done; {then}")


@linux_only
async def test_timeout_kills_the_tree_including_a_daemonized_grandchild(sandbox, exec_root):
    pid_file = exec_root.parent / "daemon.pid"
    script = _daemonizing_script(pid_file, "sleep 300 & sleep 300")
    result = await sandbox.run(request(exec_root, "/bin/sh", "-c", script, timeout_s=1))
    assert result.timed_out
    assert result.exit_code in (143, 137)
    daemon = int(pid_file.read_text())
    assert gone(daemon)


async def test_a_child_ignoring_sigterm_is_killed_after_the_grace(sandbox, exec_root):
    pid_file = exec_root.parent / "stubborn.pid"
    script = f"trap '' TERM; sh -c 'trap \"\" TERM; echo $$ > {pid_file}; sleep 300' & wait"
    result = await sandbox.run(request(exec_root, "/bin/sh", "-c", script, timeout_s=1))
    assert result.timed_out
    assert result.exit_code == 137  # it ignored SIGTERM, so SIGKILL ended it
    assert gone(int(pid_file.read_text()))


async def test_cancellation_kills_the_tree(sandbox, exec_root):
    pid_file = exec_root.parent / "daemon.pid"
    script = _daemonizing_script(pid_file, "sleep 300")
    task = asyncio.ensure_future(sandbox.run(request(exec_root, "/bin/sh", "-c", script)))
    while not (pid_file.exists() and pid_file.read_text().strip()):
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await sandbox.wait_cleanups()
    if sys.platform.startswith("linux"):  # elsewhere a new session escapes (documented)
        assert gone(int(pid_file.read_text()))


async def test_background_children_die_when_the_command_exits(sandbox, exec_root):
    pid_file = exec_root.parent / "bg.pid"
    result = await sandbox.run(request(exec_root, "/bin/sh", "-c",
                                       f"sleep 300 & echo $! > {pid_file}"))
    assert result.exit_code == 0
    assert gone(int(pid_file.read_text()))


async def test_memory_limit_makes_a_hog_fail(sandbox, exec_root):
    hog = "x = bytearray(1 << 30)"
    limited = await sandbox.run(request(exec_root, sys.executable, "-c", hog,
                                        memory_bytes=256 << 20))
    assert limited.exit_code != 0
    assert b"MemoryError" in out(exec_root, "stderr")
    unlimited = await sandbox.run(request(exec_root, sys.executable, "-c", "x = bytearray(1 << 20)",
                                          memory_bytes=256 << 20))
    assert unlimited.exit_code == 0


async def test_no_core_dumps(sandbox, exec_root):
    result = await sandbox.run(request(exec_root, "/bin/sh", "-c", "ulimit -c"))
    assert out(exec_root).strip() == b"0"
    assert result.exit_code == 0


async def test_temp_dirs_of_the_spec_are_created(sandbox, exec_root):
    result = await sandbox.run(request(exec_root, "/bin/sh", "-c", "test -d tmp/a",
                                       temp_dirs=("tmp/a",)))
    assert result.exit_code == 0


@pytest.mark.skipif(os.name != "posix" or os.geteuid() != 0, reason="needs root")
@pytest.mark.parametrize("spawn_helper", ["auto", "off"])
async def test_as_root_actions_run_unprivileged_and_cannot_write_read_only_files(
    exec_root, spawn_helper
):
    sandbox = ProcessSandbox(ProcessSandboxOptions(user="auto", adopt_orphans=False,
                                                   spawn_helper=spawn_helper))
    (exec_root / "sub").mkdir()
    locked = exec_root / "sub" / "input"
    locked.write_text("original")
    locked.chmod(0o444)
    script = "id -u; echo changed > sub/input; chmod u+w sub/input; echo made > sub/new"
    result = await sandbox.run(request(exec_root, "/bin/sh", "-c", script))
    assert out(exec_root).split()[0] != b"0"
    assert locked.read_text() == "original"
    assert (exec_root / "sub" / "new").read_text() == "made\n"  # directories are its own
    assert result.exit_code == 0
    assert b"Operation not permitted" in out(exec_root, "stderr")  # the chmod


@pytest.mark.skipif(os.name != "posix" or os.geteuid() != 0, reason="needs root")
async def test_as_root_an_exec_dir_the_action_user_cannot_traverse_to_is_named_once(caplog):
    """Actions run as nobody: one whose exec dir lies under a private (0700) directory
    cannot reach its own files by absolute path, and the sandbox says which directory
    blocks it, once. (tmp_path lies under pytest's own 0700 directory, hence /tmp.)"""
    base = Path(tempfile.mkdtemp(prefix="rex-reach-"))
    try:
        base.chmod(0o755)
        private = base / "private"
        private.mkdir(mode=0o700)
        for parent in (base, private):
            (parent / "exec" / "root").mkdir(parents=True)
        sandbox = ProcessSandbox(ProcessSandboxOptions(user="auto", adopt_orphans=False))
        by_path = 'cd "$PWD" && echo reached'
        with caplog.at_level(logging.WARNING, logger="rexcore.sandbox.process"):
            reachable = base / "exec" / "root"
            result = await sandbox.run(request(reachable, "/bin/sh", "-c", by_path))
            assert (result.exit_code, out(reachable)) == (0, b"reached\n")
            assert not caplog.records
            blocked = private / "exec" / "root"
            for _ in range(2):
                result = await sandbox.run(request(blocked, "/bin/sh", "-c", by_path))
                assert result.exit_code != 0  # what the warning explains
        warnings = [r.getMessage() for r in caplog.records]
        assert len(warnings) == 1, warnings
        assert f"may not search {private} (mode 700)" in warnings[0]
        assert "/var/lib/rex" in warnings[0]
    finally:
        shutil.rmtree(base)


@linux_only
def test_the_worker_kills_daemons_left_behind_by_a_finished_action(tmp_path):
    """With ``adopt_orphans`` the worker process is a subreaper: a daemon whose action
    exited on its own is re-parented to the worker and killed. Run in a process of its
    own, as ``rexd worker`` would."""
    script = textwrap.dedent(f"""
        import asyncio
        from pathlib import Path
        from rexcore.sandbox.process import ProcessSandbox, ProcessSandboxOptions
        from tests._daemon_action import run_daemon_action

        async def main():
            root = Path({str(tmp_path)!r})
            sandbox = ProcessSandbox(ProcessSandboxOptions(adopt_orphans=True, user="self"))
            print(0, await run_daemon_action(sandbox, root, "daemon.pid"))

        asyncio.run(main())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
    assert done.returncode == 0, done.stderr
    code, daemon = map(int, done.stdout.split())
    assert code == 0
    assert gone(daemon)


@linux_only
def test_daemons_are_killed_when_actions_run_on_a_loop_in_another_thread(tmp_path):
    """The sweep reads the children of the thread group leader and of the threads that
    start actions: with the event loop in a thread of its own, a finished action's
    daemon is still found and killed; the resident spawner (a child of that thread, in
    the worker's session) is left alone and serves the next action."""
    script = textwrap.dedent(f"""
        import asyncio, threading
        from pathlib import Path
        from rexcore.sandbox.process import ProcessSandbox, ProcessSandboxOptions
        from tests._daemon_action import run_daemon_action

        async def main():
            root = Path({str(tmp_path)!r})
            sandbox = ProcessSandbox(ProcessSandboxOptions(adopt_orphans=True, user="self"))
            daemons = []
            spawners = []
            for number in range(2):
                daemons.append(await run_daemon_action(sandbox, root, f"daemon{{number}}.pid"))
                spawners.append(sandbox._spawner and sandbox._spawner.pid)
            print(*daemons, *spawners)
            await sandbox.close()

        thread = threading.Thread(target=lambda: asyncio.run(main()))
        thread.start()
        thread.join()
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
    assert done.returncode == 0, done.stderr
    first, second, spawner, same_spawner = map(int, done.stdout.split())
    assert gone(first) and gone(second)
    if spawner:  # with a C compiler: the same spawner served both actions
        assert same_spawner == spawner


# -- choosing a sandbox ---------------------------------------------------------------


def test_the_process_sandbox_is_built_in_with_preference_zero(plugin_manager):
    registered = plugin_manager.component("sandbox", "process")
    assert registered.descriptor.preference == 0
    assert registered.descriptor.availability().available


def test_auto_picks_the_available_sandbox_with_the_highest_preference(plugin_manager, register):
    class Plugin:
        @hookimpl
        def rexcore_sandboxes(self):
            yield SandboxDescriptor(name="great", factory=object, preference=100,
                                    probe=lambda: ProbeResult.unavailable("no bubblewrap"))
            yield SandboxDescriptor(name="good", factory=object, preference=10)

    register(Plugin(), name="sandboxes")
    assert select_sandbox(plugin_manager, "auto").descriptor.name == "good"
    assert select_sandbox(plugin_manager, "process").descriptor.name == "process"
    with pytest.raises(SandboxUnavailableError, match="no bubblewrap"):
        select_sandbox(plugin_manager, "great")
    with pytest.raises(SandboxUnavailableError, match="available: .*process"):
        select_sandbox(plugin_manager, "nonesuch")


def test_create_sandbox_structures_options_and_rejects_typos(plugin_manager, tmp_path):
    context = ComponentContext(data_dir=tmp_path)
    sandbox = create_sandbox(plugin_manager, "auto", context,
                             {"kill_grace_s": 0.1, "adopt_orphans": False, "spawn_helper": "off"})
    assert isinstance(sandbox, Sandbox)
    assert sandbox.options.kill_grace_s == 0.1
    assert not sandbox.hermetic
    with pytest.raises(Exception, match="kill_grace"):
        create_sandbox(plugin_manager, "process", context, {"kill_grace": 1})
