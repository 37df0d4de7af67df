"""Which asyncio event loop the daemons run on: the config's top-level ``event_loop``.

- ``auto`` (the default): uvloop where it is installed (rexcore depends on it everywhere
  but Windows), else the standard library's loop;
- ``uvloop``: uvloop, or a clear error when it is not installed;
- ``asyncio``: the standard library's loop.

uvloop runs the same asyncio code with a loop written in C; on the execution benchmark it
cuts the coordinator's and the workers' CPU per action (BENCHMARKS.md, "Execution
engine"). Everything rex does works on both loops, and the test suite runs on both.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["EVENT_LOOPS", "EventLoopError", "check_event_loop", "chosen_event_loop", "run"]

EVENT_LOOPS = ("auto", "asyncio", "uvloop")
T = TypeVar("T")


class EventLoopError(ValueError):
    """The configured event loop is not one rex knows, or cannot be used here."""


def check_event_loop(setting: str) -> None:
    """Raise :class:`EventLoopError` unless ``setting`` is one of :data:`EVENT_LOOPS`."""
    if setting not in EVENT_LOOPS:
        raise EventLoopError(
            f"event_loop must be one of {', '.join(EVENT_LOOPS)}, got {setting!r}")


def _uvloop_module() -> Any | None:
    if sys.platform == "win32":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop


def chosen_event_loop(setting: str = "auto") -> str:
    """The loop ``setting`` runs on here: ``"uvloop"`` or ``"asyncio"``."""
    check_event_loop(setting)
    if setting == "asyncio":
        return "asyncio"
    if _uvloop_module() is not None:
        return "uvloop"
    if setting == "uvloop":
        raise EventLoopError(
            "event_loop = \"uvloop\" but uvloop is not installed here "
            "(pip install uvloop; it does not exist on Windows)")
    return "asyncio"


def run(coroutine: Coroutine[Any, Any, T], setting: str = "auto") -> T:
    """``asyncio.run(coroutine)`` on the loop ``setting`` chooses."""
    try:
        chosen = chosen_event_loop(setting)
    except EventLoopError:
        coroutine.close()  # never awaited: say so quietly, not with a warning
        raise
    if chosen == "uvloop":
        uvloop = _uvloop_module()
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coroutine)
    return asyncio.run(coroutine)
