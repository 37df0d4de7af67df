"""Every hook rex calls, in one place.

A plugin is a module (named by an entry point in the group ``rexcore.plugins``) with
functions decorated by :data:`rexcore.hookimpl` whose names are the hooks below. Hook
implementations may accept any subset of a hook's arguments.

Registration hooks (``rexcore_protocols`` ... ``rexcore_blob_stores``) return an iterable
of descriptors from :mod:`rexcore.plugins.descriptors`; the core collects them from every
plugin, rejects two components of one kind with one name, and picks components by the
names in its config. Lifecycle and event hooks let a plugin observe the service without
being named in config. Hooks are synchronous: they return descriptors, factories or plain
data, and async work lives in the objects those build.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from rexcore import hookspec

if TYPE_CHECKING:
    from rexcore.config.model import RexConfig
    from rexcore.core.runtime import ServiceRuntime
    from rexcore.monitoring.health import HealthCheck
    from rexcore.plugins.descriptors import (
        BlobStoreDescriptor,
        MetricsExporterDescriptor,
        ProtocolDescriptor,
        ProviderDescriptor,
        SandboxDescriptor,
        ScalingPolicyDescriptor,
    )

__all__ = [
    "REGISTRATION_HOOKS",
    "rexcore_blob_stores",
    "rexcore_configure",
    "rexcore_health_checks",
    "rexcore_metrics_exporters",
    "rexcore_protocols",
    "rexcore_providers",
    "rexcore_sandboxes",
    "rexcore_scaling_policies",
    "rexcore_service_started",
    "rexcore_service_stopping",
]


# -- registration hooks --------------------------------------------------------------


@hookspec
def rexcore_protocols() -> Iterable[ProtocolDescriptor]:
    """Offer protocol adapters that serve the service to clients.

    Called once per plugin manager, when components are first looked up. The core starts
    every registered protocol unless config switches it off
    (``[protocols.NAME] enabled = false``); ``factory(options, context, runtime)`` must
    return an object with ``async start()``, ``async stop()`` and ``addresses``.
    ``cli_options`` adds flags to ``rexd serve`` that set this protocol's options.

    Example::

        @rexcore.hookimpl
        def rexcore_protocols():
            yield ProtocolDescriptor(
                name="reapi", factory=ReapiServer, options_type=ReapiOptions,
                cli_options=(CliOption("--listen", "listen", "REAPI gRPC address"),),
            )
    """


@hookspec
def rexcore_sandboxes() -> Iterable[SandboxDescriptor]:
    """Offer sandboxes that run one action each.

    Called when components are first looked up. A sandbox names the ``platforms`` it runs
    on and a ``probe`` that says precisely what is missing when it cannot run here; a
    distribution must import on every OS and import platform-only code lazily.
    ``preference`` ranks sandboxes for ``sandbox = "auto"``.

    Example::

        @rexcore.hookimpl
        def rexcore_sandboxes():
            yield SandboxDescriptor(name="linux", factory=LinuxSandbox, platforms="linux",
                                    probe=probe_namespaces, preference=100)
    """


@hookspec
def rexcore_providers() -> Iterable[ProviderDescriptor]:
    """Offer worker providers: things that create, list, drain and terminate workers.

    Called when components are first looked up; the pool uses the provider its config
    names. ``probe`` should report missing credentials or config as unavailable.

    Example::

        @rexcore.hookimpl
        def rexcore_providers():
            yield ProviderDescriptor(name="ec2", factory=Ec2Provider, options_type=Ec2Options)
    """


@hookspec
def rexcore_scaling_policies() -> Iterable[ScalingPolicyDescriptor]:
    """Offer scaling policies: an observation of the pool in, a desired size and reason out.

    Called when components are first looked up; the pool uses the policy its config names.

    Example::

        @rexcore.hookimpl
        def rexcore_scaling_policies():
            yield ScalingPolicyDescriptor(name="nightly", factory=NightlyPolicy)
    """


@hookspec
def rexcore_metrics_exporters() -> Iterable[MetricsExporterDescriptor]:
    """Offer metrics exporters, fed by the metrics collector.

    Called when components are first looked up; rexd builds every exporter named in
    ``[metrics] exporters`` with ``factory(options, context)``. The result must satisfy
    :class:`rexcore.monitoring.metrics.MetricsExporter`: ``export(snapshot)`` gets a
    :class:`~rexcore.monitoring.metrics.MetricsSnapshot` every ``[metrics] interval_s`` (on
    the event loop: never block it) and ``async close()`` is called when rexd stops. Built
    in: ``log`` and ``prometheus`` (``GET /metrics``).

    Example::

        @rexcore.hookimpl
        def rexcore_metrics_exporters():
            yield MetricsExporterDescriptor(name="statsd", factory=StatsdExporter,
                                            options_type=StatsdOptions)
    """


@hookspec
def rexcore_blob_stores() -> Iterable[BlobStoreDescriptor]:
    """Offer content-addressed blob store backends.

    Called when components are first looked up; rexd builds the one named by
    ``storage.blob_store.name`` with ``factory(options, context)``. The result must satisfy
    :class:`rexcore.artifacts.store.BlobStore`; ``rexcore.testing.contracts`` has the
    contract tests every backend should pass.

    Example::

        @rexcore.hookimpl
        def rexcore_blob_stores():
            yield BlobStoreDescriptor(name="s3", factory=create_s3_store,
                                      options_type=S3StoreOptions)
    """


REGISTRATION_HOOKS: dict[str, str] = {
    "protocol": "rexcore_protocols",
    "sandbox": "rexcore_sandboxes",
    "provider": "rexcore_providers",
    "scaling_policy": "rexcore_scaling_policies",
    "metrics_exporter": "rexcore_metrics_exporters",
    "blob_store": "rexcore_blob_stores",
}
"""Component kind -> the registration hook that offers components of that kind."""


# -- lifecycle and event hooks -------------------------------------------------------


@hookspec
def rexcore_configure(config: RexConfig) -> None:
    """Called once the effective config is known, before any component is built.

    ``config`` is the resolved, validated :class:`rexcore.config.model.RexConfig`. A plugin
    may read it (its own section lives under its components' options) but must not change
    it. An exception here stops rexd with a message naming the plugin.

    Example::

        @rexcore.hookimpl
        def rexcore_configure(config):
            logging.getLogger("rex_acme").info("data dir is %s", config.data_dir)
    """


@hookspec
def rexcore_service_started(runtime: ServiceRuntime) -> None:
    """Called after the blob store, action cache and every protocol have started.

    ``runtime`` gives the blob store, action cache, config and plugin manager; a plugin may
    keep a reference to it for the life of the service. Called from the event loop thread:
    schedule async work with ``asyncio.get_running_loop().create_task``.

    Example::

        @rexcore.hookimpl
        def rexcore_service_started(runtime):
            print("serving", runtime.data_dir)
    """


@hookspec
def rexcore_service_stopping(runtime: ServiceRuntime) -> None:
    """Called once when the service begins a graceful shutdown, before protocols stop.

    Release what ``rexcore_service_started`` acquired. Exceptions are logged, not raised,
    so one plugin cannot keep the others from shutting down.

    Example::

        @rexcore.hookimpl
        def rexcore_service_stopping(runtime):
            my_reporter.flush()
    """


@hookspec
def rexcore_health_checks(runtime: ServiceRuntime) -> Iterable[HealthCheck]:
    """Offer health checks that ``GET /healthz`` runs and reports.

    Called once when the service starts; each :class:`rexcore.monitoring.health.HealthCheck`
    has a ``name`` and an async ``check()`` returning ``(healthy, detail)``. Any unhealthy
    check turns ``/healthz`` into 503 with the failing checks named.

    Example::

        @rexcore.hookimpl
        def rexcore_health_checks(runtime):
            async def bucket_reachable():
                return await probe_bucket(), "s3 bucket rex-cas"
            yield HealthCheck(name="s3", check=bucket_reachable)
    """
