"""The built-in scaling policies: ``predictive`` (the default), ``reactive`` and ``static``.

Each is built by ``factory(options, pool_config)``. The two that move share
:class:`ScalingGate`, which holds every decision to the pool's cooldowns; for
``reactive`` it also scales in only to the largest size asked for over the scale-down
cooldown, so that a dip shorter than the cooldown never turns into a scale-in followed by
a scale-out (``predictive`` has its own dead band instead, see docs/autoscaling.md).
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
    """Cooldowns and scale-in stabilisation around a policy's raw recommendation.

    A scale-up waits ``up_cooldown_s`` after the last scale-up; a scale-in waits
    ``down_cooldown_s`` after any change and goes only down to the largest size asked for
    within ``window_s`` (default: the scale-down cooldown; 0 scales in to what is asked).
    """

    def __init__(self, up_cooldown_s: float, down_cooldown_s: float,
                 window_s: float | None = None) -> None:
        self.up_cooldown_s = up_cooldown_s
        self.down_cooldown_s = down_cooldown_s
        self.window_s = down_cooldown_s if window_s is None else window_s
        self._recommended: deque[tuple[float, int]] = deque()
        self._last_up = self._last_down = -math.inf

    def apply(self, now: float, current: int, wanted: int, reason: str) -> ScalingDecision:
        self._recommended.append((now, wanted))
        while self._recommended[0][0] < now - self.window_s:
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
                                                f"{self.window_s:.0f}s")
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
    smoothing of the steady arrival rate the pool is sized for. ``service_alpha``:
    smoothing of the service time. ``trend_samples``: observations the trend is fitted
    over. ``wait_objective_s`` and ``wait_quantile``: the queue wait to keep (by default
    95% of actions start within 10 s). ``initial_service_s``: the service time assumed
    until actions have finished. ``change_band``: how many standard errors the fast rate
    must leave the steady level by for the load to count as moved (the level then
    restarts there). ``noise_band``: how many standard errors of the sized rate a change
    of the load must exceed before the pool moves *against* its last change (the dead
    band that keeps noise from reversing the pool). ``follow_band``: the same for a
    further move in the direction of the last change (narrower: continuing a move is no
    reversal, and a wide band there makes the pool lag every ramp).
    """

    alpha: float = attrs.field(default=0.3, validator=attrs.validators.and_(
        attrs.validators.gt(0), attrs.validators.le(1)))
    trend_samples: int = attrs.field(default=8, validator=attrs.validators.ge(3))
    wait_objective_s: float = attrs.field(default=10.0, validator=attrs.validators.gt(0))
    wait_quantile: float = attrs.field(default=0.95, validator=_unit)
    initial_service_s: float = attrs.field(default=30.0, validator=attrs.validators.gt(0))
    service_alpha: float = attrs.field(default=0.01, validator=attrs.validators.and_(
        attrs.validators.gt(0), attrs.validators.le(1)))
    level_alpha: float = attrs.field(default=0.025, validator=attrs.validators.and_(
        attrs.validators.gt(0), attrs.validators.le(1)))
    change_band: float = attrs.field(default=3.0, validator=attrs.validators.gt(0))
    noise_band: float = attrs.field(default=2.0, validator=attrs.validators.ge(0))
    follow_band: float = attrs.field(default=1.0, validator=attrs.validators.ge(0))


