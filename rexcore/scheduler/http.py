"""The coordinator's routes on the native HTTP API.

- ``POST /v1/execute``: ``{"action_digest": "function/hash/size", "priority": 0,
  "skip_cache_lookup": false}`` in, an :class:`~rexcore.serialization.operation.OperationView`
  out (done already on an action-cache hit). Optional: ``"wait_s": N`` answers once the
  operation is done or after N seconds (at most ``scheduler.max_long_poll_s``), saving the
  client a separate wait; ``"blobs": {"function/hash/size": "<base64>", ...}`` carries small
  blobs (the Action, Command, Directories) that are stored in the CAS, verified, before
  the action is submitted, saving an upload per blob.
- ``GET /v1/operations/{id}?wait_s=N``: the operation, once done or after ``wait_s``
  seconds (at most ``scheduler.max_long_poll_s``; 0 or absent: at once).
- ``POST /v1/operations/{id}/cancel``: cancel it; answers the operation as it now is.
- ``POST /v1/workers/synchronize``: the worker protocol (``SyncRequest`` in,
  ``SyncResponse`` out); 401 ``unauthenticated`` for a wrong join token, 403
  ``permission_denied`` for a remote worker when no join token is configured.
- ``GET /v1/status``: workers, queue and counters (``SchedulerStatus``), with ``pool``: the
  worker pool's workers by state and its scaling, when this rexd runs one.

An operation's name is ``operations/<32 hex digits>`` and its URL is ``/v1/`` followed by
that name, so names travel unchanged. Errors use the API's JSON error body; the codes are
the operation status names: ``resource_exhausted`` (429, queue full),
``failed_precondition`` (400, blobs missing: ``missing`` lists them), ``invalid_argument``
(400), ``operation_not_found`` (404), ``unavailable`` (503, stopping).
"""

from __future__ import annotations

import asyncio
import binascii
import math
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
from aiohttp import web

from rexcore.artifacts.digest import Digest, InvalidDigestError, digest_of, parse_digest
from rexcore.artifacts.disk import DiskBlobStore
from rexcore.artifacts.store import DigestMismatchError, StoreFullError, put_missing
from rexcore.monitoring.status import pool_status
from rexcore.protocol.http_server import _ApiError, _json_object  # the API's own error shape
from rexcore.scheduler.operations import (
    MissingInputsError,
    OperationNotFoundError,
    QueueFullError,
    SchedulerError,
    WorkerNotAuthorizedError,
)
from rexcore.scheduler.scheduler import Scheduler
from rexcore.serialization.action import InvalidActionError
from rexcore.serialization.codec import WireFormatError, encode, structure
from rexcore.serialization.worker_protocol import SyncRequest

__all__ = ["OPERATION_ROUTE", "add_scheduler_routes"]

#: The route of one operation: ``/v1/`` + its name.
OPERATION_ROUTE = "/v1/{name:operations/[0-9a-f]{32}}"
_JSON = "application/json"
_EXECUTE_KEYS = {"action_digest", "priority", "skip_cache_lookup", "wait_s", "blobs"}
_PRIORITY_RANGE = (-(2**31), 2**31 - 1)
_HTTP_STATUS = {"invalid_argument": 400, "unavailable": 503}
# Inline blobs up to this many bytes in all are hashed on the event loop (microseconds),
# so they can be stored while the submission commits; more are stored first.
_VERIFIED_HERE = 64 << 10


def add_scheduler_routes(app: web.Application, scheduler: Scheduler) -> None:
    """Serve ``scheduler`` on ``app`` (the native API's application)."""
    routes = _SchedulerApi(scheduler)
    app.router.add_post("/v1/execute", routes.execute)
    app.router.add_get(OPERATION_ROUTE, routes.get_operation, allow_head=False)
    app.router.add_post(OPERATION_ROUTE + "/cancel", routes.cancel_operation)
    app.router.add_post("/v1/workers/synchronize", routes.synchronize)
    app.router.add_get("/v1/status", routes.status, allow_head=False)


def _answer(obj: Any) -> web.Response:
    return web.Response(body=encode(obj), content_type=_JSON)


