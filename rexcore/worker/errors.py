"""The worker's one error family: what went wrong running an assignment, and whose fault
it was (``permanent``: the action broke the rules, retrying cannot help)."""

from __future__ import annotations

__all__ = ["InputError", "OutputError", "WorkerError"]


class WorkerError(Exception):
    """An assignment could not be run or finished. ``permanent`` says the action is at
    fault (invalid tree, forbidden output) and must fail without a retry; otherwise the
    worker or its infrastructure is (an input could not be fetched), and the coordinator
    may run it again elsewhere."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class InputError(WorkerError):
    """The input tree could not be staged."""


class OutputError(WorkerError):
    """The outputs could not be collected."""
