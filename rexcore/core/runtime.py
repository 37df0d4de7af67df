"""The running service's parts, handed to every protocol adapter."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from rexcore.artifacts.digest import DigestFunction

if TYPE_CHECKING:
    from rexcore.artifacts.action_cache import ActionCache
    from rexcore.artifacts.store import BlobStore
    from rexcore.config.model import RexConfig
    from rexcore.monitoring.health import HealthCheck
    from rexcore.monitoring.metrics import MetricsCollector
    from rexcore.plugins.manager import PluginManager
    from rexcore.pool.pool import WorkerPool
    from rexcore.scheduler.scheduler import Scheduler

__all__ = ["ServiceRuntime"]


@attrs.define(eq=False)
class ServiceRuntime:
    """What a protocol serves: the blob store, the action cache, config and plugins."""

    config: RexConfig
    data_dir: Path
    blob_store: BlobStore
    action_cache: ActionCache
    plugins: PluginManager
    digest_functions: tuple[DigestFunction, ...] = (DigestFunction.SHA256, DigestFunction.BLAKE3)
    started_at: float = attrs.field(factory=time.time)
    #: Checks ``GET /healthz`` runs: built-in ones and those plugins offer.
    health_checks: list[HealthCheck] = attrs.field(factory=list)
    #: The coordinator, when ``scheduler.enabled``; protocols serve execution through it.
    scheduler: Scheduler | None = None
    #: The worker pool, when this rexd starts workers; health checks and status read it.
    pool: WorkerPool | None = None
    #: The metrics collector, when ``[metrics] exporters`` names any; ``/metrics`` scrapes it.
    metrics: MetricsCollector | None = None
