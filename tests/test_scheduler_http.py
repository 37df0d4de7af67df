"""The coordinator's routes on the native HTTP API: status codes, error bodies, tokens."""

from __future__ import annotations

import asyncio
import base64

import aiohttp
import pytest

from rexcore.artifacts.digest import DigestFunction, digest_of
from rexcore.protocol.client import (
    InvalidAction,
    MissingBlobs,
    NotAuthorized,
    OperationNotFound,
    ResourceExhausted,
    RexClient,
)
from rexcore.scheduler.operations import WorkerNotAuthorizedError
from rexcore.serialization.action import Action, Command, Directory, canonical_digest
from rexcore.serialization.worker_protocol import SyncRequest
from rexcore.testing import start_rexd
from tests._scheduler_fakes import FakeWorker, coordinator, make_action, upload, wait_until


async def _post(url: str, body: object) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as response:
        return response.status, await response.json()


async def _get(url: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.json()


async def test_a_full_queue_answers_429_resource_exhausted(plugin_manager, tmp_path):
    async with coordinator(plugin_manager, tmp_path / "data", max_queued=2) as (running, client):
        first, _ = await make_action(client.put_blob)
        await client.execute(first)
        await client.execute((await make_action(client.put_blob))[0])
        await client.execute(first)  # merged into a waiting action: not one more
        extra, _ = await make_action(client.put_blob)
        status, body = await _post(f"{running.url}/v1/execute", {"action_digest": str(extra)})
        assert status == 429
        assert body["error"]["code"] == "resource_exhausted"
        assert "scheduler.max_queued" in body["error"]["message"]
        with pytest.raises(ResourceExhausted) as caught:
            await client.execute(extra)
        assert caught.value.status == 429


async def test_a_missing_action_is_failed_precondition_naming_it(plugin_manager, tmp_path):
    async with coordinator(plugin_manager, tmp_path / "data") as (running, client):
        digest, _ = await make_action(client.put_blob, upload_action=False)
        status, body = await _post(f"{running.url}/v1/execute", {"action_digest": str(digest)})
        assert status == 400
        assert body["error"]["code"] == "failed_precondition"
        assert body["error"]["missing"] == [str(digest)]


async def test_missing_command_and_input_root_are_both_listed(plugin_manager, tmp_path):
    async with coordinator(plugin_manager, tmp_path / "data") as (_, client):
        digest, action = await make_action(
            client.put_blob, upload_command=False, upload_input_root=False
        )
        with pytest.raises(MissingBlobs) as caught:
            await client.execute(digest)
        assert caught.value.code == "failed_precondition" and caught.value.status == 400
        assert set(caught.value.missing) == {action.command_digest, action.input_root_digest}


async def test_an_output_path_with_dotdot_is_invalid_argument(plugin_manager, tmp_path):
    async with coordinator(plugin_manager, tmp_path / "data") as (running, client):
        digest, _ = await make_action(client.put_blob, output_paths=["../escape"])
        with pytest.raises(InvalidAction) as caught:
            await client.execute(digest)
        assert caught.value.status == 400 and caught.value.code == "invalid_argument"
        assert "../escape" in str(caught.value)
        assert running.runtime.scheduler.status().queued == 0


async def test_a_malformed_action_or_input_root_is_invalid_argument(plugin_manager, tmp_path):
    async with coordinator(plugin_manager, tmp_path / "data") as (_, client):
        garbage = b"not json at all"
        garbage_digest = digest_of(garbage)
        await client.put_blob(garbage_digest, garbage)
        with pytest.raises(InvalidAction, match="malformed"):
            await client.execute(garbage_digest)
        command = await upload(client.put_blob, Command(arguments=("true",)))
        action = Action(command_digest=command, input_root_digest=garbage_digest)
        with pytest.raises(InvalidAction, match="input root"):
            await client.execute(await upload(client.put_blob, action))
        negative = Action(
            command_digest=command,
            input_root_digest=await upload(client.put_blob, Directory()),
            timeout_s=-1,
        )
        with pytest.raises(InvalidAction, match="timeout_s"):
            await client.execute(await upload(client.put_blob, negative))


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"action_digest": "blake3/abc/1"}, "invalid_digest"),
        ({"action_digest": 7}, "invalid_digest"),
        ({}, "invalid_digest"),
        ({"action_digest": str(DigestFunction.SHA256.empty), "priority": "high"},
         "invalid_request"),
        ({"action_digest": str(DigestFunction.SHA256.empty), "priority": True},
         "invalid_request"),
        ({"action_digest": str(DigestFunction.SHA256.empty), "skip_cache_lookup": "yes"},
         "invalid_request"),
        ({"action_digest": str(DigestFunction.SHA256.empty), "colour": "blue"},
         "invalid_request"),
        ([1, 2], "invalid_json"),
    ],
)
async def test_execute_rejects_malformed_requests_with_a_named_code(
    plugin_manager, tmp_path, body, code
):
    async with coordinator(plugin_manager, tmp_path / "data") as (running, _):
        status, answer = await _post(f"{running.url}/v1/execute", body)
        assert status == 400 and answer["error"]["code"] == code


