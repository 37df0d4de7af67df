"""The plugin system: discovery through real entry points, listing, failures, conflicts."""

from __future__ import annotations

import json
import types

import pytest

from rexcore import hookimpl
from rexcore.plugins import (
    BlobStoreDescriptor,
    PluginConflictError,
    PluginManager,
    ProbeResult,
    SandboxDescriptor,
    UnknownComponentError,
)
from rexcore.plugins.manager import select_plugins
from tests.conftest import run_rexd

ACME = """
import attrs
from rexcore import hookimpl
from rexcore.plugins import BlobStoreDescriptor, SandboxDescriptor, ProbeResult
from rexcore.artifacts.memory import create_memory_store, MemoryStoreOptions

@attrs.frozen
class AcmeOptions:
    bucket: str = "rex"

def make(options, context):
    return create_memory_store(MemoryStoreOptions(), context)

@hookimpl
def rexcore_blob_stores():
    yield BlobStoreDescriptor(name="acme", factory=make, options_type=AcmeOptions)

@hookimpl
def rexcore_sandboxes():
    yield SandboxDescriptor(name="acme-windows", factory=object, platforms="win32")
"""

BROKEN = """
import rex_does_not_exist_anywhere
"""

DUPLICATE_DISK = """
from rexcore import hookimpl
from rexcore.plugins import BlobStoreDescriptor

@hookimpl
def rexcore_blob_stores():
    yield BlobStoreDescriptor(name="disk", factory=object)
"""

UNAVAILABLE = """
from rexcore import hookimpl
from rexcore.plugins import ProviderDescriptor, ProbeResult

@hookimpl
def rexcore_providers():
    yield ProviderDescriptor(
        name="cloudy", factory=object,
        probe=lambda: ProbeResult.unavailable("no credentials: set CLOUDY_TOKEN"),
    )
"""


def _list(site, **env):
    result = run_rexd("plugins", "list", "--json", site=site, **env)
    assert result.returncode == 0, result.stderr
    return {row["name"]: row for row in json.loads(result.stdout)}


def test_installed_plugin_is_discovered_through_its_entry_point(plugin_site):
    site = plugin_site("rex-acme", "rex_acme_plugin", ACME, version="2.3")
    rows = _list(site)
    acme = rows["rex-acme"]
    assert (acme["distribution"], acme["version"], acme["status"]) == ("rex-acme", "2.3", "active")
    kinds = {(c["kind"], c["name"]): c for c in acme["components"]}
    assert kinds[("blob_store", "acme")]["available"] is True
    windows = kinds[("sandbox", "acme-windows")]
    assert windows["available"] is False and "win32" in windows["reason"]
    builtin = rows["rexcore"]
    assert builtin["status"] == "active"
    assert {("protocol", "native"), ("blob_store", "disk"), ("blob_store", "memory")} <= {
        (c["kind"], c["name"]) for c in builtin["components"]
    }


def test_plugin_whose_components_cannot_run_here_is_listed_unavailable_with_reason(plugin_site):
    site = plugin_site("rex-cloudy", "rex_cloudy_plugin", UNAVAILABLE)
    row = _list(site)["rex-cloudy"]
    assert row["status"] == "unavailable"
    assert "no credentials: set CLOUDY_TOKEN" in row["reason"]


def test_broken_plugin_is_listed_as_failed_and_listing_continues(plugin_site):
    plugin_site("rex-acme", "rex_acme_plugin", ACME)
    site = plugin_site("rex-broken", "rex_broken_plugin", BROKEN, version="0.9")
    result = run_rexd("plugins", "list", site=site)
    assert result.returncode == 0
    assert "rex-broken" in result.stdout and "rex-acme" in result.stdout
    assert "rex_does_not_exist_anywhere" in result.stderr
    row = _list(site)["rex-broken"]
    assert row["status"] == "failed" and "ModuleNotFoundError" in row["reason"]


def test_broken_configured_plugin_stops_rexd_naming_distribution_version_and_cause(
    plugin_site, tmp_path
):
    site = plugin_site("rex-broken", "rex_broken_plugin", BROKEN, version="0.9")
    result = run_rexd("serve", "--data-dir", str(tmp_path / "d"), "--http", "127.0.0.1:0",
                      site=site, timeout=30)
    assert result.returncode != 0
    message = result.stderr
    assert "rex-broken" in message and "0.9" in message
    assert "No module named 'rex_does_not_exist_anywhere'" in message


def test_two_plugins_offering_one_name_is_an_error_naming_both_distributions(
    plugin_site, tmp_path
):
    site = plugin_site("rex-dupe", "rex_dupe_plugin", DUPLICATE_DISK, version="4.5")
    result = run_rexd("serve", "--data-dir", str(tmp_path / "d"), site=site, timeout=30)
    assert result.returncode != 0
    assert "blob store 'disk'" in result.stderr
    assert "rexcore 0.1.0" in result.stderr and "rex-dupe 4.5" in result.stderr
    # The listing warns instead and keeps the first registration.
    row = _list(site)["rex-dupe"]
    assert row["status"] == "failed" and "rexcore" in row["reason"]


