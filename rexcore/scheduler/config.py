"""``[scheduler]`` in rexd.toml: the coordinator's queue, leases, retries and retention."""

from __future__ import annotations

import attrs

__all__ = ["SchedulerConfig"]

_positive = attrs.validators.gt(0)
_positive_s = attrs.validators.gt(0.0)
_non_negative = attrs.validators.ge(0)
_non_negative_s = attrs.validators.ge(0.0)


@attrs.frozen
class SchedulerConfig:
    """The coordinator (``[scheduler]``): every option has a default.

    Times are seconds. See docs/configuration.md for the prose on each option.
    """

    #: Run the coordinator in this rexd (the execute, operations and worker routes).
    enabled: bool = True
    #: Most actions waiting for a worker; one more is refused with ``resource_exhausted``.
    #: Submissions merged into an identical waiting action do not count.
    max_queued: int = attrs.field(default=10_000, validator=_positive)
    #: Timeout of an action that names none.
    default_timeout_s: float = attrs.field(default=600.0, validator=_positive_s)
    #: The longest any action may run; larger timeouts are lowered to it.
    max_timeout_s: float = attrs.field(default=3600.0, validator=_positive_s)
    #: Times an action is handed to a worker before a lost worker or a transient error
    #: fails it with ``unavailable`` (counting the first run).
    max_attempts: int = attrs.field(default=3, validator=_positive)
    #: A worker that does not synchronize within this long is lost; its actions are
    #: requeued. Also the coordinator's slack past an action's timeout.
    lease_s: float = attrs.field(default=30.0, validator=_positive_s)
    #: After a restart, how long an executing action waits for its worker to synchronize
    #: again before it is requeued.
    restart_grace_s: float = attrs.field(default=30.0, validator=_non_negative_s)
    #: An action whose platform properties no joined worker offers fails with
    #: ``failed_precondition`` once none has for this long (0: it waits for one forever).
    #: While no worker at all is joined nothing fails: the pool may be starting some.
    unmatched_timeout_s: float = attrs.field(default=30.0, validator=_non_negative_s)
    #: Secret every worker must present. Empty: only workers connecting from loopback
    #: (this host) may join.
    join_token: str = attrs.field(default="", repr=False)
    #: The longest the coordinator holds a synchronize call or an operation wait open.
    max_long_poll_s: float = attrs.field(default=30.0, validator=_non_negative_s)
    #: How long completed operations can still be looked up (waited on) by name.
    completed_retention_s: float = attrs.field(default=86_400.0, validator=_non_negative_s)
    #: The most completed operations kept; the oldest beyond it are forgotten first.
    max_completed: int = attrs.field(default=100_000, validator=_non_negative)
