"""Artifacts: digests, blob stores (``memory``, ``disk``, plugins' others), the action cache.

The stores and the action cache load on first access: the action cache needs
``rexcore.serialization``, which itself imports digests from here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from rexcore.artifacts.digest import (
    Digest,
    DigestFunction,
    Hasher,
    InvalidDigestError,
    digest_of,
    parse_digest,
)
from rexcore.artifacts.store import (
    BlobNotFoundError,
    BlobStore,
    BlobWriter,
    DigestMismatchError,
    StorageError,
    StoreFullError,
    StoreStats,
)

if TYPE_CHECKING:
    from rexcore.artifacts.action_cache import (
        ActionCache,
        ActionCacheOptions,
        MissingBlobsError,
        create_action_cache,
    )
    from rexcore.artifacts.disk import DiskBlobStore, DiskStoreOptions, create_disk_store
    from rexcore.artifacts.memory import MemoryBlobStore, MemoryStoreOptions, create_memory_store

_LAZY = {
    "ActionCache": "action_cache",
    "ActionCacheOptions": "action_cache",
    "MissingBlobsError": "action_cache",
    "create_action_cache": "action_cache",
    "DiskBlobStore": "disk",
    "DiskStoreOptions": "disk",
    "create_disk_store": "disk",
    "MemoryBlobStore": "memory",
    "MemoryStoreOptions": "memory",
    "create_memory_store": "memory",
}

__all__ = [
    "ActionCache",
    "ActionCacheOptions",
    "BlobNotFoundError",
    "BlobStore",
    "BlobWriter",
    "Digest",
    "DigestFunction",
    "DigestMismatchError",
    "DiskBlobStore",
    "DiskStoreOptions",
    "Hasher",
    "InvalidDigestError",
    "MemoryBlobStore",
    "MemoryStoreOptions",
    "MissingBlobsError",
    "StorageError",
    "StoreFullError",
    "StoreStats",
    "create_action_cache",
    "create_disk_store",
    "create_memory_store",
    "digest_of",
    "parse_digest",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
