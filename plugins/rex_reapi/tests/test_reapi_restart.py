"""A real rexd serving REAPI, killed mid-action and started again on the same ports and
data dir: the operation a client was following completes, by name, with its REAPI
result (output paths converted as the original Command asked)."""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from reapi_fixtures import sha256_digest
from rex_reapi.proto import remote_execution_pb2 as re_pb2
from rex_reapi.proto import remote_execution_pb2_grpc as re_grpc

from tests._real_rexd import RexdProcesses, lines, wait_until


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[RexdProcesses]:
    running = RexdProcesses(tmp_path)
    try:
        yield running
    finally:
        running.clean_up()


def _free_port() -> int:
    """A free port below the ephemeral range: while rexd is down, a port in that range
    can become the source port of some connection (the orphaned worker reconnects, the
    client retries), and then could not be listened on again, or a client could connect
    to itself."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.sample(range(max(1024, low - 12_000), low), 200):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below the ephemeral range")


async def _upload(channel: grpc.aio.Channel, *blobs: bytes) -> list[re_pb2.Digest]:
    digests = [sha256_digest(blob) for blob in blobs]
    response = await re_grpc.ContentAddressableStorageStub(channel).BatchUpdateBlobs(
        re_pb2.BatchUpdateBlobsRequest(requests=[
            re_pb2.BatchUpdateBlobsRequest.Request(digest=d, data=b)
            for d, b in zip(digests, blobs)]))
    assert all(r.status.code == 0 for r in response.responses), response
    return digests


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
async def test_an_operation_survives_a_restart_of_rexd_and_is_followed_by_name(
    processes: RexdProcesses, stop: str
) -> None:
    port = _free_port()
    server = processes.serve(workers=1, config={
        "plugins": {"load": ["rex-reapi"]},
        "protocols": {"reapi": {"listen": f"127.0.0.1:{port}", "update_interval_s": 0.2}},
    })
    await server.wait_for_workers(1)
    started, release = processes.shared / "started", processes.shared / "release"
    script = (f"echo $$ >> {started}; while [ ! -e {release} ]; do sleep 0.05; done; "
              "mkdir -p out && printf done > out/result.txt")
    command = re_pb2.Command(
        arguments=["/bin/sh", "-c", script], output_paths=["out/result.txt"],
        environment_variables=[re_pb2.Command.EnvironmentVariable(name="PATH",
                                                                  value="/usr/bin:/bin")])
    address = f"127.0.0.1:{port}"
    async with grpc.aio.insecure_channel(address) as channel:
        command_digest, root_digest = await _upload(
            channel, command.SerializeToString(), re_pb2.Directory().SerializeToString())
        action = re_pb2.Action(command_digest=command_digest, input_root_digest=root_digest)
        [action_digest] = await _upload(channel, action.SerializeToString())
        stream = re_grpc.ExecutionStub(channel).Execute(
            re_pb2.ExecuteRequest(action_digest=action_digest, skip_cache_lookup=True))
        name = (await stream.read()).name
        await wait_until(lambda: lines(started), "the action to start")
        if stop == "sigkill":
            server.kill()  # a crash: the action's worker drains, orphaned
        else:
            server.process.terminate()  # graceful: the worker finishes first...
            release.touch()  # ...so let it
            await asyncio.to_thread(server.process.wait, 60)
        # The stream ends: broken by the stop, or (graceful stop) maybe with the result.
        try:
            while await stream.read() is not grpc.aio.EOF:
                pass
        except grpc.aio.AioRpcError as broken:
            assert broken.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    release.touch()
    server.start()
    # (REAPI may start listening a moment after the native API rexd reported; a client
    # that follows an operation across a restart retries UNAVAILABLE, as Bazel does.)
    for attempt in range(5):
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                updates = [op async for op in re_grpc.ExecutionStub(channel).WaitExecution(
                    re_pb2.WaitExecutionRequest(name=name), timeout=120, wait_for_ready=True)]
            break
        except grpc.aio.AioRpcError as unavailable:
            if unavailable.code() != grpc.StatusCode.UNAVAILABLE or attempt == 4:
                raise
            await asyncio.sleep(1.0)
    assert updates and updates[-1].done and updates[-1].name == name
    response = re_pb2.ExecuteResponse()
    assert updates[-1].response.Unpack(response)
    assert response.status.code == 0, response.status
    assert response.result.exit_code == 0
    [output] = response.result.output_files
    assert output.path == "out/result.txt" and output.digest == sha256_digest(b"done")
