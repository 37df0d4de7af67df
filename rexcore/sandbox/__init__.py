"""Sandboxes: the contract (:mod:`.interface`), the built-in ``process`` sandbox
(:mod:`.process`) and the choice among installed ones (:mod:`.select`)."""

from rexcore.sandbox.interface import Sandbox, SandboxError, SandboxRequest, SandboxResult

__all__ = ["Sandbox", "SandboxError", "SandboxRequest", "SandboxResult"]
