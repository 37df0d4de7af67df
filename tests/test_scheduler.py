"""The coordinator: queue, matching, merging, leases, retries, cancellation, persistence.

Every test runs a real rexd on free ports; workers are fakes that speak the real
synchronize protocol over HTTP and finish their assignments when the test says so.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

from rexcore.protocol.client import RexClient
from rexcore.scheduler.operations import Operation
from rexcore.scheduler.persistence import DATABASE_FILE, SchedulerDatabase, operation_row
from rexcore.serialization.action import (
    Action,
    Command,
    Directory,
    canonical_bytes,
    canonical_digest,
)
from rexcore.serialization.worker_protocol import Completion
from tests._scheduler_fakes import (
    FakeWorker,
    coordinator,
    make_action,
    result_for,
    wait_until,
)
from tests.conftest import rexd_env, run_rexd
from tests.test_rexd_cli import LISTENING


async def _names(assignments) -> list[str]:
    return [assignment.operation for assignment in assignments]


# -- queue order and matching ------------------------------------------------------------


async def test_lower_priority_value_runs_first_and_fifo_within_a_priority(
    plugin_manager, tmp_path
):
    async with coordinator(plugin_manager, tmp_path / "data") as (_, client):
        submitted = []
        for priority in (5, 1, 3, 1, 5):
            digest, _ = await make_action(client.put_blob)
            submitted.append((priority, (await client.execute(digest, priority=priority)).name))
        worker = FakeWorker(client, "w1")
        order = []
        for _ in submitted:
            response = await worker.sync()
            assert len(response.assignments) == 1
            order.append(response.assignments[0].operation)
            worker.finish_all()
        await worker.sync()
        expected = [name for _, name in sorted(submitted, key=lambda pair: pair[0])]
        assert order == expected  # sorted() is stable: FIFO among equal priorities


async def test_operation_waits_until_a_worker_with_matching_properties_synchronizes(
    plugin_manager, tmp_path
):
    async with coordinator(plugin_manager, tmp_path / "data") as (_, client):
        digest, _ = await make_action(
            client.put_blob, platform=[("os", "linux"), ("pool", "gpu")]
        )
        op = await client.execute(digest)
        linux_only = FakeWorker(client, "cpu", properties=[("os", "linux")])
        wrong_pool = FakeWorker(client, "tpu", properties=[("os", "linux"), ("pool", "tpu")])
        assert (await linux_only.sync()).assignments == ()
        assert (await wrong_pool.sync()).assignments == ()
        assert (await client.wait_operation(op.name)).state == "queued"
        # A worker may offer several values for one property name.
        gpu = FakeWorker(
            client, "gpu", properties=[("os", "linux"), ("pool", "gpu"), ("pool", "tpu")]
        )
        assert await _names((await gpu.sync()).assignments) == [op.name]
        assert (await client.wait_operation(op.name)).worker == "gpu"


async def test_an_action_no_joined_worker_can_run_fails_after_unmatched_timeout_s(
    plugin_manager, tmp_path
):
    async with coordinator(plugin_manager, tmp_path / "data", unmatched_timeout_s=0.5) as (
        running, client
    ):
        scheduler = running.runtime.scheduler
        asked = [("OSFamily", "Linux"), ("container-image", "docker://example/image")]
        digest, _ = await make_action(client.put_blob, platform=asked)
        # No worker at all: the pool may be starting one, so it waits.
        op = await client.execute(digest)
        await asyncio.sleep(1.0)
        assert (await client.wait_operation(op.name)).state == "queued"
        # Workers that cannot run it join: it fails, naming both sides.
        worker = FakeWorker(client, "cpu", properties=[("os", "linux")])
        assert (await worker.sync()).assignments == ()
        done = await client.wait_operation(op.name, wait_s=30)
        assert (done.state, done.status) == ("completed", "failed_precondition")
        assert "OSFamily=Linux, container-image=docker://example/image" in done.message
        assert "[os=linux]" in done.message and "unmatched_timeout_s" in done.message
        # Work the worker can run is unaffected, and the queue holds nothing stale.
        other, _ = await make_action(client.put_blob, platform=[("os", "linux")])
        op2 = await client.execute(other)
        assert await _names((await worker.sync()).assignments) == [op2.name]
        assert not scheduler._queued and not scheduler._unmatched


async def test_an_unmatched_action_waits_for_a_worker_that_joins_in_time(
    plugin_manager, tmp_path
):
    async with coordinator(plugin_manager, tmp_path / "data", unmatched_timeout_s=60) as (
        _, client
    ):
        digest, _ = await make_action(client.put_blob, platform=[("pool", "gpu")])
        op = await client.execute(digest)
        cpu = FakeWorker(client, "cpu", properties=[("pool", "cpu")])
        assert (await cpu.sync()).assignments == ()
        await asyncio.sleep(0.5)
        gpu = FakeWorker(client, "gpu", properties=[("pool", "gpu")])
        assert await _names((await gpu.sync()).assignments) == [op.name]


async def test_an_action_without_properties_runs_on_any_worker(plugin_manager, tmp_path):
    async with coordinator(plugin_manager, tmp_path / "data") as (_, client):
        digest, _ = await make_action(client.put_blob)
        op = await client.execute(digest)
        worker = FakeWorker(client, "w", properties=[("os", "linux")])
        assert await _names((await worker.sync()).assignments) == [op.name]


async def test_a_held_synchronize_call_gets_new_work_the_moment_it_is_submitted(
    plugin_manager, tmp_path
):
    async with coordinator(plugin_manager, tmp_path / "data", max_long_poll_s=120) as (
        running, client
    ):
        scheduler = running.runtime.scheduler
        worker = FakeWorker(client, "w1")
        held = asyncio.create_task(worker.sync(wait_s=120))
        await wait_until(lambda: "w1" in scheduler._waiting, "the call is held")
        assert not held.done()
        digest, _ = await make_action(client.put_blob)
        op = await client.execute(digest)
        # Far shorter than the 120 s hold: only a wake-up can answer in time.
        response = await asyncio.wait_for(held, 30)
        assert await _names(response.assignments) == [op.name]


async def test_a_held_call_is_not_woken_by_work_it_cannot_run(plugin_manager, tmp_path):
    async with coordinator(plugin_manager, tmp_path / "data", max_long_poll_s=120) as (
        running, client
    ):
        scheduler = running.runtime.scheduler
        cpu = FakeWorker(client, "cpu", properties=[("pool", "cpu")])
        gpu = FakeWorker(client, "gpu", properties=[("pool", "gpu")])
        held_cpu = asyncio.create_task(cpu.sync(wait_s=120))
        held_gpu = asyncio.create_task(gpu.sync(wait_s=120))
        await wait_until(lambda: {"cpu", "gpu"} <= scheduler._waiting.keys(), "both are held")
        digest, _ = await make_action(client.put_blob, platform=[("pool", "gpu")])
        op = await client.execute(digest)
        response = await asyncio.wait_for(held_gpu, 30)
        assert await _names(response.assignments) == [op.name]
        assert not held_cpu.done() and "cpu" in scheduler._waiting
        held_cpu.cancel()


# -- merging and the action cache ---------------------------------------------------------


async def test_identical_in_flight_actions_share_one_execution_and_its_result(
    plugin_manager, tmp_path
):
    async with coordinator(plugin_manager, tmp_path / "data") as (_, client):
        digest, _ = await make_action(client.put_blob)
        first = await client.execute(digest)
        second = await client.execute(digest)
        assert first.name != second.name
        worker = FakeWorker(client, "w1", slots=4)
        response = await worker.sync()
        assert await _names(response.assignments) == [first.name]
        third = await client.execute(digest)  # merges into the running execution
        assert third.state == "executing"
        worker.finish(first.name, result_for("w1", exit_code=0))
        assert (await worker.sync()).assignments == ()
        views = [await client.wait_operation(op.name, 10) for op in (first, second, third)]
        assert all(view.done and view.status == "ok" for view in views)
        assert views[0].result == views[1].result == views[2].result
        assert len(worker.assigned) == 1


async def test_do_not_cache_actions_are_never_merged(plugin_manager, tmp_path):
    async with coordinator(plugin_manager, tmp_path / "data") as (_, client):
        digest, _ = await make_action(client.put_blob, do_not_cache=True)
        first = await client.execute(digest)
        second = await client.execute(digest)
        worker = FakeWorker(client, "w1", slots=4)
        response = await worker.sync()
        assert sorted(await _names(response.assignments)) == sorted([first.name, second.name])
        worker.finish_all()
        await worker.sync()
        third = await client.execute(digest)  # and never answered from the cache
        assert third.state == "queued" and not third.cached


async def test_a_merged_operation_with_a_lower_priority_value_moves_the_action_up(
    plugin_manager, tmp_path
):
    async with coordinator(plugin_manager, tmp_path / "data") as (_, client):
        slow_digest, _ = await make_action(client.put_blob)
        other_digest, _ = await make_action(client.put_blob)
        slow = await client.execute(slow_digest, priority=10)
        other = await client.execute(other_digest, priority=5)
        await client.execute(slow_digest, priority=1)
        worker = FakeWorker(client, "w1")
        assert await _names((await worker.sync()).assignments) == [slow.name]
        worker.finish_all()
        assert await _names((await worker.sync()).assignments) == [other.name]


async def test_cancelling_one_of_two_merged_operations_keeps_the_action_running(
    plugin_manager, tmp_path
):
    async with coordinator(plugin_manager, tmp_path / "data") as (_, client):
        digest, _ = await make_action(client.put_blob)
        first = await client.execute(digest)
        second = await client.execute(digest)
        worker = FakeWorker(client, "w1")
        await worker.sync()
        cancelled = await client.cancel_operation(first.name)
        assert cancelled.done and cancelled.status == "cancelled"
        response = await worker.sync()
        assert response.cancel == ()  # someone still waits for the result
        worker.finish_all()
        await worker.sync()
        done = await client.wait_operation(second.name, 10)
        assert done.status == "ok" and done.result is not None
        assert (await client.wait_operation(first.name)).status == "cancelled"


async def test_an_action_cache_hit_completes_at_once_without_a_worker(plugin_manager, tmp_path):
    async with coordinator(plugin_manager, tmp_path / "data") as (running, client):
        digest, _ = await make_action(client.put_blob)
        op = await client.execute(digest)
        worker = FakeWorker(client, "w1")
        await worker.sync()
        worker.finish(op.name, result_for("w1"))
        await worker.sync()
        hit = await client.execute(digest)
        assert hit.done and hit.cached and hit.status == "ok"
        assert hit.result == (await client.wait_operation(op.name)).result
        assert hit.worker == "" and hit.attempts == 0
        fresh = await client.execute(digest, skip_cache_lookup=True)
        assert not fresh.done and not fresh.cached
        metrics = running.runtime.scheduler.metrics()
        assert metrics.cache_hits == 1 and metrics.cache_lookups == 2


async def test_failed_results_are_not_cached(plugin_manager, tmp_path):
    async with coordinator(plugin_manager, tmp_path / "data") as (_, client):
        digest, _ = await make_action(client.put_blob)
        op = await client.execute(digest)
        worker = FakeWorker(client, "w1")
        await worker.sync()
        worker.finish(op.name, result_for("w1", exit_code=3))
        await worker.sync()
        done = await client.wait_operation(op.name, 10)
        assert done.status == "ok" and done.result.exit_code == 3
        assert await client.get_action_result(digest) is None
        assert not (await client.execute(digest)).done


async def test_an_operation_without_the_native_cache_neither_reads_nor_writes_it(
    plugin_manager, tmp_path
):
    """A protocol with its own action cache (rex-reapi) submits with native_cache=False;
    an identical native submission merged into the same run still gets its entry."""
    async with coordinator(plugin_manager, tmp_path / "data") as (running, client):
        scheduler = running.runtime.scheduler
        digest, _ = await make_action(client.put_blob)
        op = await scheduler.submit(digest, native_cache=False)
        worker = FakeWorker(client, "w1")
        await worker.sync()
        worker.finish(op.name, result_for("w1"))
        await worker.sync()
        assert (await client.wait_operation(op.name, 10)).status == "ok"
        assert await client.get_action_result(digest) is None
        cached = await client.execute(digest)  # the native way: a miss, so it runs
        assert not cached.done
        again = await scheduler.submit(digest, native_cache=False)  # merges into it
        assert again.execution == cached.name
        await worker.sync()
        worker.finish_all()
        await worker.sync()
        assert (await client.wait_operation(cached.name, 10)).status == "ok"
        assert await client.get_action_result(digest) is not None
        hit = await scheduler.submit(digest, native_cache=False)  # looks nowhere
        assert not hit.cached and hit.state == "queued"


# -- timeouts and cancellation ------------------------------------------------------------


async def test_action_timeout_defaults_and_is_capped_at_max_timeout_s(plugin_manager, tmp_path):
    async with coordinator(
        plugin_manager, tmp_path / "data", default_timeout_s=7, max_timeout_s=50
    ) as (_, client):
        digests = [
            (await make_action(client.put_blob, timeout_s=timeout))[0]
            for timeout in (None, 20, 5000)
        ]
        for digest in digests:
            await client.execute(digest)
        worker = FakeWorker(client, "w1", slots=3)
        response = await worker.sync()
        assert sorted(a.timeout_s for a in response.assignments) == [7, 20, 50]


async def test_the_coordinator_ends_an_action_past_its_deadline_if_the_worker_never_reports(
    plugin_manager, tmp_path
):
    async with coordinator(plugin_manager, tmp_path / "data", lease_s=0.2) as (_, client):
        digest, _ = await make_action(client.put_blob, timeout_s=0.1)
        op = await client.execute(digest)
        worker = FakeWorker(client, "w1", slots=2)
        await worker.sync()
        # The worker stays alive (a held call, reporting the action) but never finishes it.
        held = asyncio.create_task(worker.sync(wait_s=30))
        done = await client.wait_operation(op.name, 20)
        assert done.status == "deadline_exceeded" and "timeout of 0.1s" in done.message
        response = await asyncio.wait_for(held, 30)
        assert response.cancel == (op.name,)


async def test_a_timed_out_completion_ends_deadline_exceeded_and_is_not_cached(
    plugin_manager, tmp_path
):
    async with coordinator(plugin_manager, tmp_path / "data") as (_, client):
        digest, _ = await make_action(client.put_blob)
        op = await client.execute(digest)
        worker = FakeWorker(client, "w1")
        await worker.sync()
        worker.finish(op.name, result_for("w1", exit_code=0), timed_out=True)
        await worker.sync()
        done = await client.wait_operation(op.name, 10)
        assert done.status == "deadline_exceeded" and done.result is not None
        assert await client.get_action_result(digest) is None


async def test_cancelling_a_queued_operation_ends_it_at_once(plugin_manager, tmp_path):
    async with coordinator(plugin_manager, tmp_path / "data") as (_, client):
        digest, _ = await make_action(client.put_blob)
        op = await client.execute(digest)
        cancelled = await client.cancel_operation(op.name)
        assert cancelled.done and cancelled.status == "cancelled"
        assert (await FakeWorker(client, "w1").sync()).assignments == ()
        again = await client.cancel_operation(op.name)  # idempotent
        assert again.status == "cancelled"


async def test_cancelling_an_executing_operation_tells_its_held_worker_at_once(
    plugin_manager, tmp_path
):
    async with coordinator(plugin_manager, tmp_path / "data", max_long_poll_s=120) as (
        running, client
    ):
        digest, _ = await make_action(client.put_blob)
        op = await client.execute(digest)
        worker = FakeWorker(client, "w1", slots=2)
        await worker.sync()
        held = asyncio.create_task(worker.sync(wait_s=120))  # reports it, waits for more
        await wait_until(lambda: "w1" in running.runtime.scheduler._waiting, "the call is held")
        cancelled = await client.cancel_operation(op.name)
        assert cancelled.done and cancelled.status == "cancelled"
        response = await asyncio.wait_for(held, 30)
        assert response.cancel == (op.name,)
        # Its late completion changes nothing.
        worker.to_report.append(Completion(operation=op.name, result=result_for("w1")))
        await worker.sync()
        assert (await client.wait_operation(op.name)).status == "cancelled"


# -- lost workers and retries --------------------------------------------------------------


async def test_a_lost_worker_s_action_is_requeued_and_completes_on_another_worker(
    plugin_manager, tmp_path
):
    async with coordinator(plugin_manager, tmp_path / "data", lease_s=0.3) as (
        running, client
    ):
        digest, _ = await make_action(client.put_blob)
        op = await client.execute(digest)
        doomed = FakeWorker(client, "doomed")
        await doomed.sync()  # takes the action, then never calls again
        survivor = FakeWorker(client, "survivor")
        response = await asyncio.wait_for(survivor.sync(wait_s=30), 30)
        assert await _names(response.assignments) == [op.name]
        assert response.assignments[0].attempt == 2
        survivor.finish(op.name, result_for("survivor"))
        await survivor.sync()
        done = await client.wait_operation(op.name, 10)
        assert done.status == "ok" and done.worker == "survivor" and done.attempts == 2
        assert "doomed" not in running.runtime.scheduler._workers


async def test_a_late_result_from_a_lost_worker_is_accepted_once_and_the_rerun_cancelled(
    plugin_manager, tmp_path
):
    async with coordinator(plugin_manager, tmp_path / "data", lease_s=0.3) as (_, client):
        digest, _ = await make_action(client.put_blob)
        op = await client.execute(digest)
        slow = FakeWorker(client, "slow")
        await slow.sync()
        other = FakeWorker(client, "other")
        await asyncio.wait_for(other.sync(wait_s=30), 30)  # got the requeued action
        slow.finish(op.name, result_for("slow"))
        await slow.sync()
        done = await client.wait_operation(op.name, 10)
        assert done.result == result_for("slow")
        assert (await other.sync()).cancel == (op.name,)
        # Duplicate and later reports are ignored: the result stays the first one.
        slow.to_report.append(
            Completion(operation=op.name, result=result_for("slow", exit_code=9))
        )
        await slow.sync()
        assert (await client.wait_operation(op.name)).result == result_for("slow")


async def test_an_assignment_the_worker_stops_reporting_is_requeued_without_waiting_for_lease(
    plugin_manager, tmp_path
):
    async with coordinator(plugin_manager, tmp_path / "data") as (_, client):
        digest, _ = await make_action(client.put_blob)
        op = await client.execute(digest)
        worker = FakeWorker(client, "w1")
        await worker.sync()  # answer 1 carries the assignment
        worker.executing.clear()  # e.g. the worker restarted and forgot it
        # Call 2 may have been sent before answer 1 arrived: not yet taken as lost.
        assert (await worker.sync()).assignments == ()
        assert (await client.wait_operation(op.name)).state == "executing"
        response = await worker.sync()  # call 3 still does not list it: lost, requeued
        assert await _names(response.assignments) == [op.name]
        assert response.assignments[0].attempt == 2


async def test_work_answered_to_a_replaced_call_is_kept_when_the_worker_lists_it(
    plugin_manager, tmp_path
):
    async with coordinator(plugin_manager, tmp_path / "data") as (_, client):
        op = await client.execute((await make_action(client.put_blob))[0])
        worker = FakeWorker(client, "w1", slots=2)
        answer = await worker.sync()
        # The worker's next call crossed that answer on the wire, so it lists nothing...
        crossed = dict(worker.executing)
        worker.executing.clear()
        await worker.sync()
        # ...then it handles the answer and lists the action from then on.
        worker.executing.update(crossed)
        response = await worker.sync()
        assert response.assignments == () and response.cancel == ()
        assert len(answer.assignments) == 1 and len(worker.assigned) == 1
        worker.finish_all()
        await worker.sync()
        done = await client.wait_operation(op.name, 10)
        assert done.status == "ok" and done.attempts == 1


async def test_transient_errors_retry_up_to_the_cap_then_fail_saying_so(plugin_manager, tmp_path):
    async with coordinator(plugin_manager, tmp_path / "data", max_attempts=3) as (
        running, client
    ):
        digest, _ = await make_action(client.put_blob)
        op = await client.execute(digest)
        worker = FakeWorker(client, "crashy")
        for attempt in (1, 2, 3):
            response = await worker.sync()
            assert [a.attempt for a in response.assignments] == [attempt]
            worker.finish(op.name, error="the sandbox crashed")
        response = await worker.sync()
        assert response.assignments == ()
        done = await client.wait_operation(op.name, 10)
        assert done.status == "unavailable"
        assert "3 time(s)" in done.message and "max_attempts = 3" in done.message
        assert "the sandbox crashed" in done.message
        metrics = running.runtime.scheduler.metrics()
        assert metrics.failed_executions == 1 and metrics.total_executions == 1


async def test_lost_workers_count_against_the_retry_cap(plugin_manager, tmp_path):
    async with coordinator(
        plugin_manager, tmp_path / "data", lease_s=0.2, max_attempts=2
    ) as (_, client):
        digest, _ = await make_action(client.put_blob)
        op = await client.execute(digest)
        for name in ("first", "second"):
            worker = FakeWorker(client, name, slots=1)
            response = await asyncio.wait_for(worker.sync(wait_s=30), 30)
            assert await _names(response.assignments) == [op.name]
        done = await client.wait_operation(op.name, 20)
        assert done.status == "unavailable" and "max_attempts = 2" in done.message
        assert "lease" in done.message


async def test_a_permanent_error_fails_the_operation_without_retrying(plugin_manager, tmp_path):
    async with coordinator(plugin_manager, tmp_path / "data") as (_, client):
        digest, _ = await make_action(client.put_blob)
        op = await client.execute(digest)
        worker = FakeWorker(client, "w1")
        await worker.sync()
        worker.finish(op.name, error="input blob x is missing", permanent=True)
        assert (await worker.sync()).assignments == ()
        done = await client.wait_operation(op.name, 10)
        assert done.status == "failed_precondition" and "input blob x" in done.message
        assert done.attempts == 1


async def test_a_new_call_supersedes_the_worker_s_held_call(plugin_manager, tmp_path):
    async with coordinator(plugin_manager, tmp_path / "data", max_long_poll_s=120) as (
        running, client
    ):
        op = await client.execute((await make_action(client.put_blob))[0])
        worker = FakeWorker(client, "w1", slots=2)
        await worker.sync()
        held = asyncio.create_task(worker.sync(wait_s=120))
        await wait_until(lambda: "w1" in running.runtime.scheduler._waiting, "the call is held")
        worker.finish(op.name)  # report it now rather than when the hold ends
        await worker.sync()
        superseded = await asyncio.wait_for(held, 30)
        assert superseded.assignments == () and superseded.cancel == ()
        assert (await client.wait_operation(op.name)).status == "ok"


async def test_the_call_that_supersedes_a_held_call_is_held_and_woken_by_new_work(
    plugin_manager, tmp_path
):
    async with coordinator(plugin_manager, tmp_path / "data", max_long_poll_s=120) as (
        running, client
    ):
        scheduler = running.runtime.scheduler
        worker = FakeWorker(client, "w1", slots=2)
        held = asyncio.create_task(worker.sync(wait_s=120))
        await wait_until(lambda: "w1" in scheduler._waiting, "the first call is held")
        holding = asyncio.create_task(worker.sync(wait_s=120))  # replaces it, held in turn
        assert (await asyncio.wait_for(held, 30)).assignments == ()
        op = await client.execute((await make_action(client.put_blob))[0])
        # Far shorter than the 120 s hold: only a wake-up can answer in time.
        response = await asyncio.wait_for(holding, 30)
        assert await _names(response.assignments) == [op.name]


async def test_a_draining_worker_gets_no_new_work(plugin_manager, tmp_path):
    async with coordinator(plugin_manager, tmp_path / "data") as (running, client):
        digest, _ = await make_action(client.put_blob)
        await client.execute(digest)
        worker = FakeWorker(client, "w1")
        worker.draining = True
        assert (await worker.sync(wait_s=30)).assignments == ()
        assert "w1" not in running.runtime.scheduler._workers  # idle and draining: gone


# -- status, throughput, group commit -------------------------------------------------------


async def test_status_counts_workers_queue_and_executions(plugin_manager, tmp_path):
    async with coordinator(plugin_manager, tmp_path / "data") as (_, client):
        for _ in range(3):
            await client.execute((await make_action(client.put_blob))[0])
        worker = FakeWorker(client, "w1")
        idle = FakeWorker(client, "w2", slots=0)
        await idle.sync()
        await worker.sync()
        status = await client.status()
        assert (status.workers_total, status.workers_busy) == (2, 1)
        assert (status.queued, status.executing) == (2, 1)
        worker.finish_all()
        await worker.sync()
        status = await client.status()
        assert status.metrics.total_executions == 1
        assert status.metrics.successful_executions == 1
        assert status.metrics.uptime_s > 0


async def test_concurrent_submissions_share_database_transactions(plugin_manager, tmp_path):
    async with coordinator(plugin_manager, tmp_path / "data") as (running, client):
        digests = [(await make_action(running.runtime.blob_store.put))[0] for _ in range(200)]
        database = running.runtime.scheduler.database
        before_transactions, before_writes = database.transactions, database.writes
        ops = await asyncio.gather(*(client.execute(digest) for digest in digests))
        assert len({op.name for op in ops}) == 200
        writes = database.writes - before_writes
        transactions = database.transactions - before_transactions
        assert writes == 200
        assert transactions < writes


async def test_a_thousand_queued_actions_drain_through_four_workers_exactly_once(
    plugin_manager, tmp_path
):
    memory = {"storage": {"blob_store": {"name": "memory"}}}
    async with coordinator(plugin_manager, tmp_path / "data", memory) as (running, client):
        store = running.runtime.blob_store
        digests = [(await make_action(store.put))[0] for _ in range(1000)]
        ops = await asyncio.gather(*(client.execute(digest) for digest in digests))
        names = {op.name for op in ops}
        assert len(names) == 1000
        stop = asyncio.Event()
        clients = [RexClient(running.url) for _ in range(4)]
        workers = [FakeWorker(c, f"w{i}", slots=4) for i, c in enumerate(clients)]
        serving = [asyncio.create_task(worker.serve(stop, wait_s=1)) for worker in workers]
        try:
            views = [await client.wait_operation(name, 60) for name in names]
        finally:
            stop.set()
            await asyncio.gather(*serving)
            for worker_client in clients:
                await worker_client.close()
        assert all(view.done and view.status == "ok" for view in views)
        assigned = [a.operation for worker in workers for a in worker.assigned]
        assert len(assigned) == len(set(assigned)) == 1000
        assert set(assigned) == names
        assert all(worker.assigned for worker in workers)
        assert running.runtime.scheduler.metrics().total_executions == 1000


# -- persistence -------------------------------------------------------------------------


async def test_a_restarted_coordinator_restores_queued_and_executing_operations(
    plugin_manager, tmp_path
):
    data = tmp_path / "data"
    options = {"restart_grace_s": 0.3}
    faithful = vanished = None
    async with coordinator(plugin_manager, data, **options) as (_, client):
        finished_digest, _ = await make_action(client.put_blob)
        finished = await client.execute(finished_digest, priority=-3)
        early = FakeWorker(client, "early")
        await early.sync()
        early.finish(finished.name, result_for("early"))
        await early.sync()
        queued = [
            await client.execute((await make_action(client.put_blob))[0]) for _ in range(3)
        ]
        kept = await client.execute((await make_action(client.put_blob))[0], priority=-2)
        requeued = await client.execute((await make_action(client.put_blob))[0], priority=-1)
        faithful, vanished = FakeWorker(client, "faithful"), FakeWorker(client, "vanished")
        assert await _names((await faithful.sync()).assignments) == [kept.name]
        assert await _names((await vanished.sync()).assignments) == [requeued.name]

    async with coordinator(plugin_manager, data, **options) as (running, client):
        status = await client.status()
        assert (status.queued, status.executing) == (3, 2)
        before = await client.wait_operation(finished.name)  # completed before the restart
        assert before.done and before.result == result_for("early")
        faithful.client = client
        response = await faithful.sync()  # it still runs `kept`: it keeps it
        assert response.assignments == () and response.cancel == ()
        assert (await client.wait_operation(kept.name)).state == "executing"
        fresh = FakeWorker(client, "fresh", slots=4)
        first = await fresh.sync()
        assert sorted(await _names(first.assignments)) == sorted(op.name for op in queued)
        # `vanished` never comes back: after the grace period its action is requeued.
        second = await asyncio.wait_for(fresh.sync(wait_s=30), 30)
        assert await _names(second.assignments) == [requeued.name]
        assert second.assignments[0].attempt == 2
        faithful.finish_all()
        await faithful.sync()
        fresh.finish_all()
        await fresh.sync()
        for op in [kept, requeued, *queued]:
            view = await client.wait_operation(op.name, 10)
            assert view.done and view.status == "ok", view
        assert (await client.wait_operation(kept.name)).attempts == 1
        assert set(running.runtime.scheduler._workers) == {"faithful", "fresh"}


async def test_sigkilled_coordinator_loses_no_operation_and_runs_none_twice(tmp_path):
    data = tmp_path / "data"
    config = tmp_path / "rexd.toml"
    config.write_text("[scheduler]\nrestart_grace_s = 0.5\n")
    process, url = await _start_rexd_process(data, config, tmp_path / "first.log")
    try:
        async with RexClient(url) as client:
            done_digest, _ = await make_action(client.put_blob)
            done = await client.execute(done_digest, priority=-2)
            early = FakeWorker(client, "early")
            await early.sync()
            early.finish(done.name, result_for("early"))
            await early.sync()
            running_op = await client.execute((await make_action(client.put_blob))[0], priority=-1)
            queued = [
                await client.execute((await make_action(client.put_blob))[0]) for _ in range(3)
            ]
            survivor = FakeWorker(client, "survivor")
            assert await _names((await survivor.sync()).assignments) == [running_op.name]
    finally:
        process.kill()  # SIGKILL: no shutdown code runs
        process.wait(timeout=20)

    process, url = await _start_rexd_process(data, config, tmp_path / "second.log")
    try:
        async with RexClient(url) as client:
            assert (await client.wait_operation(done.name)).result == result_for("early")
            survivor.client = client
            response = await survivor.sync()
            assert response.cancel == ()
            assert (await client.wait_operation(running_op.name)).state == "executing"
            stop = asyncio.Event()
            serving = asyncio.create_task(survivor.serve(stop, wait_s=1))
            views = [
                await client.wait_operation(op.name, 30) for op in [running_op, *queued]
            ]
            stop.set()
            await serving
            assert all(view.done and view.status == "ok" for view in views)
            assigned = [a.operation for w in (early, survivor) for a in w.assigned]
            assert sorted(assigned) == sorted(op.name for op in [done, running_op, *queued])
    finally:
        process.terminate()
        process.wait(timeout=20)


async def _start_rexd_process(
    data: Path, config: Path, log: Path
) -> tuple[subprocess.Popen[bytes], str]:
    args = ["--config", str(config), "--data-dir", str(data), "--http", "127.0.0.1:0"]
    help_text = await asyncio.to_thread(
        run_rexd, "serve", "--help", REXCORE_DISABLE_PLUGIN_AUTOLOAD="1"
    )
    if "--workers" in help_text.stdout:
        args += ["--workers", "0"]  # the fake workers must be the only ones
    with log.open("wb") as stderr:
        process = subprocess.Popen(  # noqa: ASYNC220 - starting it does not block
            [sys.executable, "-m", "rexcore.cli.rexd", "serve", *args],
            stdout=subprocess.DEVNULL, stderr=stderr,
            env=rexd_env(REXCORE_DISABLE_PLUGIN_AUTOLOAD="1"),
        )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while loop.time() < deadline and process.poll() is None:
        match = LISTENING.search(log.read_text())
        if match:
            return process, match.group(1)
        await asyncio.sleep(0.02)  # waiting for a process to start: nothing to await
    process.kill()
    raise AssertionError(f"rexd did not start: {log.read_text()}")


async def test_completed_operations_are_forgotten_after_their_retention(tmp_path):
    database = SchedulerDatabase(tmp_path / DATABASE_FILE)
    await database.open()
    try:
        digest = canonical_digest(Directory())
        now = time.time()
        ages = {"ancient": 10_000.0, "old": 30.0, "new": 20.0, "newest": 10.0}
        rows = []
        for name, age in ages.items():
            op = Operation(name=name, action_digest=digest, action=None, command=None,
                           state="completed", completed_at=now - age)
            rows.append(operation_row(op, 0, None, None))
        command = Command(arguments=("true",))
        action = Action(command_digest=canonical_digest(command), input_root_digest=digest)
        pending = Operation(name="pending", action_digest=canonical_digest(action),
                            action=action, command=command)
        rows.append(operation_row(pending, 1, canonical_bytes(action), canonical_bytes(command)))
        await database.save(rows)
        removed = await database.prune(older_than=now - 1000, keep=2)
        assert removed == 2
        kept = {name for name in [*ages, "pending"] if await database.get(name) is not None}
        assert kept == {"new", "newest", "pending"}
    finally:
        await database.close()
