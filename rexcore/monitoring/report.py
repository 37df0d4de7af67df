"""``rex status``: the server's pool, queue and health, as rich tables or JSON.

The report is read from ``GET /v1/status`` (absent when the server runs no scheduler)
and ``GET /healthz``. ``--watch`` redraws it in place on a terminal (rich ``Live``) and
prints one report after another otherwise, until Ctrl-C.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import attrs
import orjson
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from rexcore.protocol.client import RexClient, RexClientError
from rexcore.serialization.codec import unstructure
from rexcore.serialization.operation import SchedulerStatus

__all__ = ["StatusReport", "fetch_status_report", "render_status_report", "show_status"]


@attrs.frozen
class StatusReport:
    """``status`` is None when the server runs no scheduler; ``health`` is ``/healthz``."""

    status: SchedulerStatus | None
    health: dict[str, Any]

    @property
    def healthy(self) -> bool:
        return self.health.get("status") == "ok"

    def as_json(self) -> dict[str, Any]:
        status = unstructure(self.status) if self.status is not None else None
        return {"healthy": self.healthy, "status": status, "health": self.health}


async def fetch_status_report(client: RexClient) -> StatusReport:
    health = await client.health()
    try:
        status: SchedulerStatus | None = await client.status()
    except RexClientError as exc:
        if exc.status != 404:  # 404: the server runs no scheduler, so no queue or pool
            raise
        status = None
    return StatusReport(status, health)


def _table(title: str, *columns: str) -> Table:
    table = Table(title=title, title_justify="left", title_style="bold")
    for index, column in enumerate(columns):
        table.add_column(column, justify="left" if index == 0 else "right")
    return table


def _pool_table(status: SchedulerStatus) -> Table:
    table = _table("Pool", "workers", "count")
    table.add_row("joined", str(status.workers_total))
    table.add_row("idle", str(status.workers_total - status.workers_busy))
    table.add_row("busy", str(status.workers_busy))
    pool = status.pool
    if pool is None:
        table.caption = "this rexd starts no workers; workers join with `rexd worker`"
        return table
    table.add_row("starting", str(pool.starting))
    table.add_row("draining", str(pool.draining))
    table.add_row("failed", str(pool.failed))
    table.add_row("desired", f"{pool.desired} (of {pool.min_workers}-{pool.max_workers})")
    if pool.autoscale:
        table.caption = (f"autoscaling with {pool.policy}: {pool.reason or 'no decision yet'}"
                         f"; {pool.scale_ups} up, {pool.scale_downs} down")
    if pool.last_provider_error:
        table.add_row("provider errors", str(pool.provider_errors))
    return table


def _queue_table(status: SchedulerStatus) -> Table:
    metrics = status.metrics
    table = _table("Queue", "operations", "count")
    table.add_row("queued", str(status.queued))
    table.add_row("executing", str(status.executing))
    table.add_row("executions", str(metrics.total_executions))
    table.add_row("  successful", str(metrics.successful_executions))
    table.add_row("  failed", str(metrics.failed_executions))
    table.add_row("cache hit rate", f"{metrics.cache_hit_rate:.1%} of {metrics.cache_lookups}")
    return table


def _health_table(health: dict[str, Any]) -> Table:
    table = _table("Health", "check", "state", "detail")
    table.columns[2].justify = "left"
    for name, check in sorted(health.get("checks", {}).items()):
        ok = bool(check.get("healthy"))
        state = Text("ok", style="green") if ok else Text("FAILING", style="bold red")
        table.add_row(name, state, str(check.get("detail", "")))
    overall = "ok" if health.get("status") == "ok" else "UNHEALTHY"
    table.caption = (f"{overall}: rex {health.get('version', '?')}, up "
                     f"{float(health.get('uptime_s', 0)):.0f} s")
    return table


def render_status_report(report: StatusReport) -> RenderableType:
    parts: list[RenderableType] = []
    if report.status is not None:
        parts += [_pool_table(report.status), _queue_table(report.status)]
    else:
        parts.append(Text("no scheduler on this server (scheduler.enabled = false): no pool "
                          "or queue to show"))
    parts.append(_health_table(report.health))
    return Group(*parts)


async def show_status(
    client: RexClient, console: Console, *, as_json: bool, watch: bool, interval_s: float
) -> int:
    """Print the report once (exit status 0 when healthy, 1 when not) or, with ``watch``,
    every ``interval_s`` seconds until cancelled."""
    if not watch:
        report = await fetch_status_report(client)
        if as_json:
            console.file.write(orjson.dumps(report.as_json()).decode() + "\n")
        else:
            console.print(render_status_report(report))
        return 0 if report.healthy else 1
    if as_json or not console.is_terminal:
        while True:  # one report after another: a log a script or a file can follow
            shown = await _fetch_shown(client, as_json)
            if as_json:
                console.file.write(shown + "\n")  # type: ignore[operator]
                console.file.flush()
            else:
                console.rule(time.strftime("%H:%M:%S"))
                console.print(shown)
                console.file.flush()
            await asyncio.sleep(interval_s)
    from rich.live import Live

    with Live(console=console, auto_refresh=False) as live:
        while True:
            live.update(Group(Text(time.strftime("%H:%M:%S") + f"  every {interval_s:g} s, "
                                   "Ctrl-C to stop", style="dim"),
                              await _fetch_shown(client, False)), refresh=True)
            await asyncio.sleep(interval_s)


async def _fetch_shown(client: RexClient, as_json: bool) -> Any:
    """The report as it is shown, or the error while the server does not answer (a watch
    keeps going through a restart of the server)."""
    try:
        report = await fetch_status_report(client)
    except RexClientError as exc:
        if as_json:
            return orjson.dumps({"error": str(exc)}).decode()
        return Text(f"rex: {exc}", style="red")
    return orjson.dumps(report.as_json()).decode() if as_json else render_status_report(report)
