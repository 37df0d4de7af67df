"""The real pool manager (WorkerPool + WorkerProvisioner) driving the kubernetes provider
against kmock's Kubernetes API: the API calls of a scale 0 -> 3 -> 1, drain before delete,
failed pods reported with their reasons, and a transient API error recovered by retry."""

from __future__ import annotations

import logging
from typing import Any

from k8s_test_support import NAMESPACE, Kubelet

from rexcore.pool.config import PoolConfig
from rexcore.pool.pool import SchedulerLoad, WorkerPool
from rexcore.pool.scaling import PoolObservation, ScalingDecision
from rexcore.providers.interface import ProvidedWorkerState, WorkerLaunch

TOKEN = "s3cret-join-token"
LAUNCH = WorkerLaunch("http://rex-coordinator.rex.svc:8981", join_token=TOKEN, slots=2,
                      properties=(("os", "linux"),))


class ScriptedPolicy:
    def __init__(self, *sizes: int) -> None:
        self.sizes = list(sizes)

    def decide(self, observation: PoolObservation) -> ScalingDecision:
        return ScalingDecision(self.sizes.pop(0) if len(self.sizes) > 1 else self.sizes[0],
                               "scripted")


class JoinedLoad:
    """The scheduler as the pool sees it: every running, not terminating pod has joined."""

    def __init__(self, kubelet: Kubelet) -> None:
        self.kubelet = kubelet

    def __call__(self) -> SchedulerLoad:
        return SchedulerLoad(queued=0, running=0, arrivals=0, completions=0, busy_s=0.0,
                             running_by_worker=dict.fromkeys(self.kubelet.running(), 0))


def _pool(provider: Any, kubelet: Kubelet, clock: list[float], *sizes: int) -> WorkerPool:
    config = PoolConfig(min_workers=0, max_workers=10, target_workers=0,
                        enable_autoscale=True, provider_backoff_s=1.0)
    return WorkerPool(config, provider, LAUNCH, policy=ScriptedPolicy(*sizes),
                      load=JoinedLoad(kubelet), clock=lambda: clock[0])


def _pod_calls(api: Any) -> list[tuple[str, str | None, str | None]]:
    """``(action, pod name, gracePeriodSeconds)`` of every pod request, in order."""
    return [(request.action.value.lower(), request.name or (request.data or {}).get("metadata", {}).get("name"),
             request.params.get("gracePeriodSeconds"))
            for request in api if request.resource is not None]


async def test_pool_scales_pods_0_to_3_to_1_draining_before_deleting(
        k8s_api, kubelet, make_provider):
    clock = [0.0]
    provider = make_provider(clock=lambda: clock[0])
    pool = _pool(provider, kubelet, clock, 3, 1)
    await pool.start(run=False)
    assert _pod_calls(k8s_api) == []

    await pool.tick()  # 0 -> 3
    creates = [request for request in k8s_api if request.action == k8s_api.action.CREATE]
    assert [c[0] for c in _pod_calls(k8s_api)] == ["list", "create", "create", "create"]
    assert all(request.namespace == NAMESPACE for request in creates)
    names = [request.data["metadata"]["name"] for request in creates]
    assert sorted(kubelet.pods()) == sorted(names) and len(set(names)) == 3
    pod = creates[0].data
    assert pod["metadata"]["labels"]["rex.dev/pool"] == "default"
    command = pod["spec"]["containers"][0]["command"]
    assert command[:4] == ["rexd", "worker", "--coordinator", LAUNCH.coordinator_url]
    assert command[command.index("--worker-id") + 1] == names[0]
    assert command[command.index("--slots") + 1] == "2" and "os=linux" in command
    assert {"name": "REX_JOIN_TOKEN", "valueFrom": {"secretKeyRef": {
        "name": "rex-join-token", "key": "token"}}} in pod["spec"]["containers"][0]["env"]
    assert not any(TOKEN in request.text for request in creates)  # never in the pod spec
    assert pod["spec"]["terminationGracePeriodSeconds"] == 600

    kubelet.run(*names)
    clock[0] = 1.0
    before = len(_pod_calls(k8s_api))
    await pool.tick()  # 3 -> 1: two graceful deletes (SIGTERM: the workers drain)
    drains = _pod_calls(k8s_api)[before:]
    assert [(action, grace) for action, _, grace in drains] == [
        ("list", None), ("delete", "600"), ("delete", "600")]
    drained = {name for _, name, _ in drains[1:]}
    assert set(kubelet.terminating()) == drained
    assert pool.statistics().draining == 2 and pool.statistics().idle == 1
    assert {w.worker_id: w.state for w in await provider.list_workers()
            if w.worker_id in drained} == dict.fromkeys(drained, ProvidedWorkerState.DRAINING)

    clock[0] = 2.0
    await pool.tick()  # still finishing their actions: nothing is force-deleted
    assert not [c for c in _pod_calls(k8s_api) if c[2] == "0"]

    kubelet.exit(*drained)  # drained workers exited; their pods are gone
    clock[0] = 3.0
    await pool.tick()
    calls = _pod_calls(k8s_api)
    for name in drained:  # the no-grace delete only ever follows the drain
        drain_at = calls.index(("delete", name, "600"))
        assert calls.index(("delete", name, "0")) > drain_at
    assert list(kubelet.pods()) == sorted(set(names) - drained)
    assert pool.statistics().failed == 0 and len(pool.provisioner.active) == 1