def test_disable_autoload_environment_variable_loads_no_installed_plugin(plugin_site):
    site = plugin_site("rex-broken", "rex_broken_plugin", BROKEN)
    rows = _list(site, REXCORE_DISABLE_PLUGIN_AUTOLOAD="1")
    assert rows["rex-broken"]["status"] == "disabled"
    assert "REXCORE_DISABLE_PLUGIN_AUTOLOAD" in rows["rex-broken"]["reason"]
    assert rows["rexcore"]["status"] == "active"


def test_rexcore_plugins_environment_variable_loads_only_those_named(plugin_site):
    plugin_site("rex-broken", "rex_broken_plugin", BROKEN)
    site = plugin_site("rex-acme", "rex_acme_plugin", ACME)
    rows = _list(site, REXCORE_PLUGINS="rex-acme")
    assert rows["rex-acme"]["status"] == "active"
    assert rows["rex-broken"]["status"] == "disabled"
    assert "REXCORE_PLUGINS" in rows["rex-broken"]["reason"]


def test_plugins_disable_in_config_keeps_a_plugin_from_loading(plugin_site, tmp_path):
    site = plugin_site("rex-broken", "rex_broken_plugin", BROKEN)
    config = tmp_path / "rexd.toml"
    config.write_text('[plugins]\ndisable = ["rex-broken"]\n')
    result = run_rexd("plugins", "list", "--json", "--config", str(config), site=site)
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert rows["rex-broken"]["status"] == "disabled"


def test_configured_plugin_that_is_not_installed_stops_rexd(tmp_path):
    config = tmp_path / "rexd.toml"
    config.write_text('[plugins]\nload = ["rex-nowhere"]\n')
    result = run_rexd("serve", "--config", str(config), "--data-dir", str(tmp_path / "d"))
    assert result.returncode != 0
    assert "rex-nowhere" in result.stderr and "not installed" in result.stderr


def test_plugin_options_typo_fails_with_path(plugin_site, tmp_path):
    site = plugin_site("rex-acme", "rex_acme_plugin", ACME)
    config = tmp_path / "rexd.toml"
    config.write_text('[storage.blob_store]\nname = "acme"\noptions = { buckett = "x" }\n')
    result = run_rexd("config", "show", "--config", str(config), site=site)
    assert result.returncode == 2
    assert "$.storage.blob_store.options" in result.stderr and "buckett" in result.stderr


# -- the manager in-process -------------------------------------------------------------


def _plugin(**hooks) -> types.SimpleNamespace:
    return types.SimpleNamespace(**{name: hookimpl(fn) for name, fn in hooks.items()})


def test_unknown_component_error_lists_what_is_available(plugin_manager):
    with pytest.raises(UnknownComponentError, match="available: disk, memory"):
        plugin_manager.component("blob_store", "tape")


def test_hook_yielding_the_wrong_descriptor_type_fails_the_plugin(plugin_manager, register):
    register(_plugin(rexcore_blob_stores=lambda: [SandboxDescriptor(name="x", factory=object)]),
             name="wrong-type")
    from rexcore.plugins import PluginLoadError

    with pytest.raises(PluginLoadError, match="must yield BlobStoreDescriptor"):
        plugin_manager.components("blob_store")


def test_conflict_in_process_names_both_plugins(plugin_manager, register):
    register(_plugin(rexcore_blob_stores=lambda: [
        BlobStoreDescriptor(name="memory", factory=object)]), name="other", version="7")
    with pytest.raises(PluginConflictError, match="rexcore 0.1.0 and other 7"):
        plugin_manager.components("blob_store")


def test_probe_that_raises_counts_as_unavailable():
    def probe() -> ProbeResult:
        raise RuntimeError("kernel too old")

    descriptor = SandboxDescriptor(name="fragile", factory=object, probe=probe)
    result = descriptor.availability()
    assert not result.available and "kernel too old" in result.reason


def test_descriptor_rejects_options_type_that_is_not_attrs():
    with pytest.raises(TypeError, match="must be an attrs class"):
        BlobStoreDescriptor(name="x", factory=object, options_type=dict)


@pytest.mark.parametrize(
    ("env", "config_load", "expected_names", "disabled"),
    [
        ({}, [], None, set()),
        ({"REXCORE_DISABLE_PLUGIN_AUTOLOAD": "1"}, [], [], {"a", "b"}),
        ({"REXCORE_DISABLE_PLUGIN_AUTOLOAD": "1"}, ["a"], ["a"], {"b"}),
        ({"REXCORE_PLUGINS": "b"}, ["a"], ["b"], {"a"}),
    ],
)
def test_plugin_selection_rules(env, config_load, expected_names, disabled):
    from rexcore.config.model import PluginsConfig

    selection = select_plugins(PluginsConfig(load=config_load), ["a", "b"], env)
    assert selection.names == expected_names
    assert set(selection.disabled) == disabled
