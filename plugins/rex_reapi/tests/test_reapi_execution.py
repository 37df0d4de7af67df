"""Execution and Operations over gRPC, with one real local worker running the actions."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import attrs
import blake3
import grpc
import pytest
from google.longrunning import operations_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from reapi_fixtures import Reapi, connect, reapi, reapi_plugins, sha256_digest

_FIXTURES = (reapi,)  # pytest finds them by name here
from rex_reapi.proto import bytestream_pb2 as bs_pb2
from rex_reapi.proto import remote_execution_pb2 as re_pb2

from rexcore.scheduler.scheduler import Scheduler
from rexcore.testing import start_rexd

_Fn = re_pb2.DigestFunction.Value
_Stage = re_pb2.ExecutionStage.Value
_PATH = re_pb2.Command.EnvironmentVariable(name="PATH", value="/bin:/usr/bin")


@pytest.fixture
def reapi_config() -> dict[str, Any]:
    return {
        "pool": {"target_workers": 1, "sandbox": "process", "properties": {"OSFamily": "linux"}},
        "scheduler": {"max_timeout_s": 60},
        "protocols": {"reapi": {"update_interval_s": 0.2}},
    }


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory actions can see and write: the process sandbox runs them as nobody,
    and pytest's tmp_path is private to this user."""
    path = Path(tempfile.mkdtemp(prefix="rex-reapi-test-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# -- helpers ------------------------------------------------------------------------------


def _digest(data: bytes, function: int) -> re_pb2.Digest:
    if function == _Fn.BLAKE3:
        return re_pb2.Digest(hash=blake3.blake3(data).hexdigest(), size_bytes=len(data))
    return sha256_digest(data)


async def _put(reapi: Reapi, function: int, *blobs: bytes) -> list[re_pb2.Digest]:
    digests = [_digest(b, function) for b in blobs]
    response = await reapi.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(
        digest_function=function,
        requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=d, data=b)
                  for d, b in zip(digests, blobs)]))
    assert all(r.status.code == code_pb2.OK for r in response.responses), response
    return digests


async def _action(
    reapi: Reapi, script: str, *, inputs: dict[str, bytes] | None = None,
    output_paths: list[str] | None = None, output_files: list[str] | None = None,
    output_directories: list[str] | None = None, timeout_s: float | None = 30,
    do_not_cache: bool = False, function: int = _Fn.SHA256,
    action_platform: dict[str, str] | None = None,
    command_platform: dict[str, str] | None = None,
) -> re_pb2.Digest:
    """Upload a ``/bin/sh -c script`` action with flat input files; its digest."""
    files = []
    for name, data in sorted((inputs or {}).items()):
        [digest] = await _put(reapi, function, data)
        files.append(re_pb2.FileNode(name=name, digest=digest))
    command = re_pb2.Command(
        arguments=["/bin/sh", "-c", script], environment_variables=[_PATH],
        output_paths=output_paths or [], output_files=output_files or [],
        output_directories=output_directories or [],
        platform=_platform(command_platform))
    command_digest, root_digest = await _put(
        reapi, function, command.SerializeToString(),
        re_pb2.Directory(files=files).SerializeToString())
    action = re_pb2.Action(command_digest=command_digest, input_root_digest=root_digest,
                           do_not_cache=do_not_cache, platform=_platform(action_platform))
    if timeout_s is not None:
        action.timeout.FromNanoseconds(int(timeout_s * 1e9))
    [digest] = await _put(reapi, function, action.SerializeToString())
    return digest


def _platform(properties: dict[str, str] | None) -> re_pb2.Platform:
    return re_pb2.Platform(properties=[
        re_pb2.Platform.Property(name=k, value=v) for k, v in sorted((properties or {}).items())])


@attrs.frozen
class _Update:
    operation: operations_pb2.Operation
    metadata: re_pb2.ExecuteOperationMetadata
    response: re_pb2.ExecuteResponse | None


def _unpack(op: operations_pb2.Operation) -> _Update:
    metadata = re_pb2.ExecuteOperationMetadata()
    assert op.metadata.Unpack(metadata)
    response = None
    if op.done:
        response = re_pb2.ExecuteResponse()
        assert op.response.Unpack(response)
    return _Update(op, metadata, response)


async def _follow(stream: AsyncIterator[operations_pb2.Operation]) -> list[_Update]:
    return [_unpack(op) async for op in stream]


