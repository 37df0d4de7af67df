"""The native Python API: run a rex service (coordinator + local workers) and use it.

Blocking flavour::

    service = (RemoteService.builder()
               .coordinator("127.0.0.1", 8981)
               .pool(PoolConfig(min_workers=2, max_workers=50))
               .build())
    with service:
        result = service.execute("compile-main", spec, ["cc", "-c", "main.c"], workdir)
        print(result.exit_code, service.get_status(), service.get_metrics())

Async flavour: ``builder().build_async()`` gives an :class:`AsyncRemoteService` with the
same methods as coroutines, run on the caller's event loop (``async with service: ...``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Self

import attrs

from rexcore.config.converter import structure_config, unstructure_config
from rexcore.config.loader import resolve_config, set_option
from rexcore.config.model import PoolConfig, RexConfig
from rexcore.core.daemon import Daemon, DaemonError
from rexcore.core.remote_action import ExecutionResult, execute_remotely
from rexcore.monitoring.metrics import resolve_exporters
from rexcore.plugins.manager import PluginManager, build_plugin_manager
from rexcore.protocol.client import RexClient
from rexcore.serialization.sandbox_spec import SandboxSpec

__all__ = [
    "AsyncRemoteService",
    "RemoteService",
    "RemoteServiceBuilder",
    "ServiceError",
    "ServiceMetrics",
    "ServiceStatus",
]


class ServiceError(RuntimeError):
    """The service is used wrongly (not started, started twice) or failed to start."""


@attrs.frozen
class ServiceStatus:
    workers_total: int
    workers_busy: int
    pending_actions: int
    executing_actions: int


@attrs.frozen
class ServiceMetrics:
    total_executions: int
    successful_executions: int
    failed_executions: int
    cache_hits: int
    cache_hit_rate: float
    uptime_s: float


class RemoteServiceBuilder:
    """Collects settings as ``rexd.toml`` overrides; ``build()`` validates them."""

    def __init__(self) -> None:
        self._raw: dict[str, Any] = {}
        self._plugins: PluginManager | None = None

    def coordinator(self, host: str = "127.0.0.1", port: int = 8981) -> Self:
        """Where the native HTTP API (clients and workers) listens; port 0 picks one."""
        set_option(self._raw, "protocols.native.listen", f"{host}:{port}")
        return self

    def data_dir(self, path: str | Path) -> Self:
        set_option(self._raw, "data_dir", str(path))
        return self

    def pool(self, pool: PoolConfig) -> Self:
        self._raw["pool"] = unstructure_config(pool)
        return self

    def workers(self, count: int) -> Self:
        """Shorthand for a pool of exactly ``count`` local workers."""
        set_option(self._raw, "pool.target_workers", count)
        return self

    def sandbox(self, name: str) -> Self:
        set_option(self._raw, "pool.sandbox", name)
        return self

    def enable_reapi(self, port: int = 8980, host: str = "127.0.0.1") -> Self:
        """Serve the Remote Execution API too (needs the rex-reapi distribution)."""
        set_option(self._raw, "protocols.reapi.listen", f"{host}:{port}")
        return self

    def enable_metrics(self, *exporters: str, interval_s: float | None = None) -> Self:
        """Collect metrics and feed ``exporters`` (default: ``prometheus``, served at
        ``GET /metrics``; also ``log`` or a plugin's) every ``interval_s`` seconds."""
        names = exporters or ("prometheus",)
        set_option(self._raw, "metrics.exporters", [{"name": name} for name in names])
        if interval_s is not None:
            set_option(self._raw, "metrics.interval_s", interval_s)
        return self

    def option(self, dotted: str, value: Any) -> Self:
        """Any other ``rexd.toml`` option, e.g. ``option("scheduler.max_queued", 100)``."""
        set_option(self._raw, dotted, value)
        return self

    def plugins(self, manager: PluginManager) -> Self:
        """Use this plugin manager instead of discovering installed plugins."""
        self._plugins = manager
        return self

    def _prepare(self) -> tuple[dict[str, Any], PluginManager]:
        raw = dict(self._raw)
        config = structure_config(raw, RexConfig)
        plugins = self._plugins or build_plugin_manager(config.plugins, strict=True)
        resolve_config(config, plugins)  # fail here, not in start(), on a bad setting
        resolve_exporters(config.metrics, plugins)
        return raw, plugins

    def build(self) -> RemoteService:
        return RemoteService(*self._prepare())

    def build_async(self) -> AsyncRemoteService:
        return AsyncRemoteService(*self._prepare())


class AsyncRemoteService:
    """A rex service on the running event loop: coordinator, local workers, a client."""

    def __init__(self, raw_config: dict[str, Any], plugins: PluginManager) -> None:
        self._raw = raw_config
        self._plugins = plugins
        self._daemon: Daemon | None = None
        self._client: RexClient | None = None

    @staticmethod
    def builder() -> RemoteServiceBuilder:
        return RemoteServiceBuilder()

    @property
    def url(self) -> str:
        """Base URL of the native HTTP API (what ``rex --server`` and workers use)."""
        daemon = self._require()
        return daemon.protocols["native"].url

    def _require(self) -> Daemon:
        if self._daemon is None:
            raise ServiceError("the service is not running: call start() first")
        return self._daemon

    async def start(self) -> None:
        if self._daemon is not None:
            raise ServiceError("the service is already running")
        config = structure_config(self._raw, RexConfig)
        daemon = Daemon(resolve_config(config, self._plugins), self._plugins)
        try:
            await daemon.start()
        except DaemonError as exc:
            raise ServiceError(f"the service failed to start: {exc}") from exc
        self._daemon = daemon
        # The service's own client talks to it as its local workers do (over loopback,
        # plain HTTP even when the API speaks TLS) and presents the join token, which a
        # native API with auth_tokens_file accepts.
        self._client = RexClient(daemon.protocols["native"].local_url,
                                 token=config.scheduler.join_token)

    async def stop(self) -> None:
        """Drain the workers (running actions finish) and stop; safe to call twice."""
        daemon, client = self._daemon, self._client
        self._daemon = self._client = None
        if client is not None:
            await client.close()
        if daemon is not None:
            await daemon.stop()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def execute(
        self, action_id: str, spec: SandboxSpec, argv: Sequence[str], workdir: str | Path,
        *, environment: Mapping[str, str] | None = None,
        properties: Mapping[str, str] | None = None, skip_cache_lookup: bool = False,
    ) -> ExecutionResult:
        """Run ``argv`` on a worker with ``spec``'s inputs from ``workdir``; the outputs are
        written back into ``workdir``. ``action_id`` names the action in logs."""
        self._require()
        assert self._client is not None
        del action_id  # a label for the caller; the action's identity is its digest
        return await execute_remotely(
            self._client, argv, workdir=Path(workdir), spec=spec, environment=environment,
            properties=properties, skip_cache_lookup=skip_cache_lookup,
        )

    async def get_status(self) -> ServiceStatus:
        self._require()
        assert self._client is not None
        status = await self._client.status()
        return ServiceStatus(status.workers_total, status.workers_busy, status.queued,
                             status.executing)

    async def get_metrics(self) -> ServiceMetrics:
        self._require()
        assert self._client is not None
        metrics = (await self._client.status()).metrics
        return ServiceMetrics(metrics.total_executions, metrics.successful_executions,
                              metrics.failed_executions, metrics.cache_hits,
                              metrics.cache_hit_rate, metrics.uptime_s)


class RemoteService:
    """The blocking flavour: the service runs on its own event loop in a thread."""

    def __init__(self, raw_config: dict[str, Any], plugins: PluginManager) -> None:
        self._service = AsyncRemoteService(raw_config, plugins)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @staticmethod
    def builder() -> RemoteServiceBuilder:
        return RemoteServiceBuilder()

    @property
    def url(self) -> str:
        return self._service.url

    def _call(self, coroutine: Any) -> Any:
        if self._loop is None:
            coroutine.close()
            raise ServiceError("the service is not running: call start() first")
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result()

    def start(self) -> None:
        if self._loop is not None:
            raise ServiceError("the service is already running")
        loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, name="rex-service", daemon=True)
        self._thread.start()
        self._loop = loop
        try:
            self._call(self._service.start())
        except BaseException:
            self._shutdown_loop()
            raise

    def stop(self) -> None:
        if self._loop is None:
            return
        try:
            self._call(self._service.stop())
        finally:
            self._shutdown_loop()

    def _shutdown_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join()
        if loop is not None:
            loop.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def execute(self, action_id: str, spec: SandboxSpec, argv: Sequence[str],
                workdir: str | Path, **kwargs: Any) -> ExecutionResult:
        return self._call(self._service.execute(action_id, spec, argv, workdir, **kwargs))

    def get_status(self) -> ServiceStatus:
        return self._call(self._service.get_status())

    def get_metrics(self) -> ServiceMetrics:
        return self._call(self._service.get_metrics())
