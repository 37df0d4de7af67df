"""Helpers of rex-k8s's tests (a uniquely named module: the tests dir is on sys.path)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kmock

NAMESPACE = "rex"
PODS = kmock.resource("", "v1", "pods")
#: Holds a deleted pod in Terminating (kmock's model of "the kubelet has not confirmed").
RUNNING_FINALIZER = "test.rex.dev/container-running"


def write_kubeconfig(path: Path, server: str, namespace: str = NAMESPACE) -> Path:
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters: [{{name: kmock, cluster: {{server: '{server}'}}}}]\n"
        "users: [{name: rex, user: {token: not-a-secret}}]\n"
        f"contexts: [{{name: test, context: {{cluster: kmock, user: rex, namespace: {namespace}}}}}]\n"
        "current-context: test\n")
    return path


class Kubelet:
    """Plays the node: runs, evicts, crash-loops and finishes pods in kmock's store."""

    def __init__(self, api: Any) -> None:
        self.api = api

    def pods(self) -> dict[str, Any]:
        return {name: obj for (resource, _, name), obj in self.api.objects.items()
                if resource == PODS and not obj.deleted}

    def run(self, *names: str) -> None:
        for name in names:
            self.pods()[name].patch({
                "metadata": {"finalizers": [RUNNING_FINALIZER]},
                "status": {"phase": "Running", "containerStatuses": [
                    {"name": "rex-worker", "state": {"running": {}}, "restartCount": 0,
                     "ready": True, "image": "registry.example/rex:1", "imageID": ""}]},
            })

    def running(self) -> list[str]:
        """Pods whose worker runs and has not been told to drain (joined the coordinator)."""
        return [name for name, obj in self.pods().items()
                if obj.raw.get("status", {}).get("phase") == "Running"
                and not obj.raw["metadata"].get("deletionTimestamp")]

    def terminating(self) -> list[str]:
        return [name for name, obj in self.pods().items()
                if obj.raw["metadata"].get("deletionTimestamp")]

    def exit(self, *names: str) -> None:
        """The container finished draining: the pod object goes away."""
        for name in names:
            self.pods()[name].delete()

    # An evicted or crash-looping pod has no running container: nothing holds its deletion.
    def evict(self, name: str) -> None:
        self.pods()[name].patch({"metadata": {"finalizers": []}, "status": {
            "phase": "Failed", "reason": "Evicted",
            "message": "The node was low on resource: memory."}})

    def crash_loop(self, name: str) -> None:
        self.pods()[name].patch({"metadata": {"finalizers": []}, "status": {"phase": "Running", "containerStatuses": [{
            "name": "rex-worker", "restartCount": 5, "ready": False,
            "image": "registry.example/rex:1", "imageID": "",
            "state": {"waiting": {"reason": "CrashLoopBackOff",
                                  "message": "back-off 2m40s restarting failed container"}},
            "lastState": {"terminated": {"exitCode": 2, "reason": "Error"}},
        }]}})

    def unschedulable(self, name: str) -> None:
        self.pods()[name].patch({"status": {"phase": "Pending", "conditions": [{
            "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": "0/3 nodes are available: 3 Insufficient cpu."}]}})