async def test_an_unknown_operation_is_404_and_a_malformed_name_never_leaves_the_client(
    plugin_manager, tmp_path
):
    async with coordinator(plugin_manager, tmp_path / "data") as (running, client):
        unknown = "operations/" + "0" * 32
        with pytest.raises(OperationNotFound) as caught:
            await client.wait_operation(unknown)
        assert caught.value.status == 404 and caught.value.code == "operation_not_found"
        with pytest.raises(OperationNotFound):
            await client.cancel_operation(unknown)
        with pytest.raises(OperationNotFound) as local:
            await client.wait_operation("operations/../../healthz")
        assert local.value.status is None
        status, body = await _get(f"{running.url}/v1/operations/not-hex")
        assert status == 404 and body["error"]["code"] == "not_found"


async def test_waiting_on_an_operation_returns_when_it_completes(plugin_manager, tmp_path):
    async with coordinator(plugin_manager, tmp_path / "data", max_long_poll_s=120) as (
        running, client
    ):
        digest, _ = await make_action(client.put_blob)
        op = await client.execute(digest)
        waiting = asyncio.create_task(client.wait_operation(op.name, 120))
        scheduler = running.runtime.scheduler
        await wait_until(lambda: op.name in scheduler._watchers, "the wait is held")
        assert not waiting.done()
        async with RexClient(running.url) as worker_client:
            worker = FakeWorker(worker_client, "w1")
            await worker.sync()
            worker.finish_all()
            await worker.sync()
        view = await asyncio.wait_for(waiting, 30)
        assert view.done and view.status == "ok" and view.result is not None
        status, body = await _get(f"{running.url}/v1/{op.name}?wait_s=never")
        assert status == 400 and body["error"]["code"] == "invalid_request"


async def test_with_a_join_token_workers_must_present_it(plugin_manager, tmp_path):
    async with coordinator(plugin_manager, tmp_path / "data", join_token="s3cret") as (
        running, client
    ):
        with pytest.raises(NotAuthorized) as caught:
            await FakeWorker(client, "w1").sync()
        assert caught.value.status == 401 and caught.value.code == "unauthenticated"
        assert "join token" in str(caught.value)
        with pytest.raises(NotAuthorized):
            await FakeWorker(client, "w1", token="wrong").sync()
        assert (await FakeWorker(client, "w1", token="s3cret").sync()).lease_s > 0
        assert "w1" in running.runtime.scheduler._workers


async def test_without_a_join_token_only_loopback_workers_may_join(plugin_manager, tmp_path):
    async with coordinator(plugin_manager, tmp_path / "data") as (running, client):
        await FakeWorker(client, "local").sync()  # over 127.0.0.1
        scheduler = running.runtime.scheduler
        with pytest.raises(WorkerNotAuthorizedError) as caught:
            await scheduler.synchronize(SyncRequest(worker_id="far"), remote="192.0.2.7")
        assert caught.value.status == "permission_denied"
        assert "scheduler.join_token" in str(caught.value)
        await scheduler.synchronize(SyncRequest(worker_id="v6", wait_s=0), remote="::1")
        assert {"local", "v6"} <= scheduler._workers.keys() and "far" not in scheduler._workers


async def test_a_malformed_synchronize_request_is_rejected(plugin_manager, tmp_path):
    async with coordinator(plugin_manager, tmp_path / "data") as (running, _):
        status, body = await _post(
            f"{running.url}/v1/workers/synchronize", {"worker_id": "w", "slots": "many"}
        )
        assert status == 400 and body["error"]["code"] == "invalid_request"
        assert "slots" in body["error"]["message"]


