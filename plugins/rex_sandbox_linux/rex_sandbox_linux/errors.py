"""The errors of the ``linux`` sandbox: one family, under the core's SandboxError."""

from __future__ import annotations

from rexcore.sandbox.interface import SandboxError

__all__ = ["CgroupError", "LinuxSandboxError"]


class LinuxSandboxError(SandboxError):
    """The linux sandbox could not set up or clean up an action (not the action's fault)."""


class CgroupError(LinuxSandboxError):
    """A cgroup could not be found, created, limited or emptied."""
