"""The Python client of the native HTTP API, used by the ``rex`` CLI and by workers.

::

    async with RexClient(resolve_server(None)) as client:
        digest = await client.upload_file("big.tar")
        await client.download_file(digest, "copy.tar")

Files of :data:`CHUNKED_MIN_SIZE` bytes or more move as content-defined chunks through
manifests (:class:`~rexcore.artifacts.transfer.TransferManager` over
:class:`HttpChunkRemote`): only the chunks the other side lacks travel, so an edited file
re-sends what the edit touched, and an interrupted transfer resumes where it stopped.

Every failure is a :class:`RexClientError`; its message names the server, the cause and
what to do next.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import ctypes
import hashlib
import os
import secrets
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Literal, NoReturn, Self

import aiohttp
import blake3
import orjson
from yarl import URL

from rexcore.artifacts.chunking import chunk_file
from rexcore.artifacts.digest import Digest, DigestFunction, parse_digest
from rexcore.artifacts.manifest import (
    REAPI_CHUNKING,
    BlobMismatchError,
    ChunkManifest,
    CorruptChunkError,
    InvalidManifestError,
    ManifestNotFoundError,
    MissingChunksError,
    TransferError,
)
from rexcore.artifacts.transfer import (
    ChunkEncoding,
    ChunkPayload,
    TransferManager,
    TransferOptions,
)
from rexcore.serialization.action_result import ActionResult
from rexcore.serialization.codec import WireFormatError, decode, encode
from rexcore.serialization.operation import OperationView, SchedulerStatus
from rexcore.serialization.worker_protocol import SyncRequest, SyncResponse

__all__ = [
    "ACCEPT_CHUNK_ENCODING_HEADER",
    "CHUNKED_MIN_SIZE",
    "CHUNK_ENCODING_HEADER",
    "DEFAULT_SERVER",
    "INLINE_BLOB_LIMIT",
    "BlobNotFound",
    "DigestMismatch",
    "HttpChunkRemote",
    "InvalidAction",
    "MissingBlobs",
    "NotAuthorized",
    "OperationNotFound",
    "Progress",
    "ResourceExhausted",
    "RexClient",
    "RexClientError",
    "ServerUnavailable",
    "StoreFull",
    "resolve_server",
    "tune_malloc_for_streaming",
]

DEFAULT_SERVER = "http://127.0.0.1:8981"
#: ``progress(done_bytes, total_bytes)``, called as a transfer moves on.
Progress = Callable[[int, int], None]

# Files move in slices this large: few thread hops per file, bounded memory per transfer.
_CHUNK = 4 << 20
# Digests per find-missing request; servers accept 100k by default.
_FIND_MISSING_BATCH = 50_000
#: The most bytes of blobs :meth:`RexClient.execute` sends inline (as base64 in its JSON
#: body); larger sets go up with PUTs first.
INLINE_BLOB_LIMIT = 1 << 20
#: Files (and blobs) this large or larger move as chunks through manifests. Chunking starts
#: to pay once a file spans several chunks: below that the extra round trips, and the
#: server writing the blob a second time when it splices the chunks, cost more than an
#: edit can save. Four of the largest REAPI chunks (2 MiB each).
CHUNKED_MIN_SIZE = 4 * REAPI_CHUNKING.max_size
#: How a chunk's bytes travel (``identity`` or ``zstd``), on a chunk PUT and a GET's answer.
CHUNK_ENCODING_HEADER = "Rex-Chunk-Encoding"
#: The encodings a chunk GET accepts (``zstd``); the server compresses only when it pays.
ACCEPT_CHUNK_ENCODING_HEADER = "Rex-Accept-Chunk-Encoding"


class RexClientError(Exception):
    """A call to the rex server failed; ``status`` is the HTTP status (None if none came)."""

    def __init__(self, message: str, *, status: int | None = None, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class ServerUnavailable(RexClientError):
    """No rex server answers at the URL."""


class BlobNotFound(RexClientError):
    """The server does not hold the blob."""


class DigestMismatch(RexClientError):
    """Bytes did not match their digest (on the server's side or on download)."""


class MissingBlobs(RexClientError):
    """An action result refers to blobs the server does not hold; ``missing`` lists them."""

    def __init__(self, message: str, missing: list[Digest], **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.missing = missing


class StoreFull(RexClientError):
    """The server has no room for the blob."""


class ResourceExhausted(RexClientError):
    """The server is at a limit (its queue is full); retry later."""


class OperationNotFound(RexClientError):
    """The server knows no operation of that name (never, or no longer)."""


class InvalidAction(RexClientError):
    """The action or its command breaks the rules (a ``..`` output path...)."""


class NotAuthorized(RexClientError):
    """The server refused a worker: wrong or missing join token, or not on loopback."""


_ERRORS_BY_CODE: dict[str, type[RexClientError]] = {
    "blob_not_found": BlobNotFound,
    "digest_mismatch": DigestMismatch,
    "store_full": StoreFull,
    "resource_exhausted": ResourceExhausted,
    "operation_not_found": OperationNotFound,
    "invalid_argument": InvalidAction,
    "unauthenticated": NotAuthorized,
    "permission_denied": NotAuthorized,
}


def tune_malloc_for_streaming() -> bool:
    """Keep glibc from returning transfer buffers to the kernel after every chunk.

    Moving a blob through Python allocates and frees buffers of 256 KiB to a few MiB per
    chunk; with glibc's defaults each one is handed back to the kernel and faulted in
    again (measured on 2 cores, 64 MiB blobs: 7x fewer page faults, PUT 230 -> 300 MB/s,
    GET 270 -> 370 MB/s). Freed memory up to 128 MiB then stays with the process.
    Process-wide: call it once at the start of a process that moves blobs (rexd, rex,
    workers). Returns whether it applied (only on glibc).
    """
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):  # musl, macOS, Windows: leave them be
            return False
        mallopt = ctypes.CDLL(None).mallopt
    except (ValueError, OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # from <malloc.h>
    settings = ((m_mmap_threshold, 16 << 20), (m_trim_threshold, 128 << 20), (m_top_pad, 16 << 20))
    return all(mallopt(option, value) == 1 for option, value in settings)


def resolve_server(explicit: str | None) -> str:
    """The server URL: ``explicit`` (``--server``), else ``$REX_SERVER``, else the default.

    ``host:port`` without a scheme means ``http://host:port``.
    """
    value = (explicit or os.environ.get("REX_SERVER") or DEFAULT_SERVER).strip()
    if "://" not in value:
        value = f"http://{value}"
    try:
        url = URL(value)
        valid = url.scheme in ("http", "https") and bool(url.host) and url.port is not None
    except ValueError:
        valid = False
    if not valid:
        raise RexClientError(
            f"server address {value!r} is not http://HOST:PORT or HOST:PORT; "
            "fix --server or REX_SERVER"
        )
    return str(url).rstrip("/")


class RexClient:
    """An async client of one rex server; use as ``async with RexClient(url) as client``.

    ``timeout`` is the seconds allowed to connect and the longest the server may stay
    silent in the middle of a response; transfers as such have no deadline. ``token``,
    when given, goes with every request as ``Authorization: Bearer <token>`` (a server
    with ``auth_tokens_file`` asks for it; a worker presents its join token).
    ``ca_file``: PEM certificates to trust for an ``https://`` server, instead of the
    system's (a server whose certificate a private CA signed).
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 60.0,
        chunked_min_size: int = CHUNKED_MIN_SIZE,
        transfer: TransferOptions | None = None,
        token: str = "",
        ca_file: str = "",
    ) -> None:
        self.base_url = base_url.rstrip("/")
        if token and not (token.isascii() and token.isprintable() and " " not in token):
            raise RexClientError("the token must be printable ASCII without spaces")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._ssl: Any = True  # aiohttp: verify with the system's trust store
        if ca_file:
            import ssl

            try:
                self._ssl = ssl.create_default_context(cafile=ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise RexClientError(f"cannot use the CA file {ca_file}: {exc}") from None
        #: Files and blobs at least this large move as chunks (see the module docs).
        self.chunked_min_size = max(chunked_min_size, REAPI_CHUNKING.max_size)
        self.transfer = transfer or TransferOptions()
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=timeout, sock_connect=timeout, sock_read=timeout
        )
        self._session: aiohttp.ClientSession | None = None
        #: The lean path of synchronize calls; False where it does not apply (https).
        self._lean: _LeanCalls | Literal[False] | None = None

    async def __aenter__(self) -> Self:
        self._open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout,
                headers=self._headers,
                connector=aiohttp.TCPConnector(ssl=self._ssl),
                # Big reads: a blob arrives in few, large slices.
                read_bufsize=_CHUNK,
                # The digest covers the bytes as sent; nothing may decode them on the way.
                auto_decompress=False,
            )
        return self._session

    async def close(self) -> None:
        if self._lean:
            self._lean.close()
        self._lean = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- plumbing -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _request(
        self, method: str, path: str, **kwargs: Any
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        url = f"{self.base_url}{path}"
        try:
            async with self._open().request(method, url, **kwargs) as response:
                yield response
        except aiohttp.ClientConnectorCertificateError as exc:
            raise ServerUnavailable(
                f"the rex server at {self.base_url} presents a TLS certificate this client "
                f"does not trust ({exc.certificate_error}); give the CA that signed it with "
                "--ca-file or REX_CA_FILE (RexClient(ca_file=...))"
            ) from exc
        except aiohttp.ClientConnectorError as exc:
            raise ServerUnavailable(
                f"cannot reach the rex server at {self.base_url}: {exc.os_error.strerror or exc}; "
                "start it with `rexd serve`, or point --server / REX_SERVER at a running one"
            ) from exc
        except TimeoutError as exc:
            raise RexClientError(
                f"{method} {url} timed out: the server at {self.base_url} stopped answering; "
                "check that it is healthy (GET /healthz) or raise the client timeout"
            ) from exc
        except aiohttp.ClientError as exc:
            raise RexClientError(
                f"{method} {url} failed: {type(exc).__name__}: {exc}; "
                f"check that the rex server at {self.base_url} is running, then retry"
            ) from exc

    async def _fail(self, response: aiohttp.ClientResponse) -> NoReturn:
        body = await response.read()
        raise self._error(f"{response.method} {response.url}", response.status,
                          response.reason or "", body)

    def _error(self, where: str, status: int, reason: str, body: bytes) -> RexClientError:
        """The error a refusal (``status``, JSON ``body``) stands for."""
        try:
            error = orjson.loads(body)["error"]
            code, message = str(error["code"]), str(error["message"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            text = body[:200].decode("utf-8", "replace").strip()
            return RexClientError(
                f"{where} answered {status} {reason}"
                + (f": {text}" if text else "")
                + f"; is {self.base_url} a rex server?",
                status=status,
            )
        if code in ("missing_blobs", "failed_precondition") and "missing" in error:
            missing = [parse_digest(text) for text in error.get("missing", [])]
            return MissingBlobs(message, missing, status=status, code=code)
        cls = _ERRORS_BY_CODE.get(code, RexClientError)
        return cls(message, status=status, code=code)

    # -- health and CAS -------------------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        """The server's ``/healthz`` document: ``status`` is ``ok`` or ``unhealthy`` (then
        ``checks`` says which check failed and why), plus version, uptime, store stats."""
        async with self._request("GET", "/healthz") as response:
            if response.status not in (200, 503) or response.content_type != "application/json":
                await self._fail(response)
            return orjson.loads(await response.read())

    async def contains(self, digest: Digest) -> bool:
        async with self._request("HEAD", f"/v1/cas/{digest}") as response:
            if response.status == 404:
                return False
            if response.status != 200:
                await self._fail(response)
            return True

    async def find_missing(self, digests: Iterable[Digest]) -> list[Digest]:
        """The digests the server lacks, in input order, without duplicates."""
        unique = list(dict.fromkeys(digests))
        missing: list[Digest] = []
        for start in range(0, len(unique), _FIND_MISSING_BATCH):
            batch = unique[start : start + _FIND_MISSING_BATCH]
            texts = [str(digest) for digest in batch]
            body = orjson.dumps({"digests": texts})
            async with self._request(
                "POST",
                "/v1/cas/find-missing",
                data=body,
                headers={"Content-Type": "application/json"},
            ) as response:
                if response.status != 200:
                    await self._fail(response)
                answer = orjson.loads(await response.read())
            by_text = dict(zip(texts, batch))
            missing.extend(by_text.get(text) or parse_digest(text) for text in answer["missing"])
        return missing

    async def put_blob(self, digest: Digest, data: bytes) -> bool:
        """Upload one in-memory blob; whether the server stored it (False: it had it)."""
        # Handing aiohttp the whole blob makes asyncio copy what the socket cannot take at
        # once into its buffer, and trim that buffer on every send; slices avoid both.
        return await self._put(digest, _slices(data) if len(data) > _CHUNK else data)

    async def _put(self, digest: Digest, data: Any) -> bool:
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(digest.size)}
        async with self._request(
            "PUT", f"/v1/cas/{digest}", data=data, headers=headers
        ) as response:
            if response.status not in (200, 201):
                await self._fail(response)
            await response.read()
            return response.status == 201

    async def upload_file(
        self,
        path: str | os.PathLike[str],
        function: DigestFunction = DigestFunction.BLAKE3,
        progress: Progress | None = None,
    ) -> Digest:
        """Hash ``path`` (in a thread), then upload it unless the server already has it.

        Local trouble (no such file, no permission) raises OSError; a file that changes
        while it is uploaded raises :class:`RexClientError` and nothing is stored.
        """
        path = Path(path)
        if (await asyncio.to_thread(path.stat)).st_size >= self.chunked_min_size:
            return await self._upload_chunked(path, function, progress)
        digest = await asyncio.to_thread(_hash_file, path, function)
        if await self.contains(digest):
            if progress is not None:
                progress(digest.size, digest.size)
            return digest
        try:
            await self._put(digest, _read_file(path, digest.size, progress))
        except DigestMismatch as exc:
            raise DigestMismatch(
                f"{exc}; {path} changed while it was uploaded, upload it again",
                status=exc.status,
                code=exc.code,
            ) from exc
        return digest

    def chunk_transfers(self, function: DigestFunction) -> TransferManager:
        """A transfer manager moving chunks to and from this server."""
        return TransferManager(HttpChunkRemote(self), function, REAPI_CHUNKING, self.transfer)

    async def _upload_chunked(
        self, path: Path, function: DigestFunction, progress: Progress | None
    ) -> Digest:
        manifest = await asyncio.to_thread(chunk_file, path, REAPI_CHUNKING, function)
        blob = manifest.blob
        if not await self.contains(blob):
            try:
                await self.chunk_transfers(function).upload_file(
                    path, manifest=manifest, progress=progress
                )
            except TransferError as exc:
                raise _transfer_failed(exc, self.base_url) from exc
        if progress is not None:
            progress(blob.size, blob.size)
        return blob

    async def get_blob(self, digest: Digest) -> bytes:
        """Download one blob into memory, verified against its digest."""
        chunks: list[bytes] = []
        await self._receive(digest, _VerifyingSink(digest, chunks.append))
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def download_file(
        self,
        digest: Digest,
        path: str | os.PathLike[str],
        progress: Progress | None = None,
    ) -> None:
        """Download a blob to ``path``, verified while it is written, then renamed in place.

        The bytes go to a temporary file next to ``path``; on any failure (including a
        digest mismatch) it is removed and ``path`` is left untouched.
        """
        path = Path(path)
        if digest.size >= self.chunked_min_size:
            try:
                await self.chunk_transfers(digest.function).download_file(
                    digest, path, progress=progress
                )
            except ManifestNotFoundError:
                pass  # not stored (the GET below says so) or an older server: whole it is
            except TransferError as exc:
                raise _transfer_failed(exc, self.base_url) from exc
            else:
                if progress is not None:
                    progress(digest.size, digest.size)
                return
        partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}.rex-partial")
        file = await asyncio.to_thread(_create_exclusive, partial)
        try:
            await self._receive(digest, _VerifyingSink(digest, file=file), progress)
            await asyncio.to_thread(_finish, file, partial, path)
        except BaseException:
            await asyncio.to_thread(_discard, file, partial)
            raise
        if progress is not None:
            progress(digest.size, digest.size)

    async def _receive(
        self, digest: Digest, sink: _VerifyingSink, progress: Progress | None = None
    ) -> None:
        try:
            async with self._request("GET", f"/v1/cas/{digest}") as response:
                if response.status != 200:
                    await self._fail(response)
                # iter_chunks hands over the pieces as they arrived; iter_any would join them.
                async for chunk, _ in response.content.iter_chunks():
                    if await sink.add(chunk) and progress is not None:
                        progress(sink.size, digest.size)
            actual = await sink.finish()
        finally:
            await sink.settle()
        if actual != digest.hash or sink.size != digest.size:
            raise _download_mismatch(digest, actual, sink.size, self.base_url)

    # -- action cache ---------------------------------------------------------------------

    async def get_action_result(self, digest: Digest) -> ActionResult | None:
        """The cached result of an action, or None on a miss."""
        async with self._request("GET", f"/v1/ac/{digest}") as response:
            if response.status == 404:
                return None
            if response.status != 200:
                await self._fail(response)
            body = await response.read()
        try:
            return decode(body, ActionResult)
        except WireFormatError as exc:
            raise RexClientError(
                f"the server at {self.base_url} sent an unreadable result for action "
                f"{digest}: {exc}; are client and server the same rex version?"
            ) from exc

    async def put_action_result(self, digest: Digest, result: ActionResult) -> None:
        """Store ``result`` for action ``digest``; raises :class:`MissingBlobs`."""
        async with self._request(
            "PUT",
            f"/v1/ac/{digest}",
            data=encode(result),
            headers={"Content-Type": "application/json"},
        ) as response:
            if response.status != 200:
                await self._fail(response)
            await response.read()

    # -- execution ------------------------------------------------------------------------

    async def _call(
        self, method: str, path: str, answer: type[Any], body: bytes | None = None,
        long_poll_s: float = 0.0,
    ) -> Any:
        if method == "POST" and body is not None:
            if self._lean is None:
                self._lean = _LeanCalls.for_url(self.base_url, self._headers) or False
            if self._lean:  # plain http: kept-alive connections of our own
                read_s = max(self._timeout.sock_read or 0.0,
                             long_poll_s + 30.0 if long_poll_s > 0 else 0.0)
                status, reason, data = await self._lean.post(
                    path, body, self, connect_s=self._timeout.connect or None,
                    read_s=read_s or 300.0)
                if status != 200:
                    raise self._error(f"POST {self.base_url}{path}", status, reason, data)
                return self._decode(method, path, data, answer)
        kwargs: dict[str, Any] = {}
        if body is not None:
            kwargs.update(data=body, headers={"Content-Type": "application/json"})
        if long_poll_s > 0:  # the server may stay silent that long on purpose
            read = max(self._timeout.sock_read or 0.0, long_poll_s + 30.0)
            kwargs["timeout"] = aiohttp.ClientTimeout(
                total=None, connect=self._timeout.connect,
                sock_connect=self._timeout.sock_connect, sock_read=read,
            )
        async with self._request(method, path, **kwargs) as response:
            if response.status != 200:
                await self._fail(response)
            data = await response.read()
        return self._decode(method, path, data, answer)

    def _decode(self, method: str, path: str, data: bytes, answer: type[Any]) -> Any:
        try:
            return decode(data, answer)
        except WireFormatError as exc:
            raise RexClientError(
                f"{method} {path}: the server at {self.base_url} sent an unreadable "
                f"{answer.__name__}: {exc}; are client and server the same rex version?"
            ) from exc

    async def execute(
        self,
        action_digest: Digest,
        *,
        priority: int = 0,
        skip_cache_lookup: bool = False,
        wait_s: float = 0.0,
        blobs: Mapping[Digest, bytes] | None = None,
    ) -> OperationView:
        """Submit an action (its Action, Command and input blobs must be uploaded, or be
        among ``blobs``); the operation comes back done already on a cache hit, else
        queued, or, with ``wait_s``, once it is done or after that many seconds (the
        server bounds the wait; then go on with :meth:`wait_operation`).

        ``blobs`` are small blobs (the Action, Command, Directories: at most
        :data:`INLINE_BLOB_LIMIT` bytes in all) sent in the same request; the server stores
        them in its CAS first, which saves one upload round trip per blob.

        Raises :class:`MissingBlobs` (code ``failed_precondition``) listing what to upload,
        :class:`InvalidAction`, :class:`DigestMismatch` for a blob that does not match its
        digest, or :class:`ResourceExhausted` when the queue is full.
        """
        request: dict[str, Any] = {
            "action_digest": str(action_digest),
            "priority": priority,
            "skip_cache_lookup": skip_cache_lookup,
        }
        if wait_s > 0:
            request["wait_s"] = wait_s
        if blobs:
            request["blobs"] = {
                str(digest): binascii.b2a_base64(data, newline=False).decode("ascii")
                for digest, data in blobs.items()
            }
        return await self._call("POST", "/v1/execute", OperationView, orjson.dumps(request),
                                long_poll_s=wait_s)

    async def wait_operation(self, name: str, wait_s: float = 0.0) -> OperationView:
        """The operation ``name`` once it is done, or its state after ``wait_s`` seconds
        (0: at once). Long waits are made of several long polls the server bounds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(wait_s, 0.0)
        while True:
            remaining = max(deadline - loop.time(), 0.0)
            path = f"/v1/{_operation_path(name)}?wait_s={remaining:.3f}"
            view: OperationView = await self._call("GET", path, OperationView,
                                                   long_poll_s=remaining)
            if view.done or remaining <= 0 or loop.time() >= deadline:
                return view

    async def cancel_operation(self, name: str) -> OperationView:
        """Cancel ``name``: a queued operation ends at once, a running one is stopped on
        its worker. Cancelling a finished operation changes nothing."""
        return await self._call("POST", f"/v1/{_operation_path(name)}/cancel", OperationView,
                                b"{}")

    async def synchronize(self, request: SyncRequest) -> SyncResponse:
        """The worker protocol's one call: report, renew leases, get work (the server may
        hold the call up to ``request.wait_s`` seconds). Raises :class:`NotAuthorized`
        when the coordinator refuses this worker."""
        return await self._call("POST", "/v1/workers/synchronize", SyncResponse,
                                encode(request), long_poll_s=request.wait_s)

    async def status(self) -> SchedulerStatus:
        """Workers total/busy, queued and executing operations, execution counters."""
        return await self._call("GET", "/v1/status", SchedulerStatus)


# -- the lean path of small JSON calls ---------------------------------------------------


class _Response(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one call at a time: the request goes out in
    one write, the answer is parsed once complete (``Content-Length``, chunked, or up to
    the end of the connection)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.reusable = False
        self._buffer = bytearray()
        self._answer: asyncio.Future[tuple[int, str, bytes]] | None = None
        self._head: tuple[int, str, int, bool, bool] | None = None  # status, reason, length, chunked, keep
        self._eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, request: bytes) -> asyncio.Future[tuple[int, str, bytes]]:
        assert self.transport is not None
        self._buffer.clear()
        self._head, self.reusable = None, False
        self._answer = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self._answer

    @property
    def answered_nothing(self) -> bool:
        """No byte of an answer came (a reused connection the server had closed)."""
        return not self._buffer and self._head is None

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._parse()

    def eof_received(self) -> bool:
        self._eof = True
        self._parse()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._parse()
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(ConnectionResetError(
                "the connection closed before the answer was complete"
                + (f" ({exc})" if exc else "")))

    def _parse(self) -> None:
        answer = self._answer
        if answer is None or answer.done():
            return
        try:
            complete = self._complete()
        except ValueError as exc:
            answer.set_exception(exc)
            return
        if complete is not None:
            answer.set_result(complete)

    def _complete(self) -> tuple[int, str, bytes] | None:
        buffer = self._buffer
        if self._head is None:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > 65536:
                    raise ValueError("an HTTP header longer than 64 KiB")
                return None
            lines = bytes(buffer[:end]).decode("latin-1").split("\r\n")
            version, _, rest = lines[0].partition(" ")
            code, _, reason = rest.partition(" ")
            if not version.startswith("HTTP/1.") or not code.isdigit():
                raise ValueError(f"not an HTTP/1.x answer: {lines[0][:80]!r}")
            length, chunked = -1, False
            keep = version == "HTTP/1.1"
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name, value = name.strip().lower(), value.strip().lower()
                if name == "content-length":
                    length = int(value)
                elif name == "transfer-encoding":
                    chunked = value.endswith("chunked")
                elif name == "connection":
                    keep = "keep-alive" in value if not keep else "close" not in value
            self._head = (int(code), reason, length, chunked, keep)
            del buffer[: end + 4]
        status, reason, length, chunked, keep = self._head
        if 100 <= status < 200:  # an interim answer: the real one follows
            self._head = None
            return self._complete()
        if chunked:
            body = _dechunk(buffer)
            if body is None:
                return None
        elif length >= 0:
            if len(buffer) < length:
                return None
            body = bytes(buffer[:length])
        else:  # delimited by the end of the connection
            if not self._eof:
                return None
            body, keep = bytes(buffer), False
        self.reusable = keep and not self._eof
        return status, reason, body


def _dechunk(buffer: bytearray) -> bytes | None:
    """The body of a complete chunked message in ``buffer``, or None while incomplete."""
    parts: list[bytes] = []
    at = 0
    while True:
        end = buffer.find(b"\r\n", at)
        if end < 0:
            return None
        size = int(bytes(buffer[at:end]).split(b";")[0].strip() or b"x", 16)
        if size == 0:  # then trailers, if any, up to an empty line
            return b"".join(parts) if buffer.find(b"\r\n\r\n", end) >= 0 else None
        if len(buffer) < end + 2 + size + 2:
            return None
        parts.append(bytes(buffer[end + 2:end + 2 + size]))
        at = end + 2 + size + 2


class _LeanCalls:
    """Small JSON POSTs (execute requests, the worker's synchronize calls: one or two per
    action) over kept-alive connections of our own: aiohttp costs about 0.4 ms of CPU per
    call on each side of a busy action, this a tenth of it. Plain ``http://`` only (false
    for others)."""

    _KEEP = 4  # idle connections kept: a worker has at most two calls in flight

    def __init__(self, host: str, port: int, authority: str, prefix: str,
                 headers: dict[str, str] | None = None) -> None:
        self.host, self.port, self.prefix = host, port, prefix
        self._authority = authority.encode("ascii")  # yarl's raw form: IDNA, brackets
        extra = "".join(f"\r\n{name}: {value}" for name, value in (headers or {}).items())
        self._extra = extra.encode("latin-1")
        self._idle: list[_Response] = []

    @classmethod
    def for_url(cls, base_url: str, headers: dict[str, str] | None = None) -> _LeanCalls | None:
        """For a plain ``http://host:port[/prefix]`` URL; None for anything else."""
        try:
            url = URL(base_url)
        except ValueError:
            return None
        if (url.scheme != "http" or not url.host or url.port is None or url.user
                or url.query_string or url.fragment):
            return None
        return cls(url.host, url.port, url.raw_authority, url.raw_path.rstrip("/"), headers)

    async def post(self, path: str, body: bytes, client: RexClient, *,
                   connect_s: float | None, read_s: float) -> tuple[int, str, bytes]:
        """``(status, reason, body)`` of ``POST path``; RexClientError when it fails."""
        head = (f"POST {self.prefix}{path} HTTP/1.1\r\nHost: ".encode() + self._authority
                + self._extra + b"\r\nContent-Type: application/json\r\nContent-Length: "
                + str(len(body)).encode() + b"\r\n\r\n")
        request = head + body
        while self._idle:
            connection = self._idle.pop()
            assert connection.transport is not None
            if connection.transport.is_closing():
                continue
            try:
                return await self._exchange(connection, request, read_s)
            except ConnectionError:
                if not connection.answered_nothing:
                    raise self._failed(path, client, "the connection broke") from None
                # The server had closed it while it was idle: a new one, as aiohttp does.
        connection = await self._connect(client, connect_s)
        try:
            return await self._exchange(connection, request, read_s)
        except ConnectionError as exc:
            raise self._failed(path, client, str(exc)) from None

    async def _exchange(self, connection: _Response, request: bytes,
                        read_s: float) -> tuple[int, str, bytes]:
        transport = connection.transport
        assert transport is not None
        answer = connection.send(request)
        timer = answer.get_loop().call_later(read_s, _time_out, answer)
        done = False
        try:
            result = await answer
            done = True
        except ValueError as exc:
            raise RexClientError(f"POST to http://{self.host}:{self.port}: a malformed "
                                 f"answer ({exc}); is it a rex server?") from None
        except TimeoutError:
            raise RexClientError(
                f"POST to http://{self.host}:{self.port} timed out after {read_s:g}s: the "
                "server stopped answering; check that it is healthy (GET /healthz)") from None
        finally:
            timer.cancel()
            if not done or not connection.reusable or len(self._idle) >= self._KEEP:
                transport.close() if done else transport.abort()
        if not transport.is_closing():
            self._idle.append(connection)
        return result

    async def _connect(self, client: RexClient, connect_s: float | None) -> _Response:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(connect_s):
                _, connection = await loop.create_connection(_Response, self.host, self.port)
        except (OSError, TimeoutError) as exc:
            cause = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise ServerUnavailable(
                f"cannot reach the rex server at {client.base_url}: {cause}; start it with "
                "`rexd serve`, or point --server / REX_SERVER at a running one") from exc
        return connection

    def _failed(self, path: str, client: RexClient, cause: str) -> RexClientError:
        return RexClientError(
            f"POST {client.base_url}{path} failed: {cause}; check that the rex server at "
            f"{client.base_url} is running, then retry")

    def close(self) -> None:
        for connection in self._idle:
            if connection.transport is not None:
                connection.transport.close()
        self._idle.clear()


def _time_out(answer: asyncio.Future[Any]) -> None:
    if not answer.done():
        answer.set_exception(TimeoutError())


class HttpChunkRemote:
    """A :class:`~rexcore.artifacts.transfer.ChunkRemote` over the native HTTP API: chunks
    at ``/v1/chunks/...`` (zstd both ways when it pays), manifests at
    ``/v1/manifests/...``. The server verifies what it receives; its refusals come back as
    the transfer errors the manager expects."""

    def __init__(self, client: RexClient) -> None:
        self.client = client

    async def find_missing(self, digests: Sequence[Digest]) -> list[Digest]:
        return await self.client.find_missing(digests)

    async def put_chunk(self, digest: Digest, payload: ChunkPayload) -> None:
        headers = {
            "Content-Type": "application/octet-stream",
            CHUNK_ENCODING_HEADER: payload.encoding.value,
        }
        async with self.client._request(
            "PUT", f"/v1/chunks/{digest}", data=payload.data, headers=headers
        ) as response:
            if response.status in (200, 201):
                await response.read()
                return
            code, message = await _error_of(response)
            if code == "corrupt_chunk":
                raise CorruptChunkError(digest, f"the server refused it: {message}")
            await self.client._fail(response)

    async def get_chunk(self, digest: Digest) -> ChunkPayload:
        headers = {ACCEPT_CHUNK_ENCODING_HEADER: ChunkEncoding.ZSTD.value}
        async with self.client._request(
            "GET", f"/v1/chunks/{digest}", headers=headers
        ) as response:
            if response.status == 404:
                raise MissingChunksError(None, [digest], f"the server at {self.client.base_url}")
            if response.status != 200:
                await self.client._fail(response)
            text = response.headers.get(CHUNK_ENCODING_HEADER, ChunkEncoding.IDENTITY.value)
            data = await response.read()
        try:
            encoding = ChunkEncoding(text)
        except ValueError:
            raise CorruptChunkError(digest, f"it came in an unknown encoding {text!r}") from None
        return ChunkPayload(encoding, data)

    async def put_manifest(self, manifest: ChunkManifest) -> None:
        blob = manifest.blob
        async with self.client._request(
            "PUT",
            f"/v1/manifests/{blob}",
            data=manifest.to_json(),
            headers={"Content-Type": "application/json"},
        ) as response:
            if response.status in (200, 201):
                await response.read()
                return
            code, message, missing = await _error_of(response, with_missing=True)
            if code == "missing_chunks":
                where = f"the server at {self.client.base_url}"
                raise MissingChunksError(blob, [parse_digest(t) for t in missing], where)
            if code == "blob_mismatch":
                raise BlobMismatchError(message)
            if code == "invalid_manifest":
                raise InvalidManifestError(message)
            await self.client._fail(response)

    async def get_manifest(self, blob: Digest) -> ChunkManifest | None:
        async with self.client._request("GET", f"/v1/manifests/{blob}") as response:
            if response.status == 404:  # not stored, or a server without chunked transfer
                await response.read()
                return None
            if response.status != 200:
                await self.client._fail(response)
            body = await response.read()
        return ChunkManifest.from_json(body)


async def _error_of(response: aiohttp.ClientResponse, *, with_missing: bool = False) -> Any:
    """``(code, message)`` of a JSON error answer (and its ``missing`` list if asked);
    empty strings when the body is no such error (the caller then fails generically)."""
    body = await response.read()  # cached: a later _fail reads it again
    try:
        error = orjson.loads(body)["error"]
        code, message = str(error["code"]), str(error["message"])
        missing = [str(text) for text in error.get("missing", [])]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        code, message, missing = "", "", []
    return (code, message, missing) if with_missing else (code, message)


def _transfer_failed(exc: TransferError, server: str) -> RexClientError:
    """A chunked transfer's failure as the client's error family."""
    if isinstance(exc, MissingChunksError):
        return MissingBlobs(str(exc), list(exc.missing), code="missing_chunks")
    if isinstance(exc, (CorruptChunkError, BlobMismatchError)):
        return DigestMismatch(str(exc), code="digest_mismatch")
    return RexClientError(f"chunked transfer with {server} failed: {exc}")


def _operation_path(name: str) -> str:
    prefix, _, rest = name.partition("/")
    if prefix != "operations" or not rest or "/" in rest or not rest.isalnum():
        raise OperationNotFound(
            f"{name!r} is not an operation name; names look like operations/<hex> "
            "as returned by execute()", code="operation_not_found"
        )
    return name


class _FileChanged(RexClientError):
    """A file's size changed between hashing it and sending it."""


class _VerifyingSink:
    """Hashes (and writes to ``file``, or passes to ``keep``) a download in a thread, one
    batch behind the network, so verification costs no time after the last byte."""

    def __init__(
        self,
        digest: Digest,
        keep: Callable[[bytes], None] | None = None,
        file: BinaryIO | None = None,
    ) -> None:
        # One thread per hasher: with the network on the other core, BLAKE3's own threads
        # only add hand-offs (measured slower on 2 cores).
        self._hasher = digest.function.hasher()
        self._keep = keep
        self._fd = file.fileno() if file is not None else None
        self._batch: list[bytes] = []
        self._batch_size = 0
        self._running: asyncio.Future[None] | None = None
        self.size = 0

    async def add(self, chunk: bytes) -> bool:
        """Take one piece; whether a batch was handed to the thread (time for progress)."""
        if self._keep is not None:
            self._keep(chunk)
        self._batch.append(chunk)
        self._batch_size += len(chunk)
        self.size += len(chunk)
        if self._batch_size < _CHUNK:
            return False
        await self._hand_off()
        return True

    async def _hand_off(self) -> None:
        if self._running is not None:
            await self._running
        batch, self._batch, self._batch_size = self._batch, [], 0
        self._running = (
            asyncio.ensure_future(asyncio.to_thread(self._consume, batch)) if batch else None
        )

    def _consume(self, batch: list[bytes]) -> None:
        for chunk in batch:
            self._hasher.update(chunk)
        if self._fd is not None:
            for chunk in batch:
                _write_all(self._fd, chunk)

    async def finish(self) -> str:
        await self._hand_off()  # the last, partial batch
        running, self._running = self._running, None
        if running is not None:
            await running
        return self._hasher.hexdigest()

    async def settle(self) -> None:
        """Wait for the thread (a file must not close under it); its errors are already
        reported or superseded by the one being raised."""
        running, self._running = self._running, None
        if running is not None:
            await asyncio.wait([running])
            if not running.cancelled():
                running.exception()  # retrieved, so asyncio does not log it


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _download_mismatch(digest: Digest, actual_hash: str, size: int, server: str) -> DigestMismatch:
    cause = f"{size} bytes arrived" if size != digest.size else f"the bytes hash to {actual_hash}"
    return DigestMismatch(
        f"blob {digest} from {server} is corrupt: {cause}; nothing was kept. "
        "The server's copy may be damaged: delete it there and upload it again"
    )


def _hash_file(path: Path, function: DigestFunction) -> Digest:
    size = path.stat().st_size
    if function is DigestFunction.BLAKE3:
        hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
        if size:
            hasher.update_mmap(path)  # hashes with every core straight from the page cache
        return Digest(function, hasher.hexdigest(), size)
    with path.open("rb") as file:
        digest = hashlib.file_digest(file, "sha256")
    return Digest(function, digest.hexdigest(), size)


async def _read_file(path: Path, size: int, progress: Progress | None) -> AsyncIterator[bytes]:
    file = await asyncio.to_thread(path.open, "rb")
    try:
        done = 0
        while chunk := await asyncio.to_thread(file.read, min(_CHUNK, size - done + 1)):
            done += len(chunk)
            if done > size:
                break
            yield chunk
            if progress is not None:
                progress(done, size)
    finally:
        await asyncio.to_thread(file.close)
    if done != size:  # the server would wait for bytes that never come, or get extra ones
        raise _FileChanged(
            f"{path} changed while it was uploaded ({size} bytes when hashed, {done} now); upload it again"
        )


async def _slices(data: bytes) -> AsyncIterator[memoryview]:
    view = memoryview(data)
    for start in range(0, len(view), _CHUNK):
        yield view[start : start + _CHUNK]


def _create_exclusive(path: Path) -> BinaryIO:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    return os.fdopen(fd, "wb")


def _finish(file: BinaryIO, partial: Path, path: Path) -> None:
    file.close()
    os.replace(partial, path)


def _discard(file: BinaryIO, partial: Path) -> None:
    file.close()
    partial.unlink(missing_ok=True)
