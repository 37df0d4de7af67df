"""Running one command remotely from a local directory: what ``rex run`` and
``RemoteService.execute`` do.

Inputs (files and directories under ``workdir``) become a Directory tree in the CAS, and
only blobs the server lacks are uploaded; the Command and Action go up as canonical JSON;
the action is executed (or answered from the action cache) and its outputs, stdout and
stderr come back into ``workdir``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path

import attrs

from rexcore.artifacts.digest import Digest, DigestFunction, digest_of
from rexcore.protocol.client import INLINE_BLOB_LIMIT, RexClient, RexClientError
from rexcore.serialization.action import (
    Action,
    Command,
    Directory,
    DirectoryNode,
    FileNode,
    SymlinkNode,
    Tree,
    canonical_bytes,
    check_relative_path,
    sorted_pairs,
)
from rexcore.serialization.action_result import ActionResult
from rexcore.serialization.codec import decode
from rexcore.serialization.operation import OperationView
from rexcore.serialization.sandbox_spec import SandboxSpec

__all__ = ["ExecutionResult", "RemoteActionError", "execute_remotely", "platform_for"]

_UPLOAD_CONCURRENCY = 8
# Seconds each request waiting for the result may take (the server may answer sooner).
_WAIT_S = 60.0


class RemoteActionError(RexClientError):
    """The action could not be run remotely (it did not get to an exit code)."""


@attrs.frozen
class ExecutionResult:
    """What one remote execution gave back."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    cached: bool
    action_digest: Digest
    operation: str
    result: ActionResult
    #: ``ok``, or why the operation failed (``deadline_exceeded``, ``unavailable``, ...).
    status: str = "ok"
    message: str = ""

    @property
    def succeeded(self) -> bool:
        return self.status == "ok" and self.exit_code == 0


def platform_for(spec: SandboxSpec, properties: Mapping[str, str] | None = None
                 ) -> tuple[tuple[str, str], ...]:
    """Platform properties carrying the spec's limits next to the caller's properties."""
    merged = dict(properties or {})
    if spec.memory_bytes is not None:
        merged["memory"] = str(spec.memory_bytes)
    if spec.cpus is not None:
        merged["cpus"] = f"{spec.cpus:g}"
    if spec.pids is not None:
        merged["pids"] = str(spec.pids)
    if spec.network:
        merged["network"] = "on"
    return sorted_pairs(merged)


class _TreeBuilder:
    """Hashes input files once, builds Directory blobs bottom-up, remembers every blob."""

    def __init__(self, workdir: Path, function: DigestFunction) -> None:
        self.workdir = workdir
        self.function = function
        self.files: dict[Digest, Path] = {}
        self.blobs: dict[Digest, bytes] = {}

    def add_blob(self, data: bytes) -> Digest:
        digest = digest_of(data, self.function)
        self.blobs[digest] = data
        return digest

    def build(self, inputs: Sequence[str]) -> Digest:
        nested: dict[str, object] = {}
        for path in inputs:
            check_relative_path(path, "input")
            source = self.workdir / path
            if not os.path.lexists(source):
                raise RemoteActionError(f"input {path!r} does not exist under {self.workdir}")
            node = nested
            parts = path.split("/")
            for part in parts[:-1]:
                child = node.setdefault(part, {})
                if not isinstance(child, dict):
                    raise RemoteActionError(f"input {path!r} lies inside the file input {part!r}")
                node = child
            node[parts[-1]] = source
        return self._directory(nested)

    def _directory(self, entries: Mapping[str, object]) -> Digest:
        files, directories, symlinks = [], [], []
        for name, value in sorted(entries.items()):
            if isinstance(value, dict):
                directories.append(DirectoryNode(name, self._directory(value)))
                continue
            assert isinstance(value, Path)
            info = os.lstat(value)
            if stat.S_ISLNK(info.st_mode):
                symlinks.append(SymlinkNode(name, os.readlink(value)))
            elif stat.S_ISDIR(info.st_mode):
                directories.append(DirectoryNode(name, self._walk(value)))
            elif stat.S_ISREG(info.st_mode):
                files.append(self._file(name, value, info))
            else:
                raise RemoteActionError(f"input {value} is neither a file, a directory nor a symlink")
        directory = Directory(tuple(files), tuple(directories), tuple(symlinks))
        return self.add_blob(canonical_bytes(directory))

    def _walk(self, path: Path) -> Digest:
        return self._directory({entry.name: Path(entry.path) for entry in os.scandir(path)})

    def _file(self, name: str, path: Path, info: os.stat_result) -> FileNode:
        hasher = self.function.hasher(expected_size=info.st_size)
        size = 0
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                hasher.update(chunk)
                size += len(chunk)
        digest = Digest(self.function, hasher.hexdigest(), size)
        self.files[digest] = path
        return FileNode(name, digest, bool(info.st_mode & 0o111))


