"""The built-in ``mock`` provider: workers that exist only on paper.

It records every call, starts workers after ``start_delay_s`` on its clock, and fails
creates on request, so the pool, the provisioner and the simulator can be exercised
without processes or a cloud. Nothing joins a coordinator: whoever drives the workload
(the simulator, a test) says which workers are busy through ``busy``.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable, Sequence

import attrs

from rexcore.plugins.descriptors import ComponentContext
from rexcore.providers.interface import (
    ProvidedWorker,
    ProvidedWorkerState,
    ProviderError,
    WorkerLaunch,
)

__all__ = ["MockProvider", "MockProviderOptions", "MockWorker", "create_mock_provider"]


@attrs.frozen
class MockProviderOptions:
    """Options of the ``mock`` provider.

    ``start_delay_s``: seconds from a create to the worker running. ``fail_creates``:
    how many create calls fail first; ``create_failure_rate``: the chance any later one
    fails (drawn from ``seed``).
    """

    start_delay_s: float = attrs.field(default=0.0, validator=attrs.validators.ge(0))
    fail_creates: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    create_failure_rate: float = attrs.field(default=0.0, validator=attrs.validators.and_(
        attrs.validators.ge(0), attrs.validators.le(1)))
    seed: int = 0


@attrs.define(eq=False)
class MockWorker:
    worker_id: str
    created_at: float
    running_at: float
    state: ProvidedWorkerState = ProvidedWorkerState.STARTING
    #: When it stopped (drained and idle, or terminated); None while it exists.
    stopped_at: float | None = None


class MockProvider:
    """A recording fake of :class:`~rexcore.providers.interface.WorkerProvider`."""

    def __init__(self, options: MockProviderOptions | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 busy: Callable[[str], bool] | None = None) -> None:
        self.options = options or MockProviderOptions()
        self.clock = clock
        #: Whether a worker still runs an action: a draining worker stops once it does not.
        self.busy = busy or (lambda worker_id: False)
        #: ``(method, argument)`` of every call, in order.
        self.calls: list[tuple[str, object]] = []
        #: Every worker ever created, stopped ones included (the simulator bills them).
        self.workers: dict[str, MockWorker] = {}
        #: The same workers in the order they were created (an index into it is stable).
        self.created: list[MockWorker] = []
        self._live: dict[str, MockWorker] = {}  # not stopped: what each call looks at
        self._ids = itertools.count(1)
        self._creates = 0
        self._random = random.Random(self.options.seed)

    def settle(self) -> None:
        """Bring worker states up to the clock: started ones run, idle draining ones stop."""
        now = self.clock()
        for worker in list(self._live.values()):
            if worker.state is ProvidedWorkerState.STARTING and now >= worker.running_at:
                worker.state = ProvidedWorkerState.RUNNING
            if worker.state is ProvidedWorkerState.DRAINING and not self.busy(worker.worker_id):
                self._stop(worker, now)

    def _stop(self, worker: MockWorker, now: float) -> None:
        worker.state, worker.stopped_at = ProvidedWorkerState.STOPPED, now
        self._live.pop(worker.worker_id, None)

    async def create_workers(self, count: int, launch: WorkerLaunch) -> Sequence[ProvidedWorker]:
        self.calls.append(("create_workers", count))
        self._creates += 1
        if self._creates <= self.options.fail_creates or (
            self._random.random() < self.options.create_failure_rate
        ):
            raise ProviderError(f"mock provider: create call {self._creates} fails as "
                                "configured (fail_creates, create_failure_rate)")
        now = self.clock()
        created = []
        for _ in range(count):
            worker = MockWorker(f"mock-{next(self._ids)}", now, now + self.options.start_delay_s)
            self.workers[worker.worker_id] = self._live[worker.worker_id] = worker
            self.created.append(worker)
            created.append(worker)
        self.settle()
        return [ProvidedWorker(w.worker_id, w.state) for w in created]

    async def list_workers(self) -> Sequence[ProvidedWorker]:
        self.settle()
        return [ProvidedWorker(w.worker_id, w.state) for w in self._live.values()]

    def _get(self, worker_id: str) -> MockWorker:
        worker = self._live.get(worker_id)
        if worker is None:
            raise ProviderError(f"mock provider: no worker {worker_id!r}")
        return worker

    async def drain(self, worker_id: str) -> None:
        self.calls.append(("drain", worker_id))
        self._get(worker_id).state = ProvidedWorkerState.DRAINING
        self.settle()

    async def terminate(self, worker_id: str) -> None:
        self.calls.append(("terminate", worker_id))
        worker = self.workers.get(worker_id)
        if worker is None:
            raise ProviderError(f"mock provider: no worker {worker_id!r}")
        if worker.stopped_at is None:
            self._stop(worker, self.clock())

    async def close(self) -> None:
        self.calls.append(("close", None))
        for worker in list(self._live.values()):
            self._stop(worker, self.clock())

    def running_ids(self) -> list[str]:
        """Workers that have started and not stopped (draining ones included)."""
        self.settle()
        return [w.worker_id for w in self._live.values()
                if w.state in (ProvidedWorkerState.RUNNING, ProvidedWorkerState.DRAINING)]


def create_mock_provider(options: MockProviderOptions, context: ComponentContext) -> MockProvider:
    return MockProvider(options)
