"""The components rexcore ships, registered as the plugin ``rexcore`` on the same manager."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from rexcore import hookimpl
from rexcore.artifacts.disk import DiskStoreOptions, create_disk_store
from rexcore.artifacts.memory import MemoryStoreOptions, create_memory_store
from rexcore.monitoring.health import (
    HealthCheck,
    coordinator_check,
    disk_space_check,
    failed_workers_check,
    queue_depth_check,
    workers_check,
)
from rexcore.monitoring.metrics import LogExporterOptions, create_log_exporter
from rexcore.monitoring.prometheus import create_prometheus_exporter
from rexcore.plugins.descriptors import (
    BlobStoreDescriptor,
    CliOption,
    MetricsExporterDescriptor,
    ProtocolDescriptor,
    ProviderDescriptor,
    SandboxDescriptor,
    ScalingPolicyDescriptor,
)
from rexcore.pool.scaling.policies import (
    PredictiveOptions,
    ReactiveOptions,
    StaticOptions,
    create_predictive_policy,
    create_reactive_policy,
    create_static_policy,
)
from rexcore.providers.local import LocalProviderOptions, create_local_provider
from rexcore.providers.mock import MockProviderOptions, create_mock_provider
from rexcore.protocol.http_server import NativeHttpOptions, create_native_protocol
from rexcore.sandbox.process import (
    ProcessSandboxOptions,
    create_process_sandbox,
    probe_process_sandbox,
)

if TYPE_CHECKING:
    from rexcore.core.runtime import ServiceRuntime


@hookimpl
def rexcore_protocols() -> Iterator[ProtocolDescriptor]:
    yield ProtocolDescriptor(
        name="native",
        factory=create_native_protocol,
        options_type=NativeHttpOptions,
        description="native HTTP API: CAS, action cache, health (what rex and workers use)",
        cli_options=(
            CliOption("--http", "listen", "address of the native HTTP API (default "
                      "127.0.0.1:8981)", metavar="HOST:PORT"),
        ),
    )


@hookimpl
def rexcore_blob_stores() -> Iterator[BlobStoreDescriptor]:
    yield BlobStoreDescriptor(
        name="disk", factory=create_disk_store, options_type=DiskStoreOptions,
        description="blobs as read-only files under the data dir, LRU-capped",
    )
    yield BlobStoreDescriptor(
        name="memory", factory=create_memory_store, options_type=MemoryStoreOptions,
        description="blobs in process memory, LRU-capped; lost on restart",
    )


@hookimpl
def rexcore_sandboxes() -> Iterator[SandboxDescriptor]:
    yield SandboxDescriptor(
        name="process", factory=create_process_sandbox, options_type=ProcessSandboxOptions,
        probe=probe_process_sandbox, preference=0,
        description="plain child processes, every OS; NOT hermetic (process-tree kill, "
                    "rlimits, unprivileged user when run as root)",
    )


@hookimpl
def rexcore_health_checks(runtime: ServiceRuntime) -> Iterator[HealthCheck]:
    yield disk_space_check(runtime.data_dir)
    yield coordinator_check(runtime)
    yield workers_check(runtime)
    yield queue_depth_check(runtime)
    yield failed_workers_check(runtime)


@hookimpl
def rexcore_metrics_exporters() -> Iterator[MetricsExporterDescriptor]:
    yield MetricsExporterDescriptor(
        name="log", factory=create_log_exporter, options_type=LogExporterOptions,
        description="one key=value line per snapshot to the rexcore.metrics logger",
    )
    yield MetricsExporterDescriptor(
        name="prometheus", factory=create_prometheus_exporter,
        description="Prometheus text at GET /metrics of the native HTTP API",
    )


@hookimpl
def rexcore_providers() -> Iterator[ProviderDescriptor]:
    yield ProviderDescriptor(
        name="local", factory=create_local_provider, options_type=LocalProviderOptions,
        description="rexd worker processes on this host, sharing the coordinator's store",
    )
    yield ProviderDescriptor(
        name="mock", factory=create_mock_provider, options_type=MockProviderOptions,
        description="workers on paper: records calls, configurable start delay and "
                    "failures (tests and the autoscaling simulator)",
    )


@hookimpl
def rexcore_scaling_policies() -> Iterator[ScalingPolicyDescriptor]:
    yield ScalingPolicyDescriptor(
        name="predictive", factory=create_predictive_policy, options_type=PredictiveOptions,
        description="sizes for a queue-wait objective from backlog, Erlang C and a "
                    "forecast over the worker start-up time (the default)",
    )
    yield ScalingPolicyDescriptor(
        name="reactive", factory=create_reactive_policy, options_type=ReactiveOptions,
        description="utilisation thresholds with cooldowns",
    )
    yield ScalingPolicyDescriptor(
        name="static", factory=create_static_policy, options_type=StaticOptions,
        description="a fixed size",
    )
