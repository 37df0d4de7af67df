"""The built-in scaling policies: ``predictive`` (the default), ``reactive`` and ``static``.

Each is built by ``factory(options, pool_config)``. The two that move share
:class:`ScalingGate`, which holds every decision to the pool's cooldowns and only scales
in to the largest size asked for over the scale-down cooldown, so that a dip shorter than
the cooldown never turns into a scale-in followed by a scale-out.
"""

from __future__ import annotations

import math
from collections import deque

import attrs

from rexcore.pool.config import PoolConfig
from rexcore.pool.scaling import PoolObservation, ScalingDecision
from rexcore.pool.scaling.predictor import LoadPredictor, erlang_c_slots

__all__ = [
    "PredictiveOptions",
    "PredictivePolicy",
    "ReactiveOptions",
    "ReactivePolicy",
    "ScalingGate",
    "StaticOptions",
    "StaticPolicy",
    "create_predictive_policy",
    "create_reactive_policy",
    "create_static_policy",
]

_unit = attrs.validators.and_(attrs.validators.gt(0), attrs.validators.lt(1))


class ScalingGate:
    """Cooldowns and scale-in stabilisation around a policy's raw recommendation."""

    def __init__(self, up_cooldown_s: float, down_cooldown_s: float) -> None:
        self.up_cooldown_s = up_cooldown_s
        self.down_cooldown_s = down_cooldown_s
        self._recommended: deque[tuple[float, int]] = deque()
        self._last_up = self._last_down = -math.inf

    def apply(self, now: float, current: int, wanted: int, reason: str) -> ScalingDecision:
        self._recommended.append((now, wanted))
        while self._recommended[0][0] < now - self.down_cooldown_s:
            self._recommended.popleft()
        if wanted > current:
            wait = self._last_up + self.up_cooldown_s - now
            if wait > 0:
                return ScalingDecision(current, f"{reason}; holding {current}: scale-up "
                                                f"cooldown has {wait:.0f}s left")
            self._last_up = now
            return ScalingDecision(wanted, reason)
        if wanted < current:
            wait = max(self._last_up, self._last_down) + self.down_cooldown_s - now
            if wait > 0:
                return ScalingDecision(current, f"{reason}; holding {current}: scale-down "
                                                f"cooldown has {wait:.0f}s left")
            stable = max(size for _, size in self._recommended)
            if stable >= current:
                return ScalingDecision(current, f"{reason}; holding {current}: "
                                                f"{stable} was needed within "
                                                f"{self.down_cooldown_s:.0f}s")
            self._last_down = now
            return ScalingDecision(stable, reason)
        return ScalingDecision(current, reason)


# -- static -------------------------------------------------------------------------------


@attrs.frozen
class StaticOptions:
    """``workers``: the size to keep (default: the pool's ``target_workers``)."""

    workers: int | None = attrs.field(default=None)


class StaticPolicy:
    """Always the same size: for a fixed fleet, or as a baseline."""

    def __init__(self, options: StaticOptions, pool: PoolConfig) -> None:
        self.workers = pool.initial_workers if options.workers is None else options.workers

    def decide(self, observation: PoolObservation) -> ScalingDecision:
        return ScalingDecision(self.workers, f"static: {self.workers} workers")


def create_static_policy(options: StaticOptions, pool: PoolConfig) -> StaticPolicy:
    return StaticPolicy(options, pool)


# -- reactive -----------------------------------------------------------------------------


@attrs.frozen
class ReactiveOptions:
    """``target_utilisation``: what a scale lands on (default: midway between the
    pool's thresholds)."""

    target_utilisation: float | None = attrs.field(
        default=None, validator=attrs.validators.optional(_unit))


class ReactivePolicy:
    """Utilisation thresholds: (queued + running) over the slots of ready and starting
    workers above ``scale_up_threshold`` grows the pool, below ``scale_down_threshold``
    shrinks it, each to ``target_utilisation``; in between it holds."""

    def __init__(self, options: ReactiveOptions, pool: PoolConfig) -> None:
        self.up, self.down = pool.scale_up_threshold, pool.scale_down_threshold
        self.target = options.target_utilisation or (self.up + self.down) / 2
        self.gate = ScalingGate(pool.scale_up_cooldown_s, pool.scale_down_cooldown_s)

    def decide(self, observation: PoolObservation) -> ScalingDecision:
        current, backlog = observation.current, observation.backlog
        slots = current * observation.slots_per_worker
        utilisation = backlog / slots if slots else (math.inf if backlog else 0.0)
        sized = math.ceil(backlog / (observation.slots_per_worker * self.target))
        if utilisation > self.up:
            wanted = max(sized, current + 1)
            why = f"utilisation {utilisation:.0%} is above {self.up:.0%}"
        elif utilisation < self.down:
            wanted = min(sized, current)
            why = f"utilisation {utilisation:.0%} is below {self.down:.0%}"
        else:
            wanted = current
            why = f"utilisation {utilisation:.0%} is within the thresholds"
        return self.gate.apply(observation.now, current, wanted,
                               f"reactive: {why} ({backlog} queued or running)")


def create_reactive_policy(options: ReactiveOptions, pool: PoolConfig) -> ReactivePolicy:
    return ReactivePolicy(options, pool)


# -- predictive ---------------------------------------------------------------------------


