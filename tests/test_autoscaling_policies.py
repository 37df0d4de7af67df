"""Scaling policies: bounds, cooldowns, no oscillation, and what each need adds."""

from __future__ import annotations

import math
import random

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st

from rexcore.pool.config import PoolConfig
from rexcore.pool.scaling import PoolObservation
from rexcore.pool.scaling.policies import (
    PredictiveOptions,
    ReactiveOptions,
    ScalingGate,
    StaticOptions,
    create_predictive_policy,
    create_reactive_policy,
    create_static_policy,
)
from rexcore.pool.scaling.predictor import LoadPredictor, erlang_c_slots

POOL = PoolConfig(min_workers=0, max_workers=100, evaluation_interval_s=15.0)


def _observation(now: float, **fields) -> PoolObservation:
    values = {"queued": 0, "running": 0, "ready": 1, "starting": 0} | fields
    return PoolObservation(now=now, **values)


def test_erlang_c_adds_headroom_over_littles_law_and_less_of_it_as_the_pool_grows():
    small = erlang_c_slots(5.0, 40.0, 30.0, 0.95, 1000)
    large = erlang_c_slots(100.0, 40.0, 30.0, 0.95, 1000)
    assert small > 5 and large > 100
    assert small / 5 > large / 100
    assert erlang_c_slots(0.0, 40.0, 30.0, 0.95, 1000) == 0
    assert erlang_c_slots(500.0, 40.0, 30.0, 0.95, 50) == 50  # capped by the limit


def test_a_stricter_wait_objective_needs_more_slots():
    assert erlang_c_slots(20, 40, 5, 0.95, 1000) > erlang_c_slots(20, 40, 60, 0.95, 1000)
    assert erlang_c_slots(20, 40, 30, 0.99, 1000) > erlang_c_slots(20, 40, 30, 0.9, 1000)


def test_predictor_smooths_the_rate_and_measures_the_service_time():
    predictor = LoadPredictor(alpha=0.3, trend_samples=8, initial_service_s=30.0)
    assert predictor.service_s == 30.0
    for tick in range(40):  # 2 arrivals/s, each finished action ran 10 s
        predictor.observe(tick * 15.0, tick * 30, tick * 30, tick * 300.0)
    assert math.isclose(predictor.rate, 2.0)
    assert math.isclose(predictor.service_s, 10.0)
    assert predictor.trend() == 0.0


def test_predictor_sees_a_steady_ramp_but_not_poisson_noise():
    ramp = LoadPredictor(0.3, 8, 30.0)
    arrivals = 0
    for tick in range(12):
        arrivals += 15 * (1 + tick)  # the rate rises by 1/s each 15 s
        ramp.observe((tick + 1) * 15.0, arrivals, 0, 0.0)
    assert ramp.trend() > 0.03
    assert ramp.forecast(300) > ramp.rate

    noise, rng, arrivals = LoadPredictor(0.3, 8, 30.0), random.Random(7), 0
    flagged = 0
    for tick in range(2000):
        arrivals += sum(1 for _ in range(60) if rng.random() < 0.1)  # ~0.4/s, flat
        noise.observe(tick * 15.0, arrivals, 0, 0.0)
        flagged += noise.trend() > 0
    assert flagged < 2000 * 0.05


def test_gate_holds_scale_ups_for_the_cooldown_and_scale_ins_to_the_window_maximum():
    gate = ScalingGate(up_cooldown_s=30, down_cooldown_s=120)
    assert gate.apply(0, 2, 5, "r").desired == 5
    held = gate.apply(15, 5, 8, "r")
    assert held.desired == 5 and "scale-up cooldown" in held.reason
    assert gate.apply(30, 5, 8, "r").desired == 8
    assert gate.apply(60, 8, 3, "r").desired == 8  # too soon after the scale-up
    assert gate.apply(150, 8, 3, "r").desired == 8  # 8 was asked for within 120 s
    assert gate.apply(200, 8, 3, "r").desired == 3


def test_static_keeps_its_size_whatever_the_load():
    policy = create_static_policy(StaticOptions(), attrs.evolve(POOL, target_workers=7))
    assert policy.decide(_observation(0, queued=500)).desired == 7
    assert create_static_policy(StaticOptions(3), POOL).decide(_observation(0)).desired == 3


