"""Malformed messages never crash the REAPI server; health checking and reflection."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from reapi_fixtures import Reapi, reapi, reapi_config, sha256_digest

_FIXTURES = (reapi, reapi_config)  # pytest finds them by name here
from rex_reapi.proto import remote_execution_pb2 as re_pb2

_REAPI = "build.bazel.remote.execution.v2"
SERVICES = [f"{_REAPI}.Execution", f"{_REAPI}.ActionCache", f"{_REAPI}.ContentAddressableStorage",
            f"{_REAPI}.Capabilities", "google.bytestream.ByteStream",
            "google.longrunning.Operations"]
#: Every method served, by its kind of call.
UNARY = [f"/{_REAPI}.ContentAddressableStorage/FindMissingBlobs",
         f"/{_REAPI}.ContentAddressableStorage/BatchUpdateBlobs",
         f"/{_REAPI}.ContentAddressableStorage/BatchReadBlobs",
         f"/{_REAPI}.ActionCache/GetActionResult", f"/{_REAPI}.ActionCache/UpdateActionResult",
         f"/{_REAPI}.Capabilities/GetCapabilities",
         "/google.bytestream.ByteStream/QueryWriteStatus",
         "/google.longrunning.Operations/GetOperation",
         "/google.longrunning.Operations/CancelOperation"]
SERVER_STREAMING = [f"/{_REAPI}.ContentAddressableStorage/GetTree", f"/{_REAPI}.Execution/Execute",
                    f"/{_REAPI}.Execution/WaitExecution", "/google.bytestream.ByteStream/Read"]
CLIENT_STREAMING = ["/google.bytestream.ByteStream/Write"]


def _garbage(seed: int) -> bytes:
    # Field 1 with wire type 7 (none exists) first: never a parseable message.
    return b"\x0f" + random.Random(seed).randbytes(64)


async def _still_serving(reapi: Reapi) -> None:
    caps = await reapi.capabilities.GetCapabilities(re_pb2.GetCapabilitiesRequest())
    assert caps.cache_capabilities.digest_functions


async def _execute_code(reapi: Reapi, action: re_pb2.Action | bytes) -> grpc.StatusCode:
    data = action if isinstance(action, bytes) else action.SerializeToString()
    [digest] = await reapi.upload(data)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in reapi.execution.Execute(re_pb2.ExecuteRequest(action_digest=digest)):
            pass
    return raised.value.code()


@pytest.mark.parametrize("method", UNARY)
async def test_garbage_request_to_a_unary_method_fails_and_the_server_lives_on(
    reapi: Reapi, method: str,
) -> None:
    call = reapi.channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    for seed in range(3):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call(_garbage(seed))
        assert raised.value.code() != grpc.StatusCode.OK
    await _still_serving(reapi)


@pytest.mark.parametrize("method", SERVER_STREAMING)
async def test_garbage_request_to_a_streaming_method_fails_and_the_server_lives_on(
    reapi: Reapi, method: str,
) -> None:
    call = reapi.channel.unary_stream(method, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in call(_garbage(7)):
            pass
    assert raised.value.code() != grpc.StatusCode.OK
    await _still_serving(reapi)


@pytest.mark.parametrize("method", CLIENT_STREAMING)
async def test_garbage_messages_to_write_fail_and_the_server_lives_on(
    reapi: Reapi, method: str,
) -> None:
    call = reapi.channel.stream_unary(method, request_serializer=None, response_deserializer=None)

    async def messages() -> AsyncIterator[bytes]:
        for seed in range(3):
            yield _garbage(seed)

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call(messages())
    assert raised.value.code() != grpc.StatusCode.OK
    await _still_serving(reapi)


async def test_unknown_method_is_unimplemented(reapi: Reapi) -> None:
    call = reapi.channel.unary_unary(f"/{_REAPI}.Execution/Nope", request_serializer=None,
                                     response_deserializer=None)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call(b"")
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_action_blob_that_is_no_action_is_invalid_argument(reapi: Reapi) -> None:
    assert await _execute_code(reapi, _garbage(1)) == grpc.StatusCode.INVALID_ARGUMENT
    await _still_serving(reapi)


async def test_command_or_input_root_that_is_no_message_is_invalid_argument(reapi: Reapi) -> None:
    [junk] = await reapi.upload(_garbage(2))
    [root] = await reapi.upload(b"")
    [command] = await reapi.upload(re_pb2.Command(arguments=["/bin/true"]).SerializeToString())
    for action in (re_pb2.Action(command_digest=junk, input_root_digest=root),
                   re_pb2.Action(command_digest=command, input_root_digest=junk)):
        assert await _execute_code(reapi, action) == grpc.StatusCode.INVALID_ARGUMENT


async def test_action_with_malformed_digests_is_invalid_argument(reapi: Reapi) -> None:
    [command] = await reapi.upload(re_pb2.Command(arguments=["/bin/true"]).SerializeToString())
    bad = re_pb2.Digest(hash="not-a-hash", size_bytes=3)
    negative = re_pb2.Digest(hash=sha256_digest(b"x").hash, size_bytes=-1)
    for action in (re_pb2.Action(command_digest=bad, input_root_digest=sha256_digest(b"")),
                   re_pb2.Action(command_digest=command, input_root_digest=negative),
                   re_pb2.Action(command_digest=command)):
        assert await _execute_code(reapi, action) == grpc.StatusCode.INVALID_ARGUMENT
    child = re_pb2.Directory(directories=[re_pb2.DirectoryNode(name="sub", digest=bad)])
    [root] = await reapi.upload(child.SerializeToString())
    action = re_pb2.Action(command_digest=command, input_root_digest=root)
    assert await _execute_code(reapi, action) == grpc.StatusCode.INVALID_ARGUMENT


async def test_negative_timeout_is_invalid_argument(reapi: Reapi) -> None:
    [command, root] = await reapi.upload(
        re_pb2.Command(arguments=["/bin/true"]).SerializeToString(), b"")
    action = re_pb2.Action(command_digest=command, input_root_digest=root)
    action.timeout.seconds = -1
    assert await _execute_code(reapi, action) == grpc.StatusCode.INVALID_ARGUMENT


async def test_missing_nested_input_directory_is_listed_in_the_precondition_failure(
    reapi: Reapi,
) -> None:
    lost = sha256_digest(b"a directory never uploaded")
    root = re_pb2.Directory(directories=[re_pb2.DirectoryNode(name="sub", digest=lost)])
    [command, root_digest] = await reapi.upload(
        re_pb2.Command(arguments=["/bin/true"]).SerializeToString(), root.SerializeToString())
    [digest] = await reapi.upload(re_pb2.Action(
        command_digest=command, input_root_digest=root_digest).SerializeToString())
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in reapi.execution.Execute(re_pb2.ExecuteRequest(action_digest=digest)):
            pass
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    [details] = [v for k, v in raised.value.trailing_metadata() if k == "grpc-status-details-bin"]
    failure = error_details_pb2.PreconditionFailure()
    assert status_pb2.Status.FromString(details).details[0].Unpack(failure)
    assert [v.subject for v in failure.violations] == [f"blobs/{lost.hash}/{lost.size_bytes}"]


async def test_health_check_reports_serving_for_the_server_and_each_service(reapi: Reapi) -> None:
    health = health_pb2_grpc.HealthStub(reapi.channel)
    for service in ["", *SERVICES]:
        response = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_the_reapi_services_and_describes_them(reapi: Reapi) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(reapi.channel)

    async def ask(
        request: reflection_pb2.ServerReflectionRequest,
    ) -> reflection_pb2.ServerReflectionResponse:
        async for response in stub.ServerReflectionInfo(iter([request])):
            return response
        raise AssertionError("no reflection response")

    listed = await ask(reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in listed.list_services_response.service}
    assert set(SERVICES) | {"grpc.health.v1.Health"} <= names
    described = await ask(reflection_pb2.ServerReflectionRequest(
        file_containing_symbol=f"{_REAPI}.Execution"))
    assert described.file_descriptor_response.file_descriptor_proto


@pytest.mark.parametrize("reapi_config", [{"scheduler": {"enabled": False}}])
async def test_cache_only_server_says_so_and_refuses_execute(reapi: Reapi) -> None:
    caps = await reapi.capabilities.GetCapabilities(re_pb2.GetCapabilitiesRequest())
    assert not caps.execution_capabilities.exec_enabled
    [command, root] = await reapi.upload(
        re_pb2.Command(arguments=["/bin/true"]).SerializeToString(), b"")
    action = re_pb2.Action(command_digest=command, input_root_digest=root)
    assert await _execute_code(reapi, action) == grpc.StatusCode.UNIMPLEMENTED
