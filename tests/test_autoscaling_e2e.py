"""Live scaling: a real ``rexd serve`` with the ``local`` provider and the ``predictive``
policy grows its worker processes under a burst and drains them after, without killing
or losing an action. Cooldowns and the evaluation interval are shortened; nothing is
timed: the test waits for each state and checks what happened."""

from __future__ import annotations

import sys

import pytest

from rexcore.protocol.client import RexClient
from tests._real_rexd import WORKER_PID, alive, lines, submit, wait_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
]

AUTOSCALE = {"pool": {
    "enable_autoscale": True, "min_workers": 1, "max_workers": 3,
    "evaluation_interval_s": 0.2, "scale_up_cooldown_s": 0.0, "scale_down_cooldown_s": 1.0,
    "worker_startup_s": 1.0,
    "policy": {"name": "predictive",
               "options": {"wait_objective_s": 0.5, "initial_service_s": 2.0}},
}}


async def test_rexd_grows_local_workers_under_a_burst_and_drains_them_without_killing_an_action(
    rexd_processes,
):
    server = rexd_processes.serve(workers=1, config=AUTOSCALE)
    shared = rexd_processes.shared
    started = shared / "started"
    await server.wait_for_workers(1)
    assert server.status()["workers_total"] == 1
    async with RexClient(server.url) as client:
        views = [await submit(client, (
            f"{WORKER_PID} echo {i} $(worker_pid) >> {started}; "
            f"while [ ! -e {shared}/release-{i} ]; do sleep 0.05; done; echo done {i}"
        )) for i in range(4)]

        # One worker runs one action and three wait: the pool grows to its maximum.
        await wait_until(lambda: len(lines(started)) >= 3, "three actions to run at once")
        assert server.status()["workers_total"] == 3
        assert len({line.split()[1] for line in lines(started)}) == 3

        for i in range(3):
            (shared / f"release-{i}").touch()
        for view in views[:3]:
            done = await client.wait_operation(view.name, wait_s=120)
            assert done.status == "ok" and done.attempts == 1, done.message
        await wait_until(lambda: len(lines(started)) == 4, "the fourth action to start")
        last_pid = int(lines(started)[-1].split()[1])

        # Idle now except the one running the last action: the pool drains down to it.
        await wait_until(lambda: server.status()["workers_total"] == 1,
                         "the pool to drain to one worker")
        running = await client.wait_operation(views[3].name)
        assert running.state == "executing" and alive(last_pid)
        others = {int(line.split()[1]) for line in lines(started)} - {last_pid}
        await wait_until(lambda: not any(alive(pid) for pid in others),
                         "the drained worker processes to exit")

        (shared / "release-3").touch()
        done = await client.wait_operation(views[3].name, wait_s=120)
        assert done.status == "ok" and done.attempts == 1, done.message
    assert "draining" in server.log() and "adding" in server.log()