def test_reactive_grows_above_the_threshold_and_shrinks_below_it():
    policy = create_reactive_policy(ReactiveOptions(), POOL)
    up = policy.decide(_observation(0, ready=4, running=4, queued=4))
    assert up.desired == 16 and "above 75%" in up.reason  # to 50% utilisation
    down = policy.decide(_observation(1000, ready=16, running=2))
    assert down.desired == 4 and "below 25%" in down.reason
    assert policy.decide(_observation(2000, ready=4, running=2)).desired == 4


def test_predictive_scales_on_backlog_before_any_rate_is_known():
    policy = create_predictive_policy(PredictiveOptions(), POOL)
    decision = policy.decide(_observation(0, ready=2, running=2, queued=10, startup_s=0.0))
    assert decision.desired == 12 and "backlog" in decision.reason
    assert "queued" in decision.reason and "objective" in decision.reason


def test_predictive_counts_only_the_queue_a_new_worker_would_still_find():
    """Two busy workers of 30 s actions work off two queued actions while a new worker
    takes 30 s to start, and all ten while it takes 150 s: nobody is added for those."""
    slow = create_predictive_policy(PredictiveOptions(), POOL)
    assert slow.decide(_observation(0, ready=2, running=2, queued=10)).desired == 10
    assert slow.decide(_observation(0, ready=2, running=2, queued=10,
                                    startup_s=150.0)).desired == 2


def test_predictive_sizes_steady_load_above_the_mean_for_the_tail():
    policy = create_predictive_policy(PredictiveOptions(),
                                      attrs.evolve(POOL, scale_up_cooldown_s=0))
    decision = None
    for tick in range(20):  # 0.5 arrivals/s of 40 s: 20 busy on average
        decision = policy.decide(_observation(
            tick * 15.0, ready=20, running=20, queued=1, arrivals=tick * 8 - tick // 2,
            completions=tick * 7, busy_s=tick * 7 * 40.0))
    assert decision is not None and 20 < decision.desired <= 30, decision.reason


def test_predictive_forecast_of_a_ramp_only_adds_capacity():
    options = PredictiveOptions()
    flat = create_predictive_policy(options, POOL)
    ramp = create_predictive_policy(options, POOL)
    flat_arrivals = ramp_arrivals = 0
    for tick in range(10):
        flat_arrivals += 15
        ramp_arrivals += 15 * (1 + tick)
        common = {"ready": 10, "running": 5, "completions": tick * 10, "busy_s": tick * 100.0}
        last_flat = flat.decide(_observation(tick * 15.0, arrivals=flat_arrivals, **common))
        last_ramp = ramp.decide(_observation(tick * 15.0, arrivals=ramp_arrivals, **common))
    assert last_ramp.desired > last_flat.desired


@settings(max_examples=60, deadline=None)
@given(
    policy_name=st.sampled_from(["predictive", "reactive", "static"]),
    bounds=st.tuples(st.integers(0, 5), st.integers(0, 40)),
    loads=st.lists(st.tuples(st.integers(0, 300), st.integers(0, 60), st.integers(0, 50)),
                   min_size=1, max_size=40),
)
def test_no_policy_leaves_the_pool_bounds(policy_name, bounds, loads):
    """What the pool does with a decision: clamp it. Checked through the real pool."""
    from rexcore.pool.pool import WorkerPool
    from rexcore.providers.interface import WorkerLaunch
    from rexcore.providers.mock import MockProvider
    from tests.test_pool_provisioner import FakeLoad, run

    low, high = min(bounds), max(bounds)
    config = PoolConfig(min_workers=low, max_workers=max(high, 1), target_workers=low,
                        enable_autoscale=True, scale_up_cooldown_s=0,
                        scale_down_cooldown_s=0)
    factories = {"predictive": lambda: create_predictive_policy(PredictiveOptions(), config),
                 "reactive": lambda: create_reactive_policy(ReactiveOptions(), config),
                 "static": lambda: create_static_policy(StaticOptions(high + 3), config)}
    clock = [0.0]
    load = FakeLoad()
    provider = MockProvider(clock=lambda: clock[0])
    pool = WorkerPool(config, provider, WorkerLaunch("x"), policy=factories[policy_name](),
                      load=load, clock=lambda: clock[0])

    async def scenario():
        await pool.start(run=False)
        for arrivals, queued, running in loads:
            clock[0] += 15
            load.set(provider, queued=queued, running=running, new_arrivals=arrivals)
            decision = await pool.tick()
            assert config.min_workers <= decision.desired <= config.max_workers
            assert config.min_workers <= len(pool.provisioner.active) <= config.max_workers

    run(scenario())


