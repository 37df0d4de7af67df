"""``[pool]``: how many workers, from which provider, offering what."""

from __future__ import annotations

import os

import attrs

from rexcore.config.component import ComponentRef

__all__ = ["PoolConfig"]


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@attrs.frozen(kw_only=True)
class PoolConfig:
    """The worker pool.

    ``target_workers``: workers to keep (default: this host's CPU count, clamped to
    ``[min_workers, max_workers]``); ``0`` runs a coordinator without local workers (remote
    workers join with ``rexd worker``). ``provider`` starts them (``local``: processes on
    this host). ``slots_per_worker``: actions one worker runs at once. ``sandbox``: the
    sandbox workers use (``auto``: the best available). ``properties``: platform
    properties the workers offer. ``enable_autoscale``, ``enable_predictive`` and the
    thresholds steer autoscaling (the pool issue); until it lands the pool stays at
    ``target_workers``.
    """

    min_workers: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    max_workers: int = attrs.field(default=64, validator=attrs.validators.ge(0))
    target_workers: int | None = None
    scale_up_threshold: float = 0.75
    scale_down_threshold: float = 0.25
    enable_autoscale: bool = False
    enable_predictive: bool = True
    provider: ComponentRef = attrs.field(factory=lambda: ComponentRef("local"))
    slots_per_worker: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    sandbox: str = "auto"
    properties: dict[str, str] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        if self.max_workers < self.min_workers:
            raise ValueError(
                f"max_workers ({self.max_workers}) is below min_workers ({self.min_workers})"
            )

    @property
    def initial_workers(self) -> int:
        wanted = _cpu_count() if self.target_workers is None else self.target_workers
        return max(self.min_workers, min(self.max_workers, wanted))
