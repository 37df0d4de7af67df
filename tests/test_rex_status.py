"""``rex status`` as a user runs it: a subprocess against a real in-process rexd."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator

import pytest

from rexcore.protocol.client import RexClient
from rexcore.testing import RunningRexd, start_rexd
from tests._scheduler_fakes import make_action
from tests.test_rex_cli import REPO, rex

MOCK_POOL = {"pool": {"target_workers": 2, "provider": {"name": "mock"}}}


@pytest.fixture
async def pooled(plugin_manager, tmp_path) -> AsyncIterator[RunningRexd]:
    running = await start_rexd(plugin_manager, tmp_path / "data", MOCK_POOL)
    try:
        yield running
    finally:
        await running.daemon.stop()


async def _queue_one(running: RunningRexd) -> None:
    async with RexClient(running.url) as client:
        await client.execute((await make_action(client.put_blob))[0])


async def test_status_json_reports_pool_queue_and_health_and_exits_0_when_healthy(pooled):
    ran = await rex("--server", pooled.url, "status", "--json")
    assert ran.returncode == 0, ran.stderr
    report = json.loads(ran.stdout)
    assert report["healthy"] is True and report["health"]["status"] == "ok"
    assert report["status"]["queued"] == 0
    pool = report["status"]["pool"]
    assert (pool["desired"], pool["starting"], pool["failed"]) == (2, 2, 0)
    assert report["health"]["checks"]["workers"]["healthy"] is True


async def test_status_exits_1_and_names_the_failing_checks_when_work_waits_for_no_worker(
    plugin_manager, tmp_path
):
    running = await start_rexd(plugin_manager, tmp_path / "data")
    try:
        await _queue_one(running)
        ran = await rex("--server", running.url, "status", "--json")
        assert ran.returncode == 1
        report = json.loads(ran.stdout)
        assert report["healthy"] is False and report["status"]["queued"] == 1
        assert report["status"]["pool"] is None
        failing = {n for n, c in report["health"]["checks"].items() if not c["healthy"]}
        assert failing == {"workers", "queue_depth"}

        ran = await rex("--server", running.url, "status", COLUMNS="200")
        assert ran.returncode == 1
        assert "FAILING" in ran.stdout and "UNHEALTHY" in ran.stdout
        assert "1 operation(s) queued and no worker has joined" in ran.stdout
    finally:
        await running.daemon.stop()


async def test_status_shows_pool_queue_and_health_tables(pooled):
    ran = await rex("--server", pooled.url, "status", COLUMNS="200")
    assert ran.returncode == 0, ran.stderr
    lines = ran.stdout.splitlines()
    assert [line.strip() for line in lines if line.strip() in ("Pool", "Queue", "Health")] == [
        "Pool", "Queue", "Health"]
    rows = {cells[0]: cells[1:] for cells in (
        [c.strip() for c in line.strip("│ ").split("│")] for line in lines if "│" in line)}
    assert rows["starting"] == ["2"] and rows["desired"] == ["2 (of 0-64)"]
    assert rows["queued"] == ["0"] and rows["executions"] == ["0"]
    assert rows["workers"][0] == "ok" and rows["coordinator"][0] == "ok"


async def test_status_watch_refreshes_until_ctrl_c_then_exits_0(pooled):
    env = {k: v for k, v in os.environ.items() if k != "REX_SERVER"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "rexcore.cli.rex", "--server", pooled.url, "status", "--watch",
        "--json", "--interval", "0.05", stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )
    assert process.stdout is not None
    try:
        first = json.loads(await asyncio.wait_for(process.stdout.readline(), 60))
        assert first["status"]["queued"] == 0
        await _queue_one(pooled)
        # Refreshed reports follow; one of them must show the new operation.
        while True:
            line = await asyncio.wait_for(process.stdout.readline(), 60)
            assert line, "rex status --watch stopped on its own"
            if json.loads(line)["status"]["queued"] == 1:
                break
        process.send_signal(signal.SIGINT)
        _, stderr = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, stderr.decode()


async def test_status_watch_without_json_prints_one_report_after_another(pooled):
    env = {k: v for k, v in os.environ.items() if k != "REX_SERVER"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "rexcore.cli.rex", "--server", pooled.url, "status", "--watch",
        "--interval", "0.05", stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )
    assert process.stdout is not None
    reports = 0
    try:
        while reports < 2:
            line = await asyncio.wait_for(process.stdout.readline(), 60)
            assert line, "rex status --watch stopped on its own"
            reports += line.strip() == b"Health"
        process.send_signal(signal.SIGINT)
        await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0


async def test_status_rejects_a_non_positive_interval(pooled):
    ran = await rex("--server", pooled.url, "status", "--watch", "--interval", "0")
    assert ran.returncode == 2
    assert "--interval 0 must be a positive number of seconds" in ran.stderr


async def test_status_of_an_unreachable_server_says_how_to_start_one(tmp_path):
    ran = await rex("--server", "http://127.0.0.1:9", "status")
    assert ran.returncode == 1
    assert "cannot reach the rex server at http://127.0.0.1:9" in ran.stderr


async def test_status_of_a_storage_only_server_shows_health_alone(plugin_manager, tmp_path):
    config = {"scheduler": {"enabled": False}}
    running = await start_rexd(plugin_manager, tmp_path / "data", config)
    try:
        ran = await rex("--server", running.url, "status", COLUMNS="200")
        assert ran.returncode == 0, ran.stderr
        assert "no scheduler on this server" in ran.stdout and "Pool" not in ran.stdout
        assert "Health" in ran.stdout
        report = json.loads((await rex("--server", running.url, "status", "--json")).stdout)
        assert report["status"] is None and report["healthy"] is True
    finally:
        await running.daemon.stop()