def _steady_hour(rate: float, service_s: float, seed: int) -> int:
    """Direction reversals of the pool fed an hour of a steady Poisson-like load."""
    policy = create_predictive_policy(PredictiveOptions(), POOL)
    rng = random.Random(seed)
    current, arrivals, completions, busy = 1, 0, 0, 0.0
    directions = []
    for tick in range(1, 240):  # an hour
        new = sum(1 for _ in range(150) if rng.random() < rate * 15 / 150)
        arrivals += new
        completions += new
        busy += new * service_s
        running = min(current, round(rate * service_s))
        decision = policy.decide(_observation(
            tick * 15.0, ready=current, running=running,
            queued=max(0, round(rate * service_s) - current), arrivals=arrivals,
            completions=completions, busy_s=busy))
        if decision.desired != current:
            direction = 1 if decision.desired > current else -1
            if not directions or directions[-1] != direction:
                directions.append(direction)
            current = decision.desired
    return max(0, len(directions) - 1)


def test_predictive_hardly_ever_reverses_under_steady_load():
    """Fed the counters of a steady load, the pool grows to a size and then changes
    direction at most twice an hour (an initial overshoot settling, or a rare excursion
    of the estimate beyond its dead band), and in nearly every hour not at all: noise
    alone does not start grow-shrink cycles. Seeded: 100 hours of 0.05-3 actions/s of
    5-120 s each."""
    rng = random.Random(2026)
    reversals = [_steady_hour(rng.uniform(0.05, 3.0), rng.uniform(5, 120), rng.randrange(10**6))
                 for _ in range(100)]
    assert max(reversals) <= 2, reversals
    assert sum(1 for r in reversals if r == 0) >= 90, reversals


@settings(max_examples=60, deadline=None)
@given(steps=st.lists(st.tuples(st.integers(0, 60), st.integers(0, 30), st.integers(0, 40)),
                      min_size=2, max_size=40))
def test_predictive_keeps_what_runs_while_actions_queue_and_always_says_why(steps):
    """Whatever the counters do, a decision keeps a slot per running action (unless a
    cooldown holds the current size) while actions queue; with nothing queued it may go
    below, and then says that it releases busy workers (they finish their actions
    first). Every decision carries a reason naming its need."""
    policy = create_predictive_policy(PredictiveOptions(),
                                      attrs.evolve(POOL, scale_up_cooldown_s=0))
    arrivals = completions = 0
    for tick, (new, queued, running) in enumerate(steps):
        arrivals += new
        completions += new // 2
        current = max(running, 1)
        decision = policy.decide(_observation(
            tick * 15.0, ready=current, running=running, queued=queued, arrivals=arrivals,
            completions=completions, busy_s=completions * 20.0))
        if queued:
            assert decision.desired >= running
        elif decision.desired < running:
            assert "releasing the busy beyond" in decision.reason
        assert decision.reason.startswith("predictive: ") and " needs " in decision.reason


def test_predictive_follows_a_jump_of_the_rate_before_its_slow_level_catches_up():
    """The steady level is slow; a jump beyond the fast rate's noise still grows the
    pool within a few intervals, with nobody queued yet."""
    policy = create_predictive_policy(PredictiveOptions(),
                                      attrs.evolve(POOL, scale_up_cooldown_s=0))
    arrivals, desired = 0, 1
    for tick in range(60):
        per_tick = 3 if tick < 40 else 30  # 0.2/s, then 2/s
        arrivals += per_tick
        decision = policy.decide(_observation(
            tick * 15.0, ready=desired, running=0, arrivals=arrivals,
            completions=arrivals, busy_s=arrivals * 10.0))
        desired = decision.desired
        if tick == 39:
            before = desired
    assert desired >= 2 * before, (before, desired)


def test_gate_without_a_window_scales_in_to_what_is_asked_once_the_cooldown_is_over():
    gate = ScalingGate(up_cooldown_s=30, down_cooldown_s=120, window_s=0)
    assert gate.apply(0, 2, 9, "r").desired == 9
    assert gate.apply(60, 9, 4, "r").desired == 9  # the cooldown still runs
    assert gate.apply(120, 9, 4, "r").desired == 4  # no window: 9 is not held


