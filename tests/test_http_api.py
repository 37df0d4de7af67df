"""The native HTTP API as a client sees it: a real server on 127.0.0.1, a real disk store."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import orjson
import pytest
from hypothesis import HealthCheck as HypothesisHealthCheck
from hypothesis import given, settings
from hypothesis import strategies as st

from rexcore import __version__
from rexcore.artifacts.action_cache import create_action_cache
from rexcore.artifacts.digest import Digest, DigestFunction, digest_of, parse_digest
from rexcore.artifacts.disk import DiskBlobStore
from rexcore.config.types import HostPort
from rexcore.core.runtime import ServiceRuntime
from rexcore.monitoring.health import HealthCheck
from rexcore.plugins.descriptors import ComponentContext
from rexcore.protocol import client as client_module
from rexcore.protocol.client import (
    BlobNotFound,
    DigestMismatch,
    MissingBlobs,
    RexClient,
    RexClientError,
    ServerUnavailable,
    StoreFull,
    resolve_server,
)
from rexcore.protocol.http_server import NativeHttpOptions, NativeHttpProtocol
from rexcore.serialization.action_result import ActionResult, OutputFile

BLAKE3, SHA256 = DigestFunction.BLAKE3, DigestFunction.SHA256


@attrs.define
class Served:
    protocol: NativeHttpProtocol
    runtime: ServiceRuntime
    store: DiskBlobStore
    url: str
    http: aiohttp.ClientSession
    client: RexClient

    async def error(self, method: str, path: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
        """Status and the ``error`` object of a request expected to fail."""
        async with self.http.request(method, self.url + path, **kwargs) as response:
            assert response.content_type == "application/json", await response.text()
            return response.status, (await response.json())["error"]


async def _serve(
    tmp_path: Path,
    store_root: Path,
    options: NativeHttpOptions | None = None,
    functions: tuple[DigestFunction, ...] = (DigestFunction.SHA256, DigestFunction.BLAKE3),
) -> AsyncIterator[Served]:
    store = DiskBlobStore(store_root)
    cache = create_action_cache(tmp_path, store)
    runtime = ServiceRuntime(
        config=None,
        data_dir=tmp_path,
        blob_store=store,
        action_cache=cache,
        plugins=None,
        digest_functions=functions,
    )
    protocol = NativeHttpProtocol(
        options or NativeHttpOptions(listen=HostPort("127.0.0.1:0")),
        ComponentContext(data_dir=tmp_path),
        runtime,
    )
    await protocol.start()
    try:
        async with aiohttp.ClientSession() as http, RexClient(protocol.url) as client:
            yield Served(protocol, runtime, store, protocol.url, http, client)
    finally:
        await protocol.stop()
        await cache.close()
        await store.close()


@pytest.fixture
async def served(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> AsyncIterator[Served]:
    async for value in _serve(tmp_path, tmp_path / "cas"):
        yield value
    # A handler that answered but then broke its connection shows up only here.
    failures = [r for r in caplog.get_records("call") if r.levelno >= logging.ERROR]
    assert not failures, [r.getMessage() for r in failures]


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    """A real 512 KiB tmpfs, so the store meets ENOSPC (needs root, as in CI)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _blob(size: int, function: DigestFunction = BLAKE3) -> tuple[Digest, bytes]:
    data = os.urandom(size)
    return digest_of(data, function), data


def _files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


async def _no_temp_files_eventually(store: DiskBlobStore) -> None:
    """The server notices a dropped connection on its own schedule; then nothing is left."""
    for _ in range(200):
        if not _files_under(store.root / "tmp"):
            return
        await asyncio.sleep(0.025)
    assert not _files_under(store.root / "tmp")


# -- server basics ----------------------------------------------------------------------------


async def test_port_zero_reports_the_real_bound_port(served: Served) -> None:
    [address] = served.protocol.addresses
    host, port = address.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0
    assert served.protocol.url == f"http://{address}"


async def test_healthz_reports_status_version_uptime_and_store_stats(served: Served) -> None:
    digest, data = _blob(1000)
    await served.client.put_blob(digest, data)
    health = await served.client.health()
    assert (health["status"], health["checks"]) == ("ok", {})
    assert health["version"] == __version__
    assert health["uptime_s"] >= 0
    assert health["blob_store"]["blobs"] >= 1
    assert health["blob_store"]["bytes"] >= 1000


