"""The worker's synchronize calls over connections of the client's own (not aiohttp's)."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from rexcore.protocol.client import (
    NotAuthorized,
    RexClient,
    RexClientError,
    _dechunk,
    _LeanCalls,
    _Response,
)
from rexcore.serialization.codec import decode, encode
from rexcore.serialization.worker_protocol import SyncRequest, SyncResponse


@pytest.fixture
async def server():
    """A stand-in coordinator: answers each synchronize with the lease it is told to, and
    remembers which connection (peer port) each call came on."""
    state = {"peers": [], "status": 200, "lease_s": 30.0}

    async def synchronize(request: web.Request) -> web.Response:
        decode(await request.read(), SyncRequest)
        state["peers"].append(request.transport.get_extra_info("peername")[1])
        if state["status"] != 200:
            body = b'{"error": {"code": "unauthenticated", "message": "wrong join token"}}'
            return web.Response(status=state["status"], body=body,
                                content_type="application/json")
        return web.Response(body=encode(SyncResponse(lease_s=state["lease_s"])),
                            content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/workers/synchronize", synchronize)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    state["url"] = f"http://127.0.0.1:{port}"
    state["runner"] = runner
    yield state
    await runner.cleanup()


async def test_synchronize_calls_reuse_one_kept_alive_connection(server):
    async with RexClient(server["url"]) as client:
        for lease in (5.0, 6.0, 7.0):
            server["lease_s"] = lease
            response = await client.synchronize(SyncRequest(worker_id="w", wait_s=0.0))
            assert response.lease_s == lease
    assert len(server["peers"]) == 3 and len(set(server["peers"])) == 1


async def test_two_calls_at_once_use_two_connections(server):
    async with RexClient(server["url"]) as client:
        await asyncio.gather(*(client.synchronize(SyncRequest(worker_id="w", wait_s=0.0))
                               for _ in range(2)))
    assert len(set(server["peers"])) == 2


async def test_a_connection_the_server_closed_while_idle_is_replaced(server):
    async with RexClient(server["url"]) as client:
        await client.synchronize(SyncRequest(worker_id="w", wait_s=0.0))
        for connection in client._lean._idle:  # as a server restart or idle timeout would
            connection.transport.close()
        await client.synchronize(SyncRequest(worker_id="w", wait_s=0.0))
    assert len(set(server["peers"])) == 2


async def test_a_refusal_raises_the_error_its_code_names(server):
    server["status"] = 401
    async with RexClient(server["url"]) as client:
        with pytest.raises(NotAuthorized, match="wrong join token"):
            await client.synchronize(SyncRequest(worker_id="w", wait_s=0.0))


async def test_an_unreachable_coordinator_is_a_client_error_naming_it(unused_tcp_port):
    url = f"http://127.0.0.1:{unused_tcp_port}"
    async with RexClient(url) as client:
        with pytest.raises(RexClientError, match="cannot reach the rex server at " + url):
            await client.synchronize(SyncRequest(worker_id="w", wait_s=0.0))


async def test_a_server_that_goes_silent_times_out(unused_tcp_port):
    async def silent(reader, writer):
        await reader.read(1 << 16)
        await asyncio.sleep(30)

    server = await asyncio.start_server(silent, "127.0.0.1", unused_tcp_port)
    try:
        url = f"http://127.0.0.1:{unused_tcp_port}"
        async with RexClient(url) as client:
            calls = _LeanCalls.for_url(url)
            assert calls is not None
            with pytest.raises(RexClientError, match="timed out after 0.3s"):
                await calls.post("/v1/workers/synchronize", b"{}", client, connect_s=5,
                                 read_s=0.3)
            assert not calls._idle  # a connection in an unknown state is not kept
            calls.close()
    finally:
        server.close()


class _Transport:
    def __init__(self) -> None:
        self.written = b""

    def write(self, data: bytes) -> None:
        self.written += data


async def _answer_to(*pieces: bytes, eof: bool = False):
    connection = _Response()
    connection.connection_made(_Transport())  # type: ignore[arg-type]
    answer = connection.send(b"POST / HTTP/1.1\r\n\r\n")
    for piece in pieces:
        assert not answer.done()
        connection.data_received(piece)
    if eof:
        connection.eof_received()
    return await answer, connection.reusable


async def test_answers_are_parsed_by_length_chunks_or_end_of_connection():
    assert await _answer_to(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel", b"lo") == (
        (200, "OK", b"hello"), True)
    assert await _answer_to(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel",
                            b"\r\n2\r\nlo\r\n0\r\n\r\n") == ((200, "OK", b"hello"), True)
    assert await _answer_to(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 404 Not Found\r\n"
                            b"Connection: close\r\nContent-Length: 2\r\n\r\nno") == (
        (404, "Not Found", b"no"), False)
    assert await _answer_to(b"HTTP/1.0 200 OK\r\n\r\nto the end", eof=True) == (
        (200, "OK", b"to the end"), False)
    with pytest.raises(ValueError, match="not an HTTP"):
        await _answer_to(b"SSH-2.0-OpenSSH\r\n\r\n")


def test_dechunking_waits_for_the_last_chunk_and_skips_trailers():
    assert _dechunk(bytearray(b"3\r\nabc\r\n")) is None
    assert _dechunk(bytearray(b"3\r\nabc\r\n0\r\n")) is None
    assert _dechunk(bytearray(b"3;x=y\r\nabc\r\n0\r\nTrailer: 1\r\n\r\n")) == b"abc"


def test_only_plain_http_urls_take_the_lean_path():
    assert _LeanCalls.for_url("http://127.0.0.1:8981") is not None
    assert _LeanCalls.for_url("http://[::1]:8981/prefix")._authority == b"[::1]:8981"
    assert _LeanCalls.for_url("https://rex.example:443") is None