def test_predictor_level_restarts_and_then_averages_the_samples_since():
    predictor = LoadPredictor(alpha=0.3, trend_samples=8, initial_service_s=30.0,
                              level_alpha=0.025)
    for tick in range(200):  # 0.2/s for 50 minutes: the level's memory is full
        predictor.observe(tick * 15.0, tick * 3, 0, 0.0)
    assert math.isclose(predictor.level, 0.2) and predictor.level_samples == 79
    predictor.restart_level(1.0)
    assert predictor.level == 1.0 and predictor.level_samples == 3
    arrivals = 199 * 3
    for tick in range(200, 206):  # 2/s from now on
        arrivals += 30
        predictor.observe(tick * 15.0, arrivals, 0, 0.0)
    # A running mean of the restart and the six samples since (a slow EWMA would still
    # sit near 1.1): (3 * 1.0 + 6 * 2.0) / 9.
    assert math.isclose(predictor.level, 15 / 9) and predictor.level_samples == 9


def test_predictive_holds_its_size_before_any_arrival_rate_is_known():
    policy = create_predictive_policy(PredictiveOptions(), POOL)
    decision = policy.decide(_observation(0, ready=5))
    assert decision.desired == 5 and "no arrival rate yet" in decision.reason


def test_predictive_scale_in_never_drains_the_workers_a_queue_waits_for():
    """Fifty queued actions and fifty workers starting: by the time a worker asked for
    now joined they would be served, so nobody is added, but nobody is drained either."""
    pool = attrs.evolve(POOL, scale_down_cooldown_s=0)
    policy = create_predictive_policy(PredictiveOptions(), pool)
    for now in (0.0, 15.0):
        decision = policy.decide(_observation(now, ready=2, starting=50, running=2,
                                              queued=50, startup_s=300.0))
        assert decision.desired == 52, decision.reason
    assert "the queue keeps its slots" in decision.reason


def test_predictive_asks_ahead_for_the_arrivals_of_a_jump_while_actions_queue():
    """The same queue asks for more workers when the arrival rate has just jumped (the
    arrivals until the pool may grow again are queued too by the time workers join) than
    under a steady rate."""
    def last(jump: bool):
        policy = create_predictive_policy(PredictiveOptions(), POOL)
        arrivals, decision = 0, None
        for tick in range(60):
            arrivals += 30 if jump and tick == 59 else 3  # 0.2/s, then 2/s
            decision = policy.decide(_observation(
                tick * 15.0, ready=5, running=5, queued=20 if tick == 59 else 0,
                arrivals=arrivals, completions=arrivals, busy_s=arrivals * 20.0,
                startup_s=120.0))
        return decision

    steady, jumped = last(False), last(True)
    assert "rising for" in jumped.reason and "rising" not in steady.reason
    assert jumped.desired > steady.desired + 20, (steady, jumped)


def test_predictive_shrinks_a_steady_pool_only_to_the_upper_bound_of_its_estimate():
    """A pool far too large for a steady 0.5/s of 40 s shrinks, but only as far as the
    Erlang C size at the upper end of the estimate's noise band, above the size for the
    estimate itself."""
    pool = attrs.evolve(POOL, scale_down_cooldown_s=0)
    options = PredictiveOptions()
    policy = create_predictive_policy(options, pool)
    for tick in range(240):
        done = tick * 15 // 2
        decision = policy.decide(_observation(tick * 15.0, ready=40, running=20, arrivals=done,
                                              completions=done, busy_s=done * 40.0))
    point = erlang_c_slots(20.0, 40.0, options.wait_objective_s, options.wait_quantile, 100)
    assert point < decision.desired < 40, decision.reason
    assert "within noise" in decision.reason


def test_predictor_recent_rate_is_the_plain_mean_of_the_last_raw_rates():
    predictor = LoadPredictor(alpha=0.3, trend_samples=8, initial_service_s=30.0)
    assert predictor.recent_rate(3) == 0.0  # nothing observed yet
    arrivals = 0
    for tick, per_tick in enumerate([30, 30, 30, 30, 3, 6, 9]):
        arrivals += per_tick
        predictor.observe(tick * 15.0, arrivals, 0, 0.0)
    # The samples after the first observation: 2, 2, 2, 0.2, 0.4, 0.6 per second.
    assert math.isclose(predictor.recent_rate(3), 0.4)
    assert predictor.rate > 0.4  # the fast EWMA still carries the old 2/s


def _fed(policy, ticks: int, per_tick: int, service_s: float, start: int = 0,
         arrivals: int = 0, **fields):
    """Feed ``ticks`` intervals of ``per_tick`` arrivals (each finished at once, taking
    ``service_s``); returns the arrivals so far and the last decision."""
    decision = None
    for tick in range(start, start + ticks):
        arrivals += per_tick
        decision = policy.decide(_observation(tick * 15.0, arrivals=arrivals,
                                              completions=arrivals,
                                              busy_s=arrivals * service_s, **fields))
    return arrivals, decision


