"""The native HTTP API: blobs (CAS), the action cache and health, served with aiohttp.

Routes (every error is JSON ``{"error": {"code": ..., "message": ...}}``):

- ``GET /healthz``: status, version, uptime, the blob store's stats and every health check
  (:mod:`rexcore.monitoring.health`); 503 when any check fails.
- ``GET /metrics``: the metrics in Prometheus text, with the ``prometheus`` exporter
  configured (:mod:`rexcore.monitoring.prometheus`).
- ``GET|HEAD|PUT /v1/cas/{function}/{hash}/{size}``: read (``?offset=&limit=``), probe,
  or upload one blob; uploads are verified against the address before they are stored.
- ``POST /v1/cas/find-missing``: ``{"digests": [...]}`` in, ``{"missing": [...]}`` out.
- ``GET|PUT /v1/chunks/{function}/{hash}/{size}``: one chunk of a chunked transfer (a blob
  of at most 16 MiB), plain or zstd as the ``Rex-Chunk-Encoding`` header says; a GET
  answers zstd when ``Rex-Accept-Chunk-Encoding: zstd`` asks and it pays. Verified first.
- ``GET|PUT /v1/manifests/{function}/{hash}/{size}``: a blob's chunk manifest
  (:mod:`rexcore.artifacts.transfer`). A PUT stores the blob made of its chunks, once all
  are present and they verify as the blob; a GET of a stored blob without one cuts it.
- ``GET|PUT /v1/ac/{function}/{hash}/{size}``: an action's cached ``ActionResult``.
- with the scheduler enabled, execution: ``POST /v1/execute``, ``GET /v1/operations/{id}``,
  ``POST /v1/operations/{id}/cancel``, ``POST /v1/workers/synchronize``, ``GET /v1/status``
  (:mod:`rexcore.scheduler.http`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import types
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs
import orjson
from aiohttp import web

from rexcore import __version__
from rexcore.artifacts.action_cache import MissingBlobsError
from rexcore.artifacts.chunk_store import (
    ManifestIndex,
    accept_chunk,
    splice_chunks,
    split_stored_blob,
)
from rexcore.artifacts.digest import Digest, DigestFunction, InvalidDigestError, parse_digest
from rexcore.artifacts.manifest import (
    REAPI_CHUNKING,
    BlobMismatchError,
    ChunkManifest,
    CorruptChunkError,
    InvalidManifestError,
    MissingChunksError,
)
from rexcore.artifacts.store import (
    BlobNotFoundError,
    BlobStore,
    DigestMismatchError,
    StorageError,
    StoreFullError,
)
from rexcore.artifacts.transfer import ChunkEncoding, ChunkPayload, encode_chunk
from rexcore.config.types import ByteSize, HostPort, parse_host_port
from rexcore.core.runtime import ServiceRuntime
from rexcore.monitoring.health import run_health_checks
from rexcore.plugins.descriptors import ComponentContext
from rexcore.protocol.auth import (
    BearerTokens,
    TokenFileError,
    is_loopback,
    load_tokens,
    tls_configured,
)
from rexcore.protocol.client import (
    ACCEPT_CHUNK_ENCODING_HEADER,
    CHUNK_ENCODING_HEADER,
    tune_malloc_for_streaming,
)
from rexcore.serialization.action_result import ActionResult
from rexcore.serialization.codec import WireFormatError, encode, structure

__all__ = [
    "NativeHttpError",
    "NativeHttpOptions",
    "NativeHttpProtocol",
    "create_app",
    "create_native_protocol",
]

_log = logging.getLogger(__name__)
_JSON = "application/json"
_OCTETS = "application/octet-stream"
# Uploads declaring at most this many bytes are read whole, then stored in one call.
_SMALL_BLOB = 1 << 20
# The largest chunk (FastCDC's max_size limit), and its body with zstd's worst-case growth.
_MAX_CHUNK = 16 << 20
_MAX_CHUNK_BODY = _MAX_CHUNK + (1 << 20)


class NativeHttpError(ValueError):
    """The native HTTP API is misused: a malformed ``listen`` address, a token file that
    cannot be used, no address yet."""


@attrs.frozen
class NativeHttpOptions:
    """Options of the ``native`` protocol (``[protocols.native]`` in rexd.toml)."""

    #: Where to listen, ``host:port``; port 0 picks a free port (see ``addresses``).
    listen: HostPort = attrs.field(default=HostPort("127.0.0.1:8981"))
    #: The most digests one ``find-missing`` request may ask about; clients split larger sets.
    max_find_missing: int = attrs.field(default=100_000, validator=attrs.validators.gt(0))
    #: The largest JSON request body (find-missing, action results); blobs are not limited.
    max_json_body: ByteSize = attrs.field(
        default=ByteSize(32 << 20), validator=attrs.validators.gt(ByteSize(0))
    )
    #: Bytes of a request body buffered per connection before reading from it pauses: a
    #: large buffer lets an upload reach the store in few, large writes.
    read_buffer: ByteSize = attrs.field(
        default=ByteSize(4 << 20), validator=attrs.validators.gt(ByteSize(0))
    )
    #: Seconds in-flight requests get to finish on stop before their connections are closed.
    shutdown_timeout: float = attrs.field(default=5.0, validator=attrs.validators.ge(0))
    #: Log every request to the ``aiohttp.access`` logger.
    access_log: bool = False
    #: File of bearer tokens, one per line: every request but ``GET /healthz`` and ``GET
    #: /metrics`` must carry ``Authorization: Bearer <token>`` with one of them, or with
    #: ``scheduler.join_token`` (what workers present). Empty: no token is asked for.
    auth_tokens_file: str = ""
    #: PEM certificate chain: with ``tls_key`` the API speaks HTTPS on ``listen`` (this
    #: rexd's own local workers then use a plain-HTTP listener on 127.0.0.1 of their own).
    tls_certificate: str = ""
    #: PEM private key of ``tls_certificate``.
    tls_key: str = attrs.field(default="", repr=False)


class _ApiError(Exception):
    """An error answer: HTTP status, a snake_case code, a message and optional fields."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra

    def response(self, headers: dict[str, str] | None = None) -> web.Response:
        return _error_response(self.status, self.code, self.message, headers, **self.extra)


