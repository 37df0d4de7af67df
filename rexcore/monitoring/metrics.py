"""The metrics collector: one snapshot of the service, pushed to every configured exporter.

A :class:`MetricsSnapshot` is read from the scheduler's counters and status and from the
worker pool; the collector takes one every ``[metrics] interval_s`` and hands it to each
exporter named in ``[metrics] exporters`` (components offered through the
``rexcore_metrics_exporters`` hook). An exporter that is scraped rather than pushed to
(:class:`ScrapedExporter`, e.g. ``prometheus``) gets a fresh snapshot on each scrape.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import attrs

from rexcore.config.converter import ConfigError, structure_config
from rexcore.config.model import MetricsConfig
from rexcore.monitoring.status import pool_status
from rexcore.plugins.descriptors import ComponentContext, MetricsExporterDescriptor
from rexcore.plugins.manager import PluginManager, UnknownComponentError

if TYPE_CHECKING:
    from rexcore.core.runtime import ServiceRuntime

__all__ = [
    "LogExporter",
    "LogExporterOptions",
    "MetricsCollector",
    "MetricsExporter",
    "MetricsSnapshot",
    "ResolvedExporter",
    "ScrapedExporter",
    "build_collector",
    "create_log_exporter",
    "resolve_exporters",
]

log = logging.getLogger(__name__)


@attrs.frozen(kw_only=True)
class MetricsSnapshot:
    """The service at one moment; counters count since the coordinator started."""

    #: Executions that ran on a worker and ended, and of those, how many exited 0.
    total_executions: int = 0
    successful_executions: int = 0
    failed_executions: int = 0
    #: Submissions answered from the action cache, of ``cache_lookups``.
    cache_hits: int = 0
    cache_lookups: int = 0
    cache_hit_rate: float = 0.0
    #: Operations waiting for a worker, and running on one.
    queue_depth: int = 0
    executing: int = 0
    #: Joined workers (the pool's and remote ones), idle and busy.
    active_workers: int = 0
    idle_workers: int = 0
    busy_workers: int = 0
    #: ``busy_workers / active_workers`` (0 with no worker).
    worker_utilisation: float = 0.0
    #: The pool's workers not joined yet, draining, failed since start, and its target.
    starting_workers: int = 0
    draining_workers: int = 0
    failed_workers: int = 0
    desired_workers: int = 0
    uptime_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


class MetricsExporter(Protocol):
    """What a ``rexcore_metrics_exporters`` descriptor's ``factory(options, context)``
    builds. ``export`` is called on the event loop: it must not block (hand slow I/O to
    a thread or a task of its own)."""

    def export(self, snapshot: MetricsSnapshot) -> None: ...

    async def close(self) -> None: ...


@runtime_checkable
class ScrapedExporter(MetricsExporter, Protocol):
    """An exporter that ``GET /metrics`` serves: ``render()`` is the body, in
    ``content_type``, of the snapshot last exported."""

    content_type: str

    def render(self) -> bytes: ...


@attrs.frozen
class ResolvedExporter:
    name: str
    descriptor: MetricsExporterDescriptor
    options: Any


def resolve_exporters(config: MetricsConfig, plugins: PluginManager) -> list[ResolvedExporter]:
    """Look up every exporter ``[metrics] exporters`` names and structure its options;
    a :class:`ConfigError` lists every problem with its ``$.path``."""
    problems: list[str] = []
    resolved: list[ResolvedExporter] = []
    seen: set[str] = set()
    for index, ref in enumerate(config.exporters):
        path = f"$.metrics.exporters[{index}]"
        if ref.name in seen:
            problems.append(f"{path}: exporter {ref.name!r} is named twice; keep one")
            continue
        seen.add(ref.name)
        try:
            descriptor = plugins.component("metrics_exporter", ref.name).descriptor
        except UnknownComponentError as exc:
            problems.append(f"{path}: {exc}")
            continue
        availability = descriptor.availability()
        if not availability.available:
            problems.append(f"{path}: metrics exporter {ref.name!r} cannot run here: "
                            f"{availability.reason}; remove it from [metrics] exporters")
            continue
        try:
            options: Any = structure_config(ref.options, descriptor.options_type,
                                       path=f"{path}.options")
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        assert isinstance(descriptor, MetricsExporterDescriptor)
        resolved.append(ResolvedExporter(ref.name, descriptor, options))
    if problems:
        raise ConfigError(problems)
    return resolved


class MetricsCollector:
    """Takes snapshots of ``runtime`` and feeds ``exporters`` every ``interval_s``."""

    def __init__(self, runtime: ServiceRuntime, exporters: dict[str, MetricsExporter],
                 interval_s: float) -> None:
        self.runtime = runtime
        self.exporters = exporters
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    async def snapshot(self) -> MetricsSnapshot:
        runtime = self.runtime
        uptime_s = time.time() - runtime.started_at
        scheduler = runtime.scheduler
        if scheduler is None:
            return MetricsSnapshot(uptime_s=uptime_s)
        status = scheduler.status()
        counters = status.metrics
        pool = await pool_status(runtime.pool, scheduler.worker_loads()) if (
            runtime.pool is not None) else None
        active, busy = status.workers_total, status.workers_busy
        return MetricsSnapshot(
            total_executions=counters.total_executions,
            successful_executions=counters.successful_executions,
            failed_executions=counters.failed_executions,
            cache_hits=counters.cache_hits, cache_lookups=counters.cache_lookups,
            cache_hit_rate=counters.cache_hit_rate,
            queue_depth=status.queued, executing=status.executing,
            active_workers=active, idle_workers=active - busy, busy_workers=busy,
            worker_utilisation=busy / active if active else 0.0,
            starting_workers=pool.starting if pool else 0,
            draining_workers=pool.draining if pool else 0,
            failed_workers=pool.failed if pool else 0,
            desired_workers=pool.desired if pool else 0,
            uptime_s=uptime_s,
        )

    async def export(self) -> MetricsSnapshot:
        """Take a snapshot and hand it to every exporter (one's failure is only logged)."""
        snapshot = await self.snapshot()
        for name, exporter in self.exporters.items():
            try:
                exporter.export(snapshot)
            except Exception:
                log.exception("metrics exporter %s failed; it gets the next snapshot", name)
        return snapshot

    async def scrape(self) -> tuple[bytes, str] | None:
        """A fresh snapshot as the first scraped exporter renders it (None: none is
        configured)."""
        for exporter in self.exporters.values():
            if isinstance(exporter, ScrapedExporter):
                exporter.export(await self.snapshot())
                return exporter.render(), exporter.content_type
        return None

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="rex-metrics")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.export()
            except Exception:  # a snapshot that cannot be taken now may be taken next time
                log.exception("metrics: taking a snapshot failed; trying again in %gs",
                              self.interval_s)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for name, exporter in self.exporters.items():
            try:
                await exporter.close()
            except Exception:
                log.exception("metrics exporter %s failed to close", name)