async def test_healthz_is_503_while_a_health_check_fails(served: Served) -> None:
    state = {"healthy": True}

    async def flux() -> tuple[bool, str]:
        return state["healthy"], "the flux capacitor"

    served.runtime.health_checks = [HealthCheck("flux", flux)]
    assert (await served.client.health())["checks"]["flux"]["healthy"] is True
    state["healthy"] = False
    async with served.http.get(f"{served.url}/healthz") as response:
        assert response.status == 503
        body = await response.json()
    assert body["status"] == "unhealthy"
    assert body["checks"]["flux"] == {"healthy": False, "detail": "the flux capacitor"}
    assert (await served.client.health())["status"] == "unhealthy"


async def test_a_port_in_use_is_an_os_error_naming_the_address(
    served: Served, tmp_path: Path
) -> None:
    taken = NativeHttpOptions(listen=HostPort(served.protocol.addresses[0]))
    other = NativeHttpProtocol(taken, ComponentContext(data_dir=tmp_path), served.runtime)
    with pytest.raises(OSError, match="address already in use") as caught:
        await other.start()
    assert served.protocol.addresses[0].rsplit(":", 1)[1] in str(caught.value)
    assert other.addresses == []


async def test_unknown_route_is_a_json_404(served: Served) -> None:
    status, error = await served.error("GET", "/no/such/thing")
    assert status == 404
    assert error["code"] == "not_found"
    assert "/no/such/thing" in error["message"] and "/v1/cas/" in error["message"]


async def test_wrong_method_is_a_json_405_listing_the_allowed_ones(served: Served) -> None:
    digest, _ = _blob(10)
    async with served.http.delete(f"{served.url}/v1/cas/{digest}") as response:
        assert response.status == 405
        assert {"GET", "HEAD", "PUT"} <= set(response.headers["Allow"].split(","))
        error = (await response.json())["error"]
    assert error["code"] == "method_not_allowed"
    assert "DELETE" in error["message"]
    status, error = await served.error("GET", "/v1/cas/find-missing")
    assert (status, error["code"]) == (405, "method_not_allowed")


async def test_garbage_on_the_socket_does_not_take_the_server_down(served: Served) -> None:
    host, port = served.protocol.addresses[0].rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"\x00\xffNOT HTTP AT ALL\r\n\r\n" * 10)
    await writer.drain()
    await reader.read()  # the server answers 400 and closes
    writer.close()
    assert (await served.client.health())["status"] == "ok"


# -- CAS --------------------------------------------------------------------------------------


@pytest.mark.parametrize("function", list(DigestFunction))
@pytest.mark.parametrize("size", [0, 1, 300_000, 5 << 20])
async def test_blob_round_trips_through_the_client(
    served: Served, function: DigestFunction, size: int
) -> None:
    digest, data = _blob(size, function)
    stored = await served.client.put_blob(digest, data)
    assert stored is (size > 0)  # the empty blob is always present
    assert await served.client.contains(digest)
    assert await served.client.get_blob(digest) == data
    assert await served.client.put_blob(digest, data) is False


async def test_put_answers_201_when_stored_and_200_when_already_present(served: Served) -> None:
    digest, data = _blob(4096, SHA256)
    url = f"{served.url}/v1/cas/{digest}"
    async with served.http.put(url, data=data) as response:
        assert response.status == 201
        assert await response.json() == {"digest": str(digest), "stored": True}
    async with served.http.put(url, data=data) as response:
        assert response.status == 200
        assert await response.json() == {"digest": str(digest), "stored": False}


async def test_chunked_upload_without_content_length_is_stored(served: Served) -> None:
    digest, data = _blob(3 << 20)

    async def body() -> AsyncIterator[bytes]:
        for start in range(0, len(data), 100_000):
            yield data[start : start + 100_000]

    async with served.http.put(f"{served.url}/v1/cas/{digest}", data=body()) as response:
        assert response.status == 201
    assert await served.client.get_blob(digest) == data


