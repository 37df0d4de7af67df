"""What every sandbox implements: run one command in a prepared exec root, within limits.

The worker stages inputs into ``exec_root`` (read-only files), then calls
:meth:`Sandbox.run`; the sandbox must start the command with exactly ``environment``,
stdin from /dev/null, stdout/stderr into the given files, in ``exec_root /
working_directory``, and must kill the whole process tree on timeout or cancellation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import attrs

from rexcore.serialization.sandbox_spec import SandboxSpec

__all__ = ["Sandbox", "SandboxError", "SandboxRequest", "SandboxResult"]


class SandboxError(Exception):
    """The sandbox could not run the command at all (setup failed): not the action's fault."""


@attrs.frozen
class SandboxRequest:
    exec_root: Path
    arguments: tuple[str, ...]
    environment: tuple[tuple[str, str], ...]
    working_directory: str
    spec: SandboxSpec
    stdout_path: Path
    stderr_path: Path


@attrs.frozen
class SandboxResult:
    """How the command ended. ``exit_code`` follows the shell convention for signals
    (128 + signal number); ``timed_out``/``oom_killed`` say why it was stopped."""

    exit_code: int
    wall_s: float
    timed_out: bool = False
    oom_killed: bool = False
    cpu_s: float | None = None
    peak_memory_bytes: int | None = None
    message: str = ""


@runtime_checkable
class Sandbox(Protocol):
    """Built by a ``rexcore_sandboxes`` descriptor's ``factory(options, context)``."""

    name: str
    hermetic: bool

    async def run(self, request: SandboxRequest) -> SandboxResult: ...

    async def close(self) -> None: ...
