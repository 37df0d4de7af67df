"""The plugin system: descriptors, discovery (stevedore) and the manager (pluggy)."""

from rexcore.plugins.descriptors import (
    BlobStoreDescriptor,
    CliOption,
    ComponentContext,
    ComponentDescriptor,
    MetricsExporterDescriptor,
    NoOptions,
    ProbeResult,
    ProtocolDescriptor,
    ProviderDescriptor,
    SandboxDescriptor,
    ScalingPolicyDescriptor,
)
from rexcore.plugins.manager import (
    PluginConflictError,
    PluginError,
    PluginInfo,
    PluginLoadError,
    PluginManager,
    UnknownComponentError,
)

__all__ = [
    "BlobStoreDescriptor",
    "CliOption",
    "ComponentContext",
    "ComponentDescriptor",
    "MetricsExporterDescriptor",
    "NoOptions",
    "PluginConflictError",
    "PluginError",
    "PluginInfo",
    "PluginLoadError",
    "PluginManager",
    "ProbeResult",
    "ProtocolDescriptor",
    "ProviderDescriptor",
    "SandboxDescriptor",
    "ScalingPolicyDescriptor",
    "UnknownComponentError",
]
