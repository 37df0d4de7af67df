"""REAPI messages to rex's own schemas and back.

rex's scheduler and workers run rex Actions (canonical JSON in the CAS). An Execute
therefore turns the client's Action, Command and input tree into rex's form, stored in
the CAS under the same digest function, and turns the rex result back into a REAPI
ActionResult, with each output directory's Tree re-encoded as the REAPI Tree proto.

File blobs are the same bytes in both worlds; only directory-shaped blobs (Directory,
Tree) and the Action/Command differ. Conversions are remembered by digest, so the input
directories that most actions share (toolchains, headers) are converted once.
"""

from __future__ import annotations

import asyncio
import base64
import math
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator

import attrs
import grpc
from google.protobuf import struct_pb2, timestamp_pb2
from google.protobuf.message import DecodeError

from rex_reapi.digests import to_proto, to_rex
from rex_reapi.errors import ReapiError, missing_blobs_error
from rex_reapi.proto import remote_execution_pb2 as re_pb2
from rexcore.artifacts.digest import Digest, DigestFunction, digest_of
from rexcore.artifacts.disk import INLINE_PUT
from rexcore.artifacts.store import BlobNotFoundError, BlobStore, put_missing
from rexcore.serialization import action as rex
from rexcore.serialization import action_result as rex_result
from rexcore.serialization.codec import decode

__all__ = [
    "CachedReapiResult",
    "ConvertedAction",
    "InputTreeConverter",
    "OutputLayout",
    "RecentBlobs",
    "ResultConverter",
    "convert_action",
    "result_from_proto",
]

#: Seconds a verified input directory counts as present without asking the store again.
#: An eviction inside that window still fails cleanly: the worker reports the missing
#: input as FAILED_PRECONDITION.
_VERIFIED_FOR_S = 30.0


#: Blobs up to this size with a file in the store are read on the event loop: a page-cache
#: read of a few KiB costs less than the hop to a thread and back (Actions, Commands and
#: Directories are small, and an Execute reads several).
INLINE_READ = 64 << 10


#: Small blobs kept in memory once uploaded are at most this big: what the disk store
#: writes on the event loop, too (an Action, its Command, a Directory).
INLINE_WRITE = INLINE_PUT


class RecentBlobs:
    """Small blobs just uploaded, kept in memory (least recently used out first, up to
    ``max_bytes`` in all): Bazel uploads an action's Action, Command and input Directories
    moments before its Execute reads them back. Only bytes the store verified and stored
    are remembered, so a blob found here is the blob, even if the store evicted it since."""

    def __init__(self, max_bytes: int = 8 << 20, max_blob: int = INLINE_WRITE) -> None:
        self._blobs: OrderedDict[Digest, bytes] = OrderedDict()
        self._bytes = 0
        self._max_bytes = max_bytes
        self._max_blob = max_blob

    def remember(self, digest: Digest, data: bytes | memoryview) -> None:
        if not 0 < len(data) <= self._max_blob or digest in self._blobs:
            return
        self._blobs[digest] = bytes(data)
        self._bytes += len(data)
        while self._bytes > self._max_bytes:
            _, dropped = self._blobs.popitem(last=False)
            self._bytes -= len(dropped)

    def get(self, digest: Digest) -> bytes | None:
        data = self._blobs.get(digest)
        if data is not None:
            self._blobs.move_to_end(digest)
        return data

    def __len__(self) -> int:
        return len(self._blobs)


async def get_many(store: BlobStore, digests: list[Digest],
                   recent: RecentBlobs | None = None) -> list[bytes | BaseException]:
    """The blobs ``digests`` (or the error reading each): those just uploaded from
    ``recent``, small local files read inline, the rest through the store."""
    found: list[bytes | BaseException | None] = [None] * len(digests)
    rest: list[int] = []
    for index, digest in enumerate(digests):
        if recent is not None:
            data = recent.get(digest)
            if data is not None:
                found[index] = data
                continue
        path = store.local_path(digest) if 0 < digest.size <= INLINE_READ else None
        if path is not None:
            try:
                with open(path, "rb") as file:
                    data = file.read()
            except OSError:  # evicted meanwhile: the store says what happened
                data = b""
            if len(data) == digest.size:
                found[index] = data
                continue
        rest.append(index)
    outcomes = await asyncio.gather(*(store.get(digests[i]) for i in rest),
                                    return_exceptions=True)
    for index, outcome in zip(rest, outcomes):
        found[index] = outcome
    return found  # type: ignore[return-value]


