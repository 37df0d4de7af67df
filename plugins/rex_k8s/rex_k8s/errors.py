"""The one error family of rex-k8s."""

from __future__ import annotations

from rexcore.providers.interface import ProviderError

__all__ = ["KubernetesProviderError"]


class KubernetesProviderError(ProviderError):
    """The cluster refused or could not be reached, or the options cannot make a pod.

    A :class:`ProviderError`, so the provisioner retries it with backoff.
    """
