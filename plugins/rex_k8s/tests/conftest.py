"""A Kubernetes API for the tests: kmock's emulator (a real HTTP server the official client
talks to through a kubeconfig), plus a stand-in kubelet that moves pods through phases.

No ``pytest_plugins`` here; kmock's ``kmock`` fixture comes from its own pytest plugin."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from k8s_test_support import PODS, Kubelet, write_kubeconfig
from rex_k8s.options import KubernetesProviderOptions
from rex_k8s.provider import KubernetesProvider, create_kubernetes_provider

from rexcore.plugins.descriptors import ComponentContext


@pytest.fixture
async def k8s_api(kmock: Any) -> Any:
    """kmock's Kubernetes emulator, serving pods (listing works before any exists)."""
    kmock.resources[PODS] = kmock.ResourceInfo(kind="Pod", namespaced=True)
    return kmock


@pytest.fixture
def kubeconfig(k8s_api: Any, tmp_path: Path) -> Path:
    return write_kubeconfig(tmp_path / "kubeconfig", str(k8s_api.url))


@pytest.fixture
def kubelet(k8s_api: Any) -> Kubelet:
    return Kubelet(k8s_api)


@pytest.fixture
def make_provider(kubeconfig: Path, tmp_path: Path) -> Callable[..., KubernetesProvider]:
    """``make_provider(clock=..., **options)``: the provider as rexd builds it."""

    def make(clock: Callable[[], float] | None = None, **options: Any) -> KubernetesProvider:
        settings = {"kubeconfig": str(kubeconfig), "image": "registry.example/rex:1",
                    "join_token_secret": "rex-join-token"} | options
        provider = create_kubernetes_provider(KubernetesProviderOptions(**settings),
                                              ComponentContext(data_dir=tmp_path))
        if clock is not None:
            provider.clock = clock
        return provider

    return make
