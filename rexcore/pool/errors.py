"""The pool's one error family."""

from __future__ import annotations

__all__ = ["PoolError"]


class PoolError(Exception):
    """The pool could not be built or moved: a policy, the provider, or its config."""
