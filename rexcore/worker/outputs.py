"""Output collection: what an action left at its declared output paths, into blobs.

For each of ``command.output_paths`` (relative to the working directory), whatever is
there decides the kind of output, and nothing is ever followed:

- a regular file is an :class:`OutputFile`: hashed once, then published into the local
  store by hardlink (it is made read-only and, when the action ran as another user,
  handed to the worker's user first), so its bytes are read exactly once;
- a directory is an :class:`OutputDirectory`: walked without following symlinks, each
  Directory stored as a blob, plus a ``Tree`` blob of the whole;
- a symlink is an :class:`OutputSymlink` whose target is read with ``readlink``: a link
  to ``/etc/shadow`` is reported as exactly that, never read;
- a FIFO, socket or device file is an action fault naming the path;
- nothing at all: the output is simply absent (as REAPI says).

An output path, and the working directory above it, must not pass through a symlink. A
path with ``..`` or a leading ``/`` is refused (``Command.validate`` refuses those too;
this checks again, resolving nothing). stdout and stderr become blobs the same way.
Unless the store is shared with the coordinator, ``upload`` then sends the coordinator
the blobs it lacks.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import attrs

from rexcore.artifacts.digest import Digest, DigestFunction
from rexcore.artifacts.disk import DiskBlobStore
from rexcore.serialization.action import (
    Command,
    Directory,
    DirectoryNode,
    FileNode,
    InvalidActionError,
    SymlinkNode,
    Tree,
    canonical_bytes,
    check_relative_path,
)
from rexcore.serialization.action_result import OutputDirectory, OutputFile, OutputSymlink
from rexcore.worker.errors import OutputError

__all__ = ["CollectedOutputs", "Upload", "collect_outputs", "copy_into"]

#: ``upload(digests)`` makes sure the coordinator holds these blobs of the local store.
Upload = Callable[[Sequence[Digest]], Awaitable[None]]

_CHUNK = 1 << 20
# Outputs collected on the event loop: up to this many output paths, of files (not
# directories) holding up to this many bytes with stdout and stderr.
_INLINE_OUTPUTS = 8
_INLINE_BYTES = 256 << 10


@attrs.frozen
class CollectedOutputs:
    output_files: tuple[OutputFile, ...] = ()
    output_symlinks: tuple[OutputSymlink, ...] = ()
    output_directories: tuple[OutputDirectory, ...] = ()
    stdout_digest: Digest | None = None
    stderr_digest: Digest | None = None
    #: Every blob the outputs consist of (all in the local store, and uploaded).
    digests: tuple[Digest, ...] = ()


@attrs.frozen
class _HashedFile:
    path: str
    digest: Digest
    executable: bool
    #: Only this name refers to the inode, and it is ours now: it may be linked into the
    #: store as it is. Otherwise its bytes are copied.
    exclusive: bool


def _hash_file(path: str, function: DigestFunction) -> _HashedFile:
    """Open without following, make the file the worker's and read-only when it is the
    only name of its inode, then hash it: no writer of the action's user can change it
    in between (its processes are gone; its user lost write permission)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
                     | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OutputError(f"output {path} turned into a symlink while it was collected",
                              permanent=True) from exc
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OutputError(f"output {path} changed its type while it was collected",
                              permanent=True)
        executable = bool(info.st_mode & stat.S_IXUSR)
        euid = os.geteuid() if hasattr(os, "geteuid") else None
        exclusive = info.st_nlink == 1 and (euid is None or euid in (0, info.st_uid))
        if exclusive and hasattr(os, "fchmod"):
            if euid == 0 and info.st_uid != 0:
                os.fchown(fd, 0, os.getegid())
            os.fchmod(fd, 0o444)
        hasher = function.hasher(expected_size=info.st_size)
        size = 0
        while chunk := os.read(fd, _CHUNK):
            hasher.update(chunk)
            size += len(chunk)
        return _HashedFile(path, Digest(function, hasher.hexdigest(), size), executable,
                           exclusive)
    finally:
        os.close(fd)


async def _publish(store: DiskBlobStore, hashed: _HashedFile) -> None:
    """Get a hashed file into the store: hardlinked when it is exclusively ours and on the
    store's file system, else copied through a verifying write."""
    if await store.contains(hashed.digest):
        return
    if hashed.exclusive:
        try:
            await store.link_file(hashed.digest, Path(hashed.path))
            return
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EMLINK, errno.EPERM):
                raise
    await copy_into(store, hashed.digest, Path(hashed.path))


