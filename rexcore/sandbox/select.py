"""Choosing a sandbox by name: ``auto`` picks the best one that can run on this host."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import attrs

from rexcore.config.converter import structure_config
from rexcore.plugins.descriptors import ComponentContext
from rexcore.plugins.manager import PluginManager, RegisteredComponent, UnknownComponentError
from rexcore.sandbox.interface import Sandbox, SandboxError

__all__ = ["SandboxUnavailableError", "create_sandbox", "select_sandbox"]

AUTO = "auto"

log = logging.getLogger(__name__)


class SandboxUnavailableError(SandboxError):
    """The sandbox asked for is not installed or cannot run on this host."""


def select_sandbox(plugins: PluginManager, name: str = AUTO,
                   options: Mapping[str, Any] | None = None) -> RegisteredComponent:
    """The sandbox called ``name``, or for ``auto`` the available one with the highest
    ``preference`` (ties broken by name). Raises :class:`SandboxUnavailableError` with the
    probe's reason when the named one cannot run here, unless its ``options`` (structured
    into its options type) set ``allow_fallback``: then the best other one is used, with
    a warning (a hermetic sandbox fails closed unless config says otherwise)."""
    if name != AUTO:
        try:
            registered = plugins.component("sandbox", name)
        except UnknownComponentError as exc:
            raise SandboxUnavailableError(str(exc)) from exc
        availability = registered.descriptor.availability()
        if not availability.available and _allows_fallback(registered, options):
            fallback = _best(plugins, exclude=name)
            log.warning("sandbox %r cannot run on this host (%s); falling back to %r as "
                        "its option allow_fallback says", name, availability.reason,
                        fallback.descriptor.name)
            return fallback
        if not availability.available:
            raise SandboxUnavailableError(
                f"sandbox {name!r} ({registered.origin}) cannot run on this host: "
                f"{availability.reason}; fix that, or choose another with --sandbox "
                "(auto picks the best available)"
            )
        return registered
    return _best(plugins)


def _allows_fallback(registered: RegisteredComponent, options: Mapping[str, Any] | None) -> bool:
    descriptor = registered.descriptor
    if "allow_fallback" not in attrs.fields_dict(descriptor.options_type):
        return False
    structured = structure_config(dict(options or {}), descriptor.options_type,
                                  path=f"$.sandboxes.{descriptor.name}")
    return bool(structured.allow_fallback)


def _best(plugins: PluginManager, exclude: str = "") -> RegisteredComponent:
    ranked = sorted((c for c in plugins.components("sandbox").values()
                     if c.descriptor.name != exclude),
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
    registered = select_sandbox(plugins, name, options)
    descriptor = registered.descriptor
    if name != AUTO and descriptor.name != name:  # a fallback: the options were not its
        options = None
    structured = structure_config(dict(options or {}), descriptor.options_type,
                                  path=f"$.sandboxes.{descriptor.name}")
    return descriptor.factory(structured, context)
