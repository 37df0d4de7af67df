"""The kubernetes provider on its own against kmock: refusals that name the fix, API
errors translated into the provider's error family, and pods that are not rex's."""

from __future__ import annotations

import socket

import pytest
from k8s_test_support import NAMESPACE, PODS, write_kubeconfig
from rex_k8s.errors import KubernetesProviderError
from rex_k8s.options import KubernetesProviderOptions, Toleration
from rex_k8s.pods import LABEL_POOL, classify_pod, pod_manifest
from rex_k8s.provider import create_kubernetes_provider

from rexcore.config.converter import ConfigError, structure_config
from rexcore.plugins.descriptors import ComponentContext
from rexcore.providers.interface import ProvidedWorkerState, ProviderError, WorkerLaunch

LAUNCH = WorkerLaunch("http://rex-coordinator.rex.svc:8981", join_token="t0k")


def _creates(api) -> list:
    return [r for r in api if r.action == api.action.CREATE]


def test_provider_without_an_image_is_refused_naming_the_option(kubeconfig, tmp_path):
    with pytest.raises(KubernetesProviderError, match=r"no worker image; set .* image"):
        create_kubernetes_provider(KubernetesProviderOptions(kubeconfig=str(kubeconfig)),
                                   ComponentContext(data_dir=tmp_path))


def test_unloadable_kubeconfig_is_a_provider_error_naming_the_options(tmp_path):
    missing = tmp_path / "nowhere" / "kubeconfig"
    with pytest.raises(ProviderError, match="cannot load the cluster config.*`kubeconfig`"):
        create_kubernetes_provider(KubernetesProviderOptions(kubeconfig=str(missing), image="x"),
                                   ComponentContext(data_dir=tmp_path))


async def test_loopback_coordinator_is_refused_before_any_pod_is_created(k8s_api, make_provider):
    provider = make_provider()
    with pytest.raises(KubernetesProviderError, match="cannot reach the coordinator at "
                                                      "http://127.0.0.1:8981.*coordinator_url"):
        await provider.create_workers(1, WorkerLaunch("http://127.0.0.1:8981", "t0k"))
    assert _creates(k8s_api) == []
    # The option wins over the address rexd listens on.
    overridden = make_provider(coordinator_url="http://rex.rex.svc:8981")
    await overridden.create_workers(1, WorkerLaunch("http://127.0.0.1:8981", "t0k"))
    assert "http://rex.rex.svc:8981" in _creates(k8s_api)[0].data["spec"]["containers"][0]["command"]


async def test_join_token_without_a_secret_is_refused_rather_than_put_in_the_spec(
        k8s_api, make_provider):
    with pytest.raises(KubernetesProviderError, match="join_token_secret"):
        await make_provider(join_token_secret="").create_workers(1, LAUNCH)
    assert _creates(k8s_api) == []


async def test_coordinator_without_a_join_token_is_refused_as_pods_could_never_join(
        k8s_api, make_provider):
    with pytest.raises(KubernetesProviderError, match="no scheduler.join_token.*never join"):
        await make_provider().create_workers(1, WorkerLaunch(LAUNCH.coordinator_url))
    assert _creates(k8s_api) == []


async def test_forbidden_create_names_the_rbac_manifest(k8s_api, make_provider):
    k8s_api["create"] << 403 << {"kind": "Status", "code": 403, "message": 'pods is forbidden: '
                                 'User "system:serviceaccount:rex:default" cannot create'}
    with pytest.raises(KubernetesProviderError) as info:
        await make_provider().create_workers(1, LAUNCH)
    message = str(info.value)
    assert f"namespace {NAMESPACE}: HTTP 403" in message and "cannot create" in message
    assert "deploy/rbac.yaml" in message


async def test_throttled_list_is_a_provider_error_and_the_next_list_works(k8s_api, make_provider):
    provider = make_provider()
    await provider.create_workers(1, LAUNCH)
    k8s_api["list"][:1] << 429
    with pytest.raises(KubernetesProviderError, match="HTTP 429.*throttling"):
        await provider.list_workers()
    assert len(await provider.list_workers()) == 1


