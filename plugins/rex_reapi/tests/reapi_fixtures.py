"""Fixtures: a real rexd (in this event loop) serving REAPI on a free port, and stubs."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import grpc
import pytest
import rex_reapi.plugin
from google.longrunning import operations_pb2_grpc
from rex_reapi.proto import bytestream_pb2_grpc
from rex_reapi.proto import remote_execution_pb2 as re_pb2
from rex_reapi.proto import remote_execution_pb2_grpc as re_grpc

from rexcore.plugins.manager import PluginManager
from rexcore.testing import RunningRexd, start_rexd
from tests._certificates import Certificates, make_certificates  # noqa: F401 (re-exported)


def sha256_digest(data: bytes) -> re_pb2.Digest:
    return re_pb2.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


@attrs.define
class Reapi:
    """Stubs of every service on one channel to a running rexd."""

    rexd: RunningRexd
    channel: grpc.aio.Channel
    cas: re_grpc.ContentAddressableStorageStub
    bytestream: bytestream_pb2_grpc.ByteStreamStub
    ac: re_grpc.ActionCacheStub
    execution: re_grpc.ExecutionStub
    capabilities: re_grpc.CapabilitiesStub
    operations: operations_pb2_grpc.OperationsStub

    async def upload(self, *blobs: bytes) -> list[re_pb2.Digest]:
        digests = [sha256_digest(b) for b in blobs]
        response = await self.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(requests=[
            re_pb2.BatchUpdateBlobsRequest.Request(digest=d, data=b)
            for d, b in zip(digests, blobs)
        ]))
        assert all(r.status.code == 0 for r in response.responses), response
        return digests

    async def upload_message(self, message: Any) -> re_pb2.Digest:
        return (await self.upload(message.SerializeToString()))[0]


def reapi_plugins() -> PluginManager:
    manager = PluginManager()
    manager.register_builtins()
    manager.register(rex_reapi.plugin, name="rex-reapi")
    return manager


async def connect(running: RunningRexd) -> Reapi:
    channel = grpc.aio.insecure_channel(
        running.addresses["reapi"],
        options=[("grpc.max_receive_message_length", 64 << 20)],
    )
    return Reapi(
        running, channel,
        re_grpc.ContentAddressableStorageStub(channel),
        bytestream_pb2_grpc.ByteStreamStub(channel),
        re_grpc.ActionCacheStub(channel),
        re_grpc.ExecutionStub(channel),
        re_grpc.CapabilitiesStub(channel),
        operations_pb2_grpc.OperationsStub(channel),
    )


@pytest.fixture
def reapi_config() -> dict[str, Any]:
    """Override in a module to configure the server (shaped like rexd.toml)."""
    return {}


@pytest.fixture
async def reapi(tmp_path: Path, reapi_config: dict[str, Any]) -> AsyncIterator[Reapi]:
    running = await start_rexd(reapi_plugins(), tmp_path / "data", reapi_config)
    client = await connect(running)
    try:
        yield client
    finally:
        await client.channel.close()
        await running.daemon.stop()