async def copy_into(store: DiskBlobStore, digest: Digest, path: Path) -> None:
    """Copy a file into the store through a verifying write (reads it again)."""
    file = await asyncio.to_thread(open, path, "rb")
    try:
        async with store.open_write(digest) as writer:
            while chunk := await asyncio.to_thread(file.read, 4 * _CHUNK):
                await writer.write(chunk)
    finally:
        file.close()


# -- walking what the action left ------------------------------------------------------


@attrs.define
class _Walk:
    """What a scan of the outputs found (built in a thread, published on the loop)."""

    function: DigestFunction
    files: list[_HashedFile] = attrs.field(factory=list)
    blobs: dict[Digest, bytes] = attrs.field(factory=dict)
    output_files: list[OutputFile] = attrs.field(factory=list)
    output_symlinks: list[OutputSymlink] = attrs.field(factory=list)
    output_directories: list[OutputDirectory] = attrs.field(factory=list)

    def blob(self, message: object) -> Digest:
        data = canonical_bytes(message)
        digest = Digest(self.function, _hash_bytes(data, self.function), len(data))
        self.blobs[digest] = data
        return digest


def _hash_bytes(data: bytes, function: DigestFunction) -> str:
    hasher = function.hasher(expected_size=len(data))
    hasher.update(data)
    return hasher.hexdigest()


def _kind_error(path: str, mode: int) -> OutputError:
    kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device file" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "not a file, directory or symlink")
    return OutputError(f"output {path} is {kind}; an action may only leave regular files, "
                       "directories and symlinks at its output paths", permanent=True)


def _check_name(name: str, where: str) -> str:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise OutputError(f"output {where}/{name!r} has a name that is not valid UTF-8; "
                          "rename it", permanent=True) from None
    return name


def _walk_directory(path: str, shown: str, walk: _Walk, children: dict[Digest, Directory],
                    file_digests: dict[Digest, None]) -> Directory:
    files, directories, symlinks = [], [], []
    with os.scandir(path) as entries:
        listed = sorted(entries, key=lambda e: e.name)
    for entry in listed:
        name = _check_name(entry.name, shown)
        info = entry.stat(follow_symlinks=False)
        where = f"{shown}/{name}"
        if stat.S_ISLNK(info.st_mode):
            symlinks.append(SymlinkNode(name, os.readlink(entry.path)))
        elif stat.S_ISDIR(info.st_mode):
            child = _walk_directory(entry.path, where, walk, children, file_digests)
            digest = walk.blob(child)
            children.setdefault(digest, child)
            directories.append(DirectoryNode(name, digest))
        elif stat.S_ISREG(info.st_mode):
            hashed = _hash_file(entry.path, walk.function)
            walk.files.append(hashed)
            file_digests[hashed.digest] = None
            files.append(FileNode(name, hashed.digest, hashed.executable))
        else:
            raise _kind_error(where, info.st_mode)
    return Directory(files=tuple(files), directories=tuple(directories),
                     symlinks=tuple(symlinks))


def _parent_is_real(base: str, parts: list[str], shown: str) -> bool:
    """Whether every component of ``parts`` below ``base`` is a real directory (False:
    one is missing, so the output is absent). A symlink among them is an action fault."""
    current = base
    for part in parts:
        current = os.path.join(current, part)
        try:
            info = os.lstat(current)
        except FileNotFoundError:
            return False
        if stat.S_ISLNK(info.st_mode):
            raise OutputError(
                f"output {shown} lies under the symlink {os.path.relpath(current, base)}; "
                "rex never follows symlinks while collecting outputs: make it a directory",
                permanent=True)
        if not stat.S_ISDIR(info.st_mode):
            return False
    return True