async def test_unreachable_api_server_is_reported_as_such(tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{port}")
    options = KubernetesProviderOptions(kubeconfig=str(kubeconfig), image="x",
                                        request_timeout_s=2)
    provider = create_kubernetes_provider(options, ComponentContext(data_dir=tmp_path))
    provider.cluster.api.api_client.configuration.retries = 0
    with pytest.raises(KubernetesProviderError, match="cannot reach the API server"):
        await provider.list_workers()


async def test_pods_without_rex_labels_are_neither_listed_nor_deleted(
        k8s_api, kubelet, make_provider):
    # kmock ignores label selectors: the provider's own label check is what protects
    # these (another pool's worker, and an unrelated pod).
    k8s_api.objects[PODS, NAMESPACE, "web-1"] = {"metadata": {"name": "web-1", "labels": {
        "app": "web"}}, "status": {"phase": "Running"}}
    other = make_provider(pool="other")
    (theirs,) = await other.create_workers(1, LAUNCH)
    provider = make_provider()
    (ours,) = await provider.create_workers(1, LAUNCH)
    assert [w.worker_id for w in await provider.list_workers()] == [ours.worker_id]
    await provider.close()
    deleted = {r.name for r in k8s_api if r.action == k8s_api.action.DELETE}
    assert deleted == {ours.worker_id}
    assert set(kubelet.pods()) == {"web-1", theirs.worker_id}


async def test_close_drains_every_worker_pod_with_the_grace_period(k8s_api, kubelet, make_provider):
    provider = make_provider(termination_grace_period_s=45)
    names = [w.worker_id for w in await provider.create_workers(2, LAUNCH)]
    kubelet.run(*names)
    await provider.close()
    deletes = [(r.name, r.params.get("gracePeriodSeconds")) for r in k8s_api
               if r.action == k8s_api.action.DELETE]
    assert sorted(deletes) == sorted((name, "45") for name in names)
    assert sorted(kubelet.terminating()) == sorted(names)


def test_pod_template_options_reach_the_pod_and_rex_labels_cannot_be_overridden():
    options = KubernetesProviderOptions(
        image="rex:2", image_pull_policy="Always", command=["python", "-m", "rexcore.cli.rexd"],
        service_account="rex-worker", resources={"limits": {"memory": "8Gi"}},
        node_selector={"pool": "builds"}, image_pull_secrets=["regcred"],
        tolerations=[Toleration(key="builds", value="yes", effect="NoSchedule",
                                toleration_seconds=30)],
        labels={"team": "infra", LABEL_POOL: "hijack"}, annotations={"owner": "infra"},
        env={"TMPDIR": "/var/lib/rex/tmp"}, pool="ci")
    pod = pod_manifest("rex-ci-1", options, WorkerLaunch("http://c:1", slots=3), "http://c:1")
    spec, (container,) = pod["spec"], pod["spec"]["containers"]
    assert container["command"][:5] == ["python", "-m", "rexcore.cli.rexd", "worker",
                                        "--coordinator"]
    assert (container["image"], container["imagePullPolicy"]) == ("rex:2", "Always")
    assert container["resources"] == {"limits": {"memory": "8Gi"}}
    assert {"name": "TMPDIR", "value": "/var/lib/rex/tmp"} in container["env"]
    assert spec["serviceAccountName"] == "rex-worker"
    assert spec["nodeSelector"] == {"pool": "builds"}
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert spec["tolerations"] == [{"operator": "Equal", "key": "builds", "value": "yes",
                                    "effect": "NoSchedule", "tolerationSeconds": 30}]
    assert pod["metadata"]["labels"]["team"] == "infra"
    assert pod["metadata"]["labels"][LABEL_POOL] == "ci"
    assert pod["metadata"]["annotations"] == {"owner": "infra"}


@pytest.mark.parametrize(("options", "expected"), [
    ({"imagee": "x"}, "$.pool.provider.options: unknown key(s) imagee"),
    ({"pool": "Not_A_Label"}, "pool 'Not_A_Label' must be 1-40 lowercase letters"),
    ({"tolerations": [{"operator": "Maybe"}]}, "$.pool.provider.options.tolerations[0]"),
])
def test_option_typos_and_bad_values_fail_with_their_paths(options, expected):
    with pytest.raises(ConfigError) as info:
        structure_config(options, KubernetesProviderOptions, path="$.pool.provider.options")
    assert expected in "\n".join(info.value.problems)


@pytest.mark.parametrize(("status", "state", "reason"), [
    ({"phase": "Succeeded"}, ProvidedWorkerState.STOPPED, "worker exited"),
    ({"phase": "Failed", "reason": "DeadlineExceeded", "message": "too long"},
     ProvidedWorkerState.FAILED, "pod failed (DeadlineExceeded): too long"),
    ({"phase": "Pending", "containerStatuses": [{"name": "rex-worker", "state": {"waiting": {
        "reason": "ImagePullBackOff", "message": "pull access denied"}}}]},
     ProvidedWorkerState.STARTING, "container rex-worker waiting (ImagePullBackOff: pull access denied)"),
])
def test_pod_phases_map_to_worker_states_with_the_pods_own_reason(status, state, reason):
    worker = classify_pod({"metadata": {"name": "rex-default-1"}, "status": status}, 10, 300)
    assert (worker.worker_id, worker.state, worker.reason) == ("rex-default-1", state, reason)
