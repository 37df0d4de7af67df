"""Finding the cluster: in-cluster config or a kubeconfig, and the namespace to use.

The kubernetes client is imported here, lazily, so registering the plugin (and
``rexd plugins list``) costs nothing and works where the client is missing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import attrs

from rex_k8s.errors import KubernetesProviderError
from rex_k8s.options import KubernetesProviderOptions
from rexcore.plugins.descriptors import ProbeResult

__all__ = ["Cluster", "connect", "probe_cluster"]

_SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def _in_cluster() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and (_SERVICE_ACCOUNT / "token").exists()


def _kubeconfig_candidates() -> list[Path]:
    listed = os.environ.get("KUBECONFIG", "")
    if listed:
        return [Path(p).expanduser() for p in listed.split(os.pathsep) if p]
    return [Path("~/.kube/config").expanduser()]


def probe_cluster() -> ProbeResult:
    """Available when the client imports and a cluster is configured (in-cluster or a
    kubeconfig). The provider's options are not known here: they are checked when rexd
    builds the provider."""
    try:
        import kubernetes  # noqa: F401
    except ImportError as exc:
        return ProbeResult.unavailable(f"the kubernetes client does not import ({exc}); "
                                       "pip install kubernetes")
    if _in_cluster():
        return ProbeResult.ok()
    candidates = _kubeconfig_candidates()
    if any(path.is_file() for path in candidates):
        return ProbeResult.ok()
    where = ", ".join(str(p) for p in candidates)
    return ProbeResult.unavailable(
        f"no cluster configured: not in a pod (KUBERNETES_SERVICE_HOST unset) and no "
        f"kubeconfig at {where}; set KUBECONFIG, set the provider's `kubeconfig` option, "
        "or run rexd in the cluster")


@attrs.frozen
class Cluster:
    """A connected API client and the namespace worker pods go to."""

    api: Any  # kubernetes.client.CoreV1Api
    namespace: str
    source: str  # "in-cluster" or the kubeconfig, for messages

    def close(self) -> None:
        self.api.api_client.close()


def connect(options: KubernetesProviderOptions) -> Cluster:
    """Load in-cluster config or the kubeconfig the options name (no API call is made)."""
    from kubernetes import client, config

    configuration = client.Configuration()
    use_kubeconfig = bool(options.kubeconfig or options.context) or not _in_cluster()
    try:
        if use_kubeconfig:
            path = options.kubeconfig or None
            config.load_kube_config(config_file=path, context=options.context or None,
                                    client_configuration=configuration)
            source = f"kubeconfig {path or os.pathsep.join(map(str, _kubeconfig_candidates()))}"
            namespace = options.namespace or _context_namespace(path, options.context)
        else:
            config.load_incluster_config(client_configuration=configuration)
            source = "in-cluster config"
            namespace = options.namespace or _own_namespace()
    except (config.ConfigException, OSError, ValueError) as exc:
        raise KubernetesProviderError(
            f"kubernetes provider: cannot load the cluster config ({exc}); set the "
            "`kubeconfig`/`context` options, KUBECONFIG, or run rexd in the cluster with a "
            "service account") from exc
    api = client.CoreV1Api(client.ApiClient(configuration))
    return Cluster(api, namespace or "default", source)


def _context_namespace(path: str | None, context: str) -> str:
    from kubernetes import config

    contexts, active = config.list_kube_config_contexts(config_file=path)
    chosen = next((c for c in contexts if c["name"] == context), None) if context else active
    return ((chosen or {}).get("context") or {}).get("namespace", "")


def _own_namespace() -> str:
    try:
        return (_SERVICE_ACCOUNT / "namespace").read_text().strip()
    except OSError:
        return ""
