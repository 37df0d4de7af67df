"""A real Bazel (Debian's bazel-bootstrap, installed by .ci/run) against a real rexd.

One workspace of genrules and a Starlark rule with a directory output is built locally,
then with ``--remote_executor`` against ``rexd serve`` (two local workers): every action
must run remotely and produce byte-identical outputs; after ``bazel clean`` the rebuild
must come entirely from the remote cache; a failing action must show its stderr and exit
code in Bazel's output.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

WORKSPACE = Path(__file__).parent / "bazel_workspace"
TARGETS = ["//:all"]
#: Actions Bazel runs for //:all (genrules + the tree rule), all of which must go remote.
ACTIONS = 6


def _bazel() -> str:
    found = shutil.which("bazel")
    if found is None:
        pytest.fail("bazel is not installed: `bash .ci/run` installs Debian's bazel-bootstrap "
                    "(or: apt-get install bazel-bootstrap)")
    return found


class Bazel:
    """A Bazel client with its own output root, shut down at the end."""

    def __init__(self, workspace: Path, output_root: Path) -> None:
        self.workspace = workspace
        self.startup = [_bazel(), f"--output_user_root={output_root}", "--max_idle_secs=120"]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("BAZEL")}
        self.env["HOME"] = str(output_root.parent)

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([*self.startup, *args], cwd=self.workspace, env=self.env,
                                capture_output=True, text=True, timeout=300)
        if check and result.returncode != 0:
            raise AssertionError(f"bazel {' '.join(args)} failed ({result.returncode}):\n"
                                 f"{result.stderr[-4000:]}")
        return result

    def outputs(self) -> dict[str, bytes | str]:
        """Every file under bazel-bin: bytes, or ``-> target`` for a symlink."""
        root = (self.workspace / "bazel-bin").resolve()
        found: dict[str, bytes | str] = {}
        for path in sorted(root.rglob("*")):
            relative = str(path.relative_to(root))
            if relative.startswith(("_", "external")) or relative.endswith((".runfiles",)):
                continue
            if path.is_symlink():
                found[relative] = f"-> {os.readlink(path)}"
            elif path.is_file():
                found[relative] = path.read_bytes()
                if os.access(path, os.X_OK):
                    found[relative + " (x)"] = b""
        return found

    def shutdown(self) -> None:
        subprocess.run([*self.startup, "shutdown"], cwd=self.workspace, env=self.env,
                       capture_output=True, timeout=120)


@pytest.fixture
def bazel(tmp_path: Path) -> Iterator[Bazel]:
    workspace = tmp_path / "workspace"
    shutil.copytree(WORKSPACE, workspace)
    client = Bazel(workspace, tmp_path / "bazel-root")
    try:
        yield client
    finally:
        client.shutdown()


@pytest.fixture
def rexd_reapi(tmp_path: Path) -> Iterator[str]:
    """``rexd serve`` as its own process with two local workers; yields the REAPI address."""
    log_path = tmp_path / "rexd.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("REXCORE_")}
    env["REXCORE_PLUGINS"] = "rex-reapi"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "rexcore.cli.rexd", "serve", "--data-dir",
             str(tmp_path / "rex-data"), "--http", "127.0.0.1:0", "--listen", "127.0.0.1:0",
             "--workers", "2"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180  # a loaded 2-core machine starts slowly
        while True:
            text = log_path.read_text()
            found = re.search(r"rexd: reapi listening on grpc://(\S+)", text)
            if found and text.count("joined") >= 2:
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"rexd did not start serving REAPI:\n{text}")
            time.sleep(0.1)
        yield found.group(1)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _processes(output: str) -> str:
    found = re.findall(r"INFO: \d+ process(?:es)?: ([^\n]*)", output)
    assert found, f"no process summary in Bazel's output:\n{output[-3000:]}"
    return found[-1]


def test_bazel_builds_remotely_with_identical_outputs_then_from_the_remote_cache(
    bazel: Bazel, rexd_reapi: str
) -> None:
    bazel.run("build", *TARGETS)
    local = bazel.outputs()
    assert "tree_out/nested/deeper/leaf.txt" in local and "bytes.bin" in local
    bazel.run("clean")

    remote = ["--remote_executor", f"grpc://{rexd_reapi}", "--spawn_strategy=remote",
              "--noremote_local_fallback"]
    built = bazel.run("build", *remote, *TARGETS)
    summary = _processes(built.stderr)
    assert f"{ACTIONS} remote" in summary and "cache hit" not in summary, summary
    assert "linux-sandbox" not in summary and "local" not in summary, summary
    assert bazel.outputs() == local

    bazel.run("clean")
    rebuilt = bazel.run("build", *remote, *TARGETS)
    summary = _processes(rebuilt.stderr)
    assert f"{ACTIONS} remote cache hit" in summary, summary
    assert not re.search(r"\d+ remote(,|$)", summary), summary
    assert bazel.outputs() == local


def test_a_failing_remote_action_shows_its_stderr_and_exit_code_in_bazel(
    bazel: Bazel, rexd_reapi: str
) -> None:
    failed = bazel.run("build", "--remote_executor", f"grpc://{rexd_reapi}",
                       "--spawn_strategy=remote", "//failing:fails", check=False)
    assert failed.returncode != 0
    assert "rex-failing-action-stderr" in failed.stderr, failed.stderr[-3000:]
    assert "Exit 3" in failed.stderr, failed.stderr[-3000:]
