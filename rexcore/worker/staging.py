"""Input staging: an action's input tree materialized as its exec root.

Directories are created, files are **hardlinked** from the worker's local blob store (no
copy, no re-hashing), symlinks are created as symlinks (a target is data: nothing is
followed while staging). Blob files are read-only (0444), so the action cannot write to
the cached bytes it shares an inode with; with the ``process`` sandbox run by root the
action also runs as another user and so cannot chmod them either (see
:mod:`rexcore.sandbox.process`).

Executable inputs need mode 0555, and a hardlink shares its inode's mode, so they are
never linked from the blob store itself: they come from a second, worker-local store of
executable variants (a :class:`~rexcore.artifacts.disk.DiskBlobStore` whose files are
0555), each made by copying the blob once and then hardlinked like any other input.
Where hardlinks are impossible (another file system, too many links, a kernel that
forbids linking another user's file) inputs are copied, read-only.

Blobs the local store lacks are fetched from the coordinator in parallel (bounded).
Parsed and validated Directory objects are cached by digest (LRU), so a tree seen before
costs no parsing. Every staged blob stays pinned in the local store until the action is
done with it (:meth:`StagedInputs.release`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import secrets
import shutil
import stat
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import attrs

from rexcore.artifacts.digest import Digest
from rexcore.artifacts.disk import DiskBlobStore
from rexcore.artifacts.store import BlobNotFoundError
from rexcore.serialization.action import Directory, InvalidActionError
from rexcore.serialization.codec import WireFormatError, decode
from rexcore.worker.errors import InputError

__all__ = ["DirectoryCache", "Fetch", "InputStager", "StagedInputs", "stage_inputs"]

log = logging.getLogger(__name__)

#: ``fetch(digests)`` puts those blobs into the local store (from the coordinator);
#: raises :class:`InputError` with ``permanent=True`` for a blob nobody has.
Fetch = Callable[[Sequence[Digest]], Awaitable[None]]

# More entries than this in one input tree is an action fault (and a defence against a
# small tree of repeated subdirectories that expands to billions of paths).
_MAX_ENTRIES = 2_000_000
# Errors of os.link that mean "copy instead": another file system, too many links to one
# inode, or fs.protected_hardlinks refusing a file this user does not own.
_CANNOT_LINK = {errno.EXDEV, errno.EMLINK, errno.EPERM, errno.EACCES}
# Trees up to this many entries and bytes (bytes matter only if links fail and files are
# copied) are staged on the event loop; bigger ones in a thread.
_INLINE_ENTRIES = 32
_INLINE_BYTES = 1 << 20


class DirectoryCache:
    """Parsed, validated Directory objects by digest, least recently used evicted."""

    def __init__(self, max_entries: int = 20_000) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[Digest, Directory] = OrderedDict()

    def get(self, digest: Digest) -> Directory | None:
        directory = self._entries.get(digest)
        if directory is not None:
            self._entries.move_to_end(digest)
        return directory

    def put(self, digest: Digest, directory: Directory) -> None:
        self._entries[digest] = directory
        self._entries.move_to_end(digest)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


@attrs.define
class StagedInputs:
    """A staged exec root; its blobs stay pinned until :meth:`release`."""

    exec_root: Path
    files: int
    directories: int
    symlinks: int
    bytes: int
    #: Distinct blobs of the input files.
    digests: list[Digest]
    _pins: contextlib.ExitStack = attrs.field(repr=False)

    def release(self) -> None:
        self._pins.close()


@attrs.frozen
class _Plan:
    directories: list[str]
    #: ``(path, digest, is_executable)``
    files: list[tuple[str, Digest, bool]]
    symlinks: list[tuple[str, str]]


_NOTHING = _Plan([], [], [])


class _Vanished(Exception):
    """A blob file disappeared between lookup and link (the store's owner evicted it)."""

    def __init__(self, position: int, digest: Digest) -> None:
        super().__init__(str(digest))
        self.position = position
        self.digest = digest


class InputStager:
    """Stages input trees from ``store`` (a local disk store), fetching what it lacks.

    ``executables`` is the worker-local store of executable variants (files of mode
    0555); without one, each executable input is copied into the exec root.
    """

    def __init__(
        self,
        store: DiskBlobStore,
        fetch: Fetch,
        *,
        executables: DiskBlobStore | None = None,
        directories: DirectoryCache | None = None,
    ) -> None:
        self.store = store
        self.executables = executables
        self.directories = directories or DirectoryCache()
        self._fetch = fetch
        self._warned_copy = False

    async def stage(self, input_root: Digest, exec_root: Path,
                    also_create: Sequence[str] = ()) -> StagedInputs:
        """Materialize ``input_root`` as ``exec_root`` (which must not exist yet); then
        create the directories ``also_create`` (relative paths: the working directory,
        the parents of outputs) where the tree has none, never through a symlink."""
        root = self.directories.get(input_root)
        if root is not None and not (root.files or root.directories or root.symlinks):
            # No inputs (a parsed root seen before): a mkdir, nothing to pin or link.
            try:
                _materialize(exec_root, _NOTHING, {}, False, 0, also_create)
            except OSError as exc:
                raise InputError(f"cannot stage inputs into {exec_root}: {exc}") from exc
            return StagedInputs(exec_root=exec_root, files=0, directories=0, symlinks=0,
                                bytes=0, digests=[], pins=contextlib.ExitStack())
        pins = contextlib.ExitStack()
        try:
            plan = await self._plan(input_root, pins)
            digests = list(dict.fromkeys(digest for _, digest, _ in plan.files))
            pins.enter_context(self.store.pin(digests))
            await self._ensure_local(digests)
            executable = list(dict.fromkeys(d for _, d, is_exe in plan.files if is_exe))
            if executable and self.executables is not None:
                pins.enter_context(self.executables.pin(executable))
                await self._ensure_executables(executable)
            await self._materialize(exec_root, plan, also_create)
        except BaseException:
            pins.close()
            raise
        return StagedInputs(
            exec_root=exec_root, files=len(plan.files), directories=len(plan.directories),
            symlinks=len(plan.symlinks), bytes=sum(d.size for _, d, _ in plan.files),
            digests=digests, pins=pins,
        )

    # -- the tree ------------------------------------------------------------------------

    async def _plan(self, input_root: Digest, pins: contextlib.ExitStack) -> _Plan:
        """Walk the tree level by level, fetching and parsing the Directories not cached."""
        plan = _Plan([], [], [])
        level: list[tuple[str, Digest]] = [("", input_root)]
        entries = 0
        while level:
            await self._load_directories([digest for _, digest in level], pins)
            next_level: list[tuple[str, Digest]] = []
            for path, digest in level:
                directory = self.directories.get(digest)
                assert directory is not None
                prefix = f"{path}/" if path else ""
                for node in directory.files:
                    plan.files.append((prefix + node.name, node.digest, node.is_executable))
                for link in directory.symlinks:
                    plan.symlinks.append((prefix + link.name, link.target))
                for child in directory.directories:
                    plan.directories.append(prefix + child.name)
                    next_level.append((prefix + child.name, child.digest))
                entries += len(directory.files) + len(directory.symlinks) + len(
                    directory.directories)
                if entries > _MAX_ENTRIES:
                    raise InputError(
                        f"input tree {input_root} has more than {_MAX_ENTRIES} entries; "
                        "split the action or trim its inputs", permanent=True)
            level = next_level
        return plan

    async def _load_directories(self, digests: list[Digest], pins: contextlib.ExitStack) -> None:
        wanted = [d for d in dict.fromkeys(digests) if self.directories.get(d) is None]
        if not wanted:
            return
        pins.enter_context(self.store.pin(wanted))
        await self._ensure_local(wanted)
        for digest in wanted:
            try:
                data = await self.store.get(digest)
            except BlobNotFoundError as exc:
                raise InputError(
                    f"directory blob {digest} vanished from the local store while staging; "
                    "it will be fetched again on a retry") from exc
            try:
                directory = decode(data, Directory)
                directory.validate(where=f"input directory {digest}")
            except (WireFormatError, InvalidActionError) as exc:
                raise InputError(f"invalid input tree: {exc}", permanent=True) from exc
            self.directories.put(digest, directory)

    # -- blobs ---------------------------------------------------------------------------

    async def _ensure_local(self, digests: Sequence[Digest]) -> None:
        missing = await self.store.find_missing(digests)
        if missing:
            await self._fetch(missing)

    async def _ensure_executables(self, digests: list[Digest]) -> None:
        """Make the 0555 variant of each executable blob, copying it once."""
        assert self.executables is not None
        for digest in await self.executables.find_missing(digests):
            source = self.store.local_path(digest)
            if source is None:
                await self._ensure_local([digest])
                source = self.store.local_path(digest)
            if source is None:
                raise InputError(f"input blob {digest} is not in the local store after "
                                 "fetching it; check the worker's disk")
            incoming = self.executables.root / "incoming"
            temp = incoming / f"{digest.hash}.{secrets.token_hex(4)}"
            try:
                await asyncio.to_thread(_copy, source, temp)
                await self.executables.link_file(digest, temp)
            except FileNotFoundError as exc:
                if exc.filename == str(source):
                    self.store.refresh(digest)
                raise InputError(f"cannot make the executable copy of {digest}: {exc}") \
                    from exc
            finally:
                with contextlib.suppress(OSError):
                    temp.unlink()

    def _source(self, digest: Digest, executable: bool) -> str:
        store = self.executables if executable and self.executables is not None else self.store
        path = store.local_path(digest)
        if path is None:
            raise InputError(f"input blob {digest} vanished from the local store while it "
                             "was staged; a retry fetches it again")
        return str(path)

    async def _materialize(self, exec_root: Path, plan: _Plan, also_create: Sequence[str]) -> None:
        sources: dict[tuple[Digest, bool], str] = {}
        for _, digest, executable in plan.files:
            key = (digest, executable and self.executables is not None)
            if key not in sources:
                sources[key] = self._source(digest, key[1])
        # A thread hop costs the event loop more than a few mkdir and link calls (it
        # waits for the GIL back): small trees are made right here, big ones in a thread.
        small = (len(plan.files) + len(plan.directories) + len(plan.symlinks) <= _INLINE_ENTRIES
                 and sum(digest.size for _, digest, _ in plan.files) <= _INLINE_BYTES)
        start = 0
        for attempt in range(3):
            try:
                args = (exec_root, plan, sources, self.executables is not None, start,
                        also_create)
                copied = _materialize(*args) if small else await asyncio.to_thread(
                    _materialize, *args)
            except _Vanished as vanished:
                if attempt == 2:
                    raise InputError(
                        f"input blob {vanished.digest} keeps vanishing from the local store "
                        "while it is staged; is the store's cap far too small?") from None
                # Evicted behind our back (a shared store's owner evicts on its own): drop
                # the stale entry, fetch it again, carry on where linking stopped.
                for store in (self.store, self.executables):
                    if store is not None:
                        store.refresh(vanished.digest)
                await self._ensure_local([vanished.digest])
                if self.executables is not None and plan.files[vanished.position][2]:
                    await self._ensure_executables([vanished.digest])
                for key in [k for k in sources if k[0] == vanished.digest]:
                    sources[key] = self._source(vanished.digest, key[1])
                start = vanished.position
                continue
            except OSError as exc:
                raise InputError(f"cannot stage inputs into {exec_root}: {exc}") from exc
            if copied and not self._warned_copy:
                self._warned_copy = True
                log.warning("inputs are copied into exec roots instead of hardlinked (%s); "
                            "put the worker's data dir on the blob store's file system",
                            copied)
            return


def _copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)


