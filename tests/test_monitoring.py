"""Health checks, metrics and pool status as a user of a real rexd sees them over HTTP."""

from __future__ import annotations

import logging
import types
from typing import Any

import aiohttp
import attrs
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rexcore import RemoteService, hookimpl
from rexcore.config.converter import ConfigError
from rexcore.core.daemon import DaemonError
from rexcore.monitoring.metrics import MetricsSnapshot
from rexcore.monitoring.prometheus import METRICS
from rexcore.plugins import MetricsExporterDescriptor
from rexcore.testing import start_rexd
from tests._scheduler_fakes import FakeWorker, coordinator, make_action, result_for, wait_until

PROMETHEUS = {"metrics": {"exporters": [{"name": "prometheus"}]}}
# A pool that sizes itself only when the test ticks it: no timing in these tests.
MOCK_POOL = {"pool": {
    "enable_autoscale": True, "target_workers": 2, "min_workers": 2, "max_workers": 2,
    "provider": {"name": "mock"}, "policy": {"name": "static"},
    "evaluation_interval_s": 3600,
}}


async def _get(url: str) -> tuple[int, Any, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        text = await response.text()
        body = await response.json() if response.content_type == "application/json" else text
        return response.status, body, response.headers.get("Content-Type", "")


def _failing(health: dict[str, Any]) -> set[str]:
    return {name for name, check in health["checks"].items() if not check["healthy"]}


# -- /healthz ---------------------------------------------------------------------------


async def test_healthz_turns_503_when_work_is_queued_and_no_worker_joined(
    plugin_manager, tmp_path
):
    async with coordinator(plugin_manager, tmp_path / "data") as (running, client):
        status, health, _ = await _get(f"{running.url}/healthz")
        assert status == 200 and health["status"] == "ok"
        assert {"workers", "queue_depth", "failed_workers", "coordinator"} <= health["checks"].keys()

        operation = await client.execute((await make_action(client.put_blob))[0])
        status, health, _ = await _get(f"{running.url}/healthz")
        assert status == 503 and health["status"] == "unhealthy"
        assert _failing(health) == {"workers", "queue_depth"}
        assert "1 operation(s) queued and no worker has joined" in (
            health["checks"]["workers"]["detail"])

        worker = FakeWorker(client, "w1")
        await worker.sync()  # joins and takes the operation
        worker.finish(operation.name)
        await worker.sync()
        status, health, _ = await _get(f"{running.url}/healthz")
        assert status == 200, health
        assert health["checks"]["workers"]["detail"] == "1 worker(s) joined, 0 busy"


async def test_healthz_fails_queue_depth_beyond_ten_operations_per_worker(
    plugin_manager, tmp_path
):
    async with coordinator(plugin_manager, tmp_path / "data") as (running, client):
        worker = FakeWorker(client, "w1")
        await worker.sync()
        for _ in range(11):  # the worker takes one, ten wait: exactly the limit
            await client.execute((await make_action(client.put_blob))[0])
        await worker.sync()
        assert len(worker.executing) == 1
        status, health, _ = await _get(f"{running.url}/healthz")
        assert status == 200, health

        await client.execute((await make_action(client.put_blob))[0])
        status, health, _ = await _get(f"{running.url}/healthz")
        assert status == 503
        assert _failing(health) == {"queue_depth"}
        assert health["checks"]["queue_depth"]["detail"].startswith(
            "11 operation(s) queued for 1 worker(s) (at most 10 per worker: 10); add workers")


async def test_healthz_fails_after_a_pool_worker_vanishes_without_a_drain(
    plugin_manager, tmp_path
):
    running = await start_rexd(plugin_manager, tmp_path / "data", MOCK_POOL)
    try:
        pool = running.daemon.pool
        status, health, _ = await _get(f"{running.url}/healthz")
        assert status == 200 and health["checks"]["failed_workers"]["healthy"]

        lost = next(iter(pool.provisioner.workers))
        await pool.provider.terminate(lost)  # dies behind the pool's back
        await pool.tick()  # notices, counts it failed, and replaces it
        status, health, _ = await _get(f"{running.url}/healthz")
        assert status == 503
        assert _failing(health) == {"failed_workers"}
        assert health["checks"]["failed_workers"]["detail"].startswith(
            "1 worker(s) failed, 0 provider error(s) since the pool started, within the last")
        _, body, _ = await _get(f"{running.url}/v1/status")
        assert body["pool"]["failed"] == 1 and body["pool"]["starting"] == 2
    finally:
        await running.daemon.stop()


async def test_healthz_fails_the_coordinator_check_when_its_database_is_gone(
    plugin_manager, tmp_path
):
    async with coordinator(plugin_manager, tmp_path / "data") as (running, _client):
        await running.runtime.scheduler.database.close()
        status, health, _ = await _get(f"{running.url}/healthz")
        assert status == 503
        assert _failing(health) == {"coordinator"}
        detail = health["checks"]["coordinator"]["detail"]
        assert "scheduler.sqlite3 fails" in detail and "is not open" in detail


# -- /metrics ---------------------------------------------------------------------------


def _samples(text: str) -> dict[str, float]:
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_serves_prometheus_text_with_the_execution_counters(
    plugin_manager, tmp_path
):
    async with coordinator(plugin_manager, tmp_path / "data", PROMETHEUS) as (running, client):
        worker = FakeWorker(client, "w1", slots=3)
        await worker.sync()
        good, _ = await make_action(client.put_blob, argv=["true"])
        bad, _ = await make_action(client.put_blob, argv=["false"])
        other, _ = await make_action(client.put_blob)
        for digest in (good, bad, other):
            await client.execute(digest)
        await worker.sync()
        for name, assignment in list(worker.executing.items()):
            worker.finish(name, result_for("w1", exit_code=1 if assignment.action_digest == bad
                                           else 0))
        await worker.sync()
        await wait_until(lambda: running.runtime.scheduler.metrics().total_executions == 3,
                         "three executions ended")
        cached = await client.execute(good)  # answered from the action cache
        assert cached.cached
        await client.execute((await make_action(client.put_blob))[0])  # one more in flight

        status, text, content_type = await _get(f"{running.url}/metrics")
        assert status == 200 and content_type.startswith("text/plain")
        samples = _samples(text)
        assert samples["rex_executions_total"] == 3
        assert samples["rex_successful_executions_total"] == 2
        assert samples["rex_failed_executions_total"] == 1
        assert samples["rex_cache_hits_total"] == 1
        assert samples["rex_cache_lookups_total"] == 5
        assert samples["rex_cache_hit_rate"] == pytest.approx(1 / 5)
        assert samples["rex_active_workers"] == 1
        assert samples["rex_queue_depth"] + samples["rex_executing_operations"] == 1
        assert samples["rex_uptime_seconds"] > 0
        families = {f.name: f.type for f in text_string_to_metric_families(text)}
        assert families["rex_executions"] == "counter" and families["rex_queue_depth"] == "gauge"


def test_every_snapshot_field_has_a_prometheus_metric():
    assert set(METRICS) == {field.name for field in attrs.fields(MetricsSnapshot)}


async def test_metrics_answers_404_naming_the_setting_when_no_scraped_exporter_is_on(
    plugin_manager, tmp_path
):
    running = await start_rexd(plugin_manager, tmp_path / "data")
    try:
        status, body, _ = await _get(f"{running.url}/metrics")
        assert status == 404 and body["error"]["code"] == "metrics_not_enabled"
        assert 'exporters = [{name = "prometheus"}]' in body["error"]["message"]
    finally:
        await running.daemon.stop()


async def test_an_unknown_exporter_or_bad_option_stops_rexd_naming_its_path(
    plugin_manager, tmp_path
):
    config = {"metrics": {"exporters": [{"name": "log", "options": {"levl": "info"}},
                                        {"name": "statsd"}]}}
    with pytest.raises(DaemonError) as caught:
        await start_rexd(plugin_manager, tmp_path / "data", config)
    message = str(caught.value)
    assert "$.metrics.exporters[0].options: unknown key(s) levl" in message
    assert "$.metrics.exporters[1]: unknown metrics exporter 'statsd'; available: log, " \
           "prometheus" in message


async def test_the_log_exporter_writes_a_line_every_interval(plugin_manager, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="rexcore.metrics")
    config = {"metrics": {"exporters": [{"name": "log"}], "interval_s": 0.01}}
    running = await start_rexd(plugin_manager, tmp_path / "data", config)
    try:
        await wait_until(lambda: sum(r.name == "rexcore.metrics" for r in caplog.records) >= 2,
                         "two metrics lines were logged")
    finally:
        await running.daemon.stop()
    line = next(r.getMessage() for r in caplog.records if r.name == "rexcore.metrics")
    assert line.startswith("metrics total_executions=0 successful_executions=0 ")
    assert " queue_depth=0 " in line and " worker_utilisation=0.000 " in line


async def test_a_plugin_exporter_is_fed_snapshots_and_closed(plugin_manager, register, tmp_path):
    @attrs.frozen
    class Options:
        label: str = ""

    class Recording:
        def __init__(self, options, context):
            self.options, self.snapshots, self.closed = options, [], False
            built.append(self)

        def export(self, snapshot):
            self.snapshots.append(snapshot)

        async def close(self):
            self.closed = True

    built: list[Recording] = []
    register(types.SimpleNamespace(rexcore_metrics_exporters=hookimpl(lambda: [
        MetricsExporterDescriptor(name="recording", factory=Recording, options_type=Options)])))
    config = {"metrics": {"exporters": [{"name": "recording", "options": {"label": "mine"}}],
                          "interval_s": 0.01}}
    running = await start_rexd(plugin_manager, tmp_path / "data", {**config, **MOCK_POOL})
    try:
        (exporter,) = built
        await wait_until(lambda: bool(exporter.snapshots), "a snapshot was exported")
    finally:
        await running.daemon.stop()
    assert exporter.options.label == "mine" and exporter.closed
    assert exporter.snapshots[0].desired_workers == 2
    assert exporter.snapshots[0].starting_workers == 2


# -- /v1/status -------------------------------------------------------------------------


async def test_status_shows_the_pools_workers_by_state(plugin_manager, tmp_path):
    running = await start_rexd(plugin_manager, tmp_path / "data", MOCK_POOL)
    try:
        status, body, _ = await _get(f"{running.url}/v1/status")
        assert status == 200
        pool = body["pool"]
        assert (pool["autoscale"], pool["policy"], pool["desired"]) == (True, "static", 2)
        assert (pool["starting"], pool["idle"], pool["busy"], pool["failed"]) == (2, 0, 0, 0)
    finally:
        await running.daemon.stop()


async def test_status_of_a_fixed_pool_asks_the_provider(plugin_manager, tmp_path):
    config = {"pool": {"target_workers": 3, "provider": {"name": "mock"}}}
    running = await start_rexd(plugin_manager, tmp_path / "data", config)
    try:
        _, body, _ = await _get(f"{running.url}/v1/status")
        assert body["pool"]["autoscale"] is False and body["pool"]["policy"] == ""
        assert (body["pool"]["desired"], body["pool"]["starting"]) == (3, 3)
    finally:
        await running.daemon.stop()


async def test_status_has_no_pool_when_rexd_starts_no_workers(plugin_manager, tmp_path):
    async with coordinator(plugin_manager, tmp_path / "data") as (_running, client):
        assert (await client.status()).pool is None


# -- the Python API ---------------------------------------------------------------------


async def test_enable_metrics_on_the_builder_serves_prometheus_metrics(
    plugin_manager, tmp_path
):
    service = (RemoteService.builder().plugins(plugin_manager).data_dir(tmp_path / "data")
               .coordinator("127.0.0.1", 0).workers(0).enable_metrics().build_async())
    async with service:
        status, text, _ = await _get(f"{service.url}/metrics")
    assert status == 200 and _samples(text)["rex_executions_total"] == 0


def test_enable_metrics_with_an_unknown_exporter_fails_at_build(plugin_manager):
    builder = RemoteService.builder().plugins(plugin_manager).enable_metrics("statsd")
    with pytest.raises(ConfigError, match=r"\$\.metrics\.exporters\[0\]: unknown metrics "
                                          "exporter 'statsd'"):
        builder.build()