async def get_one(store: BlobStore, digest: Digest, recent: RecentBlobs | None = None) -> bytes:
    [outcome] = await get_many(store, [digest], recent)
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome




def invalid(message: str) -> ReapiError:
    return ReapiError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _parse(message_type: type, data: bytes, what: str):  # noqa: ANN202
    message = message_type()
    try:
        message.ParseFromString(data)
    except DecodeError as exc:
        raise invalid(f"the {what} is not a valid {message_type.__name__} message: {exc}") from None
    return message


# -- inputs ------------------------------------------------------------------------------


@attrs.define(eq=False)
class _Converted:
    """One REAPI input Directory in rex's form, and what it refers to."""

    native: Digest
    files: tuple[Digest, ...]
    children: tuple[Digest, ...]
    verified_at: float = -math.inf


def _directory_to_rex(message: re_pb2.Directory, function: DigestFunction, where: str,
                      child_native: dict[Digest, Digest]) -> rex.Directory:
    files = tuple(
        rex.FileNode(node.name, to_rex(node.digest, function, f"{where}: file {node.name!r}"),
                     node.is_executable)
        for node in message.files
    )
    directories = tuple(
        rex.DirectoryNode(node.name, child_native[to_rex(node.digest, function)])
        for node in message.directories
    )
    for node in message.symlinks:
        if not node.target or node.target.startswith("/"):
            raise invalid(f"{where}: symlink {node.name!r} has the target {node.target!r}; "
                          "rex allows only relative symlink targets in inputs")
    symlinks = tuple(rex.SymlinkNode(node.name, node.target) for node in message.symlinks)
    directory = rex.Directory(files, directories, symlinks)
    try:
        directory.validate(where)
    except rex.InvalidActionError as exc:
        raise invalid(str(exc)) from None
    return directory


