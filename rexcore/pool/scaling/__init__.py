"""Scaling policies: an observation of the pool in, a desired size and a reason out.

A policy is built by a ``rexcore_scaling_policies`` descriptor's ``factory(options,
pool_config)`` and asked :meth:`ScalingPolicy.decide` once per evaluation interval. It
keeps whatever history it needs itself; time comes only from ``PoolObservation.now``, so
the simulator can drive it on a simulated clock.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import attrs

__all__ = ["PoolObservation", "ScalingDecision", "ScalingPolicy"]


@attrs.frozen(kw_only=True)
class PoolObservation:
    """The pool and its load at one instant. Counters are cumulative since the
    coordinator started; a policy differences them between observations."""

    now: float
    #: Actions waiting for a worker, and actions running on one.
    queued: int
    running: int
    #: Workers joined and not draining; asked for but not joined yet; draining.
    ready: int
    starting: int
    draining: int = 0
    slots_per_worker: int = 1
    #: Executions queued so far, executions finished on a worker so far, and the seconds
    #: workers spent running the finished ones.
    arrivals: int = 0
    completions: int = 0
    busy_s: float = 0.0
    #: Seconds a worker asked for now takes to join (measured, else configured).
    startup_s: float = 30.0

    @property
    def current(self) -> int:
        """The size a policy moves: ready plus starting workers."""
        return self.ready + self.starting

    @property
    def backlog(self) -> int:
        return self.queued + self.running


@attrs.frozen
class ScalingDecision:
    """``desired`` workers (ready plus starting) and, always, why."""

    desired: int
    reason: str


@runtime_checkable
class ScalingPolicy(Protocol):
    def decide(self, observation: PoolObservation) -> ScalingDecision:
        """The size the pool should have now; the pool clamps it to its bounds."""
        ...
