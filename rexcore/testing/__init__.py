"""Pytest support for rex and its plugin authors (install ``rexcore[testing]``).

Opt in from a ``conftest.py``::

    pytest_plugins = ["rexcore.testing"]

Fixtures:

- ``plugin_manager``: a fresh :class:`~rexcore.plugins.manager.PluginManager` with the
  built-ins registered and no installed plugin loaded;
- ``register``: ``register(module_or_object, name="...")`` registers hook implementations
  on that manager for the length of the test;
- ``rexd``: an in-process rexd (built from ``rexd_config``, a dict shaped like
  ``rexd.toml``) on free ports of 127.0.0.1, with a data dir under ``tmp_path``; it gives
  ``url`` (the native HTTP API), ``addresses`` (protocol name -> ``host:port``) and
  ``runtime``.

Contract tests for each component kind live in :mod:`rexcore.testing.contracts`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from rexcore.config.converter import structure_config
from rexcore.config.loader import resolve_config, set_option
from rexcore.config.model import RexConfig
from rexcore.core.daemon import Daemon
from rexcore.core.runtime import ServiceRuntime
from rexcore.plugins.manager import PluginManager

__all__ = ["RunningRexd", "plugin_manager", "register", "rexd", "rexd_config", "start_rexd"]


@attrs.define
class RunningRexd:
    daemon: Daemon
    runtime: ServiceRuntime
    addresses: dict[str, str]

    @property
    def url(self) -> str:
        """Base URL of the native HTTP API."""
        return f"http://{self.addresses['native']}"


async def start_rexd(
    plugins: PluginManager, data_dir: Path, config: dict[str, Any] | None = None
) -> RunningRexd:
    """Start a rexd in this event loop; every protocol with a ``listen`` option gets a free
    port unless ``config`` sets one, and no local worker starts unless
    ``pool.target_workers`` is set. Stop it with ``await running.daemon.stop()``."""
    raw: dict[str, Any] = {"data_dir": str(data_dir), **(config or {})}
    if "target_workers" not in raw.get("pool", {}):  # workers only when a test asks for them
        set_option(raw, "pool.target_workers", 0)
    for name, registered in plugins.components("protocol").items():
        if "listen" in attrs.fields_dict(registered.descriptor.options_type):
            if "listen" not in raw.get("protocols", {}).get(name, {}):
                set_option(raw, f"protocols.{name}.listen", "127.0.0.1:0")
    resolved = resolve_config(structure_config(raw, RexConfig), plugins)
    daemon = Daemon(resolved, plugins)
    runtime = await daemon.start()
    addresses = {name: server.addresses[0] for name, server in daemon.protocols.items()}
    return RunningRexd(daemon, runtime, addresses)


@pytest.fixture
def plugin_manager() -> PluginManager:
    manager = PluginManager()
    manager.register_builtins()
    return manager


@pytest.fixture
def register(plugin_manager: PluginManager) -> Iterator[Callable[..., None]]:
    names: list[str] = []

    def register(plugin: object, name: str = "test-plugin", **kwargs: Any) -> None:
        plugin_manager.register(plugin, name=name, **kwargs)
        names.append(name)

    yield register
    for name in names:
        if plugin_manager.is_registered(name):
            plugin_manager.unregister(name)


@pytest.fixture
def rexd_config() -> dict[str, Any]:
    """Override to give the ``rexd`` fixture a config (shaped like ``rexd.toml``)."""
    return {}


@pytest.fixture
async def rexd(
    plugin_manager: PluginManager, tmp_path: Path, rexd_config: dict[str, Any]
) -> AsyncIterator[RunningRexd]:
    running = await start_rexd(plugin_manager, tmp_path / "rexd-data", rexd_config)
    try:
        yield running
    finally:
        await running.daemon.stop()