async def test_one_connection_serves_many_blob_requests_in_a_row(served: Served) -> None:
    digest, data = _blob(1 << 20)
    await served.client.put_blob(digest, data)
    connector = aiohttp.TCPConnector(limit=1)  # every request on the same keep-alive socket
    async with aiohttp.ClientSession(connector=connector) as http:
        for _ in range(3):
            async with http.get(f"{served.url}/v1/cas/{digest}") as response:
                assert (response.status, await response.read()) == (200, data)
            async with http.head(f"{served.url}/v1/cas/{digest}") as response:
                assert response.status == 200


async def test_head_gives_the_size_of_a_present_blob_and_404_otherwise(served: Served) -> None:
    digest, data = _blob(12345)
    url = f"{served.url}/v1/cas/{digest}"
    async with served.http.head(url) as response:
        assert response.status == 404
    await served.client.put_blob(digest, data)
    async with served.http.head(url) as response:
        assert response.status == 200
        assert response.headers["Content-Length"] == "12345"
        assert await response.read() == b""


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("offset=10", slice(10, None)),
        ("limit=7", slice(0, 7)),
        ("offset=100&limit=50", slice(100, 150)),
        ("offset=2000&limit=5000", slice(2000, None)),  # the limit is cut at the end
        ("offset=2048", slice(2048, None)),  # at the end: empty
        ("offset=0&limit=0", slice(0, 0)),
    ],
)
async def test_get_with_offset_and_limit_returns_that_slice(
    served: Served, query: str, expected: slice
) -> None:
    digest, data = _blob(2048)
    await served.client.put_blob(digest, data)
    async with served.http.get(f"{served.url}/v1/cas/{digest}?{query}") as response:
        assert response.status == 200
        body = await response.read()
    assert body == data[expected]
    assert response.headers["Content-Length"] == str(len(body))


@pytest.mark.parametrize(
    ("query", "status", "code"),
    [
        ("offset=-1", 400, "invalid_range"),
        ("limit=ten", 400, "invalid_range"),
        ("offset=2049", 416, "range_not_satisfiable"),
    ],
)
async def test_bad_ranges_are_rejected(served: Served, query: str, status: int, code: str) -> None:
    digest, data = _blob(2048)
    await served.client.put_blob(digest, data)
    actual_status, error = await served.error("GET", f"/v1/cas/{digest}?{query}")
    assert (actual_status, error["code"]) == (status, code)
    assert query.split("=")[0] in error["message"]


async def test_get_of_a_missing_blob_is_a_json_404(served: Served) -> None:
    digest, _ = _blob(100)
    status, error = await served.error("GET", f"/v1/cas/{digest}")
    assert (status, error["code"], error["digest"]) == (404, "blob_not_found", str(digest))
    assert str(digest) in error["message"]
    status, _ = await served.error("GET", f"/v1/cas/{digest}?offset=1")
    assert status == 404
    with pytest.raises(BlobNotFound, match=str(digest)):
        await served.client.get_blob(digest)


async def test_put_of_bytes_that_do_not_match_the_digest_stores_nothing(served: Served) -> None:
    digest, _ = _blob(1 << 20)
    other = os.urandom(1 << 20)
    status, error = await served.error("PUT", f"/v1/cas/{digest}", data=other)
    assert (status, error["code"]) == (400, "digest_mismatch")
    assert str(digest) in error["message"]
    assert not await served.client.contains(digest)
    assert not _files_under(served.store.root / "tmp")
    with pytest.raises(DigestMismatch):
        await served.client.put_blob(digest, other)


async def test_upload_cut_off_by_the_client_leaves_nothing_behind(served: Served) -> None:
    digest, data = _blob(4 << 20)
    host, port = served.protocol.addresses[0].rsplit(":", 1)
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"PUT /v1/cas/{digest} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n".encode()
        + data[: 3 << 20]
    )
    await writer.drain()
    await asyncio.sleep(0.2)  # let the server start writing the blob
    writer.transport.abort()
    await _no_temp_files_eventually(served.store)
    assert not await served.client.contains(digest)
    assert await served.client.put_blob(digest, data)  # and the next try succeeds


async def test_chunked_upload_with_extra_bytes_is_rejected(served: Served) -> None:
    digest, data = _blob(1000)

    async def body() -> AsyncIterator[bytes]:
        yield data
        yield b"one byte too many"

    status, error = await served.error("PUT", f"/v1/cas/{digest}", data=body())
    assert (status, error["code"]) == (400, "digest_mismatch")
    assert not await served.client.contains(digest)