def _error_response(
    status: int, code: str, message: str, headers: Any = None, **extra: Any
) -> web.Response:
    body = orjson.dumps({"error": {"code": code, "message": message, **extra}})
    return web.Response(status=status, body=body, content_type=_JSON, headers=headers)


def _json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type=_JSON)


_API_SHAPE = (
    "the native API serves GET /healthz, GET /metrics, GET|HEAD|PUT /v1/cas/{function}/{hash}/{size}, "
    "POST /v1/cas/find-missing, GET|PUT /v1/chunks/{function}/{hash}/{size}, "
    "GET|PUT /v1/manifests/{function}/{hash}/{size}, GET|PUT /v1/ac/{function}/{hash}/{size}, and with the "
    "scheduler POST /v1/execute, GET /v1/operations/{id}, POST /v1/operations/{id}/cancel, "
    "POST /v1/workers/synchronize and GET /v1/status"
)
_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
}


@web.middleware
async def _json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Turn every failure into a JSON error body; never an HTML page or a traceback."""
    try:
        return await handler(request)
    except _ApiError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "http_error")
        where = f"{request.method} {request.path}"
        extra: dict[str, Any] = {}
        if exc.status == 404:
            message = f"no route for {where}; {_API_SHAPE}"
        elif exc.status == 405:
            allowed = sorted(getattr(exc, "allowed_methods", ()))
            extra["allowed"] = allowed
            message = f"{where} is not allowed; use {', '.join(allowed)}"
        elif exc.status == 413:
            message = (
                f"the body of {where} is larger than this server accepts ({exc.text}); "
                "split the request or raise the server's max_json_body"
            )
        else:
            message = f"{where} failed: {exc.reason}"
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return _error_response(exc.status, code, message, allow, **extra)
    except web.RequestPayloadError as exc:
        return _error_response(
            400, "invalid_body", f"the request body of {request.path} is malformed: {exc}"
        )
    except ConnectionError as exc:
        # The client went away mid-request: routine, yet aiohttp would log it as a server
        # error with a traceback. The answer below is never delivered, only dropped.
        _log.debug("native HTTP API: client left %s %s: %s", request.method, request.path, exc)
        response = _error_response(400, "client_disconnected", f"connection lost: {exc}")
        response.force_close()
        return response
    except StorageError as exc:  # the store's messages name the cause and the remedy
        _log.exception("native HTTP API: %s %s failed in storage", request.method, request.path)
        return _error_response(500, "storage_error", str(exc))
    except Exception as exc:
        _log.exception("native HTTP API: %s %s failed", request.method, request.path)
        return _error_response(
            500,
            "internal_error",
            f"the server failed on {request.method} {request.path}: "
            f"{type(exc).__name__}: {exc}; see the rexd log for the traceback",
        )


class _InFlight:
    """Counts requests being handled, so ``stop`` can wait for them to finish.

    aiohttp's own graceful shutdown ignores request bytes that arrive once it has begun
    (aio-libs/aiohttp#2298), so an upload in progress could never complete under it. The
    protocol therefore closes its listening sockets, waits here while bodies still flow,
    and only then lets aiohttp close the connections.
    """

    def __init__(self) -> None:
        self.count = 0
        self.stopping = False
        self._idle = asyncio.Event()
        self._idle.set()

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if self.stopping:
            response = _error_response(
                503,
                "shutting_down",
                f"the server is stopping and takes no new requests; retry {request.method} "
                f"{request.path} once it is back",
            )
            response.force_close()
            return response
        self.count += 1
        self._idle.clear()
        try:
            return await handler(request)
        finally:
            self.count -= 1
            if not self.count:
                self._idle.set()

    async def drain(self, timeout: float) -> None:
        """Refuse new requests; wait up to ``timeout`` seconds for the running ones."""
        self.stopping = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)


_IN_FLIGHT = web.AppKey("rex_in_flight", _InFlight)


def _trusted_digest_maker() -> Callable[[DigestFunction, str, int], Digest] | None:
    """Build a Digest from parts a regex already validated, skipping ``Digest.__init__``.

    That constructor (frozen attrs plus its own hash check) costs ~3 us on these machines,
    60% of a cold find-missing of 10k digests; filling the slots directly costs ~0.5 us.
    Returns None (use the constructor) if Digest's layout is not the one this relies on.
    """
    names = ("function", "hash", "size")
    layout = set(getattr(Digest, "__slots__", ())) - {"__weakref__"}
    slots = [Digest.__dict__.get(name) for name in names]
    if (
        Digest.__mro__ != (Digest, object)
        or layout != set(names)
        or [field.name for field in attrs.fields(Digest)] != list(names)
        or not all(isinstance(slot, types.MemberDescriptorType) for slot in slots)
    ):
        return None  # e.g. a cached-hash slot that __init__ would have to fill
    set_function, set_hash, set_size = (slot.__set__ for slot in slots)  # type: ignore[union-attr]
    new = object.__new__

    def make(function: DigestFunction, hash_: str, size: int) -> Digest:
        digest = new(Digest)
        set_function(digest, function)
        set_hash(digest, hash_)
        set_size(digest, size)
        return digest

    try:  # the same value, hash and text as the constructor gives, or not used at all
        sample = DigestFunction.SHA256.empty
        made = make(sample.function, sample.hash, sample.size)
        if made != sample or hash(made) != hash(sample) or str(made) != str(sample):
            return None
    except (TypeError, ValueError, AttributeError):
        return None
    return make


class _DigestParser:
    """Parses the canonical ``function/hash/size`` strings of find-missing, fast.

    Build tools ask about the same inputs over and over, so parsed digests are remembered
    (a dict, emptied when full: cheaper per hit than an LRU). Anything not canonical, or
    of a function the server does not enable, raises; the caller then takes the slow,
    precise path.
    """

    def __init__(self, functions: frozenset[DigestFunction], max_cached: int = 1 << 17) -> None:
        names = "|".join(sorted(re.escape(f.value) for f in functions))
        self._match = re.compile(rf"({names})/([0-9a-f]{{64}})/(0|[1-9][0-9]{{0,18}})").fullmatch
        self._functions = {f.value: f for f in functions}
        self._make = _trusted_digest_maker() or Digest
        self._cache: dict[str, Digest] = {}
        self._max_cached = max_cached

    def parse_all(self, texts: list[Any]) -> list[Digest]:
        cache = self._cache
        get = cache.get
        if len(cache) + len(texts) > self._max_cached:
            cache.clear()
        digests: list[Digest] = []
        append = digests.append
        for text in texts:
            digest = get(text)  # TypeError on an unhashable entry
            if digest is None:
                match = self._match(text)  # TypeError on a non-string
                if match is None:
                    raise ValueError(text)
                function, hash_, size = match.groups()
                digest = cache[text] = self._make(self._functions[function], hash_, int(size))
            append(digest)
        return digests


class _NativeApi:
    """The handlers, bound to one runtime."""

    def __init__(self, runtime: ServiceRuntime, options: NativeHttpOptions) -> None:
        self._runtime = runtime
        self._store: BlobStore = runtime.blob_store
        self._options = options
        self._functions = frozenset(runtime.digest_functions)
        self._digests = _DigestParser(self._functions)
        self._manifests = ManifestIndex(runtime.data_dir / "manifests")

    # -- addresses ------------------------------------------------------------------------

    def _check_function(self, digest: Digest, where: str) -> Digest:
        if digest.function not in self._functions:
            enabled = ", ".join(f.value for f in self._runtime.digest_functions)
            raise _ApiError(
                400,
                "unsupported_digest_function",
                f"{where} uses digest function {digest.function.value}, which this server "
                f"does not enable; enabled: {enabled}",
            )
        return digest

    def _address(self, request: web.Request) -> Digest:
        info = request.match_info
        text = f"{info['function']}/{info['hash']}/{info['size']}"
        try:
            digest = parse_digest(text)
        except ValueError as exc:  # int() of odd Unicode digits raises plain ValueError
            raise _ApiError(
                400,
                "invalid_digest",
                f"{request.path} is not a valid blob address: {exc}; "
                "use /{function}/{64 lowercase hex}/{size in bytes}",
            ) from None
        return self._check_function(digest, request.path)

    def _parse_text(self, text: Any) -> Digest:
        if not isinstance(text, str):
            raise InvalidDigestError(f"expected a string function/hash/size, got {text!r}")
        return self._check_function(parse_digest(text), f"digest {text!r}")

    def _parse_many(self, texts: list[Any]) -> tuple[list[Digest], bool]:
        """The digests, and whether every text was canonical (so it equals ``str(digest)``)."""
        try:
            return self._digests.parse_all(texts), True
        except (ValueError, TypeError, KeyError):
            pass
        for index, text in enumerate(texts):  # slow path only to name the bad entry
            try:
                self._parse_text(text)
            except (ValueError, _ApiError) as exc:
                cause = exc.message if isinstance(exc, _ApiError) else str(exc)
                raise _ApiError(
                    400,
                    "invalid_digest",
                    f"digests[{index}] is invalid: {cause}",
                    index=index,
                    digest=text if isinstance(text, str) else repr(text),
                ) from None
        # Only the fast path refused them (e.g. "SHA256/..." or a size with leading zeros).
        return [self._parse_text(text) for text in texts], False

    # -- health ---------------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        """200 and ``"status": "ok"`` while every health check passes, else 503."""
        report = await run_health_checks(getattr(self._runtime, "health_checks", ()))
        return _json_response(
            {
                "status": "ok" if report.healthy else "unhealthy",
                "version": __version__,
                "uptime_s": round(time.time() - self._runtime.started_at, 3),
                "blob_store": attrs.asdict(self._store.stats()),
                "digest_functions": [f.value for f in self._runtime.digest_functions],
                "checks": report.checks,
            },
            status=200 if report.healthy else 503,
        )

    async def metrics(self, request: web.Request) -> web.Response:
        """The metrics as the configured scraped exporter (``prometheus``) renders them."""
        collector = getattr(self._runtime, "metrics", None)
        scraped = await collector.scrape() if collector is not None else None
        if scraped is None:
            raise _ApiError(
                404, "metrics_not_enabled",
                "this rexd exports no metrics at /metrics; add the prometheus exporter: "
                '[metrics] exporters = [{name = "prometheus"}] in rexd.toml',
            )
        body, content_type = scraped
        return web.Response(body=body, headers={"Content-Type": content_type})

    # -- CAS ------------------------------------------------------------------------------

    async def head_blob(self, request: web.Request) -> web.Response:
        digest = self._address(request)
        if not await self._store.contains(digest):
            raise _blob_not_found(digest)
        return web.Response(
            status=200, headers={"Content-Length": str(digest.size), "Content-Type": _OCTETS}
        )

    async def get_blob(self, request: web.Request) -> web.StreamResponse:
        digest = self._address(request)
        offset, limit = _read_range(request, digest)
        if digest.is_empty:
            return web.Response(body=b"", content_type=_OCTETS)
        store = self._store
        with store.pin([digest]):
            if not await store.contains(digest):
                raise _blob_not_found(digest)
            path = store.local_path(digest) if offset == 0 and limit is None else None
            if path is not None:
                # FileResponse sends with sendfile(2); the pin keeps the file from eviction
                # until it is open (prepare opens it and sends it all).
                response: web.StreamResponse = _SentFileResponse(
                    path, headers={"Content-Type": _OCTETS}
                )
                await response.prepare(request)
                return response
            return await self._stream_blob(request, digest, offset, limit)

    async def _stream_blob(
        self, request: web.Request, digest: Digest, offset: int, limit: int | None
    ) -> web.StreamResponse:
        length = digest.size - offset if limit is None else min(limit, digest.size - offset)
        chunks = aiter(self._store.read(digest, offset, limit))
        # Read the first chunk before sending headers, so a vanished blob is still a 404.
        try:
            first = await anext(chunks, b"")
        except BlobNotFoundError:
            raise _blob_not_found(digest) from None
        response = web.StreamResponse(headers={"Content-Type": _OCTETS})
        response.content_length = length
        await response.prepare(request)
        if first:
            await response.write(first)
        async for chunk in chunks:
            await response.write(chunk)
        await response.write_eof()
        return response

    async def put_blob(self, request: web.Request) -> web.Response:
        digest = self._address(request)
        declared = request.content_length
        if declared is not None and declared != digest.size:
            raise _ApiError(
                400,
                "content_length_mismatch",
                f"Content-Length is {declared} but {request.path} says the blob has "
                f"{digest.size} bytes; send exactly the blob's bytes",
            )
        store = self._store
        if digest.is_empty or await store.contains(digest):
            await _drain(request.content)  # content-addressed: the bytes we hold are the same
            return _json_response({"digest": str(digest), "stored": False}, status=200)
        try:
            if declared is not None and declared <= _SMALL_BLOB:
                # Whole, then stored in one go: a blob store writes small blobs cheaper so.
                await store.put(digest, await _read_body(request.content, digest))
            else:
                async with store.open_write(digest) as writer:
                    await _copy_body(request.content, writer.write, digest)
        except DigestMismatchError as exc:
            raise _ApiError(400, "digest_mismatch", str(exc)) from None
        except StoreFullError as exc:
            raise _ApiError(
                507,
                "store_full",
                f"no room for blob {digest} ({digest.size} bytes): {exc}; nothing was stored. "
                "Free disk space or lower the blob store's max_size",
            ) from None
        return _json_response({"digest": str(digest), "stored": True}, status=201)

    async def find_missing(self, request: web.Request) -> web.Response:
        body = await request.read()
        started = time.perf_counter()
        doc = _json_object(body, "find-missing request")
        texts = doc.get("digests")
        unexpected = sorted(doc.keys() - {"digests"})
        if not isinstance(texts, list) or unexpected:
            cause = f"unexpected keys {unexpected}" if unexpected else "no digests list"
            raise _ApiError(
                400,
                "invalid_request",
                f"the find-missing body has {cause}; send "
                '{"digests": ["function/hash/size", ...]}',
            )
        limit = self._options.max_find_missing
        if len(texts) > limit:
            raise _ApiError(
                413,
                "too_many_digests",
                f"find-missing got {len(texts)} digests, this server answers at most {limit} "
                "per request; split the request",
                max_digests=limit,
            )
        digests, canonical = self._parse_many(texts)
        missing = await self._store.find_missing(digests)
        answer = _texts_of(missing, digests, texts) if canonical else [str(d) for d in missing]
        response = _json_response({"missing": answer})
        # Server time without the network, for benchmarks and for tracing slow builds.
        elapsed_ms = (time.perf_counter() - started) * 1000
        response.headers["Server-Timing"] = f"app;dur={elapsed_ms:.3f}"
        return response

    # -- chunked transfer -----------------------------------------------------------------

    async def put_chunk(self, request: web.Request) -> web.Response:
        digest = self._address(request)
        if digest.size > _MAX_CHUNK:
            raise _ApiError(
                413,
                "chunk_too_large",
                f"chunk {digest} has {digest.size} bytes, chunks have at most {_MAX_CHUNK}; "
                "upload a blob this large with PUT /v1/cas/...",
            )
        text = request.headers.get(CHUNK_ENCODING_HEADER, ChunkEncoding.IDENTITY.value)
        try:
            encoding = ChunkEncoding(text.strip().lower())
        except ValueError:
            served = ", ".join(e.value for e in ChunkEncoding)
            raise _ApiError(
                400,
                "unsupported_chunk_encoding",
                f"{CHUNK_ENCODING_HEADER}: {text!r} is not served; use one of {served}",
            ) from None
        data = await _read_capped(request.content, _MAX_CHUNK_BODY, f"chunk {digest}")
        try:
            stored = await accept_chunk(self._store, digest, ChunkPayload(encoding, data))
        except CorruptChunkError as exc:
            raise _ApiError(400, "corrupt_chunk", str(exc), digest=str(digest)) from None
        except StoreFullError as exc:
            raise _store_full(digest, exc) from None
        return _json_response({"digest": str(digest), "stored": stored}, 201 if stored else 200)

    async def get_chunk(self, request: web.Request) -> web.Response:
        digest = self._address(request)
        if digest.size > _MAX_CHUNK:
            raise _ApiError(
                400,
                "chunk_too_large",
                f"{digest} is larger than any chunk ({_MAX_CHUNK} bytes); read it with "
                "GET /v1/cas/...",
            )
        try:
            data = await self._store.get(digest)
        except BlobNotFoundError:
            raise _ApiError(
                404,
                "chunk_not_found",
                f"chunk {digest} is not in the store; upload the blob it belongs to again",
                digest=str(digest),
            ) from None
        accepted = request.headers.get(ACCEPT_CHUNK_ENCODING_HEADER, "").lower()
        if ChunkEncoding.ZSTD.value in (token.strip() for token in accepted.split(",")):
            payload = await asyncio.to_thread(encode_chunk, data)
        else:
            payload = ChunkPayload(ChunkEncoding.IDENTITY, data)
        return web.Response(
            body=payload.data,
            content_type=_OCTETS,
            headers={CHUNK_ENCODING_HEADER: payload.encoding.value},
        )

    async def put_manifest(self, request: web.Request) -> web.Response:
        blob = self._address(request)
        try:
            manifest = ChunkManifest.from_json(await request.read())
        except InvalidManifestError as exc:
            raise _ApiError(400, "invalid_manifest", f"{exc}; nothing was stored") from None
        if manifest.blob != blob:
            raise _ApiError(
                400,
                "invalid_manifest",
                f"the manifest sent to {request.path} is the manifest of {manifest.blob}; "
                "send it to its own blob's address. Nothing was stored",
            )
        try:
            stored = await splice_chunks(self._store, blob, manifest.chunks)
        except MissingChunksError as exc:
            raise _ApiError(
                400,
                "missing_chunks",
                f"{exc}; PUT them to /v1/chunks/... first. Nothing was stored",
                missing=[str(d) for d in exc.missing],
            ) from None
        except InvalidManifestError as exc:
            raise _ApiError(400, "invalid_manifest", str(exc)) from None
        except BlobMismatchError as exc:
            raise _ApiError(400, "blob_mismatch", f"{exc}. Nothing was stored") from None
        except StoreFullError as exc:
            raise _store_full(blob, exc) from None
        if len(manifest.chunks) > 1:
            await self._manifests.put(manifest)
        return _json_response(
            {"blob": str(blob), "chunks": len(manifest.chunks), "stored": stored},
            201 if stored else 200,
        )

    async def get_manifest(self, request: web.Request) -> web.Response:
        blob = self._address(request)
        known = await self._manifests.get(blob)
        if known is not None and not await self._store.find_missing(list(set(known.chunks))):
            return web.Response(body=known.to_json(), content_type=_JSON)
        try:
            # Cutting the stored blob (again) restores evicted chunks too.
            manifest = await split_stored_blob(
                self._store, blob, known.params if known is not None else REAPI_CHUNKING
            )
        except BlobNotFoundError:
            if known is not None:  # the client's find-missing names the chunks that are gone
                return web.Response(body=known.to_json(), content_type=_JSON)
            raise _ApiError(
                404,
                "manifest_not_found",
                f"blob {blob} is not in the store, whole or chunked; upload it first",
                digest=str(blob),
            ) from None
        except BlobMismatchError as exc:
            raise _ApiError(500, "blob_corrupt", str(exc), digest=str(blob)) from None
        if len(manifest.chunks) > 1 and manifest != known:
            await self._manifests.put(manifest)
        return web.Response(body=manifest.to_json(), content_type=_JSON)

    # -- action cache ---------------------------------------------------------------------

    async def get_action_result(self, request: web.Request) -> web.Response:
        digest = self._address(request)
        result = await self._runtime.action_cache.get(digest)
        if result is None:
            raise _ApiError(
                404,
                "action_result_not_found",
                f"no cached result for action {digest} (never stored, or its output blobs "
                "are gone); execute the action",
                digest=str(digest),
            )
        return web.Response(body=encode(result), content_type=_JSON)

    async def put_action_result(self, request: web.Request) -> web.Response:
        digest = self._address(request)
        raw = _json_object(await request.read(), "ActionResult")
        try:
            result = structure(raw, ActionResult)
        except WireFormatError as exc:
            raise _ApiError(400, "invalid_action_result", f"{exc}; fix the document") from None
        try:
            await self._runtime.action_cache.put(digest, result)
        except MissingBlobsError as exc:
            missing = [str(d) for d in exc.missing]
            raise _ApiError(
                400,
                "missing_blobs",
                f"the result of action {digest} refers to {len(missing)} blob(s) the CAS "
                "does not hold; upload them first (PUT /v1/cas/...), then store the result",
                missing=missing,
            ) from None
        return web.Response(body=encode(result), content_type=_JSON)


class _SentFileResponse(web.FileResponse):
    """A FileResponse its handler sends (to open the file inside a pin).

    aiohttp prepares every returned response once more; FileResponse would then open and
    send the file a second time, so a repeat ``prepare`` does nothing here.
    """

    async def prepare(self, request: web.BaseRequest) -> Any:
        if self.prepared:
            return None
        return await super().prepare(request)


def _texts_of(missing: list[Digest], digests: list[Digest], texts: list[Any]) -> list[str]:
    """The request's canonical strings for ``missing``: formatting 10k digests costs ~5 ms.

    Stores return the very objects they were given, in input order; walking both lists by
    identity finds their texts in one cheap pass. Any other answer is formatted instead.
    """
    found: list[str] = []
    if not missing:
        return found
    want, count = missing[0], len(missing)
    for digest, text in zip(digests, texts):
        if digest is want:
            found.append(text)
            if len(found) == count:
                return found
            want = missing[len(found)]
    return [str(digest) for digest in missing]


def _store_full(digest: Digest, exc: StoreFullError) -> _ApiError:
    return _ApiError(
        507,
        "store_full",
        f"no room for blob {digest} ({digest.size} bytes): {exc}; nothing was stored. "
        "Free disk space or lower the blob store's max_size",
    )


def _blob_not_found(digest: Digest) -> _ApiError:
    return _ApiError(
        404,
        "blob_not_found",
        f"blob {digest} is not in the store; upload it with PUT /v1/cas/{digest}",
        digest=str(digest),
    )


def _json_object(body: bytes, what: str) -> dict[str, Any]:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _ApiError(400, "invalid_json", f"the {what} body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise _ApiError(
            400, "invalid_json", f"the {what} body must be a JSON object, got {type(doc).__name__}"
        )
    return doc


def _read_range(request: web.Request, digest: Digest) -> tuple[int, int | None]:
    query = request.query
    values: list[int | None] = []
    for name in ("offset", "limit"):
        text = query.get(name)
        if text is None:
            values.append(None)
        elif text.isascii() and text.isdigit():
            values.append(int(text))
        else:
            raise _ApiError(
                400, "invalid_range", f"?{name}={text!r} must be a whole number of bytes"
            )
    offset, limit = values[0] or 0, values[1]
    if offset > digest.size:
        raise _ApiError(
            416,
            "range_not_satisfiable",
            f"offset {offset} is past the end of blob {digest} ({digest.size} bytes)",
        )
    return offset, limit


async def _drain(content: Any) -> None:
    while await content.readany():
        pass


async def _read_body(content: Any, digest: Digest) -> bytes:
    """A small request body in memory, stopping at the first excess byte."""
    chunks: list[bytes] = []
    total = 0
    while chunk := await content.readany():
        total += len(chunk)
        if total > digest.size:
            raise DigestMismatchError(digest, "", total)
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _read_capped(content: Any, limit: int, what: str) -> bytes:
    """A request body in memory, refused (413) once it passes ``limit`` bytes."""
    chunks: list[bytes] = []
    total = 0
    while chunk := await content.readany():
        total += len(chunk)
        if total > limit:
            raise _ApiError(
                413,
                "request_too_large",
                f"the body of {what} passed {limit} bytes; chunks are at most 16 MiB",
            )
        chunks.append(chunk)
    return b"".join(chunks)


async def _copy_body(
    content: Any, write: Callable[[bytes], Awaitable[None]], digest: Digest
) -> None:
    """Stream the request body into the store, stopping at the first excess byte.

    Each ``readany`` hands over everything buffered so far in one piece (the read buffer is
    ``read_buffer`` bytes); the store batches small pieces itself, so no further copy here.
    """
    total = 0
    while chunk := await content.readany():
        total += len(chunk)
        if total > digest.size:
            # Only a chunked upload gets here (Content-Length was checked); stop reading.
            raise DigestMismatchError(digest, "", total)
        await write(chunk)


#: What anyone may ask without a token: probes and scrapes.
_OPEN_ROUTES = frozenset({("GET", "/healthz"), ("GET", "/metrics")})


def _token_check(tokens: BearerTokens) -> Any:
    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if (request.method, request.path) in _OPEN_ROUTES or tokens.accepts(
                request.headers.get("Authorization")):
            return await handler(request)
        why = ("a wrong token" if "Authorization" in request.headers
               else "no Authorization header")
        return _error_response(
            401, "unauthenticated",
            f"this rex server requires 'Authorization: Bearer <token>' ({request.method} "
            f"{request.path} had {why}); clients pass it with `rex --token` or REX_TOKEN, "
            "workers present scheduler.join_token",
            {"WWW-Authenticate": "Bearer"})
    return middleware


def create_app(
    runtime: ServiceRuntime, options: NativeHttpOptions | None = None,
    tokens: BearerTokens | None = None,
) -> web.Application:
    """The aiohttp application serving the native API over ``runtime``; with ``tokens``,
    every request but the open routes must present one of them."""
    options = options or NativeHttpOptions()
    api = _NativeApi(runtime, options)
    in_flight = _InFlight()
    middlewares = [in_flight.middleware, _json_errors]
    if tokens is not None:
        middlewares.insert(1, _token_check(tokens))
    app = web.Application(middlewares=middlewares, client_max_size=options.max_json_body)
    app[_IN_FLIGHT] = in_flight
    blob = "/v1/cas/{function}/{hash}/{size}"
    action = "/v1/ac/{function}/{hash}/{size}"
    app.router.add_get("/healthz", api.healthz, allow_head=False)
    app.router.add_get("/metrics", api.metrics, allow_head=False)
    app.router.add_post("/v1/cas/find-missing", api.find_missing)
    app.router.add_get(blob, api.get_blob, allow_head=False)
    app.router.add_head(blob, api.head_blob)
    app.router.add_put(blob, api.put_blob)
    chunk = "/v1/chunks/{function}/{hash}/{size}"
    manifest = "/v1/manifests/{function}/{hash}/{size}"
    app.router.add_get(chunk, api.get_chunk, allow_head=False)
    app.router.add_put(chunk, api.put_chunk)
    app.router.add_get(manifest, api.get_manifest, allow_head=False)
    app.router.add_put(manifest, api.put_manifest)
    app.router.add_get(action, api.get_action_result, allow_head=False)
    app.router.add_put(action, api.put_action_result)
    scheduler = getattr(runtime, "scheduler", None)
    if scheduler is not None:
        from rexcore.scheduler.http import add_scheduler_routes  # it imports this module

        add_scheduler_routes(app, scheduler)
    return app


def _format_address(sockname: Sequence[Any]) -> str:
    host, port = sockname[0], sockname[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class NativeHttpProtocol:
    """The native HTTP API as a protocol adapter: ``await start()``, ``await stop()``."""

    def __init__(
        self, options: NativeHttpOptions, context: ComponentContext, runtime: ServiceRuntime
    ) -> None:
        try:
            self._host, self._port = parse_host_port(options.listen)
        except ValueError as exc:
            raise NativeHttpError(f"native HTTP API: bad listen address: {exc}") from None
        self._tokens: BearerTokens | None = None
        if options.auth_tokens_file:
            try:
                accepted = set(load_tokens(options.auth_tokens_file))
            except TokenFileError as exc:
                raise NativeHttpError(f"native HTTP API: {exc}") from None
            join_token = runtime.config.scheduler.join_token
            if runtime.config.scheduler.enabled and not join_token:
                raise NativeHttpError(
                    "native HTTP API: auth_tokens_file needs scheduler.join_token as well: "
                    "workers present the join token on every request")
            if join_token:
                accepted.add(join_token)
            self._tokens = BearerTokens(accepted)
        self._ssl = _server_ssl(options.tls_certificate, options.tls_key)
        self.scheme = "https" if self._ssl is not None else "http"
        self._local_socket: Any = None
        self.options = options
        self.context = context
        self.runtime = runtime
        self._runner: web.AppRunner | None = None
        self._in_flight = _InFlight()

    async def start(self) -> None:
        """Listen and serve; raises OSError when the address cannot be bound."""
        if self._runner is not None:
            return
        tune_malloc_for_streaming()
        app = create_app(self.runtime, self.options, self._tokens)
        self._in_flight = app[_IN_FLIGHT]
        runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=logging.getLogger("aiohttp.access") if self.options.access_log else None,
            # Requests had their time in stop(); what still runs then is stuck.
            shutdown_timeout=min(self.options.shutdown_timeout, 1.0),
            read_bufsize=self.options.read_buffer,
        )
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port, ssl_context=self._ssl)
        try:
            await site.start()
            if self._ssl is not None:
                # This rexd's own workers connect over loopback, where a certificate made
                # for the public name would not verify: a plain listener of their own.
                import socket

                local = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                local.bind(("127.0.0.1", 0))
                local.listen(128)
                self._local_socket = local
                await web.SockSite(runner, local).start()
        except OSError:  # its message names the address and the cause; rexd adds the remedy
            await runner.cleanup()
            raise
        self._runner = runner
        _log.info("native HTTP API listening on %s (%s, %s)", ", ".join(self.addresses),
                  "HTTPS" if self._ssl is not None else "plain HTTP",
                  "bearer tokens required" if self._tokens else "no client authentication")
        if self._tokens is None and not is_loopback(self._host):
            _log.warning(
                "the native HTTP API listens on %s with no client authentication: anyone "
                "who can reach it can run commands on the workers and write the cache. Set "
                "[protocols.native] auth_tokens_file (and scheduler.join_token), or listen "
                "on 127.0.0.1", self.options.listen)

    async def stop(self) -> None:
        """Stop accepting, give in-flight requests ``shutdown_timeout`` seconds, then close."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        for site in list(runner.sites):
            await site.stop()  # closes the listening sockets only
        await self._in_flight.drain(self.options.shutdown_timeout)
        await runner.cleanup()

    @property
    def addresses(self) -> list[str]:
        """The bound ``host:port`` addresses (the real port when ``listen`` asked for 0)."""
        if self._runner is None:
            return []
        local = self._local_socket.getsockname() if self._local_socket is not None else None
        return [
            _format_address(name)
            for name in self._runner.addresses
            if isinstance(name, tuple) and len(name) >= 2 and tuple(name[:2]) != local
        ]

    @property
    def local_url(self) -> str:
        """The URL this rexd's own (local) workers use: the API itself, or with TLS the
        plain listener on 127.0.0.1 kept for them."""
        if self._local_socket is not None:
            return f"http://{_format_address(self._local_socket.getsockname())}"
        return self.url

    @property
    def url(self) -> str:
        """``http(s)://host:port`` of the first bound address (raises before ``start``)."""
        addresses = self.addresses
        if not addresses:
            raise NativeHttpError("native HTTP API is not listening; call start() first")
        return f"{self.scheme}://{addresses[0]}"


def _server_ssl(certificate: str, key: str) -> Any:
    """The server's TLS context, or None without a certificate."""
    try:
        if not tls_configured(certificate, key):
            return None
    except ValueError as exc:
        raise NativeHttpError(f"native HTTP API: {exc}") from None
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certificate, key)
    except (OSError, ssl.SSLError) as exc:
        raise NativeHttpError(f"native HTTP API: cannot load tls_certificate {certificate} "
                              f"with tls_key {key}: {exc}") from None
    return context


def create_native_protocol(
    options: NativeHttpOptions, context: ComponentContext, runtime: ServiceRuntime
) -> NativeHttpProtocol:
    """The ``native`` protocol descriptor's factory."""
    return NativeHttpProtocol(options, context, runtime)
