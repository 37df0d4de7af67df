"""The plugin manager: a typed facade over pluggy, fed by :mod:`rexcore.plugins.discovery`.

Core code never calls pluggy directly: it asks this manager for components by kind and
name, and fires lifecycle hooks through its methods.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any

import attrs
import pluggy

from rexcore import __version__, hookspecs
from rexcore.plugins import discovery
from rexcore.plugins.descriptors import (
    BlobStoreDescriptor,
    ComponentDescriptor,
    MetricsExporterDescriptor,
    ProbeResult,
    ProtocolDescriptor,
    ProviderDescriptor,
    SandboxDescriptor,
    ScalingPolicyDescriptor,
)

if TYPE_CHECKING:
    from rexcore.config.model import PluginsConfig, RexConfig
    from rexcore.core.runtime import ServiceRuntime
    from rexcore.monitoring.health import HealthCheck

__all__ = [
    "BUILTIN_PLUGIN",
    "PluginConflictError",
    "PluginError",
    "PluginInfo",
    "PluginLoadError",
    "PluginManager",
    "PluginSelection",
    "RegisteredComponent",
    "UnknownComponentError",
    "build_plugin_manager",
    "select_plugins",
]

log = logging.getLogger(__name__)

BUILTIN_PLUGIN = "rexcore"

DESCRIPTOR_TYPES: dict[str, type[ComponentDescriptor]] = {
    "protocol": ProtocolDescriptor,
    "sandbox": SandboxDescriptor,
    "provider": ProviderDescriptor,
    "scaling_policy": ScalingPolicyDescriptor,
    "metrics_exporter": MetricsExporterDescriptor,
    "blob_store": BlobStoreDescriptor,
}

_KIND_LABEL = {kind: kind.replace("_", " ") for kind in DESCRIPTOR_TYPES}


class PluginError(Exception):
    """Base of every plugin-system error."""


class PluginLoadError(PluginError):
    """A plugin that rexd was configured to use failed to import, register or run a hook."""


class PluginConflictError(PluginError):
    """Two plugins offer a component of one kind under one name."""


class UnknownComponentError(PluginError, LookupError):
    """Config names a component that no loaded plugin offers."""


@attrs.frozen
class RegisteredComponent:
    descriptor: ComponentDescriptor
    plugin: str
    distribution: str
    version: str

    @property
    def origin(self) -> str:
        return f"{self.distribution} {self.version}"


@attrs.define
class _PluginRecord:
    name: str
    distribution: str
    version: str
    status: str  # active | disabled | failed (unavailable is derived from components)
    reason: str = ""


@attrs.frozen
class PluginInfo:
    """One row of ``rexd plugins list``."""

    name: str
    distribution: str
    version: str
    status: str
    reason: str
    components: tuple[dict[str, Any], ...]


@attrs.frozen
class PluginSelection:
    """Which entry points to import (``None``: all) and why the others are not imported."""

    names: list[str] | None
    disabled: dict[str, str]
    explicit: bool


def _env_list(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def select_plugins(
    config: PluginsConfig | None,
    installed: Iterable[str],
    environ: Mapping[str, str] | None = None,
) -> PluginSelection:
    """Apply ``REXCORE_PLUGINS``, ``plugins.load``, autoload and ``plugins.disable``."""
    environ = os.environ if environ is None else environ
    installed = list(installed)
    wanted: list[str] | None
    if environ.get("REXCORE_PLUGINS", "").strip():
        wanted, why_not = _env_list(environ["REXCORE_PLUGINS"]), "not in REXCORE_PLUGINS"
    elif config is not None and config.load:
        wanted, why_not = list(config.load), "not in plugins.load"
    elif environ.get("REXCORE_DISABLE_PLUGIN_AUTOLOAD", "") not in ("", "0"):
        wanted, why_not = [], "REXCORE_DISABLE_PLUGIN_AUTOLOAD is set"
    else:
        wanted, why_not = None, ""
    explicit = wanted is not None and bool(wanted)
    blocked = set(config.disable) if config is not None else set()
    disabled = {name: "in plugins.disable" for name in installed if name in blocked}
    if wanted is None:
        names = None if not blocked else [n for n in installed if n not in blocked]
    else:
        names = [n for n in wanted if n not in blocked]
        disabled |= {n: why_not for n in installed if n not in wanted and n not in disabled}
    return PluginSelection(names=names, disabled=disabled, explicit=explicit)


class PluginManager:
    """Registers built-ins and discovered plugins; looks components up by kind and name."""

    def __init__(self) -> None:
        self._pm = pluggy.PluginManager("rexcore")
        self._pm.add_hookspecs(hookspecs)
        self._records: dict[str, _PluginRecord] = {}
        self._components: dict[str, dict[str, RegisteredComponent]] | None = None
        self._strict = True

    # -- registration ---------------------------------------------------------------

    @property
    def hook(self) -> pluggy.HookRelay:
        """Pluggy's hook relay, for plugins that define hooks of their own."""
        return self._pm.hook

    def add_hookspecs(self, module_or_class: object) -> None:
        self._pm.add_hookspecs(module_or_class)

    def register(
        self, plugin: object, *, name: str, distribution: str | None = None,
        version: str = "",
    ) -> None:
        """Register a module or object of hook implementations under ``name``."""
        distribution = distribution or name
        try:
            self._pm.register(plugin, name=name)
        except (pluggy.PluginValidationError, ValueError) as exc:
            self._fail(name, distribution, version, f"invalid hook implementation: {exc}")
            return
        self._records[name] = _PluginRecord(name, distribution, version, "active")
        self._components = None

    def is_registered(self, name: str) -> bool:
        return self._pm.has_plugin(name)

    def unregister(self, name: str) -> None:
        self._pm.unregister(name=name)
        self._records.pop(name, None)
        self._components = None

    def register_builtins(self) -> None:
        from rexcore import builtin

        self.register(builtin, name=BUILTIN_PLUGIN, distribution="rexcore", version=__version__)

    def load_installed(self, selection: PluginSelection, *, strict: bool) -> None:
        """Import the selected entry points and register them.

        ``strict`` (rexd) raises :class:`PluginLoadError` on the first failure and when an
        explicitly named plugin is not installed; otherwise failures are recorded and shown
        by :meth:`plugin_infos`.
        """
        self._strict = strict
        installed = discovery.installed_entry_points()
        for name, reason in selection.disabled.items():
            distribution, version = installed.get(name, (name, ""))
            self._records[name] = _PluginRecord(name, distribution, version, "disabled", reason)
        if selection.names is not None:
            missing = [n for n in selection.names if n not in installed]
            if missing and strict:
                raise PluginLoadError(
                    f"plugin(s) {', '.join(missing)} are configured but not installed; "
                    f"installed plugins: {', '.join(installed) or 'none'}; "
                    "install them (pip install NAME) or remove them from plugins.load "
                    "/ REXCORE_PLUGINS"
                )
            for name in missing:
                self._records[name] = _PluginRecord(name, name, "", "failed", "not installed")
            names: list[str] | None = [n for n in selection.names if n in installed]
        else:
            names = None
        if names == []:
            return
        plugins, failures = discovery.discover(names)
        for failure in failures:
            if strict:
                raise PluginLoadError(
                    f"plugin {failure.name} (distribution {failure.distribution} "
                    f"{failure.version}) failed to load: {failure.cause}\n"
                    f"fix or uninstall {failure.distribution}, or leave it out with "
                    "plugins.disable / REXCORE_PLUGINS\n" + failure.traceback
                )
            self._records[failure.name] = _PluginRecord(
                failure.name, failure.distribution, failure.version, "failed", failure.cause
            )
        for plugin in plugins:
            self._register_discovered(plugin.module, plugin.name, plugin.distribution,
                                      plugin.version)

    def _register_discovered(self, module: ModuleType, name: str, distribution: str,
                             version: str) -> None:
        self.register(module, name=name, distribution=distribution, version=version)

    def _fail(self, name: str, distribution: str, version: str, cause: str) -> None:
        if self._strict:
            raise PluginLoadError(
                f"plugin {name} (distribution {distribution} {version}) failed: {cause}; "
                f"fix or uninstall {distribution}, or leave it out with plugins.disable "
                "/ REXCORE_PLUGINS"
            )
        self._records[name] = _PluginRecord(name, distribution, version, "failed", cause)
        if self._pm.has_plugin(name):
            self._pm.unregister(name=name)

    # -- components -----------------------------------------------------------------

    def _collect(self) -> dict[str, dict[str, RegisteredComponent]]:
        if self._components is not None:
            return self._components
        found: dict[str, dict[str, RegisteredComponent]] = {k: {} for k in DESCRIPTOR_TYPES}
        for kind, hook_name in hookspecs.REGISTRATION_HOOKS.items():
            expected = DESCRIPTOR_TYPES[kind]
            for impl in getattr(self._pm.hook, hook_name).get_hookimpls():
                record = self._records.get(impl.plugin_name)
                if record is None or record.status != "active":
                    continue
                try:
                    descriptors = list(impl.function() or ())
                    for descriptor in descriptors:
                        if not isinstance(descriptor, expected):
                            raise TypeError(
                                f"{hook_name} must yield {expected.__name__}, "
                                f"got {descriptor!r}"
                            )
                except Exception as exc:
                    self._fail(record.name, record.distribution, record.version,
                               f"{hook_name} raised {type(exc).__name__}: {exc}")
                    continue
                for descriptor in descriptors:
                    entry = RegisteredComponent(
                        descriptor, record.name, record.distribution, record.version
                    )
                    previous = found[kind].get(descriptor.name)
                    if previous is None:
                        found[kind][descriptor.name] = entry
                        continue
                    message = (
                        f"{_KIND_LABEL[kind]} {descriptor.name!r} is offered by both "
                        f"{previous.origin} and {entry.origin}; uninstall one of them "
                        "or leave one out with plugins.disable"
                    )
                    if self._strict:
                        raise PluginConflictError(message)
                    self._records[record.name].status = "failed"
                    self._records[record.name].reason = message
        # A plugin that failed mid-way must not leave half of its components behind.
        for kind in found:
            found[kind] = {
                n: c for n, c in found[kind].items()
                if self._records[c.plugin].status == "active"
            }
        self._components = found
        return found

    def components(self, kind: str) -> dict[str, RegisteredComponent]:
        """Every component of ``kind`` offered by an active plugin, by name."""
        if kind not in DESCRIPTOR_TYPES:
            raise ValueError(f"unknown component kind {kind!r}; kinds: {', '.join(DESCRIPTOR_TYPES)}")
        return dict(self._collect()[kind])

    def component(self, kind: str, name: str) -> RegisteredComponent:
        """The component ``name`` of ``kind``, or an error listing what is available."""
        components = self.components(kind)
        if name in components:
            return components[name]
        available = ", ".join(sorted(components)) or "none"
        raise UnknownComponentError(
            f"unknown {_KIND_LABEL[kind]} {name!r}; available: {available} "
            "(a plugin distribution may provide it: see `rexd plugins list`)"
        )

    # -- listing --------------------------------------------------------------------

    def plugin_infos(self) -> list[PluginInfo]:
        collected = self._collect()
        by_plugin: dict[str, list[dict[str, Any]]] = {name: [] for name in self._records}
        for kind, entries in collected.items():
            for name, entry in sorted(entries.items()):
                availability: ProbeResult = entry.descriptor.availability()
                by_plugin[entry.plugin].append({
                    "kind": kind, "name": name, "available": availability.available,
                    "reason": availability.reason,
                })
        infos = []
        for name, record in sorted(self._records.items(), key=lambda kv: (kv[0] != BUILTIN_PLUGIN, kv[0])):
            components = by_plugin.get(name, [])
            status, reason = record.status, record.reason
            if status == "active" and components and not any(c["available"] for c in components):
                status = "unavailable"
                reason = "; ".join(f"{c['name']}: {c['reason']}" for c in components)
            infos.append(PluginInfo(name, record.distribution, record.version, status, reason,
                                    tuple(components)))
        return infos

    # -- lifecycle hooks (typed facade) ---------------------------------------------

    def configure(self, config: RexConfig) -> None:
        self._pm.hook.rexcore_configure(config=config)

    def service_started(self, runtime: ServiceRuntime) -> None:
        self._pm.hook.rexcore_service_started(runtime=runtime)

    def service_stopping(self, runtime: ServiceRuntime) -> None:
        for impl in self._pm.hook.rexcore_service_stopping.get_hookimpls():
            try:
                impl.function(**{a: runtime for a in impl.argnames})
            except Exception:
                log.exception("plugin %s failed in rexcore_service_stopping", impl.plugin_name)

    def health_checks(self, runtime: ServiceRuntime) -> list[HealthCheck]:
        checks: list[HealthCheck] = []
        for result in self._pm.hook.rexcore_health_checks(runtime=runtime):
            checks.extend(result or ())
        return checks


def build_plugin_manager(config: PluginsConfig | None, *, strict: bool) -> PluginManager:
    """Built-ins plus the installed plugins that ``config`` and the environment select.

    ``strict`` (rexd, the Python API) raises on any plugin failure; otherwise failures are
    recorded for ``rexd plugins list``.
    """
    manager = PluginManager()
    manager.register_builtins()
    manager.load_installed(select_plugins(config, discovery.installed_names()), strict=strict)
    return manager
