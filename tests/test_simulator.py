"""The autoscaling simulator: seeded and deterministic, driving the real pool code."""

from __future__ import annotations

import attrs

from rexcore.pool.simulator import WORKLOADS, Workload, read_trace, simulate


def _short(seed: int) -> Workload:
    """The first 90 minutes of the step workload (the rate jumps at one hour)."""
    full = WORKLOADS["step"](seed)
    return Workload("step-90min", tuple(a for a in full.arrivals if a[0] < 5400), 5400.0)


def test_a_seed_gives_the_same_run_and_another_seed_another_one():
    first = simulate(_short(3), "predictive", startup_s=120, seed=3)
    assert simulate(_short(3), "predictive", startup_s=120, seed=3) == first
    other = simulate(_short(4), "predictive", startup_s=120, seed=4)
    assert (other.actions, other.worker_seconds) != (first.actions, first.worker_seconds)


def test_autoscaling_policies_move_the_pool_and_static_never_does():
    workload = _short(1)
    predictive = simulate(workload, "predictive", startup_s=30, seed=1)
    static = simulate(workload, "static", startup_s=30, seed=1)
    assert predictive.scaling_actions > 0 and predictive.peak_workers > 1
    assert static.scaling_actions == 0
    assert predictive.worker_seconds < static.worker_seconds
    assert predictive.actions == static.actions == len(workload.arrivals)


def test_the_oracle_knows_the_future_and_hardly_waits():
    result = simulate(_short(2), "oracle", startup_s=300, seed=2)
    hpa = simulate(_short(2), "hpa", startup_s=300, seed=2)
    assert result.wait_p99_s < 1.0 < hpa.wait_p99_s


def test_a_trace_replays_its_arrivals(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text("arrival_s,duration_s\n" + "".join(
        f"{i * 2.0},{30.0}\n" for i in range(300)))
    workload = read_trace(str(path))
    assert len(workload.arrivals) == 300 and workload.duration_s == 598.0
    result = simulate(workload, "hpa", startup_s=30, seed=0)
    assert result.actions == 300 and result.workload == str(path)
    assert attrs.asdict(result)["worker_seconds"] > 300 * 30.0 * 0.99


def test_a_policy_of_ones_own_is_judged_like_the_built_in_ones():
    from rexcore.pool.simulator import HpaPolicy

    workload = _short(5)
    built_in = simulate(workload, "hpa", startup_s=30, seed=5)
    own = simulate(workload, "mine", startup_s=30, seed=5,
                   policy_factory=lambda config: HpaPolicy())
    assert own.policy == "mine"
    assert attrs.evolve(own, policy="hpa") == built_in
    # a policy that asks for one worker more than what runs: its own decisions count
    asked = []

    class OneMore:
        def decide(self, o):
            from rexcore.pool.scaling import ScalingDecision

            asked.append(o.now)
            return ScalingDecision(o.backlog + 1, "one more than the backlog")

    result = simulate(workload, "one-more", startup_s=30, seed=5,
                      policy_factory=lambda config: OneMore())
    assert asked and result.actions == len(workload.arrivals)
    assert result.scaling_actions > 0 and result != built_in
