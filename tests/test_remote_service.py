"""The Python API (``RemoteService``, its builder, ``SandboxSpec``) with real local
worker processes, in both flavours: blocking (its own event loop in a thread) and async
(the caller's event loop)."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest

import rexcore
from rexcore import PoolConfig, RemoteService, SandboxSpec, ServiceError
from rexcore.core.remote_action import RemoteActionError
from rexcore.serialization.codec import decode, encode
from tests._real_rexd import rexd_environment

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX shell actions")

PATH = {"PATH": "/usr/bin:/bin"}


@pytest.fixture
def worker_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Local workers inherit this process's environment: make this checkout importable
    from any directory and keep installed plugins (and their listeners) out."""
    for key, value in rexd_environment().items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    (path / "src").mkdir(parents=True)
    (path / "src" / "name.txt").write_text("rex\n")
    return path


def test_the_api_is_importable_from_rexcore_and_its_homes():
    from rexcore.config.model import PoolConfig as ConfigPoolConfig
    from rexcore.core.service import RemoteService as ServiceRemoteService

    assert PoolConfig is ConfigPoolConfig and RemoteService is ServiceRemoteService
    assert {"RemoteService", "AsyncRemoteService", "SandboxSpec", "PoolConfig"} <= set(
        rexcore.__all__
    )
    with pytest.raises(AttributeError, match="no attribute 'Nonexistent'"):
        rexcore.Nonexistent  # noqa: B018


def test_a_sandbox_spec_from_its_builder_round_trips_through_the_codec():
    spec = (SandboxSpec.builder().input("src").output("out/app").temp("tmp")
            .max_memory(512 << 20).max_cpu(2).timeout(60).build())

    assert spec == SandboxSpec(inputs=("src",), outputs=("out/app",), temp_dirs=("tmp",),
                               memory_bytes=512 << 20, cpus=2, timeout_s=60)
    assert decode(encode(spec), SandboxSpec) == spec
    with pytest.raises(ValueError, match="timeout_s must be positive"):
        SandboxSpec.builder().timeout(0).build()


def test_using_the_service_before_start_or_after_stop_raises_service_error(tmp_path):
    service = RemoteService.builder().coordinator("127.0.0.1", 0).data_dir(tmp_path).build()

    with pytest.raises(ServiceError, match=r"not running: call start\(\) first"):
        service.execute("early", SandboxSpec(), ["/bin/true"], tmp_path)
    with pytest.raises(ServiceError, match="not running"):
        service.get_status()
    service.stop()  # stopping a service that never started is harmless


def test_a_service_that_cannot_start_raises_service_error_naming_the_cause(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        service = (RemoteService.builder().coordinator("127.0.0.1", port)
                   .data_dir(tmp_path).workers(0).build())
        with pytest.raises(ServiceError, match="failed to start.*cannot listen.*in use"):
            service.start()
    with pytest.raises(ServiceError, match="not running"):
        service.get_status()


@pytest.mark.slow
def test_the_blocking_service_executes_writes_outputs_back_and_reports_status_and_metrics(
    tmp_path, workdir, worker_environment
):
    pool = PoolConfig(min_workers=2, max_workers=50)
    service = (RemoteService.builder().coordinator("127.0.0.1", 0).data_dir(tmp_path / "data")
               .pool(pool).build())
    spec = SandboxSpec.builder().input("src/name.txt").output("out/greeting.txt").timeout(60).build()
    argv = ["/bin/sh", "-c", "echo hello $(cat src/name.txt) > out/greeting.txt; echo done"]
    greeting = workdir / "out" / "greeting.txt"

    with service:
        first = service.execute("greet", spec, argv, workdir, environment=PATH)
        assert first.succeeded and not first.cached, first.stderr
        assert first.stdout == b"done\n"
        assert greeting.read_text() == "hello rex\n"

        greeting.unlink()
        again = service.execute("greet", spec, argv, workdir, environment=PATH)
        assert again.succeeded and again.cached
        assert greeting.read_text() == "hello rex\n"  # written back from the cache too

        failed = service.execute("fail", SandboxSpec(), ["/bin/sh", "-c", "exit 4"], workdir)
        assert failed.exit_code == 4 and not failed.succeeded

        deadline = time.monotonic() + 90
        while (status := service.get_status()).workers_total < pool.initial_workers:
            assert time.monotonic() < deadline, f"workers never joined: {status}"
            time.sleep(0.05)
        assert status.workers_total == pool.initial_workers == 2
        assert (status.workers_busy, status.pending_actions, status.executing_actions) == (0, 0, 0)

        metrics = service.get_metrics()
        assert (metrics.total_executions, metrics.successful_executions,
                metrics.failed_executions, metrics.cache_hits) == (2, 1, 1, 1)
        assert metrics.cache_hit_rate == pytest.approx(1 / 3)
        assert metrics.uptime_s > 0

    with pytest.raises(ServiceError, match="not running"):
        service.execute("late", spec, argv, workdir)


@pytest.mark.slow
async def test_the_async_service_runs_actions_on_the_callers_event_loop(
    tmp_path, workdir, worker_environment
):
    service = (RemoteService.builder().coordinator("127.0.0.1", 0).data_dir(tmp_path / "data")
               .pool(PoolConfig(min_workers=1, max_workers=1)).build_async())
    spec = SandboxSpec.builder().input("src").output("out").timeout(60).build()

    async with service:
        result = await service.execute(
            "shout", spec, ["/bin/sh", "-c", "mkdir out; tr a-z A-Z < src/name.txt > out/NAME"],
            workdir, environment=PATH,
        )
        assert result.succeeded, result.stderr
        assert (workdir / "out" / "NAME").read_text() == "REX\n"
        status = await service.get_status()
        assert status.workers_total == 1 and status.pending_actions == 0
        assert (await service.get_metrics()).successful_executions == 1

        with pytest.raises(RemoteActionError, match="'absent.txt' does not exist"):
            await service.execute("absent", SandboxSpec(inputs=("absent.txt",)),
                                  ["/bin/true"], workdir)

    with pytest.raises(ServiceError, match="not running"):
        await service.get_status()
