"""What every worker provider implements: create, list, drain and terminate workers.

A provider starts ``rexd worker`` processes somewhere (this host, EC2, Kubernetes) that
join the coordinator at ``WorkerLaunch.coordinator_url`` with its join token. The pool
decides how many; the provider only does what it is told and reports what exists.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import attrs

__all__ = ["ProviderError", "ProvidedWorker", "ProvidedWorkerState", "WorkerLaunch", "WorkerProvider"]


class ProviderError(Exception):
    """The provider could not do what it was asked (capacity, quota, credentials...)."""


class ProvidedWorkerState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


@attrs.frozen
class WorkerLaunch:
    """How a new worker reaches its coordinator and what it offers."""

    coordinator_url: str
    join_token: str = ""
    slots: int = 1
    properties: tuple[tuple[str, str], ...] = ()
    sandbox: str = "auto"


@attrs.frozen
class ProvidedWorker:
    """One worker as its provider sees it; ``reason`` explains a failed one."""

    worker_id: str
    state: ProvidedWorkerState
    reason: str = ""


@runtime_checkable
class WorkerProvider(Protocol):
    """Built by a ``rexcore_providers`` descriptor's ``factory(options, context)``."""

    async def create_workers(self, count: int, launch: WorkerLaunch) -> Sequence[ProvidedWorker]:
        """Start ``count`` workers; returns them (maybe still starting)."""
        ...

    async def list_workers(self) -> Sequence[ProvidedWorker]:
        """Every worker this provider started that still exists."""
        ...

    async def drain(self, worker_id: str) -> None:
        """Ask a worker to finish its running actions, take no new ones, and exit."""
        ...

    async def terminate(self, worker_id: str) -> None:
        """Stop a worker now (after a drain, or when it is lost)."""
        ...

    async def close(self) -> None:
        """Stop every worker and release resources."""
        ...
