"""rex-k8s: the ``kubernetes`` worker provider (worker pods from a pod template)."""

from rex_k8s.errors import KubernetesProviderError
from rex_k8s.options import KubernetesProviderOptions, Toleration

__all__ = ["KubernetesProviderError", "KubernetesProviderOptions", "Toleration"]