async def build_collector(
    runtime: ServiceRuntime, config: MetricsConfig, exporters: Sequence[ResolvedExporter],
    context: ComponentContext,
) -> MetricsCollector:
    """Build every exporter and a collector feeding them (not started)."""
    built: dict[str, MetricsExporter] = {}
    for exporter in exporters:
        made = exporter.descriptor.factory(exporter.options, context)
        if asyncio.iscoroutine(made):
            made = await made
        built[exporter.name] = made
    return MetricsCollector(runtime, built, config.interval_s)


# -- the built-in ``log`` exporter ----------------------------------------------------------

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}


@attrs.frozen
class LogExporterOptions:
    """Options of the ``log`` exporter: the ``level`` of its line (debug, info, warning)."""

    level: str = attrs.field(default="info")

    @level.validator
    def _known(self, _attribute: attrs.Attribute, value: str) -> None:
        if value not in _LEVELS:
            raise ValueError(f"unknown level {value!r}; use {', '.join(_LEVELS)}")


class LogExporter:
    """Writes each snapshot as one ``key=value`` line to the ``rexcore.metrics`` logger."""

    def __init__(self, options: LogExporterOptions) -> None:
        self.level = _LEVELS[options.level]
        self.logger = logging.getLogger("rexcore.metrics")

    def export(self, snapshot: MetricsSnapshot) -> None:
        fields = " ".join(
            f"{key}={value:.3f}" if isinstance(value, float) else f"{key}={value}"
            for key, value in snapshot.as_dict().items()
        )
        self.logger.log(self.level, "metrics %s", fields)

    async def close(self) -> None:
        return None


def create_log_exporter(options: LogExporterOptions, context: ComponentContext) -> LogExporter:
    """The ``log`` descriptor's factory."""
    return LogExporter(options)
