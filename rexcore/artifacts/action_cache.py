"""The action cache: action digest to :class:`ActionResult`, for results worth reusing.

Entries persist as JSON files ``<root>/<function>/<hash[:2]>/<hash>`` (root is
``<data_dir>/ac``), each written to a temp file and renamed into place. In front of them,
in memory: the set of every stored key (so a miss never touches the disk) and an LRU of
decoded results (so a hit costs a dictionary look-up and a ``find_missing``).

A result is served only while the blob store holds every blob it refers to; a result
whose outputs were evicted is a miss, and the action runs again. A corrupt entry file is
a miss too, and is removed.
"""

from __future__ import annotations

import asyncio
import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import attrs
import orjson

from rexcore.artifacts._files import remove_file, remove_stale_temps, write_new_file
from rexcore.artifacts.digest import Digest, DigestFunction
from rexcore.artifacts.store import BlobStore, StorageError
from rexcore.serialization import codec
from rexcore.serialization.action_result import ActionResult

__all__ = [
    "ActionCache",
    "ActionCacheOptions",
    "CachedResult",
    "MissingBlobsError",
    "create_action_cache",
]

_Key = tuple[DigestFunction, str]
_LISTED_MISSING = 10
# Entries up to this size may be written on the event loop (``put(inline=True)``).
_INLINE_ENTRY = 16 << 10


@attrs.frozen
class ActionCacheOptions:
    """Options of the action cache."""

    #: Decoded results kept in memory; beyond them a hit reads its entry file (in a thread).
    max_entries_in_memory: int = attrs.field(default=100_000, validator=attrs.validators.ge(0))


class MissingBlobsError(StorageError):
    """An action result refers to blobs the blob store does not hold, so it was not stored."""

    def __init__(self, action_digest: Digest, missing: Sequence[Digest]) -> None:
        self.action_digest = action_digest
        self.missing: list[Digest] = list(missing)
        listed = ", ".join(str(d) for d in self.missing[:_LISTED_MISSING])
        if len(self.missing) > _LISTED_MISSING:
            listed += f" and {len(self.missing) - _LISTED_MISSING} more"
        super().__init__(
            f"the result of action {action_digest} was not cached: it refers to "
            f"{len(self.missing)} blob(s) the blob store does not hold ({listed}); "
            "upload them first, then store the result again"
        )


class CachedResult(Protocol):
    """What an action cache can hold: an attrs class of the wire codec that names every
    blob it refers to (the entry is served only while all of them are in the store)."""

    def blob_digests(self) -> Iterable[Digest]: ...


R = TypeVar("R", bound=CachedResult)


def _key(digest: Digest) -> _Key:
    return (digest.function, digest.hash)


def _scan(root: str) -> set[_Key]:
    temp_dir = os.path.join(root, "tmp")
    os.makedirs(temp_dir, exist_ok=True)
    remove_stale_temps(temp_dir)
    keys: set[_Key] = set()
    for function in DigestFunction:
        function_dir = os.path.join(root, function.value)
        os.makedirs(function_dir, exist_ok=True)
        with os.scandir(function_dir) as shards:
            for shard in shards:
                if len(shard.name) != 2 or not shard.is_dir(follow_symlinks=False):
                    continue
                with os.scandir(shard.path) as entries:
                    keys.update((function, entry.name) for entry in entries)
    return keys


def _encode_entry(action_digest: Digest, result: Any) -> bytes:
    """An entry file: the action digest it is for guards against misplaced files."""
    return orjson.dumps({"action_digest": str(action_digest), "result": codec.unstructure(result)})


