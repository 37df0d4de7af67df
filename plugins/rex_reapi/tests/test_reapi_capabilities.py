"""Capabilities over gRPC: what rex announces, and how it follows the config."""

from __future__ import annotations

import grpc
import pytest
from reapi_fixtures import Reapi, reapi, reapi_config, sha256_digest

_FIXTURES = (reapi, reapi_config)  # pytest finds them by name here
from rex_reapi.proto import bytestream_pb2 as bs_pb2
from rex_reapi.proto import remote_execution_pb2 as re_pb2

_Fn = re_pb2.DigestFunction.Value


def _version(v: object) -> tuple[int, int, int]:
    return (v.major, v.minor, v.patch)  # type: ignore[attr-defined]


async def test_capabilities_announce_api_range_digest_functions_and_compressors(
    reapi: Reapi,
) -> None:
    caps = await reapi.capabilities.GetCapabilities(re_pb2.GetCapabilitiesRequest())
    assert _version(caps.low_api_version) <= (2, 0, 0) <= _version(caps.high_api_version)
    assert _version(caps.high_api_version) >= (2, 1, 0)  # output_paths is 2.1
    cache = caps.cache_capabilities
    assert {_Fn.SHA256, _Fn.BLAKE3} <= set(cache.digest_functions)
    assert cache.max_batch_total_size_bytes == 4 << 20
    assert re_pb2.Compressor.ZSTD in cache.supported_compressors
    assert re_pb2.Compressor.ZSTD in cache.supported_batch_update_compressors
    assert cache.action_cache_update_capabilities.update_enabled
    execution = caps.execution_capabilities
    assert execution.exec_enabled
    assert {_Fn.SHA256, _Fn.BLAKE3} <= set(execution.digest_functions)
    assert execution.digest_function == _Fn.SHA256  # what Bazel 4-6 read


@pytest.mark.parametrize("reapi_config", [
    {"storage": {"action_cache": {"allow_client_updates": False}}},
])
async def test_capabilities_say_update_disabled_when_cache_updates_are_off(reapi: Reapi) -> None:
    caps = await reapi.capabilities.GetCapabilities(re_pb2.GetCapabilitiesRequest())
    assert not caps.cache_capabilities.action_cache_update_capabilities.update_enabled


@pytest.mark.parametrize("reapi_config", [
    {"protocols": {"reapi": {"max_batch_total_size": 1234}}},
])
async def test_capabilities_announce_the_configured_batch_limit(reapi: Reapi) -> None:
    caps = await reapi.capabilities.GetCapabilities(re_pb2.GetCapabilitiesRequest())
    assert caps.cache_capabilities.max_batch_total_size_bytes == 1234


async def test_unknown_instance_name_is_invalid_argument(reapi: Reapi) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await reapi.capabilities.GetCapabilities(
            re_pb2.GetCapabilitiesRequest(instance_name="nope"))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "nope" in (raised.value.details() or "")


@pytest.mark.parametrize("reapi_config", [
    {"protocols": {"reapi": {"instance_names": ["main/ci"]}}},
])
async def test_configured_instance_name_is_served_and_the_empty_one_is_not(reapi: Reapi) -> None:
    caps = await reapi.capabilities.GetCapabilities(
        re_pb2.GetCapabilitiesRequest(instance_name="main/ci"))
    assert caps.cache_capabilities.digest_functions
    blob = b"instance blob"
    digest = sha256_digest(blob)
    response = await reapi.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(
        instance_name="main/ci",
        requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=digest, data=blob)]))
    assert response.responses[0].status.code == 0
    chunks = [r.data async for r in reapi.bytestream.Read(bs_pb2.ReadRequest(
        resource_name=f"main/ci/blobs/{digest.hash}/{digest.size_bytes}"))]
    assert b"".join(chunks) == blob
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await reapi.capabilities.GetCapabilities(re_pb2.GetCapabilitiesRequest())
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
