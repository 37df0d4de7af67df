"""Health checks that ``GET /healthz`` runs: built-in ones and those plugins offer."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import attrs

__all__ = ["HealthCheck", "HealthReport", "disk_space_check", "run_health_checks"]


@attrs.frozen
class HealthCheck:
    """A named async check returning ``(healthy, detail)``."""

    name: str
    check: Callable[[], Awaitable[tuple[bool, str]]] = attrs.field(repr=False)
    timeout_s: float = 2.0


@attrs.frozen
class HealthReport:
    healthy: bool
    checks: dict[str, dict[str, object]]


async def _run_one(check: HealthCheck) -> tuple[bool, str]:
    try:
        return await asyncio.wait_for(check.check(), check.timeout_s)
    except TimeoutError:
        return False, f"no answer within {check.timeout_s:g} s"
    except Exception as exc:  # a failing check is a finding, not a crash
        return False, f"{type(exc).__name__}: {exc}"


async def run_health_checks(checks: Sequence[HealthCheck]) -> HealthReport:
    results = await asyncio.gather(*(_run_one(c) for c in checks))
    report = {c.name: {"healthy": ok, "detail": detail} for c, (ok, detail) in zip(checks, results)}
    return HealthReport(all(ok for ok, _ in results), report)


def disk_space_check(path: Path, min_free_bytes: int = 64 * 1024 * 1024) -> HealthCheck:
    """Unhealthy when the file system holding ``path`` has less than ``min_free_bytes`` free."""

    async def check() -> tuple[bool, str]:
        usage = await asyncio.to_thread(shutil.disk_usage, path)
        detail = f"{usage.free // (1024 * 1024)} MiB free at {path}"
        return usage.free >= min_free_bytes, detail

    return HealthCheck(name="data_dir_disk_space", check=check)
