"""Worker pods as plain JSON: the manifest rex creates, and what a listed pod means.

Pure functions on dicts (the API's own JSON), so they are tested without a cluster and
the provider never pays for the client's model classes on every list.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rex_k8s.options import KubernetesProviderOptions
from rexcore.providers.interface import ProvidedWorker, ProvidedWorkerState, WorkerLaunch

__all__ = ["CA_DIR", "CONTAINER", "DATA_DIR", "LABEL_POOL", "classify_pod", "label_selector",
           "pod_manifest", "worker_labels"]

CONTAINER = "rex-worker"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_POOL = "rex.dev/pool"
#: An emptyDir: exec roots and the worker's cache live and die with the pod.
DATA_DIR = "/var/lib/rex"
#: Where the ``coordinator_ca_config_map`` volume is mounted (read-only).
CA_DIR = "/etc/rex/ca"


def worker_labels(pool: str) -> dict[str, str]:
    return {LABEL_MANAGED_BY: "rex", LABEL_COMPONENT: "worker", LABEL_POOL: pool}


def label_selector(pool: str) -> str:
    return ",".join(f"{key}={value}" for key, value in worker_labels(pool).items())


def pod_manifest(name: str, options: KubernetesProviderOptions, launch: WorkerLaunch,
                 coordinator_url: str) -> dict[str, Any]:
    """The pod of one worker. The join token only ever appears as a ``secretKeyRef``; the
    coordinator's CA, when it has its own, comes from a ConfigMap mounted at ``CA_DIR``."""
    args = [*options.command, "worker", "--coordinator", coordinator_url]
    volume_mounts: list[dict[str, Any]] = [{"name": "rex-data", "mountPath": DATA_DIR}]
    volumes: list[dict[str, Any]] = [{"name": "rex-data", "emptyDir": {}}]
    if options.coordinator_ca_config_map:
        args += ["--ca-file", f"{CA_DIR}/{options.coordinator_ca_key}"]
        volume_mounts.append({"name": "rex-coordinator-ca", "mountPath": CA_DIR,
                              "readOnly": True})
        volumes.append({"name": "rex-coordinator-ca", "configMap": {
            "name": options.coordinator_ca_config_map,
            "items": [{"key": options.coordinator_ca_key, "path": options.coordinator_ca_key}]}})
    args += ["--worker-id", name, "--slots", str(launch.slots), "--sandbox", launch.sandbox,
            "--data-dir", f"{DATA_DIR}/worker"]
    for key, value in launch.properties:
        args += ["--property", f"{key}={value}"]
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in sorted(options.env.items())]
    if options.join_token_secret:
        env.append({"name": "REX_JOIN_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": options.join_token_secret, "key": options.join_token_secret_key}}})
    container: dict[str, Any] = {
        "name": CONTAINER, "image": options.image, "command": args, "env": env,
        "volumeMounts": volume_mounts,
    }
    if options.image_pull_policy:
        container["imagePullPolicy"] = options.image_pull_policy
    if options.resources:
        container["resources"] = options.resources
    spec: dict[str, Any] = {
        "containers": [container],
        # A crash restarts the container (so a crash loop shows as CrashLoopBackOff); a
        # worker that drained and exited 0 stays down (Succeeded) instead of rejoining.
        "restartPolicy": "OnFailure",
        # Deleting the pod sends SIGTERM, on which rexd worker drains: this is how long
        # its running actions get before SIGKILL.
        "terminationGracePeriodSeconds": options.termination_grace_period_s,
        "volumes": volumes,
    }
    if options.service_account:
        spec["serviceAccountName"] = options.service_account
    if options.node_selector:
        spec["nodeSelector"] = options.node_selector
    if options.tolerations:
        spec["tolerations"] = [t.manifest() for t in options.tolerations]
    if options.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": s} for s in options.image_pull_secrets]
    metadata: dict[str, Any] = {
        "name": name,
        "labels": options.labels | worker_labels(options.pool),  # rex's own labels win
    }
    if options.annotations:
        metadata["annotations"] = options.annotations
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def _waiting(status: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any], Mapping[str, Any]]]:
    """``(container, waiting state, container status)`` of every waiting container."""
    found = []
    for container in status.get("containerStatuses") or ():
        waiting = (container.get("state") or {}).get("waiting")
        if waiting:
            found.append((container.get("name", "?"), waiting, container))
    return found


def _why_pending(status: Mapping[str, Any]) -> str:
    for condition in status.get("conditions") or ():
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            return (f"not scheduled ({condition.get('reason', 'Unschedulable')}: "
                    f"{condition.get('message', 'no message')})")
    for name, waiting, _ in _waiting(status):
        return f"container {name} waiting ({waiting.get('reason', '?')}: " \
               f"{waiting.get('message', 'no message')})"
    return "no reason reported"


def classify_pod(pod: Mapping[str, Any], pending_s: float,
                 pending_timeout_s: float) -> ProvidedWorker:
    """The worker a pod is; ``pending_s``: how long rex has seen it Pending."""
    metadata, status = pod.get("metadata") or {}, pod.get("status") or {}
    name = metadata.get("name", "?")
    if metadata.get("deletionTimestamp"):  # SIGTERM sent: the worker is draining
        return ProvidedWorker(name, ProvidedWorkerState.DRAINING, "pod terminating")
    phase = status.get("phase") or "Pending"
    if phase == "Failed":
        reason, message = status.get("reason", ""), status.get("message", "no message")
        if reason == "Evicted":
            return ProvidedWorker(name, ProvidedWorkerState.FAILED, f"evicted: {message}")
        return ProvidedWorker(name, ProvidedWorkerState.FAILED,
                              f"pod failed ({reason or 'no reason'}): {message}")
    if phase == "Succeeded":
        return ProvidedWorker(name, ProvidedWorkerState.STOPPED, "worker exited")
    for container, waiting, container_status in _waiting(status):
        if waiting.get("reason") == "CrashLoopBackOff":
            last = (container_status.get("lastState") or {}).get("terminated") or {}
            return ProvidedWorker(name, ProvidedWorkerState.FAILED, (
                f"crash-looping: container {container} restarted "
                f"{container_status.get('restartCount', '?')} time(s), last exit code "
                f"{last.get('exitCode', '?')} ({last.get('reason', 'no reason')}); see "
                f"`kubectl logs --previous {name}`"))
    if phase == "Pending":
        why = _why_pending(status)
        if pending_s > pending_timeout_s:
            return ProvidedWorker(name, ProvidedWorkerState.FAILED, (
                f"Pending for {pending_s:.0f}s, over pending_timeout_s "
                f"({pending_timeout_s:g}): {why}"))
        return ProvidedWorker(name, ProvidedWorkerState.STARTING, why)
    if phase == "Unknown":  # the node stopped reporting; the coordinator's lease decides
        return ProvidedWorker(name, ProvidedWorkerState.RUNNING, "phase Unknown: node lost")
    return ProvidedWorker(name, ProvidedWorkerState.RUNNING)
