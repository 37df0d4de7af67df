"""The running rexd: builds storage and protocols from resolved config, starts, stops.

``rexd serve`` runs one :class:`Daemon` until SIGINT/SIGTERM; ``rexcore.testing`` runs one
in-process on free ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from typing import Any

from rexcore.artifacts.action_cache import ActionCacheOptions, create_action_cache
from rexcore.artifacts.store import StorageError
from rexcore.config.converter import ConfigError
from rexcore.config.loader import ResolvedConfig
from rexcore.core.runtime import ServiceRuntime
from rexcore.monitoring.metrics import build_collector, resolve_exporters
from rexcore.plugins.descriptors import ComponentContext
from rexcore.plugins.manager import PluginManager
from rexcore.scheduler.operations import SchedulerError

__all__ = ["Daemon", "DaemonError"]

log = logging.getLogger(__name__)


class DaemonError(RuntimeError):
    """rexd could not start: the data dir, a store or a listener failed."""


class Daemon:
    """Storage plus every enabled protocol, with an orderly start and a graceful stop."""

    def __init__(self, resolved: ResolvedConfig, plugins: PluginManager) -> None:
        self.resolved = resolved
        self.plugins = plugins
        self.runtime: ServiceRuntime | None = None
        self.protocols: dict[str, Any] = {}
        self.pool: Any = None
        self._stopped = asyncio.Event()

    @property
    def context(self) -> ComponentContext:
        return ComponentContext(
            data_dir=self.resolved.data_dir, config=self.resolved.config, plugins=self.plugins
        )

    async def start(self) -> ServiceRuntime:
        config = self.resolved.config
        data_dir = self.resolved.data_dir
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DaemonError(
                f"cannot create the data dir {data_dir}: {exc.strerror}; choose another with "
                "--data-dir or REX_DATA_DIR"
            ) from exc
        self.plugins.configure(config)
        try:
            exporters = resolve_exporters(config.metrics, self.plugins)
        except ConfigError as exc:
            raise DaemonError(str(exc)) from exc
        context = self.context
        store_descriptor = self.resolved.blob_store.registered.descriptor
        try:
            blob_store = await _maybe_await(
                store_descriptor.factory(self.resolved.blob_store.options, context)
            )
            if hasattr(blob_store, "open"):  # scan and clean up now, not on the first request
                await blob_store.open()
            cache_config = config.storage.action_cache
            action_cache = create_action_cache(
                data_dir, blob_store,
                ActionCacheOptions(max_entries_in_memory=cache_config.max_entries_in_memory),
            )
            await action_cache.open()
        except (OSError, StorageError) as exc:
            raise DaemonError(
                f"blob store {store_descriptor.name!r} failed to open: {exc}"
            ) from exc
        self.runtime = runtime = ServiceRuntime(
            config=config, data_dir=data_dir, blob_store=blob_store,
            action_cache=action_cache, plugins=self.plugins,
            digest_functions=tuple(config.storage.digest_functions),
        )
        runtime.health_checks = self.plugins.health_checks(runtime)
        try:
            if config.scheduler.enabled:
                from rexcore.scheduler.scheduler import Scheduler

                scheduler = Scheduler(runtime, config.scheduler)
                try:
                    await scheduler.start()
                except SchedulerError as exc:
                    raise DaemonError(str(exc)) from exc
                runtime.scheduler = scheduler
            for protocol in self.resolved.protocols:
                descriptor = protocol.registered.descriptor
                try:
                    server = descriptor.factory(protocol.options, context, runtime)
                except ValueError as exc:  # a protocol's way to refuse its options
                    raise DaemonError(f"protocol {descriptor.name!r}: {exc}") from exc
                try:
                    await server.start()
                except OSError as exc:
                    raise DaemonError(
                        f"protocol {descriptor.name!r} cannot listen: {exc.strerror or exc}; "
                        f"pick another address in [protocols.{descriptor.name}]"
                    ) from exc
                self.protocols[descriptor.name] = server
                for address in server.addresses:
                    print(f"rexd: {descriptor.name} listening on {_url(server, address)}",
                          file=sys.stderr, flush=True)
            if self.resolved.provider is not None:
                await self._start_pool(runtime)
            if exporters:
                runtime.metrics = await build_collector(runtime, config.metrics, exporters,
                                                        context)
                await runtime.metrics.start()
        except BaseException:
            await self._stop_parts()
            raise
        self.plugins.service_started(runtime)
        return runtime

    async def _start_pool(self, runtime: ServiceRuntime) -> None:
        from rexcore.pool.errors import PoolError
        from rexcore.pool.pool import WorkerPool, scheduler_load
        from rexcore.providers.interface import WorkerLaunch

        config = self.resolved.config
        native = self.protocols.get("native")
        if native is None or runtime.scheduler is None:
            raise DaemonError(
                "pool.target_workers asks for workers, but they need the scheduler and the "
                "native protocol; enable both or set pool.target_workers = 0"
            )
        assert self.resolved.provider is not None
        descriptor = self.resolved.provider.registered.descriptor
        if descriptor.name == "local":
            # Local workers run on this host: a sandbox that cannot run here (and does
            # not allow a fallback) must stop rexd now, not crash-loop every worker.
            from rexcore.sandbox.select import SandboxUnavailableError, select_sandbox

            try:
                select_sandbox(self.plugins, config.pool.sandbox,
                               config.sandboxes.get(config.pool.sandbox))
            except SandboxUnavailableError as exc:
                raise DaemonError(f"pool.sandbox: {exc}") from exc
        from rexcore.providers.interface import ProviderError

        try:
            provider = await _maybe_await(
                descriptor.factory(self.resolved.provider.options, self.context)
            )
        except (ProviderError, ValueError) as exc:
            # Bad options, an unusable file they name, no cluster or credentials: one line.
            raise DaemonError(f"provider {descriptor.name!r} cannot be built: {exc}") from exc
        launch = WorkerLaunch(
            # Local workers use the loopback URL the API keeps for them (with TLS a
            # plain listener of their own); remote providers are told theirs in options.
            coordinator_url=native.local_url,
            join_token=config.scheduler.join_token,
            slots=config.pool.slots_per_worker,
            properties=tuple(sorted(config.pool.properties.items())),
            sandbox=config.pool.sandbox,
        )
        policy = None
        if self.resolved.policy is not None:
            policy_descriptor = self.resolved.policy.registered.descriptor
            try:
                policy = policy_descriptor.factory(self.resolved.policy.options, config.pool)
            except (PoolError, ValueError) as exc:
                raise DaemonError(
                    f"scaling policy {policy_descriptor.name!r} cannot be built: {exc}; "
                    "fix [pool.policy] or choose another policy"
                ) from exc
        self.pool = WorkerPool(config.pool, provider, launch, policy=policy,
                               load=scheduler_load(runtime.scheduler))
        runtime.pool = self.pool
        try:
            await self.pool.start()
        except ProviderError as exc:
            raise DaemonError(f"pool: provider {descriptor.name!r} could not start the first "
                              f"workers: {exc}") from exc

    async def stop(self) -> None:
        if self.runtime is not None:
            self.plugins.service_stopping(self.runtime)
        await self._stop_parts()
        self._stopped.set()

    async def _stop_parts(self) -> None:
        if self.runtime is not None and self.runtime.metrics is not None:
            metrics, self.runtime.metrics = self.runtime.metrics, None
            await metrics.stop()
        if self.pool is not None:  # drain first: workers report while protocols still serve
            pool, self.pool = self.pool, None
            if self.runtime is not None:
                self.runtime.pool = None
            try:
                await pool.stop()
            except Exception:
                log.exception("the worker pool failed to stop cleanly")
        scheduler = self.runtime.scheduler if self.runtime is not None else None
        if scheduler is not None:
            scheduler.stop_waiting()  # held long polls answer now, so protocols stop quickly
        for name, server in reversed(list(self.protocols.items())):
            try:
                await server.stop()
            except Exception:
                log.exception("protocol %s failed to stop cleanly", name)
        self.protocols.clear()
        if scheduler is not None:
            try:
                await scheduler.stop()
            except Exception:
                log.exception("the scheduler failed to stop cleanly")
        if self.runtime is not None:
            with contextlib.suppress(Exception):
                await self.runtime.action_cache.close()
            with contextlib.suppress(Exception):
                await self.runtime.blob_store.close()
            self.runtime = None

    async def serve_forever(self) -> None:
        """Start, then run until SIGINT or SIGTERM, then stop gracefully."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):  # Windows has no signal handlers
                loop.add_signal_handler(sig, stop.set)
        await self.start()
        try:
            await stop.wait()
            print("rexd: shutting down", file=sys.stderr, flush=True)
        finally:
            await self.stop()


def _url(server: Any, address: str) -> str:
    scheme = getattr(server, "scheme", "http")
    return f"{scheme}://{address}"


async def _maybe_await(value: Any) -> Any:
    if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
        return await value
    return value
