"""The ``kubernetes`` provider: one pod per worker, drained by graceful deletion.

Pods rather than a Deployment it scales: scaling a Deployment down lets its controller
pick which pods die, and the pool must pick (starting and idle workers first, never a busy
one while an idle one is left). With bare pods rex names each victim.

A drain is a pod delete with a grace period: Kubernetes sends SIGTERM, ``rexd worker``
stops taking work and exits once its running actions finish, and the pod stays listed
(terminating, reported ``draining``) until then. ``terminate`` is the same delete with no
grace, for pods that failed or are already gone. The kubernetes client is synchronous:
every call runs in a thread so the event loop stays free.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

from rex_k8s.cluster import Cluster, connect
from rex_k8s.errors import KubernetesProviderError
from rex_k8s.options import KubernetesProviderOptions
from rex_k8s.pods import classify_pod, label_selector, pod_manifest, worker_labels
from rexcore.plugins.descriptors import ComponentContext
from rexcore.providers.interface import ProvidedWorker, ProvidedWorkerState, WorkerLaunch

__all__ = ["KubernetesProvider", "create_kubernetes_provider"]

log = logging.getLogger(__name__)

_HINTS = {
    401: "the credentials were refused: check the kubeconfig user or the service account token",
    403: "the service account may not do this: apply plugins/rex_k8s/deploy/rbac.yaml in "
         "the namespace (pods: list, create, delete)",
    404: "the namespace does not exist: create it or set the provider's `namespace` option",
    409: "a pod of that name exists already; rex retries with a new name",
    422: "the pod template is invalid: fix the provider's options",
    429: "the API server is throttling rex; the pool retries with backoff",
}


class KubernetesProvider:
    """Creates, lists, drains and deletes worker pods in one namespace."""

    def __init__(self, options: KubernetesProviderOptions, cluster: Cluster, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not options.image:
            raise KubernetesProviderError(
                "kubernetes provider: no worker image; set [pool.provider.options] image to "
                "an image with rexd installed (see plugins/rex_k8s/deploy/worker-pod.yaml)")
        self.options = options
        self.cluster = cluster
        self.namespace = cluster.namespace
        self.clock = clock
        self._labels = worker_labels(options.pool)
        #: When rex first saw each pod Pending (its own clock: the API server's may differ).
        self._pending_since: dict[str, float] = {}

    # -- API calls, off the event loop ------------------------------------------------

    async def _call(self, doing: str, method: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """One API call in a thread; the response's JSON as it came (the client's model
        classes would cost a validation per pod and reject what a newer server adds)."""
        call = functools.partial(getattr(self.cluster.api, method), *args,
                                 _request_timeout=self.options.request_timeout_s,
                                 _preload_content=False, **kwargs)
        try:
            response = await asyncio.to_thread(call)
            return json.loads(response.data or b"{}")
        except Exception as exc:
            raise self._error(doing, exc) from exc

    def _error(self, doing: str, exc: Exception) -> KubernetesProviderError:
        import urllib3

        status = getattr(exc, "status", None)
        if isinstance(exc, (urllib3.exceptions.HTTPError, OSError)):
            return KubernetesProviderError(
                f"kubernetes provider: {doing} in namespace {self.namespace}: cannot reach the "
                f"API server ({type(exc).__name__}: {exc}); check {self.cluster.source}")
        if not isinstance(status, int):
            return KubernetesProviderError(
                f"kubernetes provider: {doing} in namespace {self.namespace}: unexpected "
                f"response ({type(exc).__name__}: {exc}); is {self.cluster.source} a "
                "Kubernetes API server?")
        try:
            message = json.loads(getattr(exc, "body", "") or "{}").get("message", "")
        except (ValueError, AttributeError):
            message = ""
        hint = _HINTS.get(status, "transient; the pool retries with backoff" if status >= 500
                          else "check the provider's options")
        return KubernetesProviderError(
            f"kubernetes provider: {doing} in namespace {self.namespace}: HTTP {status} "
            f"{getattr(exc, 'reason', '')}{': ' + message if message else ''}; {hint}")

    # -- WorkerProvider ---------------------------------------------------------------

    def _coordinator_url(self, launch: WorkerLaunch) -> str:
        url = self.options.coordinator_url or launch.coordinator_url
        host = urlsplit(url).hostname or ""
        try:
            unreachable = host == "localhost" or ipaddress.ip_address(host).is_loopback or \
                ipaddress.ip_address(host).is_unspecified
        except ValueError:
            unreachable = False
        if unreachable:
            raise KubernetesProviderError(
                f"kubernetes provider: worker pods cannot reach the coordinator at {url}; set "
                "the provider's `coordinator_url` to its Service, e.g. "
                "http://rex-coordinator.rex.svc:8981 (plugins/rex_k8s/deploy/coordinator.yaml)")
        if self.options.coordinator_ca_config_map and not url.startswith("https://"):
            raise KubernetesProviderError(
                f"kubernetes provider: coordinator_ca_config_map is set but worker pods would "
                f"reach the coordinator at {url}, not https://; set `coordinator_url` to its "
                "https:// address")
        return url

    async def create_workers(self, count: int, launch: WorkerLaunch) -> Sequence[ProvidedWorker]:
        if not launch.join_token:  # pods would start, never join, and be billed anyway
            raise KubernetesProviderError(
                "kubernetes provider: the coordinator has no scheduler.join_token, so it "
                "admits only workers on its own host and worker pods could never join; set "
                "scheduler.join_token and put the same token in the Secret named by "
                "`join_token_secret`")
        if not self.options.join_token_secret:
            raise KubernetesProviderError(
                "kubernetes provider: the coordinator has a join token but the provider's "
                "`join_token_secret` is empty, and rex never puts the token in a pod spec; "
                "create it (kubectl create secret generic rex-join-token "
                "--from-literal=token=...) and set join_token_secret = \"rex-join-token\"")
        url = self._coordinator_url(launch)
        created = []
        for _ in range(count):
            name = f"rex-{self.options.pool}-{secrets.token_hex(4)}"
            body = pod_manifest(name, self.options, launch, url)
            # A create that fails after the server stored the pod leaves it behind:
            # list_workers adopts it, so nothing leaks and the pool does not overshoot.
            await self._call(f"creating pod {name}", "create_namespaced_pod",
                             self.namespace, body)
            self._pending_since[name] = self.clock()
            created.append(ProvidedWorker(name, ProvidedWorkerState.STARTING))
        return created

    async def list_workers(self) -> Sequence[ProvidedWorker]:
        listing = await self._call("listing worker pods", "list_namespaced_pod", self.namespace,
                                   label_selector=label_selector(self.options.pool))
        pods = [pod for pod in listing.get("items") or ()
                # the selector already filters; checking again costs nothing and keeps
                # rex's hands off pods a looser server (or a typo) would let through
                if self._labels.items() <= ((pod.get("metadata") or {}).get("labels") or {}).items()]
        now = self.clock()
        workers, pending = [], {}
        for pod in pods:
            name = (pod.get("metadata") or {}).get("name", "?")
            if ((pod.get("status") or {}).get("phase") or "Pending") == "Pending":
                pending[name] = self._pending_since.get(name, now)
            workers.append(classify_pod(pod, now - pending.get(name, now),
                                        self.options.pending_timeout_s))
        self._pending_since = pending
        return workers

    async def _delete(self, worker_id: str, grace_s: int, doing: str) -> bool:
        """Delete a pod; False when it was already gone."""
        try:
            await self._call(f"{doing} pod {worker_id}", "delete_namespaced_pod", worker_id,
                             self.namespace, grace_period_seconds=grace_s)
        except KubernetesProviderError as exc:
            if getattr(exc.__cause__, "status", None) == 404:
                return False
            raise
        return True

    async def drain(self, worker_id: str) -> None:
        """Graceful delete: SIGTERM now, SIGKILL after ``termination_grace_period_s``."""
        if not await self._delete(worker_id, self.options.termination_grace_period_s,
                                  "draining"):
            log.info("kubernetes: worker pod %s was already gone when asked to drain", worker_id)

    async def terminate(self, worker_id: str) -> None:
        self._pending_since.pop(worker_id, None)
        await self._delete(worker_id, 0, "deleting")

    async def close(self) -> None:
        """Drain every worker pod (they finish their actions within the grace period on
        their own; rexd does not wait), then release the client."""
        try:
            for worker in await self.list_workers():
                if worker.state is not ProvidedWorkerState.DRAINING:
                    try:
                        await self.drain(worker.worker_id)
                    except KubernetesProviderError as exc:
                        log.warning("%s; delete it with kubectl", exc)
        except KubernetesProviderError as exc:
            log.warning("%s; worker pods of pool %r may be left running: kubectl delete pods "
                        "-n %s -l %s", exc, self.options.pool, self.namespace,
                        label_selector(self.options.pool))
        finally:
            await asyncio.to_thread(self.cluster.close)


def create_kubernetes_provider(options: KubernetesProviderOptions,
                               context: ComponentContext) -> KubernetesProvider:
    cluster = connect(options)
    try:
        return KubernetesProvider(options, cluster)
    except KubernetesProviderError:
        cluster.close()
        raise
