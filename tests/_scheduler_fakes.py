"""Test support for the coordinator: actions in the CAS and a fake worker.

The fake worker speaks the real synchronize protocol over HTTP (``RexClient``) but runs
nothing: the test decides when each assignment finishes and with what result.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from rexcore.artifacts.digest import Digest
from rexcore.plugins.manager import PluginManager
from rexcore.protocol.client import RexClient
from rexcore.serialization.action import (
    Action,
    Command,
    Directory,
    canonical_bytes,
    canonical_digest,
)
from rexcore.serialization.action_result import ActionResult, ExecutionMetadata
from rexcore.serialization.worker_protocol import Assignment, Completion, SyncRequest, SyncResponse
from rexcore.testing import RunningRexd, start_rexd

_salts = itertools.count()


async def upload(put: Callable[[Digest, bytes], Awaitable[Any]], obj: object) -> Digest:
    digest = canonical_digest(obj)
    await put(digest, canonical_bytes(obj))
    return digest


async def make_action(
    put: Callable[[Digest, bytes], Awaitable[Any]],
    *,
    argv: Iterable[str] | None = None,
    output_paths: Iterable[str] = (),
    timeout_s: float | None = None,
    do_not_cache: bool = False,
    platform: Iterable[tuple[str, str]] = (),
    upload_command: bool = True,
    upload_input_root: bool = True,
    upload_action: bool = True,
) -> tuple[Digest, Action]:
    """Store an Action (unique unless ``argv`` is given) with its Command and input root."""
    command = Command(
        arguments=tuple(argv) if argv is not None else ("echo", str(next(_salts))),
        output_paths=tuple(output_paths),
    )
    root = Directory()
    action = Action(
        command_digest=canonical_digest(command),
        input_root_digest=canonical_digest(root),
        timeout_s=timeout_s,
        do_not_cache=do_not_cache,
        platform=tuple(sorted(platform)),
    )
    if upload_command:
        await upload(put, command)
    if upload_input_root:
        await upload(put, root)
    digest = canonical_digest(action)
    if upload_action:
        await upload(put, action)
    return digest, action


def result_for(worker: str, exit_code: int = 0) -> ActionResult:
    return ActionResult(exit_code=exit_code, execution_metadata=ExecutionMetadata(worker=worker))


class FakeWorker:
    """A worker that reports whatever the test tells it to, one call at a time."""

    def __init__(
        self,
        client: RexClient,
        worker_id: str,
        *,
        slots: int = 1,
        properties: Iterable[tuple[str, str]] = (),
        token: str = "",
    ) -> None:
        self.client = client
        self.worker_id = worker_id
        self.slots = slots
        self.properties = tuple(properties)
        self.token = token
        self.executing: dict[str, Assignment] = {}
        self.to_report: list[Completion] = []
        self.assigned: list[Assignment] = []
        self.cancelled: list[str] = []
        self.draining = False

    async def sync(self, wait_s: float = 0.0) -> SyncResponse:
        request = SyncRequest(
            worker_id=self.worker_id, token=self.token, properties=self.properties,
            slots=self.slots, executing=tuple(self.executing), completed=tuple(self.to_report),
            draining=self.draining, wait_s=wait_s,
        )
        response = await self.client.synchronize(request)
        self.to_report = []
        for assignment in response.assignments:
            self.executing[assignment.operation] = assignment
            self.assigned.append(assignment)
        for name in response.cancel:
            self.executing.pop(name, None)
            self.cancelled.append(name)
        return response

    def finish(
        self,
        name: str,
        result: ActionResult | None = None,
        *,
        error: str = "",
        permanent: bool = False,
        timed_out: bool = False,
    ) -> None:
        self.executing.pop(name)
        if result is None and not error:
            result = result_for(self.worker_id)
        self.to_report.append(Completion(
            operation=name, result=result, error=error, error_is_permanent=permanent,
            timed_out=timed_out,
        ))

    def finish_all(self) -> None:
        for name in list(self.executing):
            self.finish(name)

    async def serve(self, stop: asyncio.Event, wait_s: float = 5.0) -> None:
        """Run every assignment at once (successfully) until ``stop`` is set."""
        while not stop.is_set():
            self.finish_all()
            await self.sync(wait_s=wait_s)
        self.finish_all()
        await self.sync()


async def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    """Wait for a condition of the server's state (checked each loop turn, a guard only)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def coordinator(
    plugins: PluginManager, data_dir: Path, config: dict[str, Any] | None = None, **scheduler: Any
) -> AsyncIterator[tuple[RunningRexd, RexClient]]:
    """An in-process rexd with ``[scheduler]`` options (and any other ``config``), and a
    client of it."""
    running = await start_rexd(plugins, data_dir, {**(config or {}), "scheduler": scheduler})
    try:
        async with RexClient(running.url) as client:
            yield running, client
    finally:
        await running.daemon.stop()
