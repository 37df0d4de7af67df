"""The worker agent: synchronize with the coordinator, stage inputs, run actions in a
sandbox, collect outputs (``rexd worker``)."""

from rexcore.worker.errors import InputError, OutputError, WorkerError

__all__ = ["InputError", "OutputError", "WorkerError"]
