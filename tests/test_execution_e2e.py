"""The execution engine against real processes: ``rexd serve`` subprocesses whose local
workers are real ``rexd worker`` processes, killed with SIGKILL where a test says so.

Actions are shell scripts that leave traces in a shared dir outside their exec root (the
process sandbox is not hermetic), so a test can see which runs happened where.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import pytest

from rexcore.core.loop import chosen_event_loop
from rexcore.protocol.client import RexClient
from tests._real_rexd import WORKER_PID, alive, lines, stdout_of, submit, wait_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
]


async def test_an_action_whose_worker_is_killed_mid_action_completes_on_another_worker(
    rexd_processes,
):
    server = rexd_processes.serve(workers=2)
    shared = rexd_processes.shared
    started, release = shared / "started", shared / "release"
    await server.wait_for_workers(2)
    async with RexClient(server.url) as client:
        view = await submit(client, (
            f"{WORKER_PID} w=$(worker_pid); echo $w >> {started}; "
            f"while [ ! -e {release} ]; do sleep 0.05; done; echo finished on $w"
        ))
        await wait_until(lambda: lines(started), "the action to start")
        running = await client.wait_operation(view.name)
        assert running.state == "executing" and running.worker
        victim = server.worker_pid(running.worker)
        assert lines(started) == [str(victim)]  # the scheduler knows where it runs

        os.kill(victim, signal.SIGKILL)
        await wait_until(lambda: not alive(victim), "the worker to die")
        release.touch()
        done = await client.wait_operation(view.name, wait_s=120)

        assert done.done and done.status == "ok", done.message
        assert done.result.exit_code == 0
        assert done.attempts == 2
        assert len(lines(started)) == 2
        second = lines(started)[1]
        assert second != str(victim) and int(second) > 0
        assert await stdout_of(client, done) == f"finished on {second}\n"


async def test_a_coordinator_killed_with_queued_and_running_work_completes_all_after_restart(
    rexd_processes,
):
    """Two actions run and four wait when the coordinator is SIGKILLed. The running ones
    finish while it is down (their workers keep the results); the restarted coordinator,
    same data dir and port, gets them reported and runs the queued ones. Every action
    reads a generation number outside its exec root, bumped during the outage, so a rerun
    of an action that had started would give a different result."""
    server = rexd_processes.serve(workers=2)
    shared = rexd_processes.shared
    generation, runs, release = shared / "generation", shared / "runs", shared / "release"
    generation.write_text("1")
    await server.wait_for_workers(2)
    names: dict[int, str] = {}
    async with RexClient(server.url) as client:
        for action in range(6):
            view = await submit(client, (
                f"g=$(cat {generation}); echo start {action} $g >> {runs}; "
                f"while [ ! -e {release} ]; do sleep 0.05; done; "
                f"echo end {action} $g >> {runs}; echo {action} $g"
            ))
            names[action] = view.name
        await wait_until(lambda: len(lines(runs)) == 2, "two actions to start")
        status = server.status()
        assert (status["executing"], status["queued"]) == (2, 4)

    server.kill()
    generation.write_text("2")
    release.touch()  # the running actions finish while no coordinator listens
    await wait_until(lambda: sum(line.startswith("end") for line in lines(runs)) == 2,
                     "the running actions to finish")
    server.start()

    results: dict[int, str] = {}
    async with RexClient(server.url) as client:
        for action, name in names.items():
            done = await client.wait_operation(name, wait_s=120)
            assert done.done and done.status == "ok", f"{action}: {done.status} {done.message}"
            assert done.result.exit_code == 0
            results[action] = (await stdout_of(client, done)).strip()

    finished: dict[int, set[str]] = {}
    for line in lines(runs):
        kind, action, gen = line.split()
        if kind == "end":
            finished.setdefault(int(action), set()).add(f"{action} {gen}")
    assert sorted(finished) == list(range(6))  # every action ran to its end...
    for action, outputs in finished.items():
        assert outputs == {results[action]}  # ...and any rerun gave the same result
    assert sorted(gen for _, gen in (r.split() for r in results.values())) == ["1"] * 2 + ["2"] * 4


async def test_an_action_that_crashes_its_worker_every_time_fails_at_the_retry_cap(
    rexd_processes,
):
    # As the worker's own user, so that the action may kill it (as nobody it could not).
    server = rexd_processes.serve(workers=2, config={
        "sandboxes": {"process": {"user": "self"}},
        "scheduler": {"max_attempts": 3, "lease_s": 10.0},
    })
    crashes = rexd_processes.shared / "crashes"
    await server.wait_for_workers(2)
    async with RexClient(server.url) as client:
        view = await submit(client, (
            f"{WORKER_PID} w=$(worker_pid); echo $w >> {crashes}; kill -9 $w; sleep 1"
        ))
        done = await client.wait_operation(view.name, wait_s=180)

        assert done.done and done.status == "unavailable"
        assert done.result is None and done.attempts == 3
        assert "retry cap" in done.message and "max_attempts = 3" in done.message
        killed = lines(crashes)
        assert len(killed) == 3 and "none" not in killed and len(set(killed)) == 3

        after = await submit(client, "echo still serving")
        after = await client.wait_operation(after.name, wait_s=120)
        assert after.status == "ok" and after.result.exit_code == 0
        assert await stdout_of(client, after) == "still serving\n"


async def test_a_thousand_queued_actions_on_four_workers_all_complete_exactly_once(
    rexd_processes,
):
    count = 1000
    server = rexd_processes.serve(workers=4)
    runs = rexd_processes.shared / "runs"
    await server.wait_for_workers(4)
    limit = asyncio.Semaphore(64)
    async with RexClient(server.url) as client:

        async def enqueue(action: int) -> str:
            async with limit:
                return (await submit(client, f"echo {action} >> {runs}; echo {action}")).name

        async def result(action: int, name: str) -> str:
            async with limit:
                done = await client.wait_operation(name, wait_s=180)
                assert done.done and done.status == "ok", f"{action}: {done.message}"
                assert done.result.exit_code == 0
                return await stdout_of(client, done)

        names = await asyncio.gather(*(enqueue(action) for action in range(count)))
        assert len(set(names)) == count
        outputs = await asyncio.gather(*(result(a, n) for a, n in enumerate(names)))

    assert outputs == [f"{action}\n" for action in range(count)]
    assert sorted(map(int, lines(runs))) == list(range(count))  # each ran exactly once
    metrics = server.status()["metrics"]
    assert metrics["total_executions"] == metrics["successful_executions"] == count


@pytest.mark.parametrize("event_loop", ["auto", "asyncio"])
async def test_a_timeout_kills_the_whole_tree_including_a_daemonized_grandchild(
    rexd_processes, event_loop
):
    # On each event loop rexd can run: the default (uvloop here) and the standard one.
    server = rexd_processes.serve(workers=1, config={"event_loop": event_loop})
    shared = rexd_processes.shared
    daemon_pid, action_pid = shared / "daemon.pid", shared / "action.pid"
    await server.wait_for_workers(1)
    async with RexClient(server.url) as client:
        # setsid + double fork: the daemon has a session of its own and no living parent.
        view = await submit(client, (
            f"setsid sh -c 'sleep 300 & echo $! > {daemon_pid}' & "
            f"while [ ! -s {daemon_pid} ]; do sleep 0.01; done; "
            f"echo $$ > {action_pid}; echo started; sleep 300"
        ), timeout_s=2)
        done = await client.wait_operation(view.name, wait_s=120)

        assert done.done and done.status == "deadline_exceeded", done.message
        assert "timeout" in done.message
        assert await stdout_of(client, done) == "started\n"
    for pid_file in (daemon_pid, action_pid):
        pid = int(pid_file.read_text())
        await wait_until(lambda pid=pid: not alive(pid), f"{pid_file.name} {pid} to be gone",
                         patience_s=30)
    chosen = chosen_event_loop(event_loop)
    assert server.log().count(f"event loop: {chosen}") == 2, server.log()  # rexd, worker
