"""``coordinator_ca_config_map`` of the ``kubernetes`` provider: worker pods of a
coordinator served over https:// with a private CA mount the CA from a ConfigMap and pass
it as ``--ca-file`` (pods read back from kmock's API server); options that could not work
are refused with their paths."""

from __future__ import annotations

from typing import Any

import pytest
from rex_k8s.errors import KubernetesProviderError
from rex_k8s.options import KubernetesProviderOptions

from rexcore.config.converter import ConfigError, structure_config
from rexcore.providers.interface import WorkerLaunch

URL = "https://rex-coordinator.rex.svc:8981"
LAUNCH = WorkerLaunch("http://127.0.0.1:8981", join_token="t0k")


def _stored_pod(kubelet: Any, name: str) -> dict[str, Any]:
    """The pod as the API server stored it (not as rex sent it)."""
    return kubelet.pods()[name].raw


@pytest.mark.parametrize(("options", "path"), [
    ({}, "/etc/rex/ca/ca.crt"),
    ({"coordinator_ca_key": "bundle.pem"}, "/etc/rex/ca/bundle.pem"),
])
async def test_worker_pod_mounts_the_ca_config_map_and_passes_it_as_ca_file(
        k8s_api, kubelet, make_provider, options, path):
    key = options.get("coordinator_ca_key", "ca.crt")
    provider = make_provider(coordinator_url=URL,
                             coordinator_ca_config_map="rex-coordinator-ca", **options)
    (worker,) = await provider.create_workers(1, LAUNCH)
    spec = _stored_pod(kubelet, worker.worker_id)["spec"]
    (container,) = spec["containers"]
    command = container["command"]
    assert command[command.index("--ca-file") + 1] == path
    assert command[:5] == ["rexd", "worker", "--coordinator", URL, "--ca-file"]
    assert {"name": "rex-coordinator-ca", "configMap": {
        "name": "rex-coordinator-ca", "items": [{"key": key, "path": key}]}} in spec["volumes"]
    assert {"name": "rex-coordinator-ca", "mountPath": "/etc/rex/ca",
            "readOnly": True} in container["volumeMounts"]
    # The data volume is still there, and nothing else changed hands.
    assert {v["name"] for v in spec["volumes"]} == {"rex-data", "rex-coordinator-ca"}
    assert [e["name"] for e in container["env"]] == ["REX_JOIN_TOKEN"]


async def test_without_a_ca_config_map_the_pod_has_no_ca_volume_or_flag(
        k8s_api, kubelet, make_provider):
    (worker,) = await make_provider(coordinator_url=URL).create_workers(1, LAUNCH)
    spec = _stored_pod(kubelet, worker.worker_id)["spec"]
    (container,) = spec["containers"]
    assert "--ca-file" not in container["command"]
    assert spec["volumes"] == [{"name": "rex-data", "emptyDir": {}}]
    assert container["volumeMounts"] == [{"name": "rex-data", "mountPath": "/var/lib/rex"}]


@pytest.mark.parametrize(("options", "expected"), [
    ({"coordinator_ca_config_map": "ca", "coordinator_url": "http://rex.rex.svc:8981"},
     ("coordinator_ca_config_map is set but coordinator_url 'http://rex.rex.svc:8981' is not "
      "https://")),
    ({"coordinator_ca_config_map": "ca", "coordinator_ca_key": "../../etc/passwd"},
     "coordinator_ca_key '../../etc/passwd' is not a ConfigMap key"),
    ({"coordinator_ca_config_map": "ca", "coordinator_ca_key": ".."},
     "coordinator_ca_key '..' is not a ConfigMap key"),
    ({"coordinator_ca_config_map": "ca", "coordinator_ca_key": ""},
     "coordinator_ca_key '' is not a ConfigMap key"),
])
def test_ca_options_that_could_not_work_fail_with_their_paths(options, expected):
    with pytest.raises(ConfigError) as info:
        structure_config(options, KubernetesProviderOptions, path="$.pool.provider.options")
    assert expected in "\n".join(info.value.problems)


async def test_ca_without_coordinator_url_refuses_a_launch_url_that_is_not_https(
        k8s_api, make_provider):
    provider = make_provider(coordinator_ca_config_map="rex-coordinator-ca")
    with pytest.raises(KubernetesProviderError, match="coordinator_ca_config_map is set .* "
                                                      "not https://"):
        await provider.create_workers(1, WorkerLaunch("http://10.0.0.5:8981", "t0k"))
    assert [r for r in k8s_api if r.action == k8s_api.action.CREATE] == []
