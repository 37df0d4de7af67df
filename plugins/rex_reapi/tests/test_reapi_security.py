"""TLS, mutual TLS and bearer tokens on the REAPI server, with real gRPC clients."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from reapi_fixtures import Certificates, make_certificates, reapi_plugins, sha256_digest
from rex_reapi.proto import bytestream_pb2 as bs_pb2
from rex_reapi.proto import bytestream_pb2_grpc
from rex_reapi.proto import remote_execution_pb2 as re_pb2
from rex_reapi.proto import remote_execution_pb2_grpc as re_grpc

from rexcore.testing import RunningRexd, start_rexd

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


async def _rexd(tmp_path: Path, **reapi: Any) -> RunningRexd:
    return await start_rexd(reapi_plugins(), tmp_path / "data",
                            {"protocols": {"reapi": reapi}})


@pytest.fixture
async def stop() -> AsyncIterator[list[RunningRexd]]:
    running: list[RunningRexd] = []
    yield running
    for rexd in running:
        await rexd.daemon.stop()


def _port(rexd: RunningRexd) -> str:
    return rexd.addresses["reapi"].rsplit(":", 1)[1]


def _tls(certs: Certificates, client: tuple[Path, Path] | None = None) -> grpc.ChannelCredentials:
    key, chain = (client[1].read_bytes(), client[0].read_bytes()) if client else (None, None)
    return grpc.ssl_channel_credentials(certs.ca.read_bytes(), key, chain)


async def _capabilities(channel: grpc.aio.Channel, **call: Any) -> re_pb2.ServerCapabilities:
    return await re_grpc.CapabilitiesStub(channel).GetCapabilities(
        re_pb2.GetCapabilitiesRequest(), timeout=20, **call)


async def test_tls_serves_clients_that_trust_the_certificate_and_only_over_tls(
    tmp_path, certs, stop
):
    rexd = await _rexd(tmp_path, tls_certificate=str(certs.server_cert),
                       tls_key=str(certs.server_key))
    stop.append(rexd)
    assert rexd.daemon.protocols["reapi"].scheme == "grpcs"
    async with grpc.aio.secure_channel(f"localhost:{_port(rexd)}", _tls(certs)) as channel:
        capabilities = await _capabilities(channel)
        assert capabilities.execution_capabilities.exec_enabled
    async with grpc.aio.insecure_channel(f"127.0.0.1:{_port(rexd)}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await _capabilities(channel, wait_for_ready=False)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_requires_a_client_certificate_from_the_client_ca(
    tmp_path, certs, stop
):
    rexd = await _rexd(tmp_path, tls_certificate=str(certs.server_cert),
                       tls_key=str(certs.server_key), tls_client_ca=str(certs.ca))
    stop.append(rexd)
    address = f"localhost:{_port(rexd)}"
    good = _tls(certs, (certs.client_cert, certs.client_key))
    async with grpc.aio.secure_channel(address, good) as channel:
        await _capabilities(channel)
    for credentials in (_tls(certs), _tls(certs, (certs.rogue_cert, certs.rogue_key))):
        async with grpc.aio.secure_channel(address, credentials) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await _capabilities(channel)
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_bearer_tokens_gate_every_kind_of_call_but_health_checks(tmp_path, stop):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# REAPI clients\n\nanother-token\n  {TOKEN}  \n")
    rexd = await _rexd(tmp_path, auth_tokens_file=str(tokens))
    stop.append(rexd)
    blob = b"guarded"
    digest = sha256_digest(blob)
    name = f"blobs/{digest.hash}/{digest.size_bytes}"

    async def calls(metadata: tuple[tuple[str, str], ...]) -> list[grpc.StatusCode]:
        """One call of each shape; the status each ended with."""
        codes = []
        async with grpc.aio.insecure_channel(rexd.addresses["reapi"]) as channel:
            cas = re_grpc.ContentAddressableStorageStub(channel)
            bytestream = bytestream_pb2_grpc.ByteStreamStub(channel)
            execution = re_grpc.ExecutionStub(channel)
            attempts = [
                lambda: _capabilities(channel, metadata=metadata),  # unary
                lambda: cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
                    blob_digests=[digest]), metadata=metadata),
                lambda: bytestream.Write(iter([bs_pb2.WriteRequest(  # stream -> unary
                    resource_name=f"uploads/x/{name}", data=blob, finish_write=True)]),
                    metadata=metadata),
                lambda: _drain(bytestream.Read(bs_pb2.ReadRequest(  # unary -> stream
                    resource_name=name), metadata=metadata)),
                lambda: _drain(execution.Execute(re_pb2.ExecuteRequest(  # unary -> stream
                    action_digest=sha256_digest(b"no such action")), metadata=metadata)),
            ]
            for attempt in attempts:
                try:
                    await attempt()
                    codes.append(grpc.StatusCode.OK)
                except grpc.aio.AioRpcError as error:
                    codes.append(error.code())
        return codes

    unauthenticated = [grpc.StatusCode.UNAUTHENTICATED] * 5
    assert await calls(()) == unauthenticated
    assert await calls((("authorization", "Bearer wrong"),)) == unauthenticated
    assert await calls((("authorization", TOKEN),)) == unauthenticated  # no scheme
    # With a token every call goes through (the Execute of an unknown action is refused
    # by the server itself, not by the token check).
    assert await calls((("authorization", f"Bearer {TOKEN}"),)) == [
        grpc.StatusCode.OK] * 4 + [grpc.StatusCode.FAILED_PRECONDITION]
    assert (await calls((("authorization", "bearer another-token"),)))[:4] == [
        grpc.StatusCode.OK] * 4
    async with grpc.aio.insecure_channel(rexd.addresses["reapi"]) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""))
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await _capabilities(channel)
        assert "--remote_header=Authorization=Bearer" in (raised.value.details() or "")


async def _drain(call: Any) -> None:
    async for _ in call:
        pass


@pytest.mark.parametrize(("options", "message"), [
    ({"tls_key": "KEY"}, "tls_certificate is not set"),
    ({"tls_certificate": "CERT"}, "tls_key is not set"),
    ({"tls_client_ca": "CERT"}, "tls_client_ca needs tls_certificate"),
    ({"tls_certificate": "MISSING", "tls_key": "KEY"}, "cannot read the TLS certificate"),
    ({"tls_certificate": "NOT_PEM", "tls_key": "KEY"}, "is not PEM"),
    ({"auth_tokens_file": "EMPTY"}, "holds no token"),
    ({"auth_tokens_file": "MISSING"}, "cannot read auth_tokens_file"),
])
async def test_unusable_tls_or_token_files_stop_the_start_with_a_clear_error(
    tmp_path, certs, options, message
):
    files = {"CERT": str(certs.server_cert), "KEY": str(certs.server_key),
             "MISSING": str(tmp_path / "missing.pem"), "NOT_PEM": str(tmp_path / "plain"),
             "EMPTY": str(tmp_path / "empty")}
    (tmp_path / "plain").write_text("not a certificate\n")
    (tmp_path / "empty").write_text("# nothing\n\n")
    with pytest.raises(Exception) as raised:
        rexd = await _rexd(tmp_path, **{k: files[v] for k, v in options.items()})
        await rexd.daemon.stop()
    assert message in str(raised.value)