async def test_content_length_that_disagrees_with_the_size_is_rejected(served: Served) -> None:
    digest, data = _blob(1000)
    status, error = await served.error("PUT", f"/v1/cas/{digest}", data=data + b"x")
    assert (status, error["code"]) == (400, "content_length_mismatch")
    assert "1001" in error["message"] and "1000" in error["message"]
    status, error = await served.error("PUT", f"/v1/cas/{digest}", data=data[:-1])
    assert (status, error["code"]) == (400, "content_length_mismatch")
    assert not await served.client.contains(digest)


_HASH = "a" * 64


@pytest.mark.parametrize(
    "address",
    [
        f"md5/{_HASH}/10",  # unknown function
        f"blake3/{'a' * 63}/10",  # short hash
        f"blake3/{'A' * 64}/10",  # uppercase hash
        f"sha256/{'g' * 64}/10",  # not hex
        f"blake3/{_HASH}/-1",  # negative size
        f"blake3/{_HASH}/12a",  # not a number
        f"blake3/{_HASH}/%C2%B2",  # a Unicode digit ("²") that int() refuses
    ],
)
@pytest.mark.parametrize("method", ["GET", "PUT"])
async def test_malformed_blob_addresses_are_a_400(
    served: Served, address: str, method: str
) -> None:
    status, error = await served.error(method, f"/v1/cas/{address}", data=b"0123456789")
    assert (status, error["code"]) == (400, "invalid_digest")
    assert "/v1/cas/" in error["message"]
    async with served.http.head(f"{served.url}/v1/cas/{address}") as response:
        assert response.status == 400


async def test_a_digest_function_the_server_does_not_enable_is_refused(tmp_path: Path) -> None:
    async for served in _serve(tmp_path, tmp_path / "cas", functions=(BLAKE3,)):
        digest, data = _blob(100, SHA256)
        status, error = await served.error("PUT", f"/v1/cas/{digest}", data=data)
        assert (status, error["code"]) == (400, "unsupported_digest_function")
        assert "sha256" in error["message"] and "enabled: blake3" in error["message"]
        good = str(_blob(100)[0])
        status, error = await served.error(
            "POST", "/v1/cas/find-missing", json={"digests": [good, str(digest)]}
        )
        assert (status, error["code"], error["index"]) == (400, "invalid_digest", 1)
        assert "enabled: blake3" in error["message"]


# -- find-missing -----------------------------------------------------------------------------


async def test_find_missing_returns_the_absent_digests_in_order(served: Served) -> None:
    present = [_blob(100 + i, function) for i, function in enumerate([BLAKE3, SHA256] * 3)]
    for digest, data in present:
        await served.client.put_blob(digest, data)
    absent = [_blob(10 + i, function)[0] for i, function in enumerate([SHA256, BLAKE3] * 3)]
    asked = [d for pair in zip([d for d, _ in present], absent) for d in pair]
    asked += [absent[0], BLAKE3.empty, SHA256.empty]  # a duplicate; empties are always held
    assert await served.client.find_missing(asked) == absent
    assert await served.client.find_missing([]) == []
    async with served.http.post(
        f"{served.url}/v1/cas/find-missing", json={"digests": [str(d) for d in asked]}
    ) as response:
        assert response.status == 200
        assert await response.json() == {"missing": [str(d) for d in absent]}


async def test_find_missing_answers_in_canonical_form(served: Served) -> None:
    digest = _blob(10, SHA256)[0]
    loose = f"SHA256/{digest.hash}/00{digest.size}"
    async with served.http.post(
        f"{served.url}/v1/cas/find-missing", json={"digests": [loose, loose, str(digest)]}
    ) as response:
        assert response.status == 200
        assert await response.json() == {"missing": [str(digest)]}


async def test_find_missing_answers_ten_thousand_digests(served: Served) -> None:
    blobs = [_blob(32) for _ in range(10_000)]
    for digest, data in blobs[::1000]:
        await served.client.put_blob(digest, data)
    absent = [digest for i, (digest, _) in enumerate(blobs) if i % 1000]
    asked = [digest for digest, _ in blobs]
    assert await served.client.find_missing(asked) == absent
    assert await served.client.find_missing(asked) == absent  # parsed from the cache now


