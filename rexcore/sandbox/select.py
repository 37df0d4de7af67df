"""Choosing a sandbox by name: ``auto`` picks the best one that can run on this host."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rexcore.config.converter import structure_config
from rexcore.plugins.descriptors import ComponentContext
from rexcore.plugins.manager import PluginManager, RegisteredComponent, UnknownComponentError
from rexcore.sandbox.interface import Sandbox, SandboxError

__all__ = ["SandboxUnavailableError", "create_sandbox", "select_sandbox"]

AUTO = "auto"


class SandboxUnavailableError(SandboxError):
    """The sandbox asked for is not installed or cannot run on this host."""


def select_sandbox(plugins: PluginManager, name: str = AUTO) -> RegisteredComponent:
    """The sandbox called ``name``, or for ``auto`` the available one with the highest
    ``preference`` (ties broken by name). Raises :class:`SandboxUnavailableError` with the
    probe's reason when the named one cannot run here."""
    if name != AUTO:
        try:
            registered = plugins.component("sandbox", name)
        except UnknownComponentError as exc:
            raise SandboxUnavailableError(str(exc)) from exc
        availability = registered.descriptor.availability()
        if not availability.available:
            raise SandboxUnavailableError(
                f"sandbox {name!r} ({registered.origin}) cannot run on this host: "
                f"{availability.reason}; fix that, or choose another with --sandbox "
                "(auto picks the best available)"
            )
        return registered
    ranked = sorted(plugins.components("sandbox").values(),
                    key=lambda c: (-c.descriptor.preference, c.descriptor.name))
    reasons = []
    for registered in ranked:
        availability = registered.descriptor.availability()
        if availability.available:
            return registered
        reasons.append(f"{registered.descriptor.name}: {availability.reason}")
    raise SandboxUnavailableError(
        "no sandbox can run on this host"
        + (f" ({'; '.join(reasons)})" if reasons else " (none is installed)")
        + "; see `rexd plugins list`"
    )


def create_sandbox(
    plugins: PluginManager,
    name: str,
    context: ComponentContext,
    options: Mapping[str, Any] | None = None,
) -> Sandbox:
    """Select a sandbox and build it with ``options`` structured into its options type."""
    registered = select_sandbox(plugins, name)
    descriptor = registered.descriptor
    structured = structure_config(dict(options or {}), descriptor.options_type,
                                  path=f"$.sandboxes.{descriptor.name}")
    return descriptor.factory(structured, context)
