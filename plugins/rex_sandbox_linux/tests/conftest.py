"""Fixtures of the linux sandbox's tests: real bubblewrap, real cgroups, real workers.

No ``pytest_plugins`` here (only a top-level conftest may declare them): what the
tests need from ``rexcore.testing`` they import.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from rexcore.plugins.manager import PluginManager
from rexcore.protocol.client import RexClient
from rexcore.worker.agent import WorkerAgent
from rex_sandbox_linux.options import LinuxSandboxOptions
from rex_sandbox_linux.sandbox import LinuxSandbox

#: Limits every test sandbox has unless a test says otherwise: small enough that a
#: hostile action cannot hurt the shared machine.
TEST_OPTIONS = dict(default_memory=256 << 20, default_pids=128, max_file_size=64 << 20,
                    tmp_size=64 << 20, kill_grace_s=0.5)


@pytest.fixture
async def linux_sandbox(tmp_path: Path) -> AsyncIterator[LinuxSandbox]:
    sandbox = LinuxSandbox(LinuxSandboxOptions(**TEST_OPTIONS), data_dir=tmp_path)
    yield sandbox
    await sandbox.close()


@pytest.fixture
def exec_root(tmp_path: Path) -> Path:
    root = tmp_path / "exec" / "root"
    root.mkdir(parents=True)
    return root


class Served:
    """An in-process rexd and one real worker agent with a linux sandbox, serving."""

    def __init__(self, rexd: Any, agent: WorkerAgent, client: RexClient,
                 workdir: Path, task: asyncio.Task[None]) -> None:
        self.rexd, self.agent, self.client, self.workdir, self.task = (
            rexd, agent, client, workdir, task)


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    # Imported here: importing rexcore.testing before the root conftest registers it as a
    # pytest plugin would keep pytest from rewriting its asserts.
    from rexcore.testing import start_rexd

    plugins = PluginManager()
    plugins.register_builtins()
    rexd = await start_rexd(plugins, tmp_path / "rexd")
    sandbox = LinuxSandbox(LinuxSandboxOptions(**TEST_OPTIONS), data_dir=tmp_path)
    agent = WorkerAgent(rexd.url, sandbox=sandbox, data_dir=tmp_path / "worker",
                        shared_store_root=rexd.runtime.data_dir / "cas", wait_s=2.0)
    task = asyncio.ensure_future(agent.run())
    workdir = tmp_path / "client"
    workdir.mkdir()
    client = RexClient(rexd.url)
    try:
        yield Served(rexd, agent, client, workdir, task)
    finally:
        agent.drain()
        agent.drain()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 30)
        await client.close()
        await rexd.daemon.stop()