@pytest.mark.parametrize(
    ("entry", "cause"),
    [
        ("blake3/xyz/1", "64 lowercase hex"),
        ("crc32/" + _HASH + "/1", "unknown digest function"),
        (_HASH + "/1", "function/hash/size"),
        (17, "expected a string"),
        (None, "expected a string"),
    ],
)
async def test_find_missing_names_the_malformed_entry_and_its_index(
    served: Served, entry: Any, cause: str
) -> None:
    good = str(_blob(5)[0])
    status, error = await served.error(
        "POST", "/v1/cas/find-missing", json={"digests": [good, good, entry]}
    )
    assert (status, error["code"], error["index"]) == (400, "invalid_digest", 2)
    assert "digests[2]" in error["message"] and cause in error["message"]


_DIGEST_TEXTS = st.builds(
    "{}/{}/{}".format,
    st.sampled_from(["blake3", "sha256", "SHA256", "md5", ""]),
    st.one_of(
        st.text("0123456789abcdef", min_size=64, max_size=64),
        st.text("0123456789abcdefABG", min_size=62, max_size=66),
    ),
    st.one_of(st.integers(0, 10**20).map(str), st.sampled_from(["007", "-1", "1e3", "²", ""])),
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HypothesisHealthCheck.function_scoped_fixture],
)
@given(text=_DIGEST_TEXTS)
async def test_find_missing_accepts_exactly_what_parse_digest_accepts(
    served: Served, text: str
) -> None:
    try:
        expected: Digest | None = parse_digest(text)
    except ValueError:
        expected = None
    async with served.http.post(
        f"{served.url}/v1/cas/find-missing", json={"digests": [text]}
    ) as response:
        answer = await response.json()
    if expected is None:
        assert (response.status, answer["error"]["code"]) == (400, "invalid_digest")
    else:
        missing = [] if expected.is_empty else [str(expected)]  # empties are always held
        assert (response.status, answer) == (200, {"missing": missing})


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", "invalid_json"),
        (b"[1, 2]", "invalid_json"),
        (b'{"digest": []}', "invalid_request"),
        (b'{"digests": "blake3/x/1"}', "invalid_request"),
        (b'{"digests": [], "extra": 1}', "invalid_request"),
    ],
)
async def test_find_missing_rejects_a_malformed_body(
    served: Served, body: bytes, code: str
) -> None:
    status, error = await served.error("POST", "/v1/cas/find-missing", data=body)
    assert (status, error["code"]) == (400, code)


async def test_find_missing_refuses_more_digests_than_the_server_allows(tmp_path: Path) -> None:
    options = NativeHttpOptions(listen=HostPort("127.0.0.1:0"), max_find_missing=3)
    async for served in _serve(tmp_path, tmp_path / "cas", options):
        digests = [str(_blob(8)[0]) for _ in range(4)]
        status, error = await served.error(
            "POST", "/v1/cas/find-missing", json={"digests": digests}
        )
        assert (status, error["code"], error["max_digests"]) == (413, "too_many_digests", 3)
        assert "split" in error["message"]


# -- action cache -----------------------------------------------------------------------------


async def _result_with_outputs(served: Served) -> tuple[ActionResult, list[Digest]]:
    outputs = [_blob(200), _blob(300, SHA256)]
    for digest, data in outputs:
        await served.client.put_blob(digest, data)
    stdout, stdout_data = _blob(50)
    await served.client.put_blob(stdout, stdout_data)
    result = ActionResult(
        exit_code=0,
        output_files=(
            OutputFile("out/a", outputs[0][0]),
            OutputFile("out/b", outputs[1][0], is_executable=True),
        ),
        stdout_digest=stdout,
    )
    return result, [stdout, outputs[0][0], outputs[1][0]]


async def test_action_result_round_trips(served: Served) -> None:
    action = _blob(64)[0]
    assert await served.client.get_action_result(action) is None
    result, _ = await _result_with_outputs(served)
    await served.client.put_action_result(action, result)
    assert await served.client.get_action_result(action) == result
    async with served.http.get(f"{served.url}/v1/ac/{action}") as response:
        assert response.status == 200
        assert (await response.json())["output_files"][0]["path"] == "out/a"


async def test_action_cache_miss_is_a_json_404(served: Served) -> None:
    action = _blob(64)[0]
    status, error = await served.error("GET", f"/v1/ac/{action}")
    assert (status, error["code"]) == (404, "action_result_not_found")
    assert str(action) in error["message"]