class InputTreeConverter:
    """REAPI input trees to rex Directories, remembered per REAPI directory digest."""

    def __init__(self, store: BlobStore, max_directories: int = 200_000,
                 recent: RecentBlobs | None = None) -> None:
        self._store = store
        #: Blobs just uploaded (the REAPI Directories are read from here when there).
        self.recent = recent
        self._max = max_directories
        self._converted: OrderedDict[Digest, _Converted] = OrderedDict()

    async def convert(self, root: Digest) -> Digest:
        """The rex digest of the input root ``root``, every blob under it checked present.

        Raises FAILED_PRECONDITION listing the missing blobs, INVALID_ARGUMENT for a
        malformed directory."""
        native, _ = await self.convert_root(root)
        return native

    async def convert_root(self, root: Digest) -> tuple[Digest, bytes | None]:
        """:meth:`convert`, and the rex Directory blob of the root when this call made it
        (None when it was converted before), so the scheduler need not read it back."""
        data: bytes | None = None
        for attempt in range(2):
            made = await self._load(root)
            data = made if made is not None else data
            stale = await self._verify(root)
            if not stale:
                # A conversion is a function of the REAPI directory: bytes made by a first
                # attempt are still the root's.
                return self._converted[root].native, data
            for digest in stale:  # a converted directory blob was evicted: convert again
                self._converted.pop(digest, None)
        raise ReapiError(grpc.StatusCode.UNAVAILABLE,
                         f"the input tree {root} keeps being evicted from the CAS; retry")

    async def _load(self, root: Digest) -> bytes | None:
        """Fetch and convert every directory of the tree that is not converted yet; the
        rex blob of the root if it was among them."""
        known = self._converted
        fetched: dict[Digest, re_pb2.Directory] = {}
        native_of: dict[Digest, Digest] = {}  # rex digests of the directories converted
        level = [root] if root not in known else []
        missing: list[Digest] = []
        while level:
            blobs = await get_many(self._store, level, self.recent)
            next_level: dict[Digest, None] = {}
            for digest, blob in zip(level, blobs):
                if isinstance(blob, BlobNotFoundError):
                    missing.append(digest)
                    continue
                if isinstance(blob, BaseException):
                    raise blob
                message = _parse(re_pb2.Directory, blob, f"input directory {digest}")
                fetched[digest] = message
                for node in message.directories:
                    child = to_rex(node.digest, root.function,
                                   f"input directory {digest}: directory {node.name!r}")
                    if child in known:  # read now: another Execute may drop it meanwhile
                        native_of.setdefault(child, known[child].native)
                    elif child not in fetched:
                        next_level[child] = None
            level = [d for d in next_level if d not in fetched]
        if missing:
            raise missing_blobs_error(missing, "input tree")
        # Convert children before parents: a parent needs its children's rex digests.
        blobs_to_store: dict[Digest, bytes] = {}
        converted: dict[Digest, _Converted] = {}
        order = _children_first(root, fetched)
        for digest in order:
            message = fetched[digest]
            children = tuple(to_rex(node.digest, root.function) for node in message.directories)
            child_native = {child: native_of[child] for child in children}
            directory = _directory_to_rex(message, root.function, f"input directory {digest}",
                                          child_native)
            data = rex.canonical_bytes(directory)
            native = digest_of(data, root.function)
            native_of[digest] = native
            blobs_to_store[native] = data
            files = tuple(node.digest for node in directory.files)
            converted[digest] = _Converted(native, files, children)
        if blobs_to_store:
            await put_missing(self._store, blobs_to_store)
        # Known only once stored: a concurrent Execute of an overlapping tree must not
        # find an entry whose rex blob is not in the store yet (it would count as evicted).
        known.update(converted)
        while len(known) > self._max:
            known.popitem(last=False)
        return blobs_to_store[native_of[root]] if root in converted else None

    async def _verify(self, root: Digest) -> list[Digest]:
        """Check every blob of the tree is in the store (skipping recently verified
        subtrees); returns the REAPI digests of directories whose rex form is gone."""
        now = time.monotonic()
        walked: list[Digest] = []
        to_check: dict[Digest, Digest | None] = {}  # blob -> REAPI directory it stands for
        stack = [root]
        seen: set[Digest] = set()
        while stack:
            digest = stack.pop()
            if digest in seen:
                continue
            seen.add(digest)
            entry = self._converted.get(digest)
            if entry is None:
                return [digest]
            self._converted.move_to_end(digest)
            if now - entry.verified_at < _VERIFIED_FOR_S:
                continue
            walked.append(digest)
            to_check[entry.native] = digest
            for file in entry.files:
                to_check.setdefault(file, None)
            stack.extend(entry.children)
        if not to_check:
            return []
        missing = await self._store.find_missing(to_check)
        stale = [to_check[d] for d in missing if to_check[d] is not None]
        if stale:
            return stale  # type: ignore[return-value]
        if missing:
            raise missing_blobs_error(missing, "input tree")
        for digest in walked:
            entry = self._converted.get(digest)
            if entry is not None:
                entry.verified_at = now
        return []


def _children_first(root: Digest, fetched: dict[Digest, re_pb2.Directory]) -> list[Digest]:
    order: list[Digest] = []
    state: dict[Digest, bool] = {}
    stack: list[tuple[Digest, bool]] = [(root, False)] if root in fetched else []
    while stack:
        digest, expanded = stack.pop()
        if expanded:
            order.append(digest)
            continue
        if digest in state:
            continue
        state[digest] = True
        stack.append((digest, True))
        for node in fetched[digest].directories:
            child = Digest(root.function, node.digest.hash, node.digest.size_bytes)
            if child in fetched and child not in state:
                stack.append((child, False))
    return order


# -- the action and command -------------------------------------------------------------


