"""What every REAPI service shares: the runtime, options, converters and their checks."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from rex_reapi.convert import CachedReapiResult, InputTreeConverter, RecentBlobs, ResultConverter
from rex_reapi.digests import function_of
from rex_reapi.errors import ReapiError
from rex_reapi.options import ReapiOptions
from rexcore.artifacts.action_cache import ActionCache, ActionCacheOptions
from rexcore.artifacts.digest import DigestFunction
from rexcore.artifacts.store import DigestMismatchError, StorageError, StoreFullError
from rexcore.core.runtime import ServiceRuntime
from rexcore.serialization.action import InvalidActionError

__all__ = ["ReapiBackend", "streaming", "unary"]

log = logging.getLogger("rex_reapi")
T = TypeVar("T")

#: Where rex-reapi keeps REAPI action results (keyed by the REAPI action digest), apart
#: from the native cache (keyed by rex action digests).
CACHE_DIR = "reapi-ac"


class ReapiBackend:
    def __init__(self, runtime: ServiceRuntime, options: ReapiOptions) -> None:
        self.runtime = runtime
        self.options = options
        self.store = runtime.blob_store
        self.functions: tuple[DigestFunction, ...] = tuple(runtime.digest_functions)
        self.instance_names = frozenset(options.instance_names)
        #: Small blobs just uploaded, which an Execute reads moments later.
        self.recent = RecentBlobs()
        self.inputs = InputTreeConverter(self.store, recent=self.recent)
        self.results = ResultConverter(self.store)
        cache_config = runtime.config.storage.action_cache
        self.cache_enabled = cache_config.enabled
        #: UpdateActionResult: refused with PERMISSION_DENIED (and Capabilities says so)
        #: unless ``storage.action_cache.allow_client_updates``.
        self.client_updates = cache_config.allow_client_updates
        self.cache: ActionCache[CachedReapiResult] = ActionCache(
            runtime.data_dir / CACHE_DIR, self.store,
            ActionCacheOptions(max_entries_in_memory=cache_config.max_entries_in_memory),
            result_type=CachedReapiResult,
        )

    @property
    def updates_allowed(self) -> bool:
        return self.cache_enabled and self.client_updates

    def check_instance(self, name: str) -> None:
        if name not in self.instance_names:
            known = ", ".join(repr(n) for n in sorted(self.instance_names))
            raise ReapiError(grpc.StatusCode.INVALID_ARGUMENT,
                             f"unknown instance name {name!r}; this server serves {known} "
                             "([protocols.reapi] instance_names)")

    def function(self, value: int) -> DigestFunction:
        return function_of(value, self.functions)


def _as_reapi_error(exc: BaseException) -> ReapiError | None:
    if isinstance(exc, ReapiError):
        return exc
    if isinstance(exc, StoreFullError):
        return ReapiError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
    if isinstance(exc, (DigestMismatchError, InvalidActionError)):
        return ReapiError(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    if isinstance(exc, StorageError):
        return ReapiError(grpc.StatusCode.INTERNAL, f"storage failed: {exc}")
    return None


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
    error = _as_reapi_error(exc)
    if error is None:
        log.exception("REAPI %s failed", method, exc_info=exc)
        error = ReapiError(grpc.StatusCode.INTERNAL,
                           f"{method} failed inside rex: {type(exc).__name__}: {exc}; see the "
                           "rexd log")
    await context.abort(
        error.code, error.message,
        trailing_metadata=(("grpc-status-details-bin", error.status().SerializeToString()),),
    )


def unary(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Turn exceptions of a unary handler into the call's status (never a crash)."""

    @functools.wraps(method)
    async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> T:
        try:
            return await method(self, request, context)
        except (grpc.aio.AbortError, grpc.aio.UsageError):
            raise
        except Exception as exc:
            await _abort(context, exc, method.__name__)
            raise  # unreachable: abort raises

    return handler


def streaming(method: Callable[..., AsyncIterator[T]]) -> Callable[..., AsyncIterator[T]]:
    """The same for handlers that stream their responses."""

    @functools.wraps(method)
    async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[T]:
        try:
            async for response in method(self, request, context):
                yield response
        except (grpc.aio.AbortError, grpc.aio.UsageError):
            raise
        except Exception as exc:
            await _abort(context, exc, method.__name__)

    return handler