async def test_action_result_with_missing_blobs_is_refused_with_the_list(served: Served) -> None:
    action = _blob(64)[0]
    result, _ = await _result_with_outputs(served)
    gone = _blob(77)[0]
    result = attrs.evolve(result, stderr_digest=gone)
    status, error = await served.error("PUT", f"/v1/ac/{action}", data=orjson.dumps(_wire(result)))
    assert (status, error["code"], error["missing"]) == (400, "missing_blobs", [str(gone)])
    with pytest.raises(MissingBlobs) as caught:
        await served.client.put_action_result(action, result)
    assert caught.value.missing == [gone]
    assert await served.client.get_action_result(action) is None


def _wire(result: ActionResult) -> Any:
    from rexcore.serialization.codec import unstructure

    return unstructure(result)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"not json", "invalid_json"),
        (b'"a string"', "invalid_json"),
        (b'{"exit_code": "zero"}', "invalid_action_result"),
        (b'{"exit_code": 0, "no_such_field": 1}', "invalid_action_result"),
        (b'{"output_files": [{"path": "a", "digest": "blake3/zz/1"}]}', "invalid_action_result"),
    ],
)
async def test_malformed_action_result_is_a_400(served: Served, body: bytes, code: str) -> None:
    action = _blob(64)[0]
    status, error = await served.error("PUT", f"/v1/ac/{action}", data=body)
    assert (status, error["code"]) == (400, code)
    assert await served.client.get_action_result(action) is None


async def test_action_cache_rejects_a_malformed_action_address(served: Served) -> None:
    status, error = await served.error("GET", "/v1/ac/blake3/nothex/1")
    assert (status, error["code"]) == (400, "invalid_digest")


# -- a full disk ------------------------------------------------------------------------------


async def test_full_disk_is_a_507_with_no_partial_blob_and_the_server_keeps_serving(
    tmp_path: Path, small_disk: Path
) -> None:
    async for served in _serve(tmp_path, small_disk / "cas"):
        digest, data = _blob(1 << 20)  # twice the size of the whole disk
        status, error = await served.error("PUT", f"/v1/cas/{digest}", data=data)
        assert (status, error["code"]) == (507, "store_full")
        assert str(digest) in error["message"] and "Free disk space" in error["message"]
        assert not await served.client.contains(digest)
        assert not _files_under(served.store.root / "tmp")
        assert not list(served.store.root.rglob(digest.hash))
        with pytest.raises(StoreFull):
            await served.client.put_blob(digest, data)

        small, small_data = _blob(10_000)
        assert await served.client.put_blob(small, small_data)
        assert await served.client.get_blob(small) == small_data
        assert (await served.client.health())["status"] == "ok"


# -- the client -------------------------------------------------------------------------------


async def test_upload_and_download_of_a_file(served: Served, tmp_path: Path) -> None:
    source = tmp_path / "source.bin"
    data = os.urandom(9 << 20)
    source.write_bytes(data)
    seen: list[tuple[int, int]] = []
    digest = await served.client.upload_file(source, SHA256, progress=lambda *p: seen.append(p))
    assert digest == digest_of(data, SHA256)
    assert seen[-1] == (len(data), len(data))
    target = tmp_path / "out" / "copy.bin"
    target.parent.mkdir()
    seen.clear()
    await served.client.download_file(digest, target, progress=lambda *p: seen.append(p))
    assert target.read_bytes() == data
    assert seen[-1] == (len(data), len(data))
    assert [p.name for p in target.parent.iterdir()] == ["copy.bin"]


async def test_upload_file_skips_the_upload_when_the_server_has_the_blob(
    served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(100_000))
    digest = await served.client.upload_file(source)

    async def no_upload(*args: object) -> bool:
        raise AssertionError("uploaded a blob the server already holds")

    monkeypatch.setattr(served.client, "_put", no_upload)
    assert await served.client.upload_file(source) == digest