class PredictivePolicy:
    """Sizes the pool for a queue-wait objective from the backlog and a forecast.

    Three needs, in slots, and the largest wins:

    * **tail**: Erlang C slots for the sized arrival rate (the steady level plus the
      forecast) times the service time, so that ``wait_quantile`` of actions wait at most
      ``wait_objective_s``;
    * **backlog**: the running actions plus the part of the queue a worker asked for now
      would still find when it joins, to be worked off within the objective;
    * **running**: actions running now on workers that are not draining.

    The forecast (a significant upward trend over the start-up time, and while the load
    rises the arrivals until a worker asked now can join) may add capacity, never remove
    it. A dead band around the sized rate keeps noise from reversing the pool
    (``noise_band`` standard errors against the last change, ``follow_band`` along it);
    :class:`ScalingGate` applies the cooldowns. With no queue, nothing starting and no
    rise under way, a scale-in may go below what runs now: busy workers are drained last
    and exit once their actions finish, instead of idling through the cooldown.
    """

    def __init__(self, options: PredictiveOptions, pool: PoolConfig) -> None:
        self.options = options
        self.max_slots = max(pool.max_workers, 1) * pool.slots_per_worker
        self.interval_s = pool.evaluation_interval_s
        self.up_cooldown_s = pool.scale_up_cooldown_s
        self.predictor = LoadPredictor(options.alpha, options.trend_samples,
                                       options.initial_service_s, options.service_alpha,
                                       options.level_alpha)
        # Scale-ins go to what the dead band allows, not to the largest size asked for
        # within the cooldown: the band already keeps noise from shrinking the pool, and
        # the window would hold every upward wiggle of the estimate as idle workers.
        self.gate = ScalingGate(pool.scale_up_cooldown_s, pool.scale_down_cooldown_s,
                                window_s=0.0)
        #: When the arrival rate was last seen to jump up; None while it has not.
        self.rising_since: float | None = None
        #: The direction of the last change this policy made (+1 grew, -1 shrank, 0 none).
        self.direction = 0

    def decide(self, observation: PoolObservation) -> ScalingDecision:
        o, options, predictor = observation, self.options, self.predictor
        predictor.observe(o.now, o.arrivals, o.completions, o.busy_s)
        service_s = predictor.service_s
        # The pool is sized for the slow, steady level of the arrival rate. Once the fast
        # rate leaves the level by more than its noise, the load has moved: the level
        # restarts (an old level would lag a step for its whole memory).
        fast, level = predictor.rate or 0.0, predictor.level or 0.0
        moved = abs(fast - level) > options.change_band * math.sqrt(
            max(fast, level) / self._memory_s(options.alpha))
        if moved and fast > level and self.rising_since is None:
            self.rising_since = o.now - self.interval_s
        elif self.rising_since is not None and (o.queued == 0 or (fast < level and not moved)):
            self.rising_since = None
        if moved:
            # A rise restarts at the fast rate (the queue projection below covers its
            # lag). A drop restarts at the lower of the fast rate and the plain mean of
            # the last 1/alpha raw rates (as many samples as the fast rate is worth):
            # the fast rate carries the old load for a minute or two, which would hold
            # idle workers; the raw mean carries none of it unless the drop was seen
            # within 1/alpha intervals, and then the fast rate is the lower.
            level = fast if fast > level else min(fast, predictor.recent_rate(
                max(1, round(1 / options.alpha))))
            predictor.restart_level(level)
        forecast = predictor.trend() * (o.startup_s + self.interval_s)  # >= 0: only adds
        rate = level + forecast
        tail = self._tail(rate, service_s)
        # The queue: a worker asked for now joins after the start-up time, and it finds
        # only what the workers serving by then have not worked off (starting ones count
        # half: on average they join halfway). While the load rises and actions queue,
        # the arrivals until then count too, at the latest rate, for as long as the rise
        # has lasted and at least until the pool may grow again (the scale-up cooldown).
        per_queued = min(1.0, service_s / options.wait_objective_s)
        serving = (o.ready + o.starting / 2) * o.slots_per_worker / service_s
        if self.rising_since is not None and o.queued:
            ahead_s = min(o.startup_s, max(o.now - self.rising_since, self.up_cooldown_s))
            arriving = max(fast, predictor.last_rate or 0.0)
            left = max(0.0, o.queued + (arriving - serving) * ahead_s)
        else:
            left = max(0.0, o.queued - max(0.0, serving - level) * o.startup_s)
        # Actions on draining workers need no slot: those workers exit once they finish
        # (a draining worker still alive is a busy one: an idle one exits at once).
        running = max(0, o.running - o.draining * o.slots_per_worker)
        backlog = running + left * per_queued
        # A scale-in never leaves the current queue without its slots.
        held = running + o.queued * per_queued if o.queued else 0.0
        slots = max(tail, backlog, running)
        wanted = self._workers(slots, o)
        need = {tail: "tail", backlog: "backlog"}.get(slots, "running")
        # The sized rate is noisy: grow only as far as its lower confidence bound asks,
        # and shrink only as far as its upper bound allows, so that noise alone never
        # starts a grow-shrink cycle (a queue that outlasts a start-up acts at once).
        # The band is wide against the last change and narrow along it: a reversal still
        # takes a swing of both bands together, and a ramp is followed closely.
        unit = math.sqrt(rate / (self.interval_s * max(predictor.level_samples, 1))
                         + rate / self._memory_s(options.service_alpha))
        # After a burst, the workers bought for its queue may be released as they finish
        # (see the class docstring); not while a queue, a start-up or a rise is under way.
        # (A tail at the pool's maximum is no size the load needs: never release then.)
        settled = (o.queued == 0 and o.starting == 0 and self.rising_since is None
                   and tail < self.max_slots)
        if wanted > o.current:
            noise = unit * self._band(+1)
            bounded = self._workers(max(self._tail(max(0.0, rate - noise), service_s),
                                        backlog, running), o)
            if bounded < wanted:
                need, wanted = f"{need} (within noise: {bounded})", max(o.current, bounded)
        elif wanted < o.current or settled:
            noise = unit * self._band(-1)
            upper = self._workers(self._tail(rate + noise, service_s), o)
            floor = self._workers(max(held, 0 if settled else running), o)
            bounded = max(upper, floor)
            if bounded < o.current and bounded < self._workers(running, o):
                need, wanted = f"{need} (releasing the busy beyond {bounded})", bounded
            elif bounded > wanted:
                why = "within noise" if upper >= floor else "the queue keeps its slots"
                need, wanted = f"{need} ({why}: {bounded})", min(o.current, bounded)
        if predictor.rate is None and wanted < o.current:
            need, wanted = f"{need} (no arrival rate yet: holding)", o.current
        rising = ("" if self.rising_since is None
                  else f", rising for {o.now - self.rising_since:.0f}s")
        reason = (
            f"predictive: {need} needs {wanted} (arrivals {rate:.3g}/s incl. forecast "
            f"{forecast:+.3g}/s, fast {fast:.3g}/s{rising}, level {level:.3g}/s, service "
            f"{service_s:.3g}s, "
            f"{o.queued} queued, {o.running} running, p{options.wait_quantile * 100:g} "
            f"wait objective {options.wait_objective_s:g}s)"
        )
        decision = self.gate.apply(o.now, o.current, wanted, reason)
        if decision.desired != o.current:
            self.direction = 1 if decision.desired > o.current else -1
        return decision

    def _band(self, direction: int) -> float:
        """Standard errors of dead band for a move in ``direction``: narrow along the
        last change, wide against it (and before the first one)."""
        if self.direction == direction:
            return self.options.follow_band
        return self.options.noise_band

    def _memory_s(self, alpha: float) -> float:
        """The window whose plain mean is as noisy as an EWMA of per-interval figures."""
        return self.interval_s * (2 - alpha) / alpha

    def _tail(self, rate: float, service_s: float) -> int:
        return erlang_c_slots(rate * service_s, service_s, self.options.wait_objective_s,
                              self.options.wait_quantile, self.max_slots)

    @staticmethod
    def _workers(slots: float, o: PoolObservation) -> int:
        return math.ceil(slots / o.slots_per_worker - 1e-9)


def create_predictive_policy(options: PredictiveOptions, pool: PoolConfig) -> PredictivePolicy:
    return PredictivePolicy(options, pool)