async def test_evicted_crash_looping_and_stuck_pending_pods_are_failed_with_reasons_and_replaced(
        k8s_api, kubelet, make_provider, caplog):
    clock = [0.0]
    provider = make_provider(clock=lambda: clock[0], pending_timeout_s=300)
    pool = _pool(provider, kubelet, clock, 3)
    await pool.start(run=False)
    await pool.tick()
    evicted, crashing, pending = sorted(kubelet.pods())
    kubelet.run(evicted, crashing)
    kubelet.evict(evicted)
    kubelet.crash_loop(crashing)
    kubelet.unschedulable(pending)

    clock[0] = 299.0  # Pending, but not for too long yet
    states = {w.worker_id: (w.state, w.reason) for w in await provider.list_workers()}
    assert states[pending][0] is ProvidedWorkerState.STARTING
    assert "0/3 nodes are available" in states[pending][1]

    clock[0] = 301.0
    states = {w.worker_id: (w.state, w.reason) for w in await provider.list_workers()}
    assert {state for state, _ in states.values()} == {ProvidedWorkerState.FAILED}
    assert states[evicted][1] == "evicted: The node was low on resource: memory."
    assert "crash-looping" in states[crashing][1] and "restarted 5 time(s)" in states[crashing][1]
    assert "last exit code 2" in states[crashing][1]
    assert "Pending for 301s" in states[pending][1] and "Insufficient cpu" in states[pending][1]

    before = len(_pod_calls(k8s_api))
    with caplog.at_level(logging.WARNING, logger="rexcore.pool.provisioner"):
        await pool.tick()  # the pool drops the three and asks for three new pods
    calls = _pod_calls(k8s_api)[before:]
    assert sorted((a, n, g) for a, n, g in calls if a == "delete") == sorted(
        ("delete", name, "0") for name in (evicted, crashing, pending))
    assert [a for a, _, _ in calls].count("create") == 3
    assert pool.statistics().failed == 3
    assert len(kubelet.pods()) == 3 and not {evicted, crashing, pending} & set(kubelet.pods())
    assert "evicted: The node was low on resource" in caplog.text


async def test_transient_api_error_on_create_is_retried_after_backoff_without_overshooting(
        k8s_api, kubelet, make_provider):
    k8s_api["create"][:1] << 500 << {"kind": "Status", "code": 500,
                                      "message": "etcdserver: request timed out"}
    clock = [0.0]
    pool = _pool(make_provider(clock=lambda: clock[0]), kubelet, clock, 3)
    await pool.start(run=False)

    await pool.tick()  # the first create fails: the provisioner backs off for 1 s
    stats = pool.statistics()
    assert stats.provider_errors == 1
    assert "HTTP 500" in stats.last_provider_error
    assert "etcdserver: request timed out" in stats.last_provider_error
    # The server had stored the pod before failing (kmock does, as a timed-out etcd write
    # may): the next list adopts it instead of leaking it.
    clock[0] = 0.5
    await pool.tick()
    assert [a for a, _, _ in _pod_calls(k8s_api)].count("create") == 1  # still backing off
    assert len(pool.provisioner.active) == 1

    clock[0] = 1.5
    await pool.tick()
    assert [a for a, _, _ in _pod_calls(k8s_api)].count("create") == 3
    assert len(kubelet.pods()) == 3 and len(pool.provisioner.active) == 3
    assert pool.statistics().provider_errors == 1