async def test_status_route_reports_workers_queue_and_metrics(plugin_manager, tmp_path):
    async with coordinator(plugin_manager, tmp_path / "data") as (running, client):
        await client.execute((await make_action(client.put_blob))[0])
        status, body = await _get(f"{running.url}/v1/status")
        assert status == 200
        assert body["queued"] == 1 and body["workers_total"] == 0
        assert {"total_executions", "cache_hit_rate", "uptime_s"} <= body["metrics"].keys()


async def test_stopping_the_daemon_answers_held_calls_at_once(plugin_manager, tmp_path):
    running = await start_rexd(
        plugin_manager, tmp_path / "data", {"scheduler": {"max_long_poll_s": 120}}
    )
    stopped = False
    try:
        async with RexClient(running.url) as client:
            scheduler = running.runtime.scheduler
            held = asyncio.create_task(FakeWorker(client, "w1").sync(wait_s=120))
            await wait_until(lambda: "w1" in scheduler._waiting, "the call is held")
            await asyncio.wait_for(running.daemon.stop(), 30)
            stopped = True
            response = await asyncio.wait_for(held, 30)
            assert response.assignments == ()
    finally:
        if not stopped:
            await running.daemon.stop()


async def test_a_disabled_scheduler_serves_no_execution_routes(plugin_manager, tmp_path):
    async with coordinator(plugin_manager, tmp_path / "data", enabled=False) as (running, _):
        assert running.runtime.scheduler is None
        empty = canonical_digest(Directory())
        status, body = await _post(f"{running.url}/v1/execute", {"action_digest": str(empty)})
        assert status == 404 and body["error"]["code"] == "not_found"


async def test_a_worker_without_an_id_is_rejected(plugin_manager, tmp_path):
    async with coordinator(plugin_manager, tmp_path / "data") as (running, _):
        status, body = await _post(f"{running.url}/v1/workers/synchronize", {"worker_id": ""})
        assert status == 400 and body["error"]["code"] == "invalid_argument"


# -- execute with inline blobs, waiting for the result --------------------------------------


def _collector(blobs: dict):
    async def put(digest, data):
        blobs[digest] = data

    return put


async def test_execute_stores_inline_blobs_and_answers_once_done_when_asked_to_wait(
    plugin_manager, tmp_path
):
    async with coordinator(plugin_manager, tmp_path / "data") as (_, client):
        blobs: dict = {}
        digest, _ = await make_action(_collector(blobs))
        worker = FakeWorker(client, "w1")
        stop = asyncio.Event()
        serving = asyncio.create_task(worker.serve(stop, wait_s=0.5))
        op = await client.execute(digest, blobs=blobs, wait_s=60)
        stop.set()
        await serving
        assert op.done and op.status == "ok" and op.result is not None
        assert op.result.exit_code == 0 and op.worker == "w1"
        assert await client.find_missing(blobs) == []  # the blobs are in the CAS


async def test_an_inline_blob_that_does_not_match_its_digest_is_refused_and_nothing_queued(
    plugin_manager, tmp_path
):
    async with coordinator(plugin_manager, tmp_path / "data") as (running, client):
        blobs: dict = {}
        digest, action = await make_action(_collector(blobs))
        forged = {**blobs, action.command_digest: b"x" * action.command_digest.size}
        body = {"action_digest": str(digest),
                "blobs": {str(d): base64.b64encode(data).decode() for d, data in forged.items()}}
        status, answer = await _post(f"{running.url}/v1/execute", body)
        assert status == 400 and answer["error"]["code"] == "digest_mismatch"
        assert (await client.status()).queued == 0
        assert await client.find_missing([action.command_digest]) == [action.command_digest]


async def test_concurrent_executions_sending_the_same_new_input_root_inline_all_queue(
    plugin_manager, tmp_path
):
    async with coordinator(plugin_manager, tmp_path / "data") as (_, client):
        submissions = []
        for _ in range(8):
            blobs: dict = {}
            digest, _ = await make_action(_collector(blobs))  # all share the empty root
            submissions.append(client.execute(digest, blobs=blobs))
        ops = await asyncio.gather(*submissions)
        assert [op.state for op in ops] == ["queued"] * 8
