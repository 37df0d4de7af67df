"""Reading ``rexd.toml``, applying command-line overrides, and resolving components.

Two steps, because component options can only be checked once plugins have loaded:

1. :func:`load_config` reads TOML (or nothing) into :class:`RexConfig`;
2. :func:`resolve_config` looks up every named component and structures its options into
   the descriptor's ``options_type``, collecting every problem with its ``$.path``.
"""

from __future__ import annotations

import copy
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from rexcore.config.converter import ConfigError, structure_config, unstructure_config
from rexcore.config.model import RexConfig
from rexcore.plugins.manager import PluginManager, RegisteredComponent, UnknownComponentError

__all__ = [
    "ResolvedComponent",
    "ResolvedConfig",
    "effective_config",
    "load_config",
    "read_config_file",
    "resolve_config",
    "set_option",
]


def read_config_file(path: Path | None) -> dict[str, Any]:
    """The raw TOML table of ``path`` (``{}`` for no file), or a ConfigError saying where."""
    if path is None:
        return {}
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError([f"$: config file {path} does not exist"], str(path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"$: not valid TOML: {exc}"], str(path)) from None
    except OSError as exc:
        raise ConfigError([f"$: cannot read {path}: {exc.strerror}"], str(path)) from None


def set_option(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in a raw config table, creating tables on the way."""
    *parents, leaf = dotted.split(".")
    table = raw
    for key in parents:
        table = table.setdefault(key, {})
        if not isinstance(table, dict):
            raise ConfigError([f"$.{dotted}: {key} is not a table"])
    table[leaf] = value


def load_config(
    path: Path | None = None, overrides: Mapping[str, Any] | None = None
) -> RexConfig:
    """Read ``path`` (optional), apply ``overrides`` (``dotted.key -> value``), validate."""
    raw = copy.deepcopy(read_config_file(path))
    for dotted, value in (overrides or {}).items():
        set_option(raw, dotted, value)
    return structure_config(raw, RexConfig, source=str(path) if path else "config")


@attrs.frozen
class ResolvedComponent:
    """A component picked by config: its registration and its structured options."""

    registered: RegisteredComponent
    options: Any

    @property
    def name(self) -> str:
        return self.registered.descriptor.name


@attrs.frozen
class ResolvedConfig:
    config: RexConfig
    blob_store: ResolvedComponent
    protocols: tuple[ResolvedComponent, ...]
    #: The worker provider of the pool (``None`` when the pool starts no workers).
    provider: ResolvedComponent | None = None
    #: The scaling policy (``None`` unless ``pool.enable_autoscale``).
    policy: ResolvedComponent | None = None

    @property
    def data_dir(self) -> Path:
        return self.config.data_path


def _resolve_one(
    plugins: PluginManager, kind: str, name: str, options: Any, path: str,
    problems: list[str],
) -> ResolvedComponent | None:
    try:
        registered = plugins.component(kind, name)
    except UnknownComponentError as exc:
        problems.append(f"{path}: {exc}")
        return None
    try:
        structured = structure_config(options or {}, registered.descriptor.options_type,
                                      path=f"{path}.options" if kind != "protocol" else path)
    except ConfigError as exc:
        problems.extend(exc.problems)
        return None
    return ResolvedComponent(registered, structured)


def resolve_config(config: RexConfig, plugins: PluginManager, source: str = "config") -> ResolvedConfig:
    """Pick every component config names and check its options; all problems at once."""
    problems: list[str] = []
    store_ref = config.storage.blob_store
    blob_store = _resolve_one(plugins, "blob_store", store_ref.name, store_ref.options,
                              "$.storage.blob_store", problems)
    available = plugins.components("protocol")
    protocols = []
    for name in config.protocols:
        if name not in available:
            known = ", ".join(sorted(available)) or "none"
            problems.append(
                f"$.protocols.{name}: unknown protocol {name!r}; available: {known} "
                "(a plugin distribution may provide it: see `rexd plugins list`)"
            )
    for name in sorted(available):
        table = dict(config.protocols.get(name, {}))
        enabled = table.pop("enabled", True)
        if not isinstance(enabled, bool):
            problems.append(f"$.protocols.{name}.enabled: expected bool, got {enabled!r}")
            continue
        if enabled:
            resolved = _resolve_one(plugins, "protocol", name, table, f"$.protocols.{name}",
                                    problems)
            if resolved is not None:
                protocols.append(resolved)
    provider = policy = None
    if config.pool.initial_workers or config.pool.autoscales:
        provider_ref = config.pool.provider
        provider = _resolve_one(plugins, "provider", provider_ref.name, provider_ref.options,
                                "$.pool.provider", problems)
    if config.pool.autoscales:
        pool = config.pool  # enable_predictive = false swaps in reactive, without options
        options = pool.policy.options if pool.policy_name == pool.policy.name else {}
        policy = _resolve_one(plugins, "scaling_policy", pool.policy_name, options,
                              "$.pool.policy", problems)
    if problems:
        raise ConfigError(problems, source)
    assert blob_store is not None
    return ResolvedConfig(config, blob_store, tuple(protocols), provider, policy)


def effective_config(resolved: ResolvedConfig) -> dict[str, Any]:
    """The config rexd runs with: every default filled in, every component's options."""
    data = unstructure_config(resolved.config)
    data["data_dir"] = str(resolved.data_dir)
    data["storage"]["blob_store"] = {
        "name": resolved.blob_store.name,
        "options": unstructure_config(resolved.blob_store.options),
    }
    protocols: dict[str, Any] = {
        p.name: {"enabled": True, **unstructure_config(p.options)} for p in resolved.protocols
    }
    for name, table in resolved.config.protocols.items():
        if table.get("enabled") is False:
            protocols[name] = {"enabled": False}
    data["protocols"] = protocols
    if resolved.provider is not None:
        data["pool"]["provider"] = {
            "name": resolved.provider.name,
            "options": unstructure_config(resolved.provider.options),
        }
    if resolved.policy is not None:
        data["pool"]["policy"] = {
            "name": resolved.policy.name,
            "options": unstructure_config(resolved.policy.options),
        }
    return data