@attrs.frozen
class OutputLayout:
    """How the client asked for outputs: ``output_paths`` (v2.1+), or the older split
    into files and directories, which decides where symlinks are reported."""

    legacy: bool = False
    directories: frozenset[str] = frozenset()


@attrs.frozen
class ConvertedAction:
    native_digest: Digest
    action: rex.Action
    action_bytes: bytes
    command: rex.Command
    command_bytes: bytes
    layout: OutputLayout
    do_not_cache: bool
    #: The rex input root's blob when this conversion made it (else None).
    input_root_bytes: bytes | None = None

    def blobs(self) -> dict[Digest, bytes]:
        """The rex blobs at hand, for the scheduler (it then reads none of them back)."""
        blobs = {self.native_digest: self.action_bytes,
                 self.action.command_digest: self.command_bytes}
        if self.input_root_bytes is not None:
            blobs[self.action.input_root_digest] = self.input_root_bytes
        return blobs


def _timeout_of(action: re_pb2.Action, max_timeout_s: float) -> float | None:
    if not action.HasField("timeout"):
        return None
    seconds = action.timeout.seconds + action.timeout.nanos / 1e9
    if seconds < 0:
        raise invalid(f"the action timeout {seconds:g}s is negative")
    if seconds > max_timeout_s:
        raise invalid(f"the action timeout {seconds:g}s is above the server's maximum "
                      f"{max_timeout_s:g}s (scheduler.max_timeout_s); ask for less")
    return seconds or None


def convert_command(message: re_pb2.Command, where: str) -> tuple[rex.Command, OutputLayout]:
    if message.output_node_properties:
        raise invalid(f"{where}: output node properties {list(message.output_node_properties)} "
                      "are not supported")
    if message.output_paths:
        outputs = tuple(message.output_paths)
        layout = OutputLayout()
    else:
        outputs = tuple(sorted({*message.output_files, *message.output_directories}))
        layout = OutputLayout(True, frozenset(message.output_directories))
    command = rex.Command(
        arguments=tuple(message.arguments),
        environment=tuple((v.name, v.value) for v in message.environment_variables),
        output_paths=outputs,
        working_directory=message.working_directory,
    )
    try:
        command.validate()
    except rex.InvalidActionError as exc:
        raise invalid(f"{where}: {exc}") from None
    return command, layout


async def convert_action(
    action_digest: Digest, store: BlobStore, inputs: InputTreeConverter, max_timeout_s: float,
) -> ConvertedAction:
    """Read the REAPI Action and Command, convert them and the input tree to rex's form
    (the rex input tree's Directories are stored in the CAS; the rex Action and Command
    are only returned)."""
    function = action_digest.function
    try:
        action_bytes = await get_one(store, action_digest, inputs.recent)
    except BlobNotFoundError:
        raise missing_blobs_error([action_digest], "action") from None
    action = _parse(re_pb2.Action, action_bytes, f"action {action_digest}")
    if not action.HasField("command_digest") or not action.HasField("input_root_digest"):
        raise invalid(f"action {action_digest} names no command or no input root")
    command_digest = to_rex(action.command_digest, function, "action command_digest")
    root_digest = to_rex(action.input_root_digest, function, "action input_root_digest")
    try:
        command_bytes = await get_one(store, command_digest, inputs.recent)
    except BlobNotFoundError:
        raise missing_blobs_error([command_digest], "action's command") from None
    command_message = _parse(re_pb2.Command, command_bytes, f"command {command_digest}")
    command, layout = convert_command(command_message, f"command {command_digest}")
    platform_message = action.platform if action.platform.properties else command_message.platform
    timeout_s = _timeout_of(action, max_timeout_s)
    native_root, native_root_bytes = await inputs.convert_root(root_digest)
    native_command_bytes = rex.canonical_bytes(command)
    native_command_digest = digest_of(native_command_bytes, function)
    native_action = rex.Action(
        command_digest=native_command_digest,
        input_root_digest=native_root,
        timeout_s=timeout_s,
        do_not_cache=action.do_not_cache,
        platform=tuple(sorted((p.name, p.value) for p in platform_message.properties)),
        salt=action.salt.hex(),
    )
    native_action_bytes = rex.canonical_bytes(native_action)
    native_digest = digest_of(native_action_bytes, function)
    # The rex Action and Command go to the scheduler with the submission (blobs()) and to
    # workers with the assignment: they are not stored in the CAS.
    return ConvertedAction(native_digest, native_action, native_action_bytes, command,
                           native_command_bytes, layout, action.do_not_cache, native_root_bytes)


