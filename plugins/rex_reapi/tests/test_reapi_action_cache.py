"""ActionCache over gRPC: misses, client updates and their checks, inlined outputs."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from reapi_fixtures import Reapi, reapi, reapi_config, sha256_digest

_FIXTURES = (reapi, reapi_config)  # pytest finds them by name here
from rex_reapi.proto import remote_execution_pb2 as re_pb2


def _rich_status(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    raise AssertionError(f"no grpc-status-details-bin in {error}")


async def _update(
    reapi: Reapi, action: re_pb2.Digest, result: re_pb2.ActionResult,
) -> re_pb2.ActionResult:
    return await reapi.ac.UpdateActionResult(re_pb2.UpdateActionResultRequest(
        action_digest=action, action_result=result))


async def _update_error(reapi: Reapi, action: re_pb2.Digest,
                        result: re_pb2.ActionResult) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _update(reapi, action, result)
    return raised.value


async def test_get_action_result_miss_is_not_found(reapi: Reapi) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await reapi.ac.GetActionResult(re_pb2.GetActionResultRequest(
            action_digest=sha256_digest(b"never run")))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_updated_result_is_returned_by_get(reapi: Reapi) -> None:
    out, stdout = await reapi.upload(b"output bytes", b"some stdout")
    action = sha256_digest(b"action 1")
    result = re_pb2.ActionResult(
        exit_code=0, stdout_digest=stdout,
        output_files=[re_pb2.OutputFile(path="out/a.txt", digest=out, is_executable=True)],
        output_symlinks=[re_pb2.OutputSymlink(path="out/link", target="a.txt")],
    )
    await _update(reapi, action, result)
    got = await reapi.ac.GetActionResult(re_pb2.GetActionResultRequest(action_digest=action))
    assert got.output_files == result.output_files
    assert got.output_symlinks == result.output_symlinks
    assert got.stdout_digest == stdout
    assert got.stdout_raw == b""


async def test_get_with_inline_stdout_returns_stdout_raw(reapi: Reapi) -> None:
    out, stdout, stderr = await reapi.upload(b"file", b"the stdout", b"the stderr")
    action = sha256_digest(b"inline action")
    await _update(reapi, action, re_pb2.ActionResult(
        stdout_digest=stdout, stderr_digest=stderr,
        output_files=[re_pb2.OutputFile(path="f", digest=out)]))
    got = await reapi.ac.GetActionResult(re_pb2.GetActionResultRequest(
        action_digest=action, inline_stdout=True, inline_output_files=["f"]))
    assert got.stdout_raw == b"the stdout"
    assert got.stderr_raw == b""  # not asked for
    assert got.output_files[0].contents == b"file"


async def test_updated_output_directory_needs_its_tree_and_files(reapi: Reapi) -> None:
    [file] = await reapi.upload(b"in the tree")
    tree = re_pb2.Tree(root=re_pb2.Directory(files=[re_pb2.FileNode(name="x", digest=file)]))
    tree_digest = await reapi.upload_message(tree)
    action = sha256_digest(b"dir action")
    result = re_pb2.ActionResult(output_directories=[
        re_pb2.OutputDirectory(path="out", tree_digest=tree_digest)])
    await _update(reapi, action, result)
    got = await reapi.ac.GetActionResult(re_pb2.GetActionResultRequest(action_digest=action))
    assert got.output_directories == result.output_directories

    lost = sha256_digest(b"a file the tree names but nobody uploaded")
    bad_tree = re_pb2.Tree(root=re_pb2.Directory(files=[re_pb2.FileNode(name="y", digest=lost)]))
    bad_result = re_pb2.ActionResult(output_directories=[
        re_pb2.OutputDirectory(path="out", tree_digest=await reapi.upload_message(bad_tree))])
    error = await _update_error(reapi, sha256_digest(b"dir action 2"), bad_result)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_update_referring_to_a_missing_blob_is_failed_precondition(reapi: Reapi) -> None:
    missing = sha256_digest(b"not uploaded")
    action = sha256_digest(b"action with missing output")
    error = await _update_error(reapi, action, re_pb2.ActionResult(
        output_files=[re_pb2.OutputFile(path="out", digest=missing)]))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    failure = error_details_pb2.PreconditionFailure()
    [detail] = _rich_status(error).details
    assert detail.Unpack(failure)
    assert [(v.type, v.subject) for v in failure.violations] == [
        ("MISSING", f"blobs/{missing.hash}/{missing.size_bytes}")]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await reapi.ac.GetActionResult(re_pb2.GetActionResultRequest(action_digest=action))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("path", ["../escape", "/abs/path", "a/../../b", "a//b", ""])
async def test_update_with_a_path_outside_the_exec_root_is_invalid_argument(
    reapi: Reapi, path: str,
) -> None:
    [out] = await reapi.upload(b"x")
    action = sha256_digest(path.encode() + b" action")
    for result in (
        re_pb2.ActionResult(output_files=[re_pb2.OutputFile(path=path, digest=out)]),
        re_pb2.ActionResult(output_symlinks=[re_pb2.OutputSymlink(path=path, target="x")]),
    ):
        error = await _update_error(reapi, action, result)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await reapi.ac.GetActionResult(re_pb2.GetActionResultRequest(action_digest=action))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("reapi_config", [
    {"storage": {"action_cache": {"allow_client_updates": False}}},
    {"storage": {"action_cache": {"enabled": False}}},
])
async def test_update_is_permission_denied_when_updates_are_off(reapi: Reapi) -> None:
    [out] = await reapi.upload(b"x")
    error = await _update_error(reapi, sha256_digest(b"denied"), re_pb2.ActionResult(
        output_files=[re_pb2.OutputFile(path="out", digest=out)]))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_action_cache_with_unknown_instance_is_invalid_argument(reapi: Reapi) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await reapi.ac.GetActionResult(re_pb2.GetActionResultRequest(
            instance_name="elsewhere", action_digest=sha256_digest(b"x")))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
