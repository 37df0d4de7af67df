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
    properties the workers offer.

    With ``enable_autoscale`` the pool starts at ``target_workers`` and then, every
    ``evaluation_interval_s``, asks ``policy`` for a size within ``[min_workers,
    max_workers]`` (``enable_predictive = false`` swaps the default ``predictive`` policy
    for ``reactive``). The thresholds steer ``reactive``; the cooldowns both. The
    provisioner retries a failing provider after ``provider_backoff_s``, doubling up to
    ``max_provider_backoff_s``, and always drains a worker before terminating it.
    """

    min_workers: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    max_workers: int = attrs.field(default=64, validator=attrs.validators.ge(0))
    target_workers: int | None = None
    scale_up_threshold: float = 0.75
    scale_down_threshold: float = 0.25
    enable_autoscale: bool = False
    enable_predictive: bool = True
    policy: ComponentRef = attrs.field(factory=lambda: ComponentRef("predictive"))
    evaluation_interval_s: float = attrs.field(default=15.0, validator=attrs.validators.gt(0))
    scale_up_cooldown_s: float = attrs.field(default=30.0, validator=attrs.validators.ge(0))
    scale_down_cooldown_s: float = attrs.field(default=120.0, validator=attrs.validators.ge(0))
    #: Expected seconds from asking the provider for a worker to its joining; the pool
    #: replaces it by what it measures once workers have joined.
    worker_startup_s: float = attrs.field(default=30.0, validator=attrs.validators.ge(0))
    provider_backoff_s: float = attrs.field(default=1.0, validator=attrs.validators.gt(0))
    max_provider_backoff_s: float = attrs.field(default=60.0, validator=attrs.validators.gt(0))
    provider: ComponentRef = attrs.field(factory=lambda: ComponentRef("local"))
    slots_per_worker: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    sandbox: str = "auto"
    properties: dict[str, str] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        if self.max_workers < self.min_workers:
            raise ValueError(
                f"max_workers ({self.max_workers}) is below min_workers ({self.min_workers})"
            )
        if not 0 <= self.scale_down_threshold < self.scale_up_threshold <= 1:
            raise ValueError(
                f"scale_down_threshold ({self.scale_down_threshold}) must be below "
                f"scale_up_threshold ({self.scale_up_threshold}), both within [0, 1]"
            )

    @property
    def policy_name(self) -> str:
        """The policy autoscaling uses: ``enable_predictive = false`` means ``reactive``
        unless ``policy`` names another one explicitly."""
        if self.policy.name == "predictive" and not self.enable_predictive:
            return "reactive"
        return self.policy.name

    @property
    def autoscales(self) -> bool:
        return self.enable_autoscale and self.max_workers > 0

    @property
    def initial_workers(self) -> int:
        wanted = _cpu_count() if self.target_workers is None else self.target_workers
        return max(self.min_workers, min(self.max_workers, wanted))
