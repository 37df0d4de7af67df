"""The plugin module of rex-k8s: registers the ``kubernetes`` provider.

Registration imports neither the kubernetes client nor the provider: the factory and the
probe do, when they are called.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from rex_k8s.options import KubernetesProviderOptions
from rexcore import hookimpl
from rexcore.plugins.descriptors import ComponentContext, ProbeResult, ProviderDescriptor

__all__ = ["rexcore_providers"]


def _create(options: KubernetesProviderOptions, context: ComponentContext) -> Any:
    from rex_k8s.provider import create_kubernetes_provider

    return create_kubernetes_provider(options, context)


def _probe() -> ProbeResult:
    from rex_k8s.cluster import probe_cluster

    return probe_cluster()


@hookimpl
def rexcore_providers() -> Iterator[ProviderDescriptor]:
    yield ProviderDescriptor(
        name="kubernetes", factory=_create, options_type=KubernetesProviderOptions,
        probe=_probe,
        description="worker pods from a pod template; drained by graceful pod deletion",
    )