def test_predictive_releases_the_workers_of_a_worked_off_burst_as_they_finish():
    """A steady 0.2/s of 40 s needs about 13 workers. After a burst, 60 workers all run
    an action and nothing queues: the pool is sized down to its steady need at once,
    draining busy workers (they finish their action first), instead of holding 60 until
    the burst's actions have finished. The next tick, with those workers draining, it
    does not grow back for the actions they still run (it may take one more step down:
    continuing a move needs only the narrow follow band)."""
    pool = attrs.evolve(POOL, scale_down_cooldown_s=0)
    policy = create_predictive_policy(PredictiveOptions(), pool)
    arrivals, _ = _fed(policy, 200, 3, 40.0, ready=13, running=8)
    _, decision = _fed(policy, 1, 3, 40.0, start=200, arrivals=arrivals,
                       ready=60, running=60)
    assert decision.desired < 20, decision.reason
    assert "releasing the busy beyond" in decision.reason
    released = decision.desired
    _, decision = _fed(policy, 1, 3, 40.0, start=201, arrivals=arrivals + 3,
                       ready=released, running=60, draining=60 - released)
    assert decision.desired <= released, decision.reason


def test_predictive_does_not_release_busy_workers_while_actions_queue_or_workers_start():
    pool = attrs.evolve(POOL, scale_down_cooldown_s=0)
    for fields in ({"queued": 5}, {"starting": 3}):
        policy = create_predictive_policy(PredictiveOptions(), pool)
        arrivals, _ = _fed(policy, 200, 3, 40.0, ready=13, running=8)
        _, decision = _fed(policy, 1, 3, 40.0, start=200, arrivals=arrivals,
                           ready=60, running=60, **fields)
        assert decision.desired >= 60, (fields, decision.reason)


def test_predictive_band_is_narrow_along_its_last_change_and_wide_against_it():
    options = PredictiveOptions(noise_band=2.0, follow_band=0.5)
    policy = create_predictive_policy(options, POOL)
    assert policy._band(+1) == policy._band(-1) == 2.0  # no change yet: wide both ways
    policy.direction = 1
    assert policy._band(+1) == 0.5 and policy._band(-1) == 2.0
    policy.direction = -1
    assert policy._band(+1) == 2.0 and policy._band(-1) == 0.5


def test_predictive_follows_a_slow_ramp_closer_with_a_narrow_follow_band():
    """On a slow ramp (too slow for the trend test) the pool keeps growing; with a
    follow band narrower than the noise band it keeps closer to the estimate than with
    the same wide band both ways."""
    def size(follow_band: float) -> int:
        policy = create_predictive_policy(
            PredictiveOptions(noise_band=2.0, follow_band=follow_band), POOL)
        arrivals, current, sizes = 0, 10, []
        for tick in range(480):  # two hours, 0.5/s rising to 1.5/s, 30 s each
            arrivals += round((0.5 + tick / 480) * 15)
            decision = policy.decide(_observation(
                tick * 15.0, ready=current, running=min(current, 15), arrivals=arrivals,
                completions=arrivals, busy_s=arrivals * 30.0))
            current = decision.desired
            sizes.append(current)
        return sum(sizes[240:])

    assert size(0.5) > size(2.0)


def test_predictive_restarts_its_level_after_a_drop_at_the_lower_recent_estimate():
    """Once a drop of the rate from 2/s to 0.2/s is detected, the level the pool is
    sized for restarts at the lower of the fast rate and the plain mean of the last
    1/alpha raw rates (the fast rate still carries the old load for a while, and so does
    the raw mean if the drop is seen within 1/alpha intervals)."""
    policy = create_predictive_policy(PredictiveOptions(), POOL)
    predictor = policy.predictor
    arrivals, _ = _fed(policy, 200, 30, 10.0, ready=30, running=20)
    restarted = None
    for tick in range(200, 206):
        recent = [3 / 15.0] * min(3, tick - 199) + [2.0] * max(0, 3 - (tick - 199))
        arrivals, decision = _fed(policy, 1, 3, 10.0, start=tick, arrivals=arrivals,
                                  ready=30, running=2)
        if restarted is None and predictor.level_samples == 3:
            restarted = tick
            assert math.isclose(predictor.level, min(sum(recent) / 3, predictor.rate))
    assert restarted is not None
