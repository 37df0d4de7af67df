"""The result of an action as rex stores it in the action cache and returns it natively.

It mirrors the REAPI ``ActionResult`` closely enough that the ``reapi`` protocol converts
both ways without loss of the fields rex serves.
"""

from __future__ import annotations

from collections.abc import Iterator

import attrs

from rexcore.artifacts.digest import Digest

__all__ = ["ActionResult", "ExecutionMetadata", "OutputDirectory", "OutputFile", "OutputSymlink"]


@attrs.frozen
class OutputFile:
    path: str
    digest: Digest
    is_executable: bool = False


@attrs.frozen
class OutputSymlink:
    path: str
    target: str


@attrs.frozen
class OutputDirectory:
    """A directory output: ``tree_digest`` names a Tree blob; ``file_digests`` lists every
    file blob inside it so the action cache can tell when one of them is gone."""

    path: str
    tree_digest: Digest
    file_digests: tuple[Digest, ...] = ()


@attrs.frozen
class ExecutionMetadata:
    """Who ran the action and where the time went (unix seconds, floats)."""

    worker: str = ""
    queued_at: float | None = None
    worker_start: float | None = None
    worker_end: float | None = None
    input_fetch_start: float | None = None
    input_fetch_end: float | None = None
    execution_start: float | None = None
    execution_end: float | None = None
    output_upload_start: float | None = None
    output_upload_end: float | None = None
    cpu_seconds: float | None = None
    peak_memory_bytes: int | None = None
    #: The sandbox's memory limit was hit and the kernel killed a process of the action
    #: (resource exhaustion, not a bug of the action; only hermetic sandboxes can tell).
    oom_killed: bool = False


@attrs.frozen
class ActionResult:
    exit_code: int = 0
    output_files: tuple[OutputFile, ...] = ()
    output_symlinks: tuple[OutputSymlink, ...] = ()
    output_directories: tuple[OutputDirectory, ...] = ()
    stdout_digest: Digest | None = None
    stderr_digest: Digest | None = None
    execution_metadata: ExecutionMetadata = attrs.field(factory=ExecutionMetadata)

    def blob_digests(self) -> Iterator[Digest]:
        """Every blob this result refers to; all must be present for a cache hit."""
        for digest in (self.stdout_digest, self.stderr_digest):
            if digest is not None:
                yield digest
        for file in self.output_files:
            yield file.digest
        for directory in self.output_directories:
            yield directory.tree_digest
            yield from directory.file_digests