async def _execute(reapi: Reapi, digest: re_pb2.Digest, **request: Any) -> list[_Update]:
    request_message = re_pb2.ExecuteRequest(action_digest=digest, **request)
    return await _follow(reapi.execution.Execute(request_message))


async def _run(reapi: Reapi, digest: re_pb2.Digest, **request: Any) -> re_pb2.ExecuteResponse:
    """Execute to the end; the final ExecuteResponse (asserted to be the only done one)."""
    updates = await _execute(reapi, digest, **request)
    assert [u.operation.done for u in updates] == [False] * (len(updates) - 1) + [True]
    assert updates[-1].response is not None
    return updates[-1].response


async def _execute_error(
    reapi: Reapi, digest: re_pb2.Digest, **request: Any,
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _execute(reapi, digest, **request)
    return raised.value


async def _read(reapi: Reapi, digest: re_pb2.Digest, function: str = "") -> bytes:
    segment = f"{function}/" if function else ""
    name = f"blobs/{segment}{digest.hash}/{digest.size_bytes}"
    request = bs_pb2.ReadRequest(resource_name=name)
    return b"".join([r.data async for r in reapi.bytestream.Read(request)])


def _scheduler(reapi: Reapi) -> Scheduler:
    scheduler = reapi.rexd.runtime.scheduler
    assert scheduler is not None
    return scheduler


async def _get_operation(reapi: Reapi, name: str) -> _Update:
    request = operations_pb2.GetOperationRequest(name=name)
    return _unpack(await reapi.operations.GetOperation(request))


def _rich_status(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    raise AssertionError(f"no grpc-status-details-bin in {error}")


def _gated(gate: Path, then: str = "true") -> str:
    """A script that waits until the test creates ``gate`` (no sleeps to guess)."""
    return f"while [ ! -e {gate} ]; do sleep 0.01; done; {then}"


async def _first_update(stream: Any) -> _Update:
    """The first update of an Execute stream: the action has been submitted."""
    return _unpack(await stream.read())


async def _rest(stream: Any) -> list[_Update]:
    updates = []
    while (op := await stream.read()) is not grpc.aio.EOF:
        updates.append(_unpack(op))
    return updates


# -- Execute --------------------------------------------------------------------------------


async def test_execute_streams_updates_and_ends_with_the_result(reapi: Reapi) -> None:
    digest = await _action(reapi, "mkdir -p out && printf hi > out/a.txt && printf err >&2",
                           output_paths=["out/a.txt"])
    updates = await _execute(reapi, digest)
    assert [u.operation.done for u in updates][-1]
    assert not any(u.operation.done for u in updates[:-1])
    assert len({u.operation.name for u in updates}) == 1 and updates[0].operation.name
    assert all(u.metadata.action_digest == digest for u in updates)
    assert updates[-1].metadata.stage == _Stage.COMPLETED
    assert {u.metadata.stage for u in updates[:-1]} <= {_Stage.QUEUED, _Stage.EXECUTING}
    response = updates[-1].response
    assert response is not None
    assert response.status.code == code_pb2.OK
    assert not response.cached_result
    result = response.result
    assert result.exit_code == 0
    [out] = result.output_files
    assert out.path == "out/a.txt"
    assert await _read(reapi, out.digest) == b"hi"
    assert await _read(reapi, result.stderr_digest) == b"err"
    assert result.execution_metadata.worker
    assert result.execution_metadata.HasField("worker_start_timestamp")


async def test_second_execute_is_served_from_the_cache(reapi: Reapi) -> None:
    digest = await _action(reapi, "echo cached > o", output_paths=["o"])
    first = await _run(reapi, digest)
    second = await _run(reapi, digest)
    assert not first.cached_result
    assert second.cached_result
    assert second.status.code == code_pb2.OK
    assert second.result.output_files == first.result.output_files
    assert second.result.execution_metadata == first.result.execution_metadata
    cached = await reapi.ac.GetActionResult(re_pb2.GetActionResultRequest(action_digest=digest))
    assert cached.output_files == first.result.output_files


async def test_skip_cache_lookup_runs_the_action_again(reapi: Reapi) -> None:
    digest = await _action(reapi, "head -c 16 /dev/urandom | od -x > o", output_paths=["o"])
    first = await _run(reapi, digest)
    again = await _run(reapi, digest, skip_cache_lookup=True)
    assert not again.cached_result
    assert again.result.output_files[0].digest != first.result.output_files[0].digest


async def test_do_not_cache_results_are_not_cached(reapi: Reapi) -> None:
    digest = await _action(reapi, "head -c 16 /dev/urandom | od -x > o", output_paths=["o"],
                           do_not_cache=True)
    first = await _run(reapi, digest)
    assert first.status.code == code_pb2.OK
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await reapi.ac.GetActionResult(re_pb2.GetActionResultRequest(action_digest=digest))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    second = await _run(reapi, digest)
    assert not second.cached_result
    assert second.result.output_files[0].digest != first.result.output_files[0].digest


async def test_failing_action_reports_exit_code_and_stderr_and_is_not_cached(reapi: Reapi) -> None:
    digest = await _action(reapi, "echo broken >&2; exit 3")
    response = await _run(reapi, digest)
    assert response.status.code == code_pb2.OK  # the action ran; it failed by itself
    assert response.result.exit_code == 3
    assert await _read(reapi, response.result.stderr_digest) == b"broken\n"
    assert not (await _run(reapi, digest)).cached_result


async def test_inline_stdout_on_execute_returns_stdout_raw(reapi: Reapi) -> None:
    digest = await _action(reapi, "printf inline-me")
    response = await _run(reapi, digest, inline_stdout=True)
    assert response.result.stdout_raw == b"inline-me"
    cached = await _run(reapi, digest, inline_stdout=True)
    assert cached.cached_result and cached.result.stdout_raw == b"inline-me"


async def test_identical_in_flight_actions_are_merged_into_one_run(
    reapi: Reapi, shared_dir: Path,
) -> None:
    gate = shared_dir / "gate"
    digest = await _action(reapi, _gated(gate, "head -c 16 /dev/urandom | od -x > o"),
                           output_paths=["o"])
    request = re_pb2.ExecuteRequest(action_digest=digest)
    scheduler = _scheduler(reapi)
    runs_before = scheduler.metrics().total_executions
    first, second = reapi.execution.Execute(request), reapi.execution.Execute(request)
    try:
        head = [await _first_update(first), await _first_update(second)]
        assert not any(u.operation.done for u in head)
    finally:
        gate.touch()
    responses = [(await _rest(stream))[-1].response for stream in (first, second)]
    assert all(r is not None and not r.cached_result for r in responses)
    one, two = (r.result for r in responses if r is not None)
    assert one.output_files[0].digest == two.output_files[0].digest  # random bytes: one run
    started = [r.execution_metadata.worker_start_timestamp for r in (one, two)]
    assert started[0] == started[1]
    assert scheduler.metrics().total_executions == runs_before + 1


async def test_lower_priority_value_runs_first_when_the_worker_is_busy(
    reapi: Reapi, shared_dir: Path,
) -> None:
    gate, log = shared_dir / "gate", shared_dir / "order.log"
    log.touch()
    log.chmod(0o666)
    blocker = await _action(reapi, _gated(gate), do_not_cache=True)
    late = await _action(reapi, f"echo late >> {log}", do_not_cache=True)
    urgent = await _action(reapi, f"echo urgent >> {log}", do_not_cache=True)
    streams = []
    try:
        streams.append(reapi.execution.Execute(re_pb2.ExecuteRequest(action_digest=blocker)))
        for update in await _follow_until_executing(streams[0]):
            assert not update.operation.done
        for digest, priority in ((late, 10), (urgent, -10)):
            stream = reapi.execution.Execute(re_pb2.ExecuteRequest(
                action_digest=digest, execution_policy=re_pb2.ExecutionPolicy(priority=priority)))
            assert (await _first_update(stream)).metadata.stage == _Stage.QUEUED
            streams.append(stream)
    finally:
        gate.touch()
    for stream in streams:
        response = (await _rest(stream))[-1].response
        assert response is not None and response.result.exit_code == 0
    assert log.read_text().split() == ["urgent", "late"]


async def _follow_until_executing(stream: Any) -> list[_Update]:
    updates = []
    while True:
        op = await stream.read()
        assert op is not grpc.aio.EOF
        updates.append(_unpack(op))
        if updates[-1].metadata.stage == _Stage.EXECUTING:
            return updates


async def test_execute_with_unknown_instance_is_invalid_argument(reapi: Reapi) -> None:
    digest = await _action(reapi, "true")
    error = await _execute_error(reapi, digest, instance_name="elsewhere")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- WaitExecution and Operations ----------------------------------------------------------


async def test_wait_execution_follows_an_operation_by_name(reapi: Reapi, shared_dir: Path) -> None:
    gate = shared_dir / "gate"
    digest = await _action(reapi, _gated(gate, "printf waited"))
    execute = reapi.execution.Execute(re_pb2.ExecuteRequest(action_digest=digest))
    try:
        name = (await _first_update(execute)).operation.name
        execute.cancel()  # the client went away; the operation goes on
        running = await reapi.operations.GetOperation(operations_pb2.GetOperationRequest(name=name))
        assert not running.done
        assert _unpack(running).metadata.action_digest == digest
        waiter = reapi.execution.WaitExecution(re_pb2.WaitExecutionRequest(name=name))
        assert not (await _first_update(waiter)).operation.done
    finally:
        gate.touch()
    updates = await _rest(waiter)
    assert updates[-1].operation.name == name
    response = updates[-1].response
    assert response is not None and response.status.code == code_pb2.OK
    assert await _read(reapi, response.result.stdout_digest) == b"waited"
    done = await _get_operation(reapi, name)
    assert done.operation.done and done.metadata.stage == _Stage.COMPLETED
    assert done.response is not None
    assert done.response.result.stdout_digest == response.result.stdout_digest
    again = await _follow(reapi.execution.WaitExecution(re_pb2.WaitExecutionRequest(name=name)))
    assert [u.operation.done for u in again] == [True]


async def test_wait_execution_and_get_operation_of_unknown_names_are_not_found(
    reapi: Reapi,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _follow(reapi.execution.WaitExecution(
            re_pb2.WaitExecutionRequest(name="operations/nope")))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await reapi.operations.GetOperation(
            operations_pb2.GetOperationRequest(name="operations/nope"))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await reapi.operations.CancelOperation(operations_pb2.CancelOperationRequest(name="nope"))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_cancel_operation_ends_the_operation_as_cancelled(
    reapi: Reapi, shared_dir: Path,
) -> None:
    gate = shared_dir / "gate"
    digest = await _action(reapi, _gated(gate))
    execute = reapi.execution.Execute(re_pb2.ExecuteRequest(action_digest=digest))
    try:
        name = (await _first_update(execute)).operation.name
        await reapi.operations.CancelOperation(operations_pb2.CancelOperationRequest(name=name))
        updates = await _rest(execute)
    finally:
        gate.touch()
    assert updates[-1].operation.done
    response = updates[-1].response
    assert response is not None and response.status.code == code_pb2.CANCELLED
    got = await _get_operation(reapi, name)
    assert got.operation.done
    assert got.response is not None and got.response.status.code == code_pb2.CANCELLED
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await reapi.ac.GetActionResult(re_pb2.GetActionResultRequest(action_digest=digest))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


# -- errors ---------------------------------------------------------------------------------


async def test_missing_inputs_are_failed_precondition_listing_each_blob(reapi: Reapi) -> None:
    lost_a, lost_b = sha256_digest(b"lost input a"), sha256_digest(b"lost input b")
    root = re_pb2.Directory(files=[re_pb2.FileNode(name="a", digest=lost_a),
                                   re_pb2.FileNode(name="b", digest=lost_b)])
    command = re_pb2.Command(arguments=["/bin/true"])
    action = re_pb2.Action(command_digest=await reapi.upload_message(command),
                           input_root_digest=await reapi.upload_message(root))
    error = await _execute_error(reapi, await reapi.upload_message(action))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    status = _rich_status(error)
    assert status.code == code_pb2.FAILED_PRECONDITION
    [detail] = status.details
    failure = error_details_pb2.PreconditionFailure()
    assert detail.Unpack(failure)
    assert sorted((v.type, v.subject) for v in failure.violations) == sorted(
        ("MISSING", f"blobs/{d.hash}/{d.size_bytes}") for d in (lost_a, lost_b))


async def test_missing_action_command_or_input_root_is_failed_precondition(reapi: Reapi) -> None:
    lost = sha256_digest(b"no such action")
    error = await _execute_error(reapi, lost)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    [detail] = _rich_status(error).details
    failure = error_details_pb2.PreconditionFailure()
    assert detail.Unpack(failure)
    assert [v.subject for v in failure.violations] == [f"blobs/{lost.hash}/{lost.size_bytes}"]

    [root] = await reapi.upload(re_pb2.Directory().SerializeToString())
    lost_command = sha256_digest(b"lost command")
    for action in (re_pb2.Action(command_digest=lost_command, input_root_digest=root),
                   re_pb2.Action(command_digest=await reapi.upload_message(
                       re_pb2.Command(arguments=["/bin/true"])),
                       input_root_digest=sha256_digest(b"lost root"))):
        error = await _execute_error(reapi, await reapi.upload_message(action))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert _rich_status(error).details


async def _bad_action(reapi: Reapi, command: re_pb2.Command,
                      root: re_pb2.Directory | None = None) -> grpc.StatusCode:
    action = re_pb2.Action(command_digest=await reapi.upload_message(command),
                           input_root_digest=await reapi.upload_message(root or re_pb2.Directory()))
    return (await _execute_error(reapi, await reapi.upload_message(action))).code()


@pytest.mark.parametrize("outputs", [
    {"output_paths": ["../escape"]},
    {"output_paths": ["/abs"]},
    {"output_files": ["a/../../b"]},
    {"output_directories": ["../d"]},
])
async def test_output_path_outside_the_exec_root_is_invalid_argument(
    reapi: Reapi, outputs: dict[str, list[str]],
) -> None:
    command = re_pb2.Command(arguments=["/bin/true"], **outputs)
    assert await _bad_action(reapi, command) == grpc.StatusCode.INVALID_ARGUMENT


async def test_working_directory_with_dot_dot_is_invalid_argument(reapi: Reapi) -> None:
    command = re_pb2.Command(arguments=["/bin/true"], working_directory="../up")
    assert await _bad_action(reapi, command) == grpc.StatusCode.INVALID_ARGUMENT


async def test_input_named_dot_dot_is_invalid_argument(reapi: Reapi) -> None:
    [file] = await reapi.upload(b"x")
    root = re_pb2.Directory(files=[re_pb2.FileNode(name="..", digest=file)])
    assert await _bad_action(reapi, re_pb2.Command(arguments=["/bin/true"]), root) == \
        grpc.StatusCode.INVALID_ARGUMENT


async def test_unsorted_directory_entries_are_invalid_argument(reapi: Reapi) -> None:
    [file] = await reapi.upload(b"x")
    root = re_pb2.Directory(files=[re_pb2.FileNode(name="b", digest=file),
                                   re_pb2.FileNode(name="a", digest=file)])
    assert await _bad_action(reapi, re_pb2.Command(arguments=["/bin/true"]), root) == \
        grpc.StatusCode.INVALID_ARGUMENT
    child = re_pb2.Directory(files=[re_pb2.FileNode(name="z", digest=file),
                                    re_pb2.FileNode(name="y", digest=file)])
    nested = re_pb2.Directory(directories=[
        re_pb2.DirectoryNode(name="sub", digest=await reapi.upload_message(child))])
    assert await _bad_action(reapi, re_pb2.Command(arguments=["/bin/true"]), nested) == \
        grpc.StatusCode.INVALID_ARGUMENT


async def test_unsorted_environment_is_invalid_argument(reapi: Reapi) -> None:
    command = re_pb2.Command(arguments=["/bin/true"], environment_variables=[
        re_pb2.Command.EnvironmentVariable(name="B", value="1"),
        re_pb2.Command.EnvironmentVariable(name="A", value="2")])
    assert await _bad_action(reapi, command) == grpc.StatusCode.INVALID_ARGUMENT


async def test_command_without_arguments_is_invalid_argument(reapi: Reapi) -> None:
    assert await _bad_action(reapi, re_pb2.Command()) == grpc.StatusCode.INVALID_ARGUMENT


async def test_action_that_outlives_its_timeout_ends_deadline_exceeded(reapi: Reapi) -> None:
    digest = await _action(reapi, "sleep 30", timeout_s=0.3)
    response = await _run(reapi, digest)
    assert response.status.code == code_pb2.DEADLINE_EXCEEDED
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await reapi.ac.GetActionResult(re_pb2.GetActionResultRequest(action_digest=digest))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_timeout_above_the_server_maximum_is_invalid_argument(reapi: Reapi) -> None:
    digest = await _action(reapi, "true", timeout_s=61)
    assert (await _execute_error(reapi, digest)).code() == grpc.StatusCode.INVALID_ARGUMENT


# -- compatibility ----------------------------------------------------------------------------


_MAKE_OUTPUTS = ("mkdir -p out d/sub && printf f > out/f && printf g > d/sub/g && "
                 "ln -s f out/link && ln -s d dlink")


async def test_legacy_output_fields_report_symlinks_in_the_legacy_fields(reapi: Reapi) -> None:
    digest = await _action(reapi, _MAKE_OUTPUTS, output_files=["out/f", "out/link"],
                           output_directories=["d", "dlink"])
    result = (await _run(reapi, digest)).result
    assert [f.path for f in result.output_files] == ["out/f"]
    assert [(s.path, s.target) for s in result.output_file_symlinks] == [("out/link", "f")]
    assert [(s.path, s.target) for s in result.output_directory_symlinks] == [("dlink", "d")]
    assert not result.output_symlinks
    [directory] = result.output_directories
    assert directory.path == "d"
    tree = re_pb2.Tree.FromString(await _read(reapi, directory.tree_digest))
    [sub] = tree.root.directories
    assert sub.name == "sub"
    [child] = tree.children
    assert sub.digest == sha256_digest(child.SerializeToString(deterministic=True))
    [g] = child.files
    assert g.name == "g" and await _read(reapi, g.digest) == b"g"


async def test_output_paths_report_symlinks_in_output_symlinks(reapi: Reapi) -> None:
    digest = await _action(reapi, _MAKE_OUTPUTS, output_paths=["d", "dlink", "out/f", "out/link"])
    result = (await _run(reapi, digest)).result
    assert [f.path for f in result.output_files] == ["out/f"]
    assert sorted((s.path, s.target) for s in result.output_symlinks) == [
        ("dlink", "d"), ("out/link", "f")]
    assert not result.output_file_symlinks and not result.output_directory_symlinks
    assert [d.path for d in result.output_directories] == ["d"]


async def test_platform_comes_from_the_command_when_the_action_has_none(reapi: Reapi) -> None:
    scheduler = _scheduler(reapi)
    digest = await _action(reapi, "true", command_platform={"OSFamily": "linux"})
    updates = await _execute(reapi, digest)
    assert updates[-1].response is not None and updates[-1].response.status.code == code_pb2.OK
    op = await scheduler.get(updates[-1].operation.name)
    assert op.platform == (("OSFamily", "linux"),)
    # The Action's own platform wins over the Command's.
    digest = await _action(reapi, "true", command_platform={"OSFamily": "windows"},
                           action_platform={"OSFamily": "linux"})
    updates = await _execute(reapi, digest)
    assert updates[-1].response is not None and updates[-1].response.status.code == code_pb2.OK
    assert (await scheduler.get(updates[-1].operation.name)).platform == (("OSFamily", "linux"),)


async def test_command_platform_no_worker_offers_keeps_the_action_queued(reapi: Reapi) -> None:
    digest = await _action(reapi, "true", command_platform={"pool": "gpu"})
    execute = reapi.execution.Execute(re_pb2.ExecuteRequest(action_digest=digest))
    first = await _first_update(execute)
    op = await _scheduler(reapi).get(first.operation.name)
    assert op.platform == (("pool", "gpu"),)
    assert first.metadata.stage == _Stage.QUEUED
    await reapi.operations.CancelOperation(operations_pb2.CancelOperationRequest(name=op.name))
    response = (await _rest(execute))[-1].response
    assert response is not None and response.status.code == code_pb2.CANCELLED


async def test_a_platform_no_worker_offers_fails_with_failed_precondition_in_time(
    tmp_path: Path, reapi_config: dict[str, Any]
) -> None:
    """Bazel's usual RBE properties against workers that offer none of them: the Execute
    stream ends FAILED_PRECONDITION naming them, instead of the action queueing forever."""
    config = {**reapi_config, "scheduler": {"unmatched_timeout_s": 0.5}}
    running = await start_rexd(reapi_plugins(), tmp_path / "data", config)
    client = await connect(running)
    try:
        # The worker offers OSFamily=linux (lower case): no match either.
        digest = await _action(client, "true", action_platform={
            "OSFamily": "Linux", "container-image": "docker://gcr.io/example/image"})
        response = await _run(client, digest)
        assert response.status.code == code_pb2.FAILED_PRECONDITION
        assert "OSFamily=Linux, container-image=docker://gcr.io/example/image" in \
            response.status.message
        # The server keeps serving what its workers can run.
        assert (await _run(client, await _action(client, "true"))).status.code == code_pb2.OK
    finally:
        await client.channel.close()
        await running.daemon.stop()


async def test_sha256_is_assumed_when_no_digest_function_is_named(reapi: Reapi) -> None:
    digest = await _action(reapi, "printf sha", output_paths=[])
    updates = await _execute(reapi, digest)
    assert all(u.metadata.digest_function == _Fn.SHA256 for u in updates)
    response = updates[-1].response
    assert response is not None
    assert response.result.stdout_digest == sha256_digest(b"sha")


async def test_blake3_action_runs_end_to_end(reapi: Reapi) -> None:
    digest = await _action(reapi, "cat in.txt > out.txt; printf b3",
                           inputs={"in.txt": b"blake3 in"}, output_paths=["out.txt"],
                           function=_Fn.BLAKE3)
    updates = await _execute(reapi, digest, digest_function=_Fn.BLAKE3)
    assert all(u.metadata.digest_function == _Fn.BLAKE3 for u in updates)
    response = updates[-1].response
    assert response is not None and response.status.code == code_pb2.OK
    [out] = response.result.output_files
    assert out.digest == _digest(b"blake3 in", _Fn.BLAKE3)
    assert response.result.stdout_digest == _digest(b"b3", _Fn.BLAKE3)
    assert await _read(reapi, out.digest, "blake3") == b"blake3 in"
    cached = await reapi.ac.GetActionResult(re_pb2.GetActionResultRequest(
        action_digest=digest, digest_function=_Fn.BLAKE3))
    assert cached.output_files == response.result.output_files
    # Under SHA-256 the same digest names no action.
    assert (await _execute_error(reapi, digest)).code() in (
        grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT)


async def test_execute_never_needs_a_duration_field(reapi: Reapi) -> None:
    digest = await _action(reapi, "printf no-timeout", timeout_s=None)
    response = await _run(reapi, digest)
    assert response.status.code == code_pb2.OK
    assert response.result.stdout_digest == sha256_digest(b"no-timeout")




async def test_cache_hit_operation_can_be_looked_up_by_its_name(reapi: Reapi) -> None:
    digest = await _action(reapi, "printf hit", output_paths=[])
    await _run(reapi, digest)
    [hit] = await _execute(reapi, digest)
    assert hit.operation.done and hit.response is not None and hit.response.cached_result
    got = _unpack(await reapi.operations.GetOperation(
        operations_pb2.GetOperationRequest(name=hit.operation.name)))
    assert got.operation.done
    waited = await _follow(reapi.execution.WaitExecution(
        re_pb2.WaitExecutionRequest(name=hit.operation.name)))
    assert [u.operation.done for u in waited] == [True]
    waited_op = await reapi.operations.WaitOperation(
        operations_pb2.WaitOperationRequest(name=hit.operation.name))
    assert waited_op.done
    [again] = await _execute(reapi, digest)
    assert again.operation.name != hit.operation.name  # each call is an operation of its own


async def test_result_uploaded_by_a_client_serves_execute_from_the_cache(reapi: Reapi) -> None:
    digest = await _action(reapi, "exit 7")  # would fail if it ran
    [stdout] = await reapi.upload(b"from the client")
    await reapi.ac.UpdateActionResult(re_pb2.UpdateActionResultRequest(
        action_digest=digest, action_result=re_pb2.ActionResult(stdout_digest=stdout)))
    response = await _run(reapi, digest)
    assert response.cached_result
    assert response.result.exit_code == 0 and response.result.stdout_digest == stdout


async def test_cancelling_a_finished_operation_leaves_its_result(reapi: Reapi) -> None:
    digest = await _action(reapi, "printf kept", do_not_cache=True)
    updates = await _execute(reapi, digest)
    name = updates[-1].operation.name
    await reapi.operations.CancelOperation(operations_pb2.CancelOperationRequest(name=name))
    got = await _get_operation(reapi, name)
    assert got.response is not None and got.response.status.code == code_pb2.OK
    assert got.response.result.stdout_digest == sha256_digest(b"kept")
