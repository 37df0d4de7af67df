"""The built-in ``local`` provider: ``rexd worker`` processes on this host.

Each worker is a long-lived process that shares the coordinator's disk store (it stages
inputs by hardlink and publishes outputs straight into it). A worker that exits without
being asked to is replaced, with a growing delay if it keeps crashing.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import attrs

from rexcore.plugins.descriptors import ComponentContext
from rexcore.providers.interface import (
    ProvidedWorker,
    ProvidedWorkerState,
    ProviderError,
    WorkerLaunch,
)

__all__ = ["LocalProvider", "LocalProviderOptions", "create_local_provider"]

log = logging.getLogger(__name__)


@attrs.frozen
class LocalProviderOptions:
    """Options of the ``local`` provider.

    ``drain_timeout_s``: how long a draining worker may take to finish before it is
    killed. ``restart_delay_s``/``max_restart_delay_s``: the delay before replacing a
    crashed worker, doubling on each crash in a row up to the maximum.
    """

    drain_timeout_s: float = 600.0
    restart_delay_s: float = 0.2
    max_restart_delay_s: float = 30.0


@attrs.define(eq=False)
class _LocalWorker:
    worker_id: str
    launch: WorkerLaunch
    process: asyncio.subprocess.Process | None = None
    state: ProvidedWorkerState = ProvidedWorkerState.STARTING
    reason: str = ""
    crashes: int = 0
    supervisor: asyncio.Task[None] | None = None
    stopping: bool = False

    def view(self) -> ProvidedWorker:
        return ProvidedWorker(self.worker_id, self.state, self.reason)


class LocalProvider:
    """Starts and supervises ``rexd worker`` processes on this host."""

    def __init__(self, options: LocalProviderOptions, context: ComponentContext) -> None:
        self.options = options
        self.data_dir = context.data_dir
        self.shared_store = context.data_dir / "cas"
        self._workers: dict[str, _LocalWorker] = {}
        self._ids = itertools.count(1)
        self._prefix = f"local-{os.getpid()}"
        self.worker_config = self._write_worker_config(context)

    def _write_worker_config(self, context: ComponentContext) -> Path | None:
        """The coordinator's plugin selection and sandbox options, for its workers."""
        if context.config is None:
            return None
        import tomli_w

        from rexcore.config.converter import unstructure_config

        path = context.data_dir / "workers" / "worker.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        table = {"plugins": unstructure_config(context.config.plugins),
                 "sandboxes": context.config.sandboxes,
                 "event_loop": context.config.event_loop}
        path.write_text(tomli_w.dumps(table))
        return path

    async def create_workers(self, count: int, launch: WorkerLaunch) -> Sequence[ProvidedWorker]:
        created = []
        for _ in range(count):
            worker = _LocalWorker(f"{self._prefix}-{next(self._ids)}", launch)
            self._workers[worker.worker_id] = worker
            await self._spawn(worker)
            worker.supervisor = asyncio.create_task(self._supervise(worker))
            created.append(worker.view())
        return created

    def _command(self, worker: _LocalWorker) -> list[str]:
        launch = worker.launch
        command = [
            sys.executable, "-m", "rexcore.cli.rexd", "worker",
            "--coordinator", launch.coordinator_url,
            "--worker-id", worker.worker_id,
            "--slots", str(launch.slots),
            "--sandbox", launch.sandbox,
            "--data-dir", str(self.data_dir / "workers" / worker.worker_id),
            "--shared-store", str(self.shared_store),
            "--parent-pid", str(os.getpid()),
        ]
        for key, value in launch.properties:
            command += ["--property", f"{key}={value}"]
        if self.worker_config is not None:
            command += ["--config", str(self.worker_config)]
        return command

    async def _spawn(self, worker: _LocalWorker) -> None:
        env = dict(os.environ)
        if worker.launch.join_token:  # by environment, so it never shows in `ps`
            env["REX_JOIN_TOKEN"] = worker.launch.join_token
        try:
            worker.process = await asyncio.create_subprocess_exec(
                *self._command(worker), stdin=asyncio.subprocess.DEVNULL, env=env,
                start_new_session=True,  # a Ctrl-C at the terminal goes to rexd, which drains
            )
        except OSError as exc:
            worker.state, worker.reason = ProvidedWorkerState.FAILED, str(exc)
            raise ProviderError(f"cannot start a local worker: {exc}") from exc
        worker.state = ProvidedWorkerState.RUNNING

    async def _supervise(self, worker: _LocalWorker) -> None:
        while True:
            assert worker.process is not None
            code = await worker.process.wait()
            if worker.stopping:
                worker.state = ProvidedWorkerState.STOPPED
                return
            worker.crashes += 1
            worker.reason = f"exited with status {code}; replaced ({worker.crashes} crash(es))"
            log.warning("local worker %s %s", worker.worker_id, worker.reason)
            delay = min(self.options.restart_delay_s * 2 ** (worker.crashes - 1),
                        self.options.max_restart_delay_s)
            worker.state = ProvidedWorkerState.STARTING
            await asyncio.sleep(delay)
            if worker.stopping:
                worker.state = ProvidedWorkerState.STOPPED
                return
            try:
                await self._spawn(worker)
            except ProviderError:
                log.exception("could not replace local worker %s", worker.worker_id)
                return

    async def list_workers(self) -> Sequence[ProvidedWorker]:
        return [w.view() for w in self._workers.values() if w.state is not ProvidedWorkerState.STOPPED]

    def _get(self, worker_id: str) -> _LocalWorker:
        try:
            return self._workers[worker_id]
        except KeyError:
            raise ProviderError(f"no local worker {worker_id!r}") from None

    async def drain(self, worker_id: str) -> None:
        worker = self._get(worker_id)
        worker.stopping = True
        worker.state = ProvidedWorkerState.DRAINING
        if worker.process is not None and worker.process.returncode is None:
            worker.process.send_signal(signal.SIGTERM)

    async def terminate(self, worker_id: str) -> None:
        worker = self._get(worker_id)
        worker.stopping = True
        if worker.process is not None and worker.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                worker.process.kill()
            await worker.process.wait()
        if worker.supervisor is not None:
            await asyncio.gather(worker.supervisor, return_exceptions=True)
        worker.state = ProvidedWorkerState.STOPPED
        self._workers.pop(worker_id, None)

    async def close(self) -> None:
        """Drain every worker, wait up to ``drain_timeout_s``, kill what is left."""
        workers = list(self._workers.values())
        for worker in workers:
            await self.drain(worker.worker_id)

        async def finish(worker: _LocalWorker) -> None:
            if worker.process is None:
                return
            try:
                await asyncio.wait_for(worker.process.wait(), self.options.drain_timeout_s)
            except TimeoutError:
                log.warning("local worker %s did not drain in %.0f s; killing it",
                            worker.worker_id, self.options.drain_timeout_s)
            await self.terminate(worker.worker_id)

        await asyncio.gather(*(finish(w) for w in workers))


def create_local_provider(options: LocalProviderOptions, context: ComponentContext) -> LocalProvider:
    return LocalProvider(options, context)