# -- results ------------------------------------------------------------------------------


def _timestamp(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    if seconds is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def _metadata_to_proto(meta: rex_result.ExecutionMetadata) -> re_pb2.ExecutedActionMetadata:
    fields = {
        "queued_timestamp": meta.queued_at,
        "worker_start_timestamp": meta.worker_start,
        "worker_completed_timestamp": meta.worker_end,
        "input_fetch_start_timestamp": meta.input_fetch_start,
        "input_fetch_completed_timestamp": meta.input_fetch_end,
        "execution_start_timestamp": meta.execution_start,
        "execution_completed_timestamp": meta.execution_end,
        "output_upload_start_timestamp": meta.output_upload_start,
        "output_upload_completed_timestamp": meta.output_upload_end,
    }
    proto = re_pb2.ExecutedActionMetadata(
        worker=meta.worker,
        **{name: stamp for name, value in fields.items()
           if (stamp := _timestamp(value)) is not None},
    )
    if meta.execution_start is not None and meta.execution_end is not None:
        proto.virtual_execution_duration.FromNanoseconds(
            max(0, int((meta.execution_end - meta.execution_start) * 1e9)))
    usage = {}
    if meta.cpu_seconds is not None:
        usage["cpu_seconds"] = meta.cpu_seconds
    if meta.peak_memory_bytes is not None:
        usage["peak_memory_bytes"] = float(meta.peak_memory_bytes)
    if usage:
        struct = struct_pb2.Struct()
        struct.update({"rex.resource_usage": usage})
        proto.auxiliary_metadata.add().Pack(struct)
    return proto


@attrs.frozen
class CachedReapiResult:
    """A REAPI ActionResult as rex-reapi keeps it in its action cache: the proto itself,
    and every blob it refers to (including the files inside output directories), so the
    entry is a miss once any of them is evicted."""

    result_proto: str  # base64 of the serialized ActionResult
    referenced: tuple[Digest, ...] = ()

    def blob_digests(self) -> Iterator[Digest]:
        return iter(self.referenced)

    @classmethod
    def of(cls, result: re_pb2.ActionResult, referenced: Iterable[Digest]) -> CachedReapiResult:
        return cls(base64.b64encode(result.SerializeToString()).decode(),
                   tuple(dict.fromkeys(referenced)))

    def proto(self) -> re_pb2.ActionResult:
        result = re_pb2.ActionResult()
        result.ParseFromString(base64.b64decode(self.result_proto))
        return result


class ResultConverter:
    """rex ActionResults to REAPI ones; rex Trees become REAPI Tree blobs in the CAS."""

    def __init__(self, store: BlobStore, max_trees: int = 10_000) -> None:
        self._store = store
        self._max = max_trees
        self._trees: OrderedDict[Digest, Digest] = OrderedDict()

    async def to_proto(
        self, result: rex_result.ActionResult, layout: OutputLayout,
    ) -> tuple[re_pb2.ActionResult, list[Digest]]:
        """The REAPI form of ``result`` and every blob it refers to."""
        referenced: list[Digest] = []
        proto = re_pb2.ActionResult(exit_code=result.exit_code)
        for file in result.output_files:
            proto.output_files.add(path=file.path, digest=to_proto(file.digest),
                                   is_executable=file.is_executable)
            referenced.append(file.digest)
        for link in result.output_symlinks:
            if not layout.legacy:
                target = proto.output_symlinks
            elif link.path in layout.directories:
                target = proto.output_directory_symlinks
            else:
                target = proto.output_file_symlinks
            target.add(path=link.path, target=link.target)
        for directory in result.output_directories:
            tree_digest = await self._tree(directory.tree_digest)
            proto.output_directories.add(path=directory.path, tree_digest=to_proto(tree_digest))
            referenced.append(tree_digest)
            referenced.extend(directory.file_digests)
        for name, digest in (("stdout_digest", result.stdout_digest),
                             ("stderr_digest", result.stderr_digest)):
            if digest is not None:
                getattr(proto, name).CopyFrom(to_proto(digest))
                referenced.append(digest)
        proto.execution_metadata.CopyFrom(_metadata_to_proto(result.execution_metadata))
        return proto, referenced

    async def _tree(self, native_tree: Digest) -> Digest:
        """The digest of the REAPI Tree for the rex Tree ``native_tree`` (stored in the CAS)."""
        known = self._trees.get(native_tree)
        if known is not None and not await self._store.find_missing([known]):
            self._trees.move_to_end(native_tree)
            return known
        function = native_tree.function
        tree = decode(await get_one(self._store, native_tree), rex.Tree)
        by_native = {rex.canonical_digest(child, function): child for child in tree.children}
        converted: dict[Digest, tuple[re_pb2.Directory, Digest]] = {}

        def convert(directory: rex.Directory) -> tuple[re_pb2.Directory, Digest]:
            message = re_pb2.Directory()
            for file in directory.files:
                message.files.add(name=file.name, digest=to_proto(file.digest),
                                  is_executable=file.is_executable)
            for node in directory.directories:
                if node.digest not in converted:
                    converted[node.digest] = convert(by_native[node.digest])
                message.directories.add(name=node.name,
                                        digest=to_proto(converted[node.digest][1]))
            for link in directory.symlinks:
                message.symlinks.add(name=link.name, target=link.target)
            return message, digest_of(message.SerializeToString(deterministic=True), function)

        root, _ = convert(tree.root)
        proto_tree = re_pb2.Tree(root=root)
        for child_digest in by_native:  # every child the rex Tree lists, converted once
            if child_digest not in converted:
                converted[child_digest] = convert(by_native[child_digest])
            proto_tree.children.append(converted[child_digest][0])
        data = proto_tree.SerializeToString(deterministic=True)
        digest = digest_of(data, function)
        await self._store.put(digest, data)
        self._trees[native_tree] = digest
        while len(self._trees) > self._max:
            self._trees.popitem(last=False)
        return digest


async def result_from_proto(
    result: re_pb2.ActionResult, function: DigestFunction, store: BlobStore,
) -> CachedReapiResult:
    """A client's ActionResult (UpdateActionResult) checked and made ready to cache:
    paths must be relative and stay inside the exec root, and every blob it names,
    including the files inside output directories, must be in the CAS."""
    referenced: list[Digest] = []
    for file in result.output_files:
        _path_ok(file.path)
        referenced.append(to_rex(file.digest, function, f"output file {file.path!r}"))
        file.ClearField("contents")
    for group in (result.output_symlinks, result.output_file_symlinks,
                  result.output_directory_symlinks):
        for link in group:
            _path_ok(link.path)
    for directory in result.output_directories:
        _path_ok(directory.path)
        tree_digest = to_rex(directory.tree_digest, function, f"output directory {directory.path!r}")
        referenced.append(tree_digest)
        try:
            tree = _parse(re_pb2.Tree, await store.get(tree_digest), f"tree {tree_digest}")
        except BlobNotFoundError:
            raise missing_blobs_error([tree_digest], "action result") from None
        for message in (tree.root, *tree.children):
            referenced.extend(to_rex(node.digest, function, "tree file") for node in message.files)
    for field in ("stdout", "stderr"):
        if result.HasField(f"{field}_digest"):
            referenced.append(to_rex(getattr(result, f"{field}_digest"), function, field))
            result.ClearField(f"{field}_raw")
    missing = await store.find_missing(referenced)
    if missing:
        raise missing_blobs_error(missing, "action result")
    return CachedReapiResult.of(result, referenced)


def _path_ok(path: str) -> bool:
    try:
        rex.check_relative_path(path, "output path")
    except rex.InvalidActionError as exc:
        raise invalid(str(exc)) from None
    return True