def _load(path: str, action_digest: Digest, result_type: type[R]) -> R | None:
    """The stored result, or None when the file is gone or corrupt (then removed)."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        return None
    try:
        entry = orjson.loads(data)
        if entry["action_digest"] == str(action_digest):
            return codec.structure(entry["result"], result_type)
    except (codec.WireFormatError, ValueError, TypeError, KeyError):
        pass
    remove_file(path)
    return None


def _store(temp_dir: str, path: str, data: bytes) -> None:
    write_new_file(temp_dir, path, data, replace=True)


class ActionCache(Generic[R]):
    """Action results by action digest, persisted under ``root``, served from memory.

    Construction does no I/O; the first call (or :meth:`open`) lists the stored keys.
    ``result_type`` is what the entries hold: rex's :class:`ActionResult` unless a protocol
    keeps results of its own form (``rex-reapi`` keeps REAPI results in a cache of its own).
    """

    def __init__(
        self, root: Path, blob_store: BlobStore, options: ActionCacheOptions = ActionCacheOptions(),
        result_type: type[R] = ActionResult,  # type: ignore[assignment]
    ) -> None:
        self.root = root
        self._result_type = result_type
        self._root = str(root)
        self._temp_dir = os.path.join(self._root, "tmp")
        self._blob_store = blob_store
        self._options = options
        self._keys: set[_Key] | None = None
        self._results: OrderedDict[_Key, R] = OrderedDict()
        self._load_lock = asyncio.Lock()
        self._closed = False

    def _path(self, key: _Key) -> str:
        function, hash_ = key
        return os.path.join(self._root, function.value, hash_[:2], hash_)

    def _fail(self, doing: str, exc: OSError) -> StorageError:
        return StorageError(
            f"cannot {doing} the action cache at {self._root}: {exc.strerror or exc}; check "
            "that the data dir is writable and the disk is not full"
        )

    async def open(self) -> ActionCache:
        """List the stored keys now rather than on first use."""
        await self._ready()
        return self

    async def _ready(self) -> set[_Key]:
        if self._closed:
            raise StorageError(f"the action cache at {self._root} is closed; open a new one")
        if self._keys is None:
            async with self._load_lock:
                if self._keys is None:
                    try:
                        self._keys = await asyncio.to_thread(_scan, self._root)
                    except OSError as exc:
                        raise self._fail("open", exc) from exc
        return self._keys

    def _remember(self, key: _Key, result: R) -> None:
        if not self._options.max_entries_in_memory:
            return
        self._results[key] = result
        self._results.move_to_end(key)
        if len(self._results) > self._options.max_entries_in_memory:
            self._results.popitem(last=False)

    async def get(self, action_digest: Digest) -> R | None:
        """The cached result, or None if there is none or some of its blobs are gone."""
        keys = await self._ready()
        key = _key(action_digest)
        result = self._results.get(key)
        if result is not None:
            self._results.move_to_end(key)
        elif key not in keys:
            return None
        else:
            try:
                result = await asyncio.to_thread(_load, self._path(key), action_digest,
                                                 self._result_type)
            except OSError as exc:
                raise self._fail(f"read action {action_digest} from", exc) from exc
            if result is None:
                keys.discard(key)
                return None
            self._remember(key, result)
        if await self._blob_store.find_missing(result.blob_digests()):
            return None
        return result

    async def put(self, action_digest: Digest, result: R, *, inline: bool = False) -> None:
        """Store ``result``; raises :class:`MissingBlobsError` if any of its blobs is missing.

        ``inline``: write a small entry on the calling thread (a hop to a thread and back
        costs more than writing a few hundred bytes); a large one still goes to a thread."""
        keys = await self._ready()
        missing = await self._blob_store.find_missing(result.blob_digests())
        if missing:
            raise MissingBlobsError(action_digest, missing)
        key = _key(action_digest)
        data = _encode_entry(action_digest, result)
        try:
            if inline and len(data) <= _INLINE_ENTRY:
                _store(self._temp_dir, self._path(key), data)
            else:
                await asyncio.to_thread(_store, self._temp_dir, self._path(key), data)
        except OSError as exc:
            raise self._fail(f"store action {action_digest} in", exc) from exc
        keys.add(key)
        self._remember(key, result)

    async def delete(self, action_digest: Digest) -> None:
        """Forget the result of ``action_digest`` if there is one."""
        keys = await self._ready()
        key = _key(action_digest)
        self._results.pop(key, None)
        if key in keys:
            keys.discard(key)
            try:
                await asyncio.to_thread(remove_file, self._path(key))
            except OSError as exc:
                raise self._fail(f"delete action {action_digest} from", exc) from exc

    async def close(self) -> None:
        """Drop the in-memory index; the cache is unusable afterwards (entries stay on disk)."""
        self._closed = True
        self._results.clear()
        self._keys = None


def create_action_cache(
    data_dir: Path, blob_store: BlobStore, options: ActionCacheOptions = ActionCacheOptions()
) -> ActionCache:
    """The action cache of a data dir (entries under ``<data_dir>/ac``)."""
    return ActionCache(data_dir / "ac", blob_store, options)