async def _upload_missing(client: RexClient, builder: _TreeBuilder) -> dict[Digest, bytes]:
    """Upload the files and blobs the server lacks, except small blobs (Action, Command,
    Directories): those are returned, to go along with the execute request. Without input
    files nothing is asked first: the server stores only the inline blobs it lacks."""
    if not builder.files and sum(map(len, builder.blobs.values())) <= INLINE_BLOB_LIMIT:
        return dict(builder.blobs)
    missing = await client.find_missing([*builder.files, *builder.blobs])
    inline: dict[Digest, bytes] = {}
    budget = INLINE_BLOB_LIMIT
    uploads: list[Digest] = []
    for digest in missing:
        if digest in builder.blobs and digest.size <= budget:
            inline[digest] = builder.blobs[digest]
            budget -= digest.size
        else:
            uploads.append(digest)
    limit = asyncio.Semaphore(_UPLOAD_CONCURRENCY)

    async def upload(digest: Digest) -> None:
        async with limit:
            if digest in builder.blobs:
                await client.put_blob(digest, builder.blobs[digest])
            else:
                uploaded = await client.upload_file(builder.files[digest], digest.function)
                if uploaded != digest:
                    raise RemoteActionError(
                        f"input {builder.files[digest]} changed while it was being uploaded"
                    )

    await asyncio.gather(*(upload(d) for d in uploads))
    return inline


async def _get_stream(client: RexClient, digest: Digest | None) -> bytes:
    """stdout or stderr; an empty one costs no request."""
    if digest is None or digest.is_empty:
        return b""
    return await client.get_blob(digest)


async def _materialize_tree(client: RexClient, tree_digest: Digest, target: Path) -> None:
    tree = decode(await client.get_blob(tree_digest), Tree)
    children = {digest_of(canonical_bytes(d), tree_digest.function): d for d in tree.children}

    async def write(directory: Directory, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        for file in directory.files:
            await client.download_file(file.digest, path / file.name)
            if file.is_executable:
                os.chmod(path / file.name, 0o755)
        for link in directory.symlinks:
            os.symlink(link.target, path / link.name)
        for node in directory.directories:
            if node.digest not in children:
                raise RemoteActionError(f"output tree {tree_digest} lacks directory {node.digest}")
            await write(children[node.digest], path / node.name)

    await write(tree.root, target)


def _clear(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


async def _fetch_outputs(client: RexClient, result: ActionResult, workdir: Path) -> None:
    for file in result.output_files:
        target = workdir / check_relative_path(file.path, "output")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or not target.is_file():
            _clear(target)  # an older regular file stays: a chunked download reuses its chunks
        await client.download_file(file.digest, target)
        if file.is_executable:
            os.chmod(target, 0o755)
    for link in result.output_symlinks:
        target = workdir / check_relative_path(link.path, "output")
        target.parent.mkdir(parents=True, exist_ok=True)
        _clear(target)
        os.symlink(link.target, target)
    for directory in result.output_directories:
        target = workdir / check_relative_path(directory.path, "output")
        _clear(target)
        await _materialize_tree(client, directory.tree_digest, target)


async def execute_remotely(
    client: RexClient,
    argv: Sequence[str],
    *,
    workdir: Path,
    spec: SandboxSpec,
    environment: Mapping[str, str] | None = None,
    properties: Mapping[str, str] | None = None,
    function: DigestFunction = DigestFunction.BLAKE3,
    skip_cache_lookup: bool = False,
    do_not_cache: bool = False,
    priority: int = 0,
    fetch_outputs: bool = True,
) -> ExecutionResult:
    """Upload what is missing, execute ``argv`` remotely, bring outputs back into
    ``workdir``. The exit code is the action's; failures to run raise or set ``status``."""
    workdir = Path(workdir)
    if spec.inputs or (fetch_outputs and spec.outputs):  # else no file is read or written
        workdir = workdir.resolve()
    builder = _TreeBuilder(workdir, function)
    if spec.inputs:
        input_root = await asyncio.to_thread(builder.build, spec.inputs)
    else:
        input_root = builder.build(())  # the empty tree: no file to look at
    command = Command(
        arguments=tuple(argv),
        environment=sorted_pairs(environment or {}),
        output_paths=tuple(sorted(set(spec.outputs))),
    )
    command.validate()
    command_digest = builder.add_blob(canonical_bytes(command))
    action = Action(
        command_digest=command_digest, input_root_digest=input_root,
        timeout_s=spec.timeout_s, do_not_cache=do_not_cache,
        platform=platform_for(spec, properties),
    )
    action_digest = builder.add_blob(canonical_bytes(action))
    inline = await _upload_missing(client, builder)
    # One request submits, carries the small blobs and waits for the result.
    operation: OperationView = await client.execute(
        action_digest, priority=priority, skip_cache_lookup=skip_cache_lookup,
        wait_s=_WAIT_S, blobs=inline,
    )
    while not operation.done:
        operation = await client.wait_operation(operation.name, wait_s=_WAIT_S)
    result = operation.result
    if result is None:
        return ExecutionResult(
            exit_code=-1, stdout=b"", stderr=b"", cached=operation.cached,
            action_digest=action_digest, operation=operation.name, result=ActionResult(),
            status=operation.status, message=operation.message,
        )
    stdout = await _get_stream(client, result.stdout_digest)
    stderr = await _get_stream(client, result.stderr_digest)
    if fetch_outputs:
        await _fetch_outputs(client, result, workdir)
    return ExecutionResult(
        exit_code=result.exit_code, stdout=stdout, stderr=stderr, cached=operation.cached,
        action_digest=action_digest, operation=operation.name, result=result,
        status=operation.status, message=operation.message,
    )