@pytest.mark.parametrize("change", ["shrink", "grow", "rewrite"])
async def test_upload_of_a_file_that_changes_after_hashing_fails_cleanly(
    served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(6 << 20))
    real_hash = client_module._hash_file

    def hash_then_change(path: Path, function: DigestFunction) -> Digest:
        digest = real_hash(path, function)
        data = path.read_bytes()
        changed = {"shrink": data[:-10], "grow": data + b"more", "rewrite": data[::-1]}[change]
        path.write_bytes(changed)
        return digest

    monkeypatch.setattr(client_module, "_hash_file", hash_then_change)
    with pytest.raises(RexClientError, match="changed while it was uploaded") as caught:
        await asyncio.wait_for(served.client.upload_file(source), 30)
    assert str(source) in str(caught.value)
    await _no_temp_files_eventually(served.store)
    assert (await served.client.health())["blob_store"]["blobs"] <= 2  # the empty blobs only


async def test_download_verifies_the_digest_and_leaves_nothing_on_mismatch(
    served: Served, tmp_path: Path
) -> None:
    digest, data = _blob(3 << 20)
    await served.client.put_blob(digest, data)
    blob_file = served.store.local_path(digest)
    assert blob_file is not None
    blob_file.chmod(0o644)
    blob_file.write_bytes(os.urandom(len(data)))  # rot on the server's disk, same size

    target_dir = tmp_path / "downloads"
    target_dir.mkdir()
    kept = target_dir / "kept.bin"
    kept.write_bytes(b"an older version")
    with pytest.raises(DigestMismatch, match="corrupt"):
        await served.client.download_file(digest, kept)
    assert kept.read_bytes() == b"an older version"
    with pytest.raises(DigestMismatch):
        await served.client.download_file(digest, target_dir / "new.bin")
    assert sorted(p.name for p in target_dir.iterdir()) == ["kept.bin"]
    with pytest.raises(DigestMismatch):
        await served.client.get_blob(digest)


async def test_download_of_a_missing_blob_raises_and_leaves_nothing(
    served: Served, tmp_path: Path
) -> None:
    digest, _ = _blob(10)
    with pytest.raises(BlobNotFound) as caught:
        await served.client.download_file(digest, tmp_path / "x.bin")
    assert (caught.value.status, caught.value.code) == (404, "blob_not_found")
    assert not list(tmp_path.glob("*x.bin*"))


async def test_unreachable_server_is_reported_with_its_url(served: Served) -> None:
    url = served.url
    await served.protocol.stop()
    async with RexClient(url, timeout=5) as client:
        with pytest.raises(ServerUnavailable, match="rexd serve") as caught:
            await client.health()
    assert url in str(caught.value)
    assert isinstance(caught.value, RexClientError)


async def test_stop_lets_an_inflight_upload_finish(served: Served) -> None:
    digest, data = _blob(2 << 20)
    sent_first = asyncio.Event()
    proceed = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield data[:1000]
        sent_first.set()
        await proceed.wait()
        yield data[1000:]

    async def upload() -> int:
        async with served.http.put(
            f"{served.url}/v1/cas/{digest}",
            data=slow_body(),
            headers={"Content-Length": str(len(data))},
        ) as response:
            return response.status

    uploading = asyncio.create_task(upload())
    await sent_first.wait()
    while not _files_under(served.store.root / "tmp"):  # the server is writing the blob
        await asyncio.sleep(0.01)
    stopping = asyncio.create_task(served.protocol.stop())
    await asyncio.sleep(0.05)  # stop() is now waiting for the upload
    assert not stopping.done()
    proceed.set()
    assert await uploading == 201
    await stopping
    assert await served.store.contains(digest)


@pytest.mark.parametrize(
    ("explicit", "env", "expected"),
    [
        ("http://example.test:1234/", None, "http://example.test:1234"),
        ("10.0.0.1:9000", "other:1", "http://10.0.0.1:9000"),
        (None, "rex.internal:8981", "http://rex.internal:8981"),
        (None, None, "http://127.0.0.1:8981"),
    ],
)
def test_resolve_server_prefers_the_flag_then_the_environment(
    monkeypatch: pytest.MonkeyPatch, explicit: str | None, env: str | None, expected: str
) -> None:
    if env is None:
        monkeypatch.delenv("REX_SERVER", raising=False)
    else:
        monkeypatch.setenv("REX_SERVER", env)
    assert resolve_server(explicit) == expected


def test_resolve_server_rejects_a_non_http_address() -> None:
    with pytest.raises(RexClientError, match="--server"):
        resolve_server("ftp://host:21")
