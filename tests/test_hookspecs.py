"""Every hook is documented and tested; each ``test_hook_<name>`` shows its hook working."""

from __future__ import annotations

import asyncio
import inspect
import re
import types
from pathlib import Path

import aiohttp
import attrs
import pytest

from rexcore import hookimpl, hookspecs
from rexcore.artifacts.digest import digest_of
from rexcore.artifacts.memory import MemoryStoreOptions, create_memory_store
from rexcore.monitoring.health import HealthCheck
from rexcore.plugins import (
    BlobStoreDescriptor,
    MetricsExporterDescriptor,
    ProbeResult,
    ProtocolDescriptor,
    ProviderDescriptor,
    SandboxDescriptor,
    ScalingPolicyDescriptor,
)
from rexcore.testing import start_rexd

HOOKS = sorted(
    name for name, value in vars(hookspecs).items()
    if name.startswith("rexcore_") and inspect.isfunction(value)
)
TESTS_DIR = Path(__file__).parent


def _plugin(**hooks) -> types.SimpleNamespace:
    return types.SimpleNamespace(**{name: hookimpl(fn) for name, fn in hooks.items()})


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_docstring_with_an_example(hook):
    doc = inspect.getdoc(getattr(hookspecs, hook)) or ""
    assert len(doc) > 80, f"{hook} needs a docstring saying when it is called and what it returns"
    assert "Example::" in doc, f"{hook}'s docstring needs a short example"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_test(hook):
    sources = "\n".join(p.read_text() for p in TESTS_DIR.rglob("test_*.py"))
    assert re.search(rf"def test_hook_{hook}\b", sources), f"no test_hook_{hook} in tests/"


def test_every_registration_hook_is_mapped_to_a_component_kind():
    registration = {h for h in HOOKS if h.endswith("s") and "health" not in h}
    assert registration == set(hookspecs.REGISTRATION_HOOKS.values())


# -- registration hooks -------------------------------------------------------------------


@attrs.frozen
class _LineOptions:
    listen: str = "127.0.0.1:0"
    greeting: str = "hello"


class _LineProtocol:
    """A tiny real protocol: answers every TCP connection with one line."""

    def __init__(self, options, context, runtime):
        self.options, self.server = options, None

    async def start(self):
        host, port = self.options.listen.rsplit(":", 1)

        async def answer(reader, writer):
            writer.write(self.options.greeting.encode() + b"\n")
            await writer.drain()
            writer.close()

        self.server = await asyncio.start_server(answer, host, int(port))

    async def stop(self):
        self.server.close()
        await self.server.wait_closed()

    @property
    def addresses(self):
        host, port = self.server.sockets[0].getsockname()[:2]
        return [f"{host}:{port}"]


async def test_hook_rexcore_protocols(plugin_manager, register, tmp_path):
    register(_plugin(rexcore_protocols=lambda: [ProtocolDescriptor(
        name="line", factory=_LineProtocol, options_type=_LineOptions)]))
    running = await start_rexd(plugin_manager, tmp_path,
                               {"protocols": {"line": {"greeting": "rex here"}}})
    try:
        host, port = running.addresses["line"].rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        assert await reader.readline() == b"rex here\n"
        writer.close()
    finally:
        await running.daemon.stop()
    with pytest.raises(OSError):
        await asyncio.open_connection(host, int(port))


def _listed(plugin_manager, kind: str, name: str) -> dict:
    for info in plugin_manager.plugin_infos():
        for component in info.components:
            if (component["kind"], component["name"]) == (kind, name):
                return {"plugin": info.name, **component}
    raise AssertionError(f"{kind} {name} not listed")


def test_hook_rexcore_sandboxes(plugin_manager, register):
    register(_plugin(rexcore_sandboxes=lambda: [
        SandboxDescriptor(name="jail", factory=object, preference=5,
                          probe=lambda: ProbeResult.unavailable("jail(8) not found")),
    ]), name="rex-jail")
    assert plugin_manager.component("sandbox", "jail").descriptor.preference == 5
    listed = _listed(plugin_manager, "sandbox", "jail")
    assert listed["plugin"] == "rex-jail" and listed["reason"] == "jail(8) not found"