def _materialize(
    root: Path,
    plan: _Plan,
    sources: dict[tuple[Digest, bool], str],
    have_executables: bool,
    start: int,
    also_create: Sequence[str] = (),
) -> str:
    """Create the tree under ``root`` (files from ``start`` on, the rest before that was
    done by an earlier call). Returns why files were copied, if any were."""
    base = str(root)
    if start == 0:
        try:
            os.mkdir(base)
        except FileNotFoundError:  # the parent is missing too (the usual exec dir is not)
            os.makedirs(base)
        for path in plan.directories:  # parents come before children: breadth first
            os.mkdir(os.path.join(base, path))
    copied = ""
    for position in range(start, len(plan.files)):
        path, digest, executable = plan.files[position]
        source = sources[(digest, executable and have_executables)]
        target = os.path.join(base, path)
        mode = 0o555 if executable else 0o444
        try:
            if executable and not have_executables:
                raise OSError(errno.EXDEV, "no store of executable copies")
            os.link(source, target, follow_symlinks=False)
        except FileNotFoundError:
            if os.path.exists(os.path.dirname(target)):
                raise _Vanished(position, digest) from None
            raise
        except OSError as exc:
            if exc.errno not in _CANNOT_LINK:
                raise
            copied = exc.strerror or str(exc)
            try:
                shutil.copyfile(source, target)
            except FileNotFoundError:
                raise _Vanished(position, digest) from None
            os.chmod(target, mode)
    for path, target in plan.symlinks:
        os.symlink(target, os.path.join(base, path))
    for path in also_create:
        _make_directory(base, path)
    return copied


def _make_directory(base: str, path: str) -> None:
    """``mkdir -p`` that never follows a symlink: a component that exists as anything
    but a directory stops it (the action will meet whatever is there)."""
    current = base
    for part in path.split("/"):
        current = os.path.join(current, part)
        try:
            info = os.lstat(current)
        except FileNotFoundError:
            os.mkdir(current)
            continue
        if not stat.S_ISDIR(info.st_mode):
            return


async def stage_inputs(
    input_root: Digest,
    exec_root: Path,
    store: DiskBlobStore,
    fetch: Fetch,
    *,
    executables: DiskBlobStore | None = None,
    directories: DirectoryCache | None = None,
    also_create: Sequence[str] = (),
) -> StagedInputs:
    """Stage ``input_root`` into ``exec_root`` once; a worker keeps an :class:`InputStager`
    so that parsed Directories are cached across actions."""
    stager = InputStager(store, fetch, executables=executables, directories=directories)
    return await stager.stage(input_root, exec_root, also_create)
