"""Descriptors: what a registration hook returns to offer one component to the core.

A descriptor is frozen data: the component's ``name`` (unique per kind across every
installed distribution), a ``factory`` the core calls with the structured options and a
:class:`ComponentContext`, the attrs ``options_type`` the config's ``options`` table is
structured into, the ``platforms`` it runs on, and an optional ``probe`` that says whether
it can run on this host and why not.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

if TYPE_CHECKING:
    from rexcore.config.model import RexConfig
    from rexcore.plugins.manager import PluginManager

__all__ = [
    "BlobStoreDescriptor",
    "ComponentContext",
    "ComponentDescriptor",
    "MetricsExporterDescriptor",
    "NoOptions",
    "ProbeResult",
    "ProtocolDescriptor",
    "ProviderDescriptor",
    "SandboxDescriptor",
    "ScalingPolicyDescriptor",
    "current_platform",
]


@attrs.frozen
class NoOptions:
    """The options type of a component that takes none (any key in config is an error)."""


@attrs.frozen
class ProbeResult:
    """Whether a component can run on this host; ``reason`` says why not, precisely."""

    available: bool
    reason: str = ""

    @classmethod
    def ok(cls) -> ProbeResult:
        return cls(True)

    @classmethod
    def unavailable(cls, reason: str) -> ProbeResult:
        return cls(False, reason)


@attrs.frozen
class ComponentContext:
    """What a factory gets besides its options: where data lives and the rest of rex."""

    data_dir: Path
    config: RexConfig | None = None
    plugins: PluginManager | None = None


def current_platform() -> str:
    """``linux``, ``darwin`` or ``win32`` (``sys.platform`` with version suffixes cut)."""
    for name in ("linux", "darwin", "win32"):
        if sys.platform.startswith(name):
            return name
    return sys.platform


def _as_platforms(value: Any) -> frozenset[str]:
    return frozenset([value] if isinstance(value, str) else value)


@attrs.frozen(kw_only=True)
class ComponentDescriptor:
    """Base of every descriptor; subclasses fix ``kind``."""

    kind: ClassVar[str] = "component"

    name: str = attrs.field()
    factory: Callable[..., Any] = attrs.field(repr=False)
    options_type: type = attrs.field(default=NoOptions)
    #: ``linux``/``darwin``/``win32``; empty means every platform.
    platforms: frozenset[str] = attrs.field(default=frozenset(), converter=_as_platforms)
    probe: Callable[[], ProbeResult] | None = attrs.field(default=None, repr=False)
    description: str = ""

    @name.validator
    def _check_name(self, _attribute: attrs.Attribute, value: str) -> None:
        if not value or not value.replace("-", "_").replace(".", "_").isidentifier():
            raise ValueError(
                f"component name {value!r} must be a non-empty identifier (letters, digits, -, _)"
            )

    @options_type.validator
    def _check_options_type(self, _attribute: attrs.Attribute, value: type) -> None:
        if not attrs.has(value):
            raise TypeError(f"options_type of {self.kind} {self.name!r} must be an attrs class")

    def availability(self) -> ProbeResult:
        """Platform check first, then the probe; a probe that raises counts as unavailable."""
        if self.platforms and current_platform() not in self.platforms:
            wanted = ", ".join(sorted(self.platforms))
            return ProbeResult.unavailable(
                f"runs on {wanted}, this host is {current_platform()}"
            )
        if self.probe is None:
            return ProbeResult.ok()
        try:
            return self.probe()
        except Exception as exc:  # a broken probe must not take the daemon down
            return ProbeResult.unavailable(f"probe failed: {type(exc).__name__}: {exc}")


@attrs.frozen(kw_only=True)
class ProtocolDescriptor(ComponentDescriptor):
    """A protocol adapter that serves the service (the native HTTP API, REAPI, ...).

    ``factory(options, context, service)`` returns an object with ``async start()``,
    ``async stop()`` and ``addresses`` (list of ``host:port`` it listens on).
    ``cli_options`` maps command-line flags of ``rexd serve`` onto this protocol's options.
    """

    kind: ClassVar[str] = "protocol"
    cli_options: tuple[CliOption, ...] = ()


@attrs.frozen
class CliOption:
    """A ``rexd serve`` flag that sets one option of its component, e.g. ``--listen``."""

    flag: str
    option: str
    help: str
    metavar: str | None = None


@attrs.frozen(kw_only=True)
class SandboxDescriptor(ComponentDescriptor):
    """A sandbox that runs one action; ``probe`` must say exactly what is missing."""

    kind: ClassVar[str] = "sandbox"
    #: Higher wins when config asks for ``auto``.
    preference: int = 0


@attrs.frozen(kw_only=True)
class ProviderDescriptor(ComponentDescriptor):
    """A worker provider: creates, lists, drains and terminates workers."""

    kind: ClassVar[str] = "provider"


@attrs.frozen(kw_only=True)
class ScalingPolicyDescriptor(ComponentDescriptor):
    """A scaling policy: an observation of the pool in, a desired size and a reason out.

    ``factory(options, pool_config)`` returns a :class:`rexcore.pool.scaling.ScalingPolicy`.
    """

    kind: ClassVar[str] = "scaling_policy"


@attrs.frozen(kw_only=True)
class MetricsExporterDescriptor(ComponentDescriptor):
    """An exporter fed by the metrics collector."""

    kind: ClassVar[str] = "metrics_exporter"


@attrs.frozen(kw_only=True)
class BlobStoreDescriptor(ComponentDescriptor):
    """A content-addressed blob store; ``factory(options, context)`` returns a BlobStore."""

    kind: ClassVar[str] = "blob_store"