def _scan(exec_root: Path, command: Command, function: DigestFunction,
          extra_files: list[Path]) -> _Walk:
    walk = _Walk(function)
    root = str(exec_root)
    workdir_parts = command.working_directory.split("/") if command.working_directory else []
    for output in dict.fromkeys(command.output_paths):
        parts = output.split("/")
        if not _parent_is_real(root, workdir_parts + parts[:-1], output):
            continue
        path = os.path.join(root, *workdir_parts, *parts)
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat.S_ISREG(info.st_mode):
            hashed = _hash_file(path, function)
            walk.files.append(hashed)
            walk.output_files.append(OutputFile(output, hashed.digest, hashed.executable))
        elif stat.S_ISLNK(info.st_mode):
            walk.output_symlinks.append(OutputSymlink(output, os.readlink(path)))
        elif stat.S_ISDIR(info.st_mode):
            children: dict[Digest, Directory] = {}
            file_digests: dict[Digest, None] = {}
            top = _walk_directory(path, output, walk, children, file_digests)
            walk.blob(top)
            tree = walk.blob(Tree(root=top, children=tuple(children.values())))
            walk.output_directories.append(OutputDirectory(output, tree, tuple(file_digests)))
        else:
            raise _kind_error(output, info.st_mode)
    for extra in extra_files:
        walk.files.append(_hash_file(str(extra), function))
    return walk


def _few_and_small(exec_root: Path, command: Command, streams: list[Path]) -> bool:
    """Whether the outputs are at most a few files, small in all (a look with ``lstat``):
    then collecting them right on the event loop costs less than a hop to a thread,
    which then waits for the GIL back."""
    if len(command.output_paths) > _INLINE_OUTPUTS:
        return False
    base = os.path.join(str(exec_root), command.working_directory)
    total = 0
    paths: list[str | Path] = [*streams]
    paths += [os.path.join(base, output) for output in command.output_paths]
    for path in paths:
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            continue
        except OSError:
            return False
        if stat.S_ISDIR(info.st_mode):
            return False
        total += info.st_size
    return total <= _INLINE_BYTES


def _all_empty(streams: list[Path]) -> bool:
    """Whether every stream file is a regular file of zero bytes (one ``lstat`` each: the
    action's processes are gone, so none can write to it any more)."""
    for path in streams:
        try:
            info = os.lstat(path)
        except OSError:
            return False
        if not stat.S_ISREG(info.st_mode) or info.st_size:
            return False
    return True


async def collect_outputs(
    exec_root: Path,
    command: Command,
    store: DiskBlobStore,
    upload: Upload | None,
    *,
    function: DigestFunction = DigestFunction.BLAKE3,
    stdout_path: Path | None = None,
    stderr_path: Path | None = None,
) -> CollectedOutputs:
    """Collect the outputs of a finished action into ``store`` (and, with ``upload``,
    to the coordinator). Raises :class:`OutputError`, permanent when the action is at
    fault. ``function`` should be the one of the action's digest."""
    for output in command.output_paths:
        try:
            check_relative_path(output, "output path")
        except InvalidActionError as exc:
            raise OutputError(str(exc), permanent=True) from exc
    if command.working_directory:
        try:
            check_relative_path(command.working_directory, "working directory")
        except InvalidActionError as exc:
            raise OutputError(str(exc), permanent=True) from exc
    streams = [p for p in (stdout_path, stderr_path) if p is not None]
    if not command.output_paths and _all_empty(streams):
        # The usual trivial action: nothing to read, hash or store.
        return CollectedOutputs(
            stdout_digest=function.empty if stdout_path else None,
            stderr_digest=function.empty if stderr_path else None,
            digests=(function.empty,) if streams else ())
    try:
        if _few_and_small(exec_root, command, streams):
            walk = _scan(exec_root, command, function, streams)  # cheaper than a thread hop
        else:
            walk = await asyncio.to_thread(_scan, exec_root, command, function, streams)
    except OutputError:
        raise
    except OSError as exc:
        raise OutputError(f"cannot collect the outputs in {exec_root}: {exc}") from exc
    digests = list(dict.fromkeys([*(f.digest for f in walk.files), *walk.blobs]))
    with store.pin(digests):
        try:
            for hashed in walk.files:
                await _publish(store, hashed)
            for digest, data in walk.blobs.items():
                if not await store.contains(digest):
                    await store.put(digest, data)
        except OSError as exc:
            raise OutputError(f"cannot store the outputs of {exec_root}: {exc}") from exc
        if upload is not None:
            await upload(digests)
    stream_digests = {Path(f.path): f.digest for f in walk.files[len(walk.files) - len(streams):]}
    return CollectedOutputs(
        output_files=tuple(walk.output_files),
        output_symlinks=tuple(walk.output_symlinks),
        output_directories=tuple(walk.output_directories),
        stdout_digest=stream_digests.get(stdout_path) if stdout_path else None,
        stderr_digest=stream_digests.get(stderr_path) if stderr_path else None,
        digests=tuple(digests),
    )

