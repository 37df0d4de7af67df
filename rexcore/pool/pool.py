"""The worker pool: keeps the configured number of workers through a provider.

Autoscaling (policies moving the size with the load) arrives with the pool issue; today
the pool starts ``target_workers`` and the provider replaces crashed ones.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from rexcore.pool.config import PoolConfig
from rexcore.providers.interface import ProvidedWorker, WorkerLaunch, WorkerProvider

__all__ = ["WorkerPool"]

log = logging.getLogger(__name__)


class WorkerPool:
    def __init__(self, config: PoolConfig, provider: WorkerProvider, launch: WorkerLaunch) -> None:
        self.config = config
        self.provider = provider
        self.launch = launch

    async def start(self) -> None:
        if self.config.enable_autoscale:
            log.warning("pool.enable_autoscale is set, but autoscaling is not available yet; "
                        "the pool stays at %d workers", self.config.initial_workers)
        if self.config.initial_workers:
            await self.provider.create_workers(self.config.initial_workers, self.launch)

    async def workers(self) -> Sequence[ProvidedWorker]:
        return await self.provider.list_workers()

    async def stop(self) -> None:
        """Drain every worker (running actions finish), then stop them."""
        await self.provider.close()
