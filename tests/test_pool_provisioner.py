"""The pool and its provisioner against the ``mock`` provider: worker states, retries
with backoff, drain before terminate, and the pool's tick driving a policy."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest

from rexcore.pool.config import PoolConfig
from rexcore.pool.errors import PoolError
from rexcore.pool.pool import SchedulerLoad, WorkerPool
from rexcore.pool.provisioner import WorkerProvisioner, WorkerState
from rexcore.pool.scaling import PoolObservation, ScalingDecision
from rexcore.providers.interface import ProvidedWorkerState, WorkerLaunch
from rexcore.providers.mock import MockProvider, MockProviderOptions

LAUNCH = WorkerLaunch("http://coordinator")


def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coroutine)


class FakeLoad:
    """The scheduler as the pool sees it: running workers of the mock have joined."""

    def __init__(self) -> None:
        self.queued = self.running = self.arrivals = 0
        self.busy: dict[str, int] = {}
        self.joined: list[str] = []

    def set(self, provider: MockProvider, *, queued: int = 0, running: int = 0,
            new_arrivals: int = 0) -> None:
        self.queued, self.running = queued, running
        self.arrivals += new_arrivals
        self.joined = provider.running_ids()

    def __call__(self) -> SchedulerLoad:
        by_worker = dict.fromkeys(self.joined, 0) | {
            w: n for w, n in self.busy.items() if w in self.joined}
        return SchedulerLoad(queued=self.queued, running=self.running, arrivals=self.arrivals,
                             completions=0, busy_s=0.0, running_by_worker=by_worker)


class ScriptedPolicy:
    def __init__(self, *sizes: int) -> None:
        self.sizes = list(sizes)
        self.seen: list[PoolObservation] = []

    def decide(self, observation: PoolObservation) -> ScalingDecision:
        self.seen.append(observation)
        return ScalingDecision(self.sizes.pop(0), "scripted")


def _pool(policy, *, clock, provider, load, **config) -> WorkerPool:
    settings = {"min_workers": 0, "max_workers": 10, "target_workers": 1,
                "enable_autoscale": True} | config
    return WorkerPool(PoolConfig(**settings), provider, LAUNCH, policy=policy, load=load,
                      clock=lambda: clock[0])


def test_provisioner_retries_a_failing_provider_with_doubling_backoff():
    clock = [0.0]
    provider = MockProvider(MockProviderOptions(fail_creates=3), clock=lambda: clock[0])
    provisioner = WorkerProvisioner(provider, LAUNCH, clock=lambda: clock[0],
                                    backoff_s=1.0, max_backoff_s=3.0)

    async def scenario() -> list[float]:
        attempts = []
        while not provisioner.active:
            before = len(provider.calls)
            await provisioner.move_to(2)
            if len(provider.calls) > before:
                attempts.append(clock[0])
            clock[0] += 0.5
        return attempts

    attempts = run(scenario())
    assert attempts == [0.0, 1.0, 3.0, 6.0]  # waits 1, 2, then 3 (the cap)
    assert provisioner.provider_errors == 3
    assert "fails as configured" in provisioner.last_error
    assert [call for call in provider.calls] == [("create_workers", 2)] * 4
    assert len(provisioner.active) == 2


def test_scale_in_drains_idle_and_starting_workers_first_and_terminates_only_after_exit():
    clock = [0.0]
    busy: set[str] = set()
    provider = MockProvider(MockProviderOptions(start_delay_s=10), clock=lambda: clock[0],
                            busy=busy.__contains__)
    load = FakeLoad()
    pool = _pool(ScriptedPolicy(4, 1, 1, 1), clock=clock, provider=provider, load=load,
                 target_workers=3)

    async def scenario() -> None:
        await pool.start(run=False)
        clock[0] = 10.0  # the first three join; two run an action
        load.set(provider, running=2)
        first, second, third = provider.running_ids()
        load.busy = {first: 1, second: 1}
        busy.update({first, second})
        await pool.tick()  # to 4: one more starts
        states = {r.worker_id: r.state for r in pool.provisioner.workers.values()}
        assert list(states.values()).count(WorkerState.BUSY) == 2
        assert states[third] is WorkerState.IDLE and WorkerState.STARTING in states.values()

        clock[0] = 11.0
        await pool.tick()  # to 1: the starting one, the idle one, then a busy one drain
        drained = [arg for call, arg in provider.calls if call == "drain"]
        assert drained[:2] == ["mock-4", third] and drained[2] in (first, second)
        assert not [c for c in provider.calls if c[0] == "terminate"]
        survivor = ({first, second} - {drained[2]}).pop()

        clock[0] = 12.0
        await pool.tick()  # the idle and starting ones have exited: now terminated
        terminated = {arg for call, arg in provider.calls if call == "terminate"}
        assert terminated == {"mock-4", third}
        assert provider.workers[drained[2]].state is ProvidedWorkerState.DRAINING
        assert pool.statistics().draining == 1 and pool.statistics().busy == 1

        busy.discard(drained[2])  # its action finished: it exits, then is terminated
        load.busy.pop(drained[2])
        clock[0] = 13.0
        await pool.tick()
        calls = provider.calls
        assert calls.index(("drain", drained[2])) < calls.index(("terminate", drained[2]))
        assert [r.worker_id for r in pool.provisioner.active] == [survivor]
        assert pool.statistics().failed == 0

    run(scenario())


def test_tick_clamps_to_bounds_and_counts_actions_and_reversals():
    clock = [0.0]
    provider = MockProvider(clock=lambda: clock[0])
    load = FakeLoad()
    policy = ScriptedPolicy(50, 0, 3, 3)
    pool = _pool(policy, clock=clock, provider=provider, load=load, min_workers=2,
                 max_workers=5)

    reasons = []

    async def scenario() -> list[int]:
        await pool.start(run=False)
        sizes = []
        for _ in range(4):
            clock[0] += 15
            load.set(provider)
            decision = await pool.tick()
            reasons.append(decision.reason)
            sizes.append(len(pool.provisioner.active))
        return sizes

    assert run(scenario()) == [5, 2, 3, 3]
    stats = pool.statistics()
    assert (stats.scale_ups, stats.scale_downs, stats.reversals) == (2, 1, 2)
    assert reasons[0] == "scripted; clamped to [2, 5]" and reasons[2] == "scripted"
    # Before any worker joined, the configured start-up time; then the measured one.
    assert policy.seen[0].startup_s == 15.0 and policy.seen[1].ready == 5


def test_pool_measures_worker_start_up_and_tells_the_policy():
    clock = [0.0]
    provider = MockProvider(MockProviderOptions(start_delay_s=40), clock=lambda: clock[0])
    load = FakeLoad()
    policy = ScriptedPolicy(1, 1, 1)
    pool = _pool(policy, clock=clock, provider=provider, load=load)

    async def scenario() -> None:
        await pool.start(run=False)
        for now in (15.0, 45.0, 60.0):
            clock[0] = now
            load.set(provider)
            await pool.tick()

    run(scenario())
    assert [o.starting for o in policy.seen] == [1, 0, 0]
    assert policy.seen[-1].startup_s == 45.0  # joined as seen on the tick at 45 s


def test_a_worker_that_fails_is_released_counted_and_replaced():
    clock = [0.0]
    provider = MockProvider(clock=lambda: clock[0])
    load = FakeLoad()
    pool = _pool(ScriptedPolicy(2, 2), clock=clock, provider=provider, load=load,
                 target_workers=2)

    async def scenario() -> None:
        await pool.start(run=False)
        provider.workers["mock-1"].state = ProvidedWorkerState.FAILED
        load.set(provider)
        await pool.tick()

    run(scenario())
    assert ("terminate", "mock-1") in provider.calls
    assert pool.statistics().failed == 1
    assert sorted(r.worker_id for r in pool.provisioner.active) == ["mock-2", "mock-3"]


def test_autoscaling_pool_needs_a_policy_and_a_load():
    with pytest.raises(PoolError, match="needs a scaling policy"):
        WorkerPool(PoolConfig(enable_autoscale=True), MockProvider(), LAUNCH)


async def test_without_autoscale_the_pool_keeps_target_workers_and_never_ticks():
    provider = MockProvider()
    pool = WorkerPool(PoolConfig(target_workers=3), provider, LAUNCH)
    await pool.start()
    assert len(await pool.workers()) == 3 and pool._loop is None
    await pool.stop()
    assert provider.calls == [("create_workers", 3), ("close", None)]


async def test_the_daemon_runs_an_autoscaling_pool_with_the_mock_provider(plugin_manager,
                                                                          tmp_path):
    from rexcore.testing import start_rexd

    running = await start_rexd(plugin_manager, tmp_path, {"pool": {
        "enable_autoscale": True, "min_workers": 2, "max_workers": 4, "target_workers": 0,
        "evaluation_interval_s": 0.01, "provider": {"name": "mock"},
        "policy": {"name": "static", "options": {"workers": 3}},
    }})
    try:
        pool = running.daemon.pool
        assert len(pool.provisioner.active) == 2  # target 0, raised to min_workers

        async def grown() -> None:
            while len(pool.provisioner.active) != 3:
                await asyncio.sleep(0.01)

        await asyncio.wait_for(grown(), 30)
        assert pool.last_decision.reason == "static: 3 workers"
    finally:
        await running.daemon.stop()
    assert pool.provider.calls[-1] == ("close", None)


def test_policy_options_are_checked_with_their_path(plugin_manager):
    from rexcore.config.converter import ConfigError
    from rexcore.config.loader import load_config, resolve_config

    config = load_config(None, {"pool.enable_autoscale": True, "pool.policy.name": "predictive",
                                "pool.policy.options": {"alpha": "fast"}})
    with pytest.raises(ConfigError, match=r"\$\.pool\.policy\.options\.alpha"):
        resolve_config(config, plugin_manager)
    reactive = resolve_config(load_config(None, {"pool.enable_autoscale": True,
                                                 "pool.enable_predictive": False}),
                              plugin_manager)
    assert reactive.policy is not None and reactive.policy.name == "reactive"


def test_every_policy_option_is_documented():
    from pathlib import Path

    import attrs

    from rexcore.plugins.manager import PluginManager

    manager = PluginManager()
    manager.register_builtins()
    doc = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    missing = [f"{name}: {field.name}"
               for name, registered in manager.components("scaling_policy").items()
               for field in attrs.fields(registered.descriptor.options_type)
               if f"`{field.name}`" not in doc]
    assert not missing
