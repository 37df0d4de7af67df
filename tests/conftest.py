from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests._real_rexd import RexdProcesses

pytest_plugins = ["rexcore.testing"]

REPO = Path(__file__).resolve().parent.parent


def write_plugin_distribution(
    site: Path, distribution: str, module: str, source: str, version: str = "1.0"
) -> None:
    """Install a plugin the way pip would leave it: a module plus a ``.dist-info`` with an
    entry point in ``rexcore.plugins``, so discovery goes through real entry points."""
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    normalized = distribution.replace("-", "_")
    info = site / f"{normalized}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n"
    )
    (info / "entry_points.txt").write_text(f"[rexcore.plugins]\n{distribution} = {module}\n")
    (info / "RECORD").write_text("")


@pytest.fixture
def plugin_site(tmp_path: Path) -> Callable[..., Path]:
    """``add(distribution, module, source, version)`` installs a fake plugin into a
    site directory that :func:`run_rexd` puts on ``PYTHONPATH``."""
    site = tmp_path / "site"
    site.mkdir()

    def add(distribution: str, module: str, source: str, version: str = "1.0") -> Path:
        write_plugin_distribution(site, distribution, module, source, version)
        return site

    add.site = site  # type: ignore[attr-defined]
    return add


def rexd_env(site: Path | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REXCORE_")}
    paths = [str(site)] if site else []
    paths.append(str(REPO))
    env["PYTHONPATH"] = os.pathsep.join(paths)
    if site is not None:  # stevedore caches entry points; keep each test's cache apart
        env["XDG_CACHE_HOME"] = str(site.parent / "cache")
    env.update(extra)
    return env


def run_rexd(*args: str, site: Path | None = None, timeout: float = 60,
             **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rexcore.cli.rexd", *args], capture_output=True, text=True,
        env=rexd_env(site, **env), timeout=timeout,
    )


@pytest.fixture
def rexd_processes(tmp_path: Path) -> Iterator[RexdProcesses]:
    """Start real ``rexd serve`` processes (``rexd_processes.serve(workers=N)``); every
    process they and their actions leave is killed afterwards (see ``_real_rexd``)."""
    from tests._real_rexd import RexdProcesses

    processes = RexdProcesses(tmp_path)
    try:
        yield processes
    finally:
        processes.clean_up()