@attrs.frozen
class PredictiveOptions:
    """Options of the ``predictive`` policy (see docs/autoscaling.md).

    ``alpha``: smoothing of the arrival rate that detects changes. ``level_alpha``:
    smoothing of the steady arrival rate the pool is sized for while the fast one agrees
    with it. ``service_alpha``: smoothing of the service time. ``trend_samples``:
    observations the trend is fitted over. ``wait_objective_s`` and ``wait_quantile``:
    the queue wait to keep (by default 95% of actions start within 30 s).
    ``initial_service_s``: the service time assumed until actions have finished.
    """

    alpha: float = attrs.field(default=0.3, validator=attrs.validators.and_(
        attrs.validators.gt(0), attrs.validators.le(1)))
    trend_samples: int = attrs.field(default=8, validator=attrs.validators.ge(3))
    wait_objective_s: float = attrs.field(default=30.0, validator=attrs.validators.gt(0))
    wait_quantile: float = attrs.field(default=0.95, validator=_unit)
    initial_service_s: float = attrs.field(default=30.0, validator=attrs.validators.gt(0))
    service_alpha: float = attrs.field(default=0.05, validator=attrs.validators.and_(
        attrs.validators.gt(0), attrs.validators.le(1)))
    level_alpha: float = attrs.field(default=0.05, validator=attrs.validators.and_(
        attrs.validators.gt(0), attrs.validators.le(1)))


class PredictivePolicy:
    """Sizes the pool for a queue-wait objective from the backlog and a forecast.

    Three needs, in slots, and the largest wins:

    * **tail**: Erlang C slots for the sized arrival rate (the steady level while the
      fast rate agrees with it, plus the forecast) times the service time, so that
      ``wait_quantile`` of actions wait at most ``wait_objective_s``;
    * **backlog**: the running actions plus the queue worked off within the objective;
    * **running**: actions running now (a worker running one is never drained anyway).

    The forecast is the smoothed rate plus its significant upward trend over the start-up
    time: it may add capacity, never remove it. :class:`ScalingGate` applies the cooldowns.
    """

    def __init__(self, options: PredictiveOptions, pool: PoolConfig) -> None:
        self.options = options
        self.max_slots = max(pool.max_workers, 1) * pool.slots_per_worker
        self.interval_s = pool.evaluation_interval_s
        self.predictor = LoadPredictor(options.alpha, options.trend_samples,
                                       options.initial_service_s, options.service_alpha,
                                       options.level_alpha)
        self.gate = ScalingGate(pool.scale_up_cooldown_s, pool.scale_down_cooldown_s)

    def decide(self, observation: PoolObservation) -> ScalingDecision:
        o, options, predictor = observation, self.options, self.predictor
        predictor.observe(o.now, o.arrivals, o.completions, o.busy_s)
        service_s = predictor.service_s
        horizon_s = o.startup_s + self.interval_s
        # Size for the slow, steady level of the arrival rate while the fast estimate
        # agrees with it within its noise; once the fast one leaves that band the load
        # has moved, and the sized rate follows it to the edge of the band. The noise of
        # the sized rate is then the level's, which the scale-in window would otherwise
        # turn into idle workers (it keeps the largest size asked for over 2 minutes).
        fast, level = predictor.rate or 0.0, predictor.level or 0.0
        fast_spread = 2 * math.sqrt(max(fast, level) / self._memory_s(options.alpha))
        steady = min(max(level, fast - fast_spread), fast + fast_spread)
        forecast = predictor.trend() * horizon_s  # >= 0: a forecast only adds capacity
        rate = steady + forecast
        tail = erlang_c_slots(rate * service_s, service_s, options.wait_objective_s,
                              options.wait_quantile, self.max_slots)
        # What is here now: every running action keeps its slot, and the queue is worked
        # off within the objective (one slot per queued action when actions take longer).
        backlog = o.running + o.queued * min(1.0, service_s / options.wait_objective_s)
        slots = max(tail, backlog, o.running)
        wanted = math.ceil(slots / o.slots_per_worker - 1e-9)
        need = {tail: "tail", backlog: "backlog"}.get(slots, "running")
        # The sized rate is still noisy: with nobody waiting, grow only as far as its
        # lower confidence bound asks, and shrink only as far as its upper bound allows,
        # so that noise alone never starts a grow-shrink cycle (a queue acts at once).
        spread = 2 * math.sqrt(rate / self._memory_s(options.level_alpha))
        if o.queued == 0 and wanted > o.current:
            bounded = self._workers(max(0.0, rate - spread), service_s, backlog, o)
            if bounded < wanted:
                need, wanted = f"{need} (within noise: {bounded})", max(o.current, bounded)
        elif wanted < o.current:
            bounded = self._workers(rate + spread, service_s, backlog, o)
            if bounded > wanted:
                need, wanted = f"{need} (within noise: {bounded})", min(o.current, bounded)
        reason = (
            f"predictive: {need} needs {wanted} (arrivals {rate:.3g}/s incl. forecast "
            f"{forecast:+.3g}/s, fast {fast:.3g}/s, level {level:.3g}/s, service "
            f"{service_s:.3g}s, {o.queued} queued, {o.running} running, p"
            f"{options.wait_quantile * 100:g} wait objective {options.wait_objective_s:g}s)"
        )
        return self.gate.apply(o.now, o.current, wanted, reason)

    def _memory_s(self, alpha: float) -> float:
        """The window whose plain mean is as noisy as an EWMA of per-interval rates."""
        return self.interval_s * (2 - alpha) / alpha

    def _workers(self, rate: float, service_s: float, backlog: float,
                 o: PoolObservation) -> int:
        tail = erlang_c_slots(rate * service_s, service_s, self.options.wait_objective_s,
                              self.options.wait_quantile, self.max_slots)
        return math.ceil(max(tail, backlog, o.running) / o.slots_per_worker - 1e-9)


def create_predictive_policy(options: PredictiveOptions, pool: PoolConfig) -> PredictivePolicy:
    return PredictivePolicy(options, pool)
