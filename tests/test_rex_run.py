"""``rex run`` as a user runs it: ``python -m rexcore.cli.rex`` in a project directory,
against a real ``rexd serve`` with local workers (one server for this module; every test
uses contents of its own, so no test is answered from another's cache)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rexcore.artifacts.digest import digest_of
from tests._real_rexd import RexdProcesses, RexdServe, rexd_environment

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX shell actions"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RexdServe]:
    processes = RexdProcesses(tmp_path_factory.mktemp("rexd"))
    try:
        # Every request is logged, so a test can see which blobs were uploaded.
        server = processes.serve(workers=2, config={"protocols": {"native": {"access_log": True}}})
        yield server
    finally:
        processes.clean_up()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """The user's working directory, with contents unique to this test."""
    path = tmp_path / "project"
    path.mkdir()
    (path / "stamp").write_text(f"{tmp_path.name} {time.time_ns()}\n")
    return path


def rex(server: RexdServe, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rexcore.cli.rex", "--server", server.url, *args],
        cwd=cwd, capture_output=True, text=True, env=rexd_environment(), timeout=120,
        check=False,
    )


def uploads_since(server: RexdServe, start: int, *expected: str) -> list[str]:
    """Blobs PUT into the CAS (``function/hash/size``) that rexd logged after offset
    ``start`` of its log, once the ``expected`` ones are among them (a request is logged
    as it ends, so give the log a moment)."""
    deadline = time.monotonic() + 30
    while True:
        found = re.findall(r'"PUT /v1/cas/(\S+) HTTP', server.log()[start:])
        if set(expected) <= set(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_outputs_come_back_as_file_directory_and_symlink_with_stdout_stderr_and_exit_code(
    server, project
):
    (project / "src" / "words").mkdir(parents=True)
    (project / "src" / "greeting.txt").write_text("hello\n")
    (project / "src" / "words" / "a.txt").write_text("alpha\n")
    script = (
        "cat stamp > /dev/null; mkdir -p out/tree/deep; "
        "tr a-z A-Z < src/greeting.txt > out/upper.txt; "
        "cp src/words/a.txt out/tree/deep/a.txt; ln -s upper.txt out/link; "
        "echo to stdout; echo to stderr >&2; exit 3"
    )
    ran = rex(server, project, "run", "-i", "src", "-i", "stamp", "-o", "out/upper.txt",
              "-o", "out/tree", "-o", "out/link", "--", "/bin/sh", "-c", script)

    assert ran.returncode == 3, ran.stderr
    assert ran.stdout == "to stdout\n"
    assert ran.stderr == "to stderr\n"
    assert (project / "out" / "upper.txt").read_text() == "HELLO\n"
    assert (project / "out" / "tree" / "deep" / "a.txt").read_text() == "alpha\n"
    assert os.readlink(project / "out" / "link") == "upper.txt"


def test_a_second_run_with_one_changed_input_uploads_only_that_input(server, project):
    (project / "a.txt").write_text(f"a, first version, {project.parent.name}\n")
    (project / "b.txt").write_text(f"b, never changes, {project.parent.name}\n")
    a_before = str(digest_of((project / "a.txt").read_bytes()))
    b = str(digest_of((project / "b.txt").read_bytes()))
    argv = ["run", "-i", "a.txt", "-i", "b.txt", "-o", "out.txt", "--",
            "/bin/sh", "-c", "cat a.txt b.txt > out.txt"]

    start = len(server.log())
    first = rex(server, project, *argv)
    assert first.returncode == 0, first.stderr
    assert {a_before, b} <= set(uploads_since(server, start, a_before, b))

    (project / "a.txt").write_text(f"a, second version, {project.parent.name}\n")
    a_after = str(digest_of((project / "a.txt").read_bytes()))
    start = len(server.log())
    second = rex(server, project, *argv)
    assert second.returncode == 0, second.stderr
    second_uploads = uploads_since(server, start, a_after)

    input_files = {a_before, a_after, b}
    assert [d for d in second_uploads if d in input_files] == [a_after]
    assert (project / "out.txt").read_text() == (
        (project / "a.txt").read_text() + (project / "b.txt").read_text()
    )


def test_an_identical_second_run_is_answered_from_the_action_cache_and_verbose_says_so(
    server, project
):
    argv = ["run", "-v", "-i", "stamp", "-o", "copy", "--", "/bin/sh", "-c",
            "cp stamp copy; echo copied"]
    first = rex(server, project, *argv)
    assert first.returncode == 0, first.stderr
    assert "answered by a worker" in first.stderr
    (project / "copy").unlink()
    hits = server.status()["metrics"]["cache_hits"]

    second = rex(server, project, *argv)

    assert second.returncode == 0, second.stderr
    assert "answered by the action cache" in second.stderr
    assert server.status()["metrics"]["cache_hits"] == hits + 1
    assert second.stdout == first.stdout == "copied\n"
    assert (project / "copy").read_text() == (project / "stamp").read_text()  # written back


def test_limits_given_to_rex_run_reach_the_sandbox_and_do_not_block_the_action(
    server, project
):
    ran = rex(server, project, "run", "--memory", "256MiB", "--cpus", "1", "--timeout", "60",
              "-i", "stamp", "--", "/bin/sh", "-c", "ulimit -v")

    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == str(256 * 1024)  # RLIMIT_AS, in KiB


def test_an_action_past_its_timeout_exits_1_saying_so(server, project):
    ran = rex(server, project, "run", "--timeout", "1", "-i", "stamp", "--",
              "/bin/sh", "-c", "echo waiting; sleep 60")

    assert ran.returncode == 1
    assert ran.stdout == "waiting\n"
    assert "deadline_exceeded" in ran.stderr


def test_a_missing_input_is_a_clear_error_exiting_1(server, project):
    ran = rex(server, project, "run", "-i", "missing.txt", "--", "/bin/true")

    assert ran.returncode == 1
    assert ran.stderr == (
        f"rex: error: input 'missing.txt' does not exist under {project.resolve()}\n"
    )


@pytest.mark.parametrize("argv", [[], ["--"]], ids=["nothing", "only-dashes"])
def test_run_without_a_command_is_a_usage_error_exiting_2(server, project, argv):
    ran = rex(server, project, "run", "-i", "stamp", *argv)

    assert ran.returncode == 2
    assert "rex run needs a command after --" in ran.stderr
