"""A real Bazel (Debian's bazel-bootstrap, installed by .ci/run) against a real rexd.

One workspace of genrules and a Starlark rule with a directory output is built locally,
then with ``--remote_executor`` against ``rexd serve`` (two local workers): every action
must run remotely and produce byte-identical outputs; after ``bazel clean`` the rebuild
must come entirely from the remote cache; a failing action must show its stderr and exit
code in Bazel's output.

A second workspace is what most users point rex at: C++ compiled and linked remotely
(the host's gcc, found by Bazel's auto-configured toolchain), and ``bazel test`` run
remotely (passing, failing and timed-out tests, a test that runs a binary from its
runfiles); and rex as a plain remote cache (``--remote_cache``) for a local build.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

WORKSPACE = Path(__file__).parent / "bazel_workspace"
CC_WORKSPACE = Path(__file__).parent / "bazel_cc_workspace"
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


def _client(tmp_path: Path, source: Path) -> Iterator[Bazel]:
    workspace = tmp_path / "workspace"
    shutil.copytree(source, workspace)
    client = Bazel(workspace, tmp_path / "bazel-root")
    try:
        yield client
    finally:
        client.shutdown()


@pytest.fixture
def bazel(tmp_path: Path) -> Iterator[Bazel]:
    yield from _client(tmp_path, WORKSPACE)


@pytest.fixture
def bazel_cc(tmp_path: Path) -> Iterator[Bazel]:
    if shutil.which("gcc") is None:
        pytest.fail("gcc is not installed: `bash .ci/run` installs Debian's g++ "
                    "(or: apt-get install g++)")
    yield from _client(tmp_path, CC_WORKSPACE)


@pytest.fixture
def rexd_reapi(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """``rexd serve`` as its own process with two local workers; yields the REAPI address.

    The workers' sandbox is ``process`` unless the test is parametrized indirectly with
    ``"linux"`` (rex-sandbox-linux then loads as well)."""
    with _serve(tmp_path, getattr(request, "param", "process")) as address:
        yield address


@contextlib.contextmanager
def _serve(tmp_path: Path, sandbox: str = "process", config: str = "") -> Iterator[str]:
    """``rexd serve`` with ``config`` as its rexd.toml; yields ``host:port`` of REAPI.

    The data dir is one the actions' user may traverse to (tmp_path lies under pytest's
    private directory, and run as root the process sandbox runs actions as nobody, who
    could not reach its exec root by absolute path, as Bazel's test runner does)."""
    config_path = tmp_path / "rexd.toml"
    config_path.write_text(config)
    data_dir = Path(tempfile.mkdtemp(prefix="rex-bazel-test-"))
    data_dir.chmod(0o755)
    log_path = tmp_path / "rexd.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("REXCORE_")}
    env["REXCORE_PLUGINS"] = "rex-reapi" + (",rex-sandbox-linux" if sandbox == "linux" else "")
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "rexcore.cli.rexd", "serve", "--config", str(config_path),
             "--data-dir",
             str(data_dir), "--http", "127.0.0.1:0", "--listen", "127.0.0.1:0",
             "--workers", "2"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180  # a loaded 2-core machine starts slowly
        while True:
            text = log_path.read_text()
            found = re.search(r"rexd: reapi listening on grpcs?://(\S+)", text)
            if found and len(re.findall(rf"joined the coordinator .*sandbox {sandbox}\b", text)) >= 2:
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
        shutil.rmtree(data_dir, ignore_errors=True)


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


def _test_status(output: str, target: str) -> str:
    found = re.search(rf"^{re.escape(target)}\s+(PASSED|FAILED|TIMEOUT|NO STATUS)\b",
                      output, re.MULTILINE)
    assert found, f"no status for {target} in Bazel's output:\n{output[-3000:]}"
    return found.group(1)