def _translated(
    handler: Callable[[Any, web.Request], Awaitable[web.Response]],
) -> Callable[[Any, web.Request], Awaitable[web.Response]]:
    """Turn the scheduler's errors into the API's JSON errors."""

    async def wrapper(self: Any, request: web.Request) -> web.Response:
        try:
            return await handler(self, request)
        except QueueFullError as exc:
            raise _ApiError(429, "resource_exhausted", str(exc)) from None
        except MissingInputsError as exc:
            raise _ApiError(
                400, "failed_precondition", str(exc), missing=[str(d) for d in exc.missing]
            ) from None
        except InvalidActionError as exc:
            raise _ApiError(400, "invalid_argument", str(exc)) from None
        except OperationNotFoundError as exc:
            raise _ApiError(404, "operation_not_found", str(exc)) from None
        except WorkerNotAuthorizedError as exc:
            status = 401 if exc.status == "unauthenticated" else 403
            raise _ApiError(status, exc.status, str(exc)) from None
        except SchedulerError as exc:
            raise _ApiError(_HTTP_STATUS.get(exc.status, 500), exc.status, str(exc)) from None

    wrapper.__name__ = handler.__name__
    wrapper.__doc__ = handler.__doc__
    return wrapper


class _SchedulerApi:
    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler

    @_translated
    async def execute(self, request: web.Request) -> web.Response:
        doc = _json_object(await request.read(), "execute request")
        unexpected = sorted(doc.keys() - _EXECUTE_KEYS)
        if unexpected:
            raise _ApiError(
                400, "invalid_request",
                f"the execute body has unexpected keys {unexpected}; send "
                '{"action_digest": "function/hash/size", "priority": 0, '
                '"skip_cache_lookup": false} and optionally "wait_s" and "blobs"',
            )
        text = doc.get("action_digest")
        try:
            if not isinstance(text, str):
                raise InvalidDigestError(f"expected a string function/hash/size, got {text!r}")
            digest = parse_digest(text)
        except ValueError as exc:
            raise _ApiError(400, "invalid_digest", f"action_digest is invalid: {exc}") from None
        enabled = self._scheduler.runtime.digest_functions
        if digest.function not in enabled:
            raise _ApiError(
                400, "unsupported_digest_function",
                f"action {digest} uses digest function {digest.function.value}, which this "
                f"server does not enable; enabled: {', '.join(f.value for f in enabled)}",
            )
        priority = doc.get("priority", 0)
        if type(priority) is not int or not _PRIORITY_RANGE[0] <= priority <= _PRIORITY_RANGE[1]:
            raise _ApiError(
                400, "invalid_request",
                f"priority must be a whole number from {_PRIORITY_RANGE[0]} to "
                f"{_PRIORITY_RANGE[1]} (lower runs sooner), got {priority!r}",
            )
        skip = doc.get("skip_cache_lookup", False)
        if not isinstance(skip, bool):
            raise _ApiError(
                400, "invalid_request", f"skip_cache_lookup must be true or false, got {skip!r}"
            )
        wait_s = _wait_seconds(doc.get("wait_s", 0), "wait_s")
        blobs = self._inline_blobs(doc.get("blobs"))
        store = self._scheduler.runtime.blob_store
        stored: asyncio.Future[None] | None = None
        try:
            total = sum(map(len, blobs.values()))
            if isinstance(store, DiskBlobStore) and store.writes_inline(total):
                # A few hundred bytes (an Action and its Command): verified and written
                # right here, which costs less than a hop to a thread and back.
                _verify(blobs)
                if blobs:
                    await put_missing(store, blobs)
            elif total <= _VERIFIED_HERE:
                # Checked right here, so storing them can go on beside the submission's
                # own commit (the scheduler queues the action once both are done).
                _verify(blobs)
                if blobs:
                    stored = asyncio.ensure_future(put_missing(store, blobs))
            else:
                await put_missing(store, blobs)
            op = await self._scheduler.submit(
                digest, priority=priority, skip_cache_lookup=skip, blobs=blobs,
                blobs_stored=stored,
            )
            if stored is not None:
                await stored
        except DigestMismatchError as exc:
            raise _ApiError(400, "digest_mismatch", str(exc)) from None
        except StoreFullError as exc:
            raise _ApiError(
                507, "store_full",
                f"no room for the request's blobs: {exc}; free disk space or lower the blob "
                "store's max_size",
            ) from None
        finally:
            if stored is not None:
                await asyncio.wait([stored])  # never left running
                if not stored.cancelled():
                    stored.exception()  # reported above, or superseded by another error
        if wait_s > 0 and not op.done:
            op = await self._scheduler.wait(
                op.name, min(wait_s, self._scheduler.config.max_long_poll_s)
            )
        return _answer(op.view())

    def _inline_blobs(self, value: Any) -> dict[Digest, bytes]:
        """The ``blobs`` of an execute request, decoded and checked against their sizes."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise _ApiError(
                400, "invalid_request",
                'blobs must be an object {"function/hash/size": "<base64 bytes>", ...}',
            )
        enabled = self._scheduler.runtime.digest_functions
        blobs: dict[Digest, bytes] = {}
        for text, encoded in value.items():
            try:
                digest = parse_digest(text)
            except ValueError as exc:
                raise _ApiError(400, "invalid_digest", f"blobs: {exc}") from None
            if digest.function not in enabled:
                raise _ApiError(
                    400, "unsupported_digest_function",
                    f"blob {digest} uses digest function {digest.function.value}, which this "
                    f"server does not enable; enabled: {', '.join(f.value for f in enabled)}",
                )
            try:
                if not isinstance(encoded, str):
                    raise TypeError(f"expected a base64 string, got {type(encoded).__name__}")
                data = binascii.a2b_base64(encoded, strict_mode=True)
            except (binascii.Error, TypeError, ValueError) as exc:
                raise _ApiError(
                    400, "invalid_request", f"blobs[{text!r}] is not valid base64: {exc}"
                ) from None
            if len(data) != digest.size:
                raise _ApiError(
                    400, "digest_mismatch",
                    f"blob {digest} arrived with {len(data)} bytes, its digest says "
                    f"{digest.size}; nothing was stored",
                )
            blobs[digest] = data
        return blobs

    @_translated
    async def get_operation(self, request: web.Request) -> web.Response:
        wait_s = _wait_seconds(request.query.get("wait_s", "0"), "?wait_s")
        wait_s = min(wait_s, self._scheduler.config.max_long_poll_s)
        op = await self._scheduler.wait(request.match_info["name"], wait_s)
        return _answer(op.view())

    @_translated
    async def cancel_operation(self, request: web.Request) -> web.Response:
        op = await self._scheduler.cancel(request.match_info["name"])
        return _answer(op.view())

    @_translated
    async def synchronize(self, request: web.Request) -> web.Response:
        raw = _json_object(await request.read(), "SyncRequest")
        try:
            sync = structure(raw, SyncRequest)
        except WireFormatError as exc:
            raise _ApiError(400, "invalid_request", f"{exc}; fix the worker's request") from None

        def is_connected() -> bool:
            transport = request.transport
            return transport is not None and not transport.is_closing()

        response = await self._scheduler.synchronize(
            sync, remote=request.remote or None, is_connected=is_connected
        )
        return _answer(response)

    @_translated
    async def status(self, request: web.Request) -> web.Response:
        status = self._scheduler.status()
        pool = self._scheduler.runtime.pool
        if pool is not None:
            loads = self._scheduler.worker_loads()
            status = attrs.evolve(status, pool=await pool_status(pool, loads))
        return _answer(status)


def _wait_seconds(value: Any, name: str) -> float:
    """A number of seconds to wait (a number or, in a query, its text), finite and >= 0."""
    wait_s = math.nan
    if not isinstance(value, bool):
        try:
            wait_s = float(value)
        except (TypeError, ValueError):
            pass
    if not math.isfinite(wait_s) or wait_s < 0:
        raise _ApiError(
            400, "invalid_request", f"{name}={value!r} must be a number of seconds >= 0"
        )
    return wait_s


def _verify(blobs: dict[Digest, bytes]) -> None:
    for digest, data in blobs.items():
        actual = digest_of(data, digest.function)
        if actual != digest:
            raise DigestMismatchError(digest, actual.hash, len(data))


