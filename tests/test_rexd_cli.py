"""`rexd serve` as a user runs it: a real process, real ports, real signals."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import rexd_env, run_rexd

LISTENING = re.compile(r"rexd: native listening on (http://\S+)")


def _start(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "rexcore.cli.rexd", "serve", "--data-dir", str(tmp_path / "data"),
         "--http", "127.0.0.1:0", "--workers", "0", *args],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        env=rexd_env(REXCORE_DISABLE_PLUGIN_AUTOLOAD="1"),
    )
    deadline = time.monotonic() + 30
    assert process.stderr is not None
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        match = LISTENING.search(line)
        if match:
            return process, match.group(1)
    process.kill()
    raise AssertionError(f"rexd did not report a listener: {process.stderr.read()}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_logs_its_listener_answers_healthz_and_stops_cleanly_on_signal(tmp_path, sig):
    process, url = _start(tmp_path)
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=10) as response:
            assert json.load(response)["status"] == "ok"
        process.send_signal(sig)
        assert process.wait(timeout=20) == 0
        assert "shutting down" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()


def test_serve_refuses_a_port_in_use_with_a_clear_message(tmp_path):
    process, url = _start(tmp_path)
    try:
        address = url.removeprefix("http://")
        result = run_rexd("serve", "--data-dir", str(tmp_path / "other"), "--http", address,
                          REXCORE_DISABLE_PLUGIN_AUTOLOAD="1", timeout=30)
        assert result.returncode == 1
        assert "protocol 'native' cannot listen" in result.stderr
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_serve_help_lists_the_protocols_flags():
    result = run_rexd("serve", "--help", REXCORE_DISABLE_PLUGIN_AUTOLOAD="1")
    assert result.returncode == 0
    assert "--http HOST:PORT" in result.stdout and "[protocols.native.listen]" in result.stdout


def test_serve_rejects_unknown_flags():
    result = run_rexd("serve", "--colour", "blue", REXCORE_DISABLE_PLUGIN_AUTOLOAD="1")
    assert result.returncode == 2 and "--colour" in result.stderr


def test_data_dir_that_cannot_be_created_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = run_rexd("serve", "--data-dir", str(blocker / "data"), "--http", "127.0.0.1:0",
                      REXCORE_DISABLE_PLUGIN_AUTOLOAD="1", timeout=30)
    assert result.returncode == 1
    assert "cannot create the data dir" in result.stderr


def test_version_flag():
    result = run_rexd("--version")
    assert result.returncode == 0 and result.stdout.startswith("rexd ")