@pytest.mark.parametrize("rexd_reapi", ["process", "linux"], indirect=True)
def test_bazel_compiles_cpp_and_runs_tests_remotely(bazel_cc: Bazel, rexd_reapi: str) -> None:
    tests = ["//app:greet_test", "//app:runs_app_test", "//app:failing_test",
             "//app:slow_test"]
    tested = bazel_cc.run(
        "test", "--remote_executor", f"grpc://{rexd_reapi}", "--spawn_strategy=remote",
        "--noremote_local_fallback", "--test_output=errors", "--test_timeout=5",
        "//app:app", *tests, check=False)
    output = tested.stderr + tested.stdout
    assert tested.returncode == 3, output[-3000:]  # built, but some tests failed
    # Compiles, links and the four tests all ran remotely; nothing ran locally.
    summary = _processes(tested.stderr)
    remote = re.search(r"(\d+) remote[,.]?$", summary) or re.search(r"(\d+) remote,", summary)
    assert remote and int(remote.group(1)) >= 9, summary
    assert "linux-sandbox" not in summary and "local" not in summary, summary
    assert _test_status(output, "//app:greet_test") == "PASSED"
    assert _test_status(output, "//app:runs_app_test") == "PASSED"
    assert _test_status(output, "//app:failing_test") == "FAILED"
    assert "rex-failing-test-output" in output  # the failed test's log, from the CAS
    assert _test_status(output, "//app:slow_test") == "TIMEOUT"
    # The remotely linked binary runs here, and the passing test's log came back.
    binary = bazel_cc.workspace / "bazel-bin" / "app" / "app"
    assert subprocess.run([binary], capture_output=True, text=True,
                          check=True).stdout == "hello rex\n"
    log = bazel_cc.workspace / "bazel-testlogs" / "app" / "greet_test" / "test.log"
    assert "rex-cc-test-passed" in log.read_text()


def test_bazel_uses_rex_as_a_remote_cache_for_local_builds(
    bazel_cc: Bazel, rexd_reapi: str
) -> None:
    cache = ["--remote_cache", f"grpc://{rexd_reapi}"]
    built = bazel_cc.run("build", *cache, "//app:app")
    summary = _processes(built.stderr)
    assert "remote" not in summary, summary  # nothing cached yet, nothing ran remotely
    bazel_cc.run("clean")
    # Bazel ran the compiles and the link itself and uploaded their results
    # (UpdateActionResult); after a clean every one is a hit.
    rebuilt = bazel_cc.run("build", *cache, "//app:app")
    summary = _processes(rebuilt.stderr)
    assert "3 remote cache hit" in summary, summary
    assert re.search(r"\d+ (linux-sandbox|processwrapper-sandbox|local)", summary) is None, summary
    binary = bazel_cc.workspace / "bazel-bin" / "app" / "app"
    assert subprocess.run([binary], capture_output=True, text=True,
                          check=True).stdout == "hello rex\n"


def test_bazel_needs_the_bearer_token_the_server_asks_for(bazel: Bazel, tmp_path: Path) -> None:
    """Over plain text: Debian's Bazel 4.2.3 cannot open TLS channels at all (its netty
    finds no ALPN in the JDK and the client crashes before connecting), so TLS is tested
    with grpcio clients in test_reapi_security.py."""
    tokens = tmp_path / "tokens"
    tokens.write_text("bazel-test-token\n")
    with _serve(tmp_path, config=f'[protocols.reapi]\nauth_tokens_file = "{tokens}"\n') as address:
        remote = ["--remote_executor", f"grpc://{address}", "--spawn_strategy=remote",
                  "--noremote_local_fallback"]
        refused = bazel.run("build", *remote, "//:greeting", check=False)
        assert refused.returncode != 0
        assert "UNAUTHENTICATED" in refused.stderr, refused.stderr[-3000:]
        assert "--remote_header=Authorization=Bearer" in refused.stderr
        built = bazel.run("build", *remote,
                          "--remote_header=Authorization=Bearer bazel-test-token", "//:greeting")
        assert "1 remote" in _processes(built.stderr)
    greeting = bazel.workspace / "bazel-bin" / "greeting.txt"
    assert greeting.read_text().endswith("from-genrule\n")