def test_hook_rexcore_providers(plugin_manager, register):
    register(_plugin(rexcore_providers=lambda: [ProviderDescriptor(name="vm", factory=object)]))
    assert plugin_manager.component("provider", "vm").plugin == "test-plugin"
    assert _listed(plugin_manager, "provider", "vm")["available"] is True


def test_hook_rexcore_scaling_policies(plugin_manager, register):
    register(_plugin(rexcore_scaling_policies=lambda: [
        ScalingPolicyDescriptor(name="nightly", factory=object)]))
    assert "nightly" in plugin_manager.components("scaling_policy")


def test_hook_rexcore_metrics_exporters(plugin_manager, register):
    register(_plugin(rexcore_metrics_exporters=lambda: [
        MetricsExporterDescriptor(name="statsd", factory=object, platforms=["win32"])]))
    listed = _listed(plugin_manager, "metrics_exporter", "statsd")
    assert listed["available"] is False and "win32" in listed["reason"]


@attrs.frozen
class _CountingOptions:
    label: str = "counted"


async def test_hook_rexcore_blob_stores(plugin_manager, register, tmp_path):
    built = []

    def factory(options, context):
        store = create_memory_store(MemoryStoreOptions(), context)
        built.append((options, store))
        return store

    register(_plugin(rexcore_blob_stores=lambda: [BlobStoreDescriptor(
        name="counting", factory=factory, options_type=_CountingOptions)]))
    running = await start_rexd(plugin_manager, tmp_path, {
        "storage": {"blob_store": {"name": "counting", "options": {"label": "mine"}}}})
    try:
        data = b"stored through a plugin's blob store"
        digest = digest_of(data)
        async with aiohttp.ClientSession() as session:
            url = f"{running.url}/v1/cas/{digest}"
            async with session.put(url, data=data) as response:
                assert response.status == 201
        (options, store), = built
        assert options.label == "mine"
        assert await store.get(digest) == data
    finally:
        await running.daemon.stop()


# -- lifecycle and event hooks ------------------------------------------------------------


async def test_hook_rexcore_configure(plugin_manager, register, tmp_path):
    seen = []
    register(_plugin(rexcore_configure=lambda config: seen.append(config)))
    running = await start_rexd(plugin_manager, tmp_path / "data")
    await running.daemon.stop()
    assert len(seen) == 1 and seen[0].data_path == tmp_path / "data"


async def test_hook_rexcore_service_started(plugin_manager, register, tmp_path):
    seen = []
    register(_plugin(rexcore_service_started=lambda runtime: seen.append(
        (runtime.data_dir, bool(runtime.blob_store)))))
    running = await start_rexd(plugin_manager, tmp_path)
    assert seen == [(tmp_path, True)]
    await running.daemon.stop()


async def test_hook_rexcore_service_stopping(plugin_manager, register, tmp_path):
    events = []

    def failing(runtime):
        raise RuntimeError("plugin bug while stopping")

    register(_plugin(rexcore_service_stopping=failing), name="buggy")
    register(_plugin(rexcore_service_stopping=lambda runtime: events.append("stopping")),
             name="tidy")
    running = await start_rexd(plugin_manager, tmp_path)
    url = running.url
    await running.daemon.stop()
    assert events == ["stopping"]  # one plugin's failure does not stop the others
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.get(f"{url}/healthz")


async def test_hook_rexcore_health_checks(plugin_manager, register, tmp_path):
    state = {"healthy": True}

    async def check():
        return state["healthy"], "the flux capacitor"

    register(_plugin(rexcore_health_checks=lambda runtime: [HealthCheck("flux", check)]))
    running = await start_rexd(plugin_manager, tmp_path)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{running.url}/healthz") as response:
                body = await response.json()
                assert response.status == 200 and body["checks"]["flux"]["healthy"] is True
            state["healthy"] = False
            async with session.get(f"{running.url}/healthz") as response:
                body = await response.json()
                assert response.status == 503
                assert body["status"] == "unhealthy"
                assert body["checks"]["flux"]["detail"] == "the flux capacitor"
                assert body["checks"]["data_dir_disk_space"]["healthy"] is True
    finally:
        await running.daemon.stop()
