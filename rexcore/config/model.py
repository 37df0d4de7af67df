"""The shape of ``rexd.toml``. Every option has a default, so rexd runs with no file.

Component choices are ``{name, options}``: the name picks a descriptor registered by a
plugin, and ``options`` is structured into that descriptor's ``options_type`` once plugins
have loaded (:mod:`rexcore.config.resolve`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import attrs

from rexcore.artifacts.digest import DigestFunction
from rexcore.config.component import ComponentRef
from rexcore.core.loop import check_event_loop
from rexcore.pool.config import PoolConfig
from rexcore.scheduler.config import SchedulerConfig

__all__ = [
    "ActionCacheConfig",
    "ComponentRef",
    "LoggingConfig",
    "MetricsConfig",
    "PoolConfig",
    "PluginsConfig",
    "RexConfig",
    "SchedulerConfig",
    "StorageConfig",
    "default_data_dir",
]


def default_data_dir() -> Path:
    """``$REX_DATA_DIR``, else ``/var/lib/rex`` for root and ``~/.local/share/rex`` for
    everyone else.

    Root's home is private (0700), and a worker running as root runs its actions as an
    unprivileged user, who could not traverse it to reach an exec root by its absolute
    path (Bazel's test runner, for one, goes there by ``$PWD``); ``/var/lib`` is where a
    system daemon keeps its state anyway.
    """
    env = os.environ.get("REX_DATA_DIR")
    if env:
        return Path(env).expanduser()
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return Path("/var/lib/rex")
    return Path.home() / ".local" / "share" / "rex"


@attrs.frozen
class PluginsConfig:
    """Which plugin distributions rexd loads.

    ``load``: entry-point names (distribution names) to import; empty means every
    installed plugin, unless ``REXCORE_DISABLE_PLUGIN_AUTOLOAD=1``. ``REXCORE_PLUGINS=a,b``
    overrides ``load``. ``disable``: names never to import, even when installed.
    """

    load: list[str] = attrs.field(factory=list)
    disable: list[str] = attrs.field(factory=list)


@attrs.frozen
class ActionCacheConfig:
    """``enabled = false`` turns action-cache reads and writes off for every protocol.

    ``allow_client_updates``: whether clients may write results (REAPI UpdateActionResult,
    native ``PUT /v1/ac``); results of actions rex itself ran are always cached.
    ``max_entries_in_memory``: size of the in-memory index in front of the on-disk entries.
    """

    enabled: bool = True
    allow_client_updates: bool = True
    max_entries_in_memory: int = 100_000


@attrs.frozen
class StorageConfig:
    """Blobs and action results: the blob store backend and the digest functions served."""

    blob_store: ComponentRef = attrs.field(factory=lambda: ComponentRef("disk"))
    digest_functions: list[DigestFunction] = attrs.field(
        factory=lambda: [DigestFunction.SHA256, DigestFunction.BLAKE3]
    )
    action_cache: ActionCacheConfig = attrs.field(factory=ActionCacheConfig)

    @digest_functions.validator
    def _not_empty(self, _attribute: attrs.Attribute, value: list[DigestFunction]) -> None:
        if not value:
            raise ValueError("at least one digest function must be enabled (sha256, blake3)")


@attrs.frozen
class LoggingConfig:
    """``level``: debug, info, warning or error."""

    level: str = attrs.field(default="info")

    @level.validator
    def _known(self, _attribute: attrs.Attribute, value: str) -> None:
        if value.lower() not in {"debug", "info", "warning", "error"}:
            raise ValueError(f"unknown log level {value!r}; use debug, info, warning or error")


@attrs.frozen(kw_only=True)
class MetricsConfig:
    """The metrics collector (``[metrics]``); off while ``exporters`` is empty.

    ``exporters``: the exporters to feed, each ``{name, options}`` (built in: ``log`` and
    ``prometheus``; plugins add more). ``interval_s``: seconds between two snapshots pushed
    to every exporter (``prometheus`` also takes a fresh one on each scrape).
    """

    exporters: list[ComponentRef] = attrs.field(factory=list)
    interval_s: float = attrs.field(default=60.0, validator=attrs.validators.gt(0))


@attrs.frozen
class RexConfig:
    """The whole of ``rexd.toml``.

    ``protocols`` maps a protocol name to its options table; a protocol not named there
    runs with its defaults, and ``enabled = false`` in its table switches it off.
    ``sandboxes`` maps a sandbox name to its options, used by the workers.
    ``event_loop``: the asyncio loop of rexd and its local workers (:mod:`rexcore.core.loop`).
    """

    data_dir: str = ""
    event_loop: str = attrs.field(default="auto")
    plugins: PluginsConfig = attrs.field(factory=PluginsConfig)
    storage: StorageConfig = attrs.field(factory=StorageConfig)
    protocols: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    logging: LoggingConfig = attrs.field(factory=LoggingConfig)
    scheduler: SchedulerConfig = attrs.field(factory=SchedulerConfig)
    pool: PoolConfig = attrs.field(factory=PoolConfig)
    sandboxes: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    metrics: MetricsConfig = attrs.field(factory=MetricsConfig)

    @event_loop.validator
    def _known_loop(self, _attribute: attrs.Attribute, value: str) -> None:
        check_event_loop(value)

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser() if self.data_dir else default_data_dir()
