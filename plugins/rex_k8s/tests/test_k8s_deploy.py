"""The example manifests in deploy/: they parse, the RBAC grants exactly the verbs the
provider uses, and the worker pod example is what the coordinator's config produces."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import yaml
from rex_k8s.options import KubernetesProviderOptions
from rex_k8s.pods import pod_manifest

from rexcore.config.loader import load_config, resolve_config
from rexcore.plugins.manager import build_plugin_manager
from rexcore.providers.interface import WorkerLaunch

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
#: What each recorded request needs from RBAC.
VERB_OF_ACTION = {"LIST": "list", "WATCH": "watch", "FETCH": "get", "CREATE": "create",
                  "UPDATE": "patch", "DELETE": "delete"}


def _documents(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((DEPLOY / name).read_text()) if doc]


def _kind(name: str, kind: str) -> list[dict[str, Any]]:
    return [doc for doc in _documents(name) if doc["kind"] == kind]


def test_every_manifest_parses_as_kubernetes_objects():
    files = sorted(DEPLOY.glob("*.yaml"))
    assert {f.name for f in files} >= {"coordinator.yaml", "rbac.yaml", "worker-pod.yaml"}
    for path in files:
        for doc in _documents(path.name):
            assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], path.name


async def test_rbac_grants_exactly_the_verbs_the_provider_uses_on_pods(
        k8s_api, kubelet, make_provider):
    provider = make_provider()
    first, second = [w.worker_id for w in await provider.create_workers(
        2, WorkerLaunch("http://rex-coordinator.rex.svc:8981", join_token="t0k"))]
    kubelet.run(first, second)
    await provider.list_workers()
    await provider.drain(first)
    await provider.terminate(first)
    await provider.close()
    used = {(request.resource.plural, VERB_OF_ACTION[request.action.name])
            for request in k8s_api if request.resource is not None}

    (role,) = _kind("rbac.yaml", "Role")
    granted = {(resource, verb) for rule in role["rules"] for resource in rule["resources"]
               for verb in rule["verbs"]}
    assert all(rule["apiGroups"] == [""] for rule in role["rules"])
    assert granted == used == {("pods", "list"), ("pods", "create"), ("pods", "delete")}


def test_rbac_binds_the_role_to_the_account_the_coordinator_runs_as():
    (binding,) = _kind("rbac.yaml", "RoleBinding")
    (role,) = _kind("rbac.yaml", "Role")
    (deployment,) = _kind("coordinator.yaml", "Deployment")
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account,
                                    "namespace": role["metadata"]["namespace"]}]


def test_worker_pod_example_is_what_the_coordinator_config_produces(tmp_path):
    (secret,) = _kind("coordinator.yaml", "Secret")
    config_file = tmp_path / "rexd.toml"
    config_file.write_text(secret["stringData"]["rexd.toml"])
    resolved = resolve_config(load_config(config_file), build_plugin_manager(None, strict=True),
                              str(config_file))
    options = resolved.provider.options
    assert isinstance(options, KubernetesProviderOptions)
    (pod,) = _documents("worker-pod.yaml")
    launch = WorkerLaunch("http://0.0.0.0:8981", join_token="change-me",
                          sandbox=resolved.config.pool.sandbox)
    assert pod_manifest(pod["metadata"]["name"], options, launch, options.coordinator_url) == pod
    # The token reaches the workers through the Secret the coordinator reads it from.
    assert options.join_token_secret == secret["metadata"]["name"]
    assert tomllib.loads(secret["stringData"]["rexd.toml"])["scheduler"]["join_token"] == \
        secret["stringData"][options.join_token_secret_key]
    assert "change-me" not in (DEPLOY / "worker-pod.yaml").read_text()
