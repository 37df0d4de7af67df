"""Finding and importing plugin distributions: the only module that talks to stevedore.

Each plugin distribution declares one entry point in the group ``rexcore.plugins`` whose
name is the distribution name and whose value is its plugin module. rexd imports only the
names its config enables (``NamedExtensionManager``); listings import everything but
disabled names and report failures instead of raising.
"""

from __future__ import annotations

import importlib.metadata
import traceback
from collections.abc import Collection
from types import ModuleType

import attrs
from stevedore import ExtensionManager, NamedExtensionManager

__all__ = ["ENTRY_POINT_GROUP", "DiscoveredPlugin", "LoadFailure", "discover", "installed_names"]

ENTRY_POINT_GROUP = "rexcore.plugins"


@attrs.frozen
class LoadFailure:
    name: str
    distribution: str
    version: str
    cause: str
    traceback: str = attrs.field(repr=False, default="")


@attrs.frozen
class DiscoveredPlugin:
    name: str
    distribution: str
    version: str
    module: ModuleType


def _dist_of(entry_point: importlib.metadata.EntryPoint) -> tuple[str, str]:
    dist = getattr(entry_point, "dist", None)
    if dist is not None:
        return dist.metadata["Name"], dist.version
    return entry_point.name, "unknown"


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    return sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name)


def installed_names() -> list[str]:
    """Entry-point names of every installed plugin, without importing any of them."""
    return [ep.name for ep in _entry_points()]


def installed_entry_points() -> dict[str, tuple[str, str]]:
    """Entry-point name -> (distribution, version), without importing anything."""
    return {ep.name: _dist_of(ep) for ep in _entry_points()}


def discover(
    names: Collection[str] | None,
) -> tuple[list[DiscoveredPlugin], list[LoadFailure]]:
    """Import the plugins named (``None``: every installed one); failures are returned."""
    failures: list[LoadFailure] = []
    # stevedore hands back cached entry points without their distribution; ask
    # importlib.metadata once instead.
    distributions = installed_entry_points()

    def on_failure(_manager: object, entry_point: importlib.metadata.EntryPoint,
                   exc: BaseException) -> None:
        distribution, version = distributions.get(entry_point.name, _dist_of(entry_point))
        failures.append(LoadFailure(
            name=entry_point.name, distribution=distribution, version=version,
            cause=f"{type(exc).__name__}: {exc}",
            traceback="".join(traceback.format_exception(exc)),
        ))

    if names is None:
        manager: ExtensionManager = ExtensionManager(
            namespace=ENTRY_POINT_GROUP, invoke_on_load=False,
            on_load_failure_callback=on_failure,
        )
    else:
        manager = NamedExtensionManager(
            namespace=ENTRY_POINT_GROUP, names=list(names), invoke_on_load=False,
            on_load_failure_callback=on_failure, name_order=True,
        )
    plugins = []
    for extension in manager:
        distribution, version = distributions.get(extension.name, _dist_of(extension.entry_point))
        module = extension.plugin
        if not isinstance(module, ModuleType):
            failures.append(LoadFailure(
                name=extension.name, distribution=distribution, version=version,
                cause=f"entry point must name a module, it names {module!r}",
            ))
            continue
        plugins.append(DiscoveredPlugin(extension.name, distribution, version, module))
    return plugins, failures
