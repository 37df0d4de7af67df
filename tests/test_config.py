"""Config: defaults, `$.path` errors, component options structured after plugins load."""

from __future__ import annotations

import os

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from rexcore.artifacts.digest import DigestFunction
from rexcore.config.converter import ConfigError
from rexcore.config.loader import effective_config, load_config, resolve_config
from rexcore.config.model import RexConfig, default_data_dir
from tests.conftest import run_rexd


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rexd.toml"
    path.write_text(text)
    return path


def test_no_file_gives_every_default(monkeypatch):
    monkeypatch.delenv("REX_DATA_DIR", raising=False)
    config = load_config(None)
    assert config == RexConfig()
    assert config.storage.blob_store.name == "disk"
    assert config.storage.digest_functions == [DigestFunction.SHA256, DigestFunction.BLAKE3]
    assert config.data_path == (Path("/var/lib/rex") if os.geteuid() == 0
                                else Path.home() / ".local" / "share" / "rex")


def test_default_data_dir_is_var_lib_for_root_and_the_home_for_others(monkeypatch):
    monkeypatch.delenv("REX_DATA_DIR", raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_data_dir() == Path("/var/lib/rex")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert default_data_dir() == Path.home() / ".local" / "share" / "rex"


def test_rex_data_dir_environment_variable_sets_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("REX_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path


def test_unknown_key_is_reported_with_its_path(tmp_path):
    path = _write(tmp_path, "[storage]\nblob_storee = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert any(p.startswith("$.storage") and "blob_storee" in p for p in info.value.problems)
    assert str(path) in str(info.value)


def test_bad_values_are_each_reported_with_their_paths(tmp_path):
    path = _write(tmp_path, (
        '[storage]\ndigest_functions = ["sha256", "md5"]\n'
        '[storage.action_cache]\nenabled = "yes"\n'
        '[logging]\nlevel = "loud"\n'
    ))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = "\n".join(info.value.problems)
    assert "$.storage.digest_functions[1]" in text and "md5" in text
    assert "$.storage.action_cache.enabled" in text
    assert "$.logging" in text and "unknown log level 'loud'" in text


def test_an_unknown_event_loop_is_a_config_error_and_the_worker_refuses_it(tmp_path):
    path = _write(tmp_path, 'event_loop = "twisted"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = "\n".join(info.value.problems)
    assert "event_loop must be one of auto, asyncio, uvloop, got 'twisted'" in text
    worker = subprocess.run(
        [sys.executable, "-m", "rexcore.cli.rexd", "worker", "--coordinator",
         "http://127.0.0.1:9", "--config", str(path), "--data-dir", str(tmp_path / "w")],
        capture_output=True, text=True, timeout=60, check=False)
    assert worker.returncode == 2
    assert "event_loop must be one of auto, asyncio, uvloop, got 'twisted'" in worker.stderr


def test_invalid_toml_names_the_file_and_line(tmp_path):
    path = _write(tmp_path, "[storage\n")
    with pytest.raises(ConfigError, match=r"not valid TOML.*line 1"):
        load_config(path)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_component_options_are_structured_into_the_options_type(plugin_manager, tmp_path):
    config = load_config(_write(tmp_path, (
        '[storage.blob_store]\nname = "disk"\noptions = { max_size = "2GiB" }\n'
        '[protocols.native]\nlisten = "0.0.0.0:9999"\n'
    )))
    resolved = resolve_config(config, plugin_manager)
    assert resolved.blob_store.options.max_size == 2 * 1024**3
    (native,) = resolved.protocols
    assert native.options.listen == "0.0.0.0:9999"


def test_component_option_errors_carry_the_full_path(plugin_manager, tmp_path):
    config = load_config(_write(tmp_path, (
        '[storage.blob_store]\nname = "disk"\noptions = { max_size = "lots", colour = 1 }\n'
        '[protocols.native]\nlisten = "nowhere"\n'
    )))
    with pytest.raises(ConfigError) as info:
        resolve_config(config, plugin_manager)
    text = "\n".join(info.value.problems)
    assert "$.storage.blob_store.options.max_size" in text and "lots" in text
    assert "colour" in text
    assert "$.protocols.native.listen" in text and "host:port" in text


def test_unknown_component_names_list_the_available_ones(plugin_manager, tmp_path):
    config = load_config(_write(tmp_path, (
        '[storage.blob_store]\nname = "tape"\n[protocols.carrier_pigeon]\nlisten = "a:1"\n'
    )))
    with pytest.raises(ConfigError) as info:
        resolve_config(config, plugin_manager)
    text = "\n".join(info.value.problems)
    assert "$.storage.blob_store: unknown blob store 'tape'; available: disk, memory" in text
    assert "$.protocols.carrier_pigeon: unknown protocol" in text


def test_protocol_can_be_switched_off(plugin_manager, tmp_path):
    config = load_config(_write(tmp_path, "[protocols.native]\nenabled = false\n"))
    resolved = resolve_config(config, plugin_manager)
    assert resolved.protocols == ()
    assert effective_config(resolved)["protocols"] == {"native": {"enabled": False}}


def test_config_show_prints_effective_toml_that_loads_back(tmp_path):
    path = _write(tmp_path, '[storage.blob_store]\nname = "memory"\n')
    result = run_rexd("config", "show", "--config", str(path), "--data-dir", str(tmp_path / "d"),
                      REXCORE_DISABLE_PLUGIN_AUTOLOAD="1")
    assert result.returncode == 0, result.stderr
    shown = tomllib.loads(result.stdout)
    assert shown["data_dir"] == str(tmp_path / "d")
    assert shown["storage"]["blob_store"]["name"] == "memory"
    assert shown["storage"]["blob_store"]["options"]["max_size"] == "1GiB"
    assert shown["protocols"]["native"]["listen"] == "127.0.0.1:8981"
    # What it prints is itself a valid config.
    again = _write(tmp_path, result.stdout)
    assert run_rexd("config", "show", "--config", str(again),
                    REXCORE_DISABLE_PLUGIN_AUTOLOAD="1").stdout == result.stdout


def test_config_errors_exit_2_with_paths_on_stderr(tmp_path):
    path = _write(tmp_path, "colour = 'blue'\n")
    result = run_rexd("config", "show", "--config", str(path))
    assert result.returncode == 2
    assert "colour" in result.stderr and "$" in result.stderr


def _option_names(cls: type, prefix: str = "") -> list[str]:
    import attrs

    attrs.resolve_types(cls)
    names = []
    for field in attrs.fields(cls):
        nested = field.type if isinstance(field.type, type) and attrs.has(field.type) else None
        if nested is not None and nested.__module__.startswith(
            ("rexcore.config", "rexcore.scheduler", "rexcore.pool")
        ):
            names.extend(_option_names(nested, f"{prefix}{field.name}."))
        else:
            names.append(f"{prefix}{field.name}")
    return names


def test_every_option_is_documented_in_docs_configuration():
    """Core options and those of every installed plugin (the nox session installs them all)."""
    import attrs

    from rexcore.plugins.manager import build_plugin_manager

    plugin_manager = build_plugin_manager(None, strict=True)
    doc = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    missing = []
    for name in _option_names(RexConfig):
        parts = name.split(".")
        if not any(f"`{'.'.join(parts[i:])}`" in doc for i in range(len(parts))):
            missing.append(name)
    for kind in ("blob_store", "protocol", "provider", "sandbox"):
        for component, registered in plugin_manager.components(kind).items():
            for field in attrs.fields(registered.descriptor.options_type):
                if f"`{field.name}`" not in doc:
                    missing.append(f"{kind} {component}: {field.name}")
    assert not missing, f"undocumented options: {missing}"
