"""rexd as a user runs it (real subprocesses, real entry points): ``plugins list --json``
shows ``kubernetes`` active with a cluster configured and unavailable, with the reason,
without one; ``serve`` with an incomplete provider config stops with the fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def _rexd(tmp_path: Path, kubeconfig: Path, *args: str,
          **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items()
                   if not k.startswith(("REXCORE_", "KUBERNETES_SERVICE"))}
    environment |= {"KUBECONFIG": str(kubeconfig), "HOME": str(tmp_path),
                    "XDG_CACHE_HOME": str(tmp_path / "cache")} | env
    return subprocess.run([sys.executable, "-m", "rexcore.cli.rexd", *args],
                          check=False, capture_output=True, text=True, env=environment,
                          timeout=60)


def _kubernetes_row(tmp_path: Path, kubeconfig: Path) -> tuple[dict, dict]:
    result = _rexd(tmp_path, kubeconfig, "plugins", "list", "--json")
    assert result.returncode == 0, result.stderr
    (row,) = [r for r in json.loads(result.stdout) if r["name"] == "rex-k8s"]
    (component,) = [c for c in row["components"] if c["name"] == "kubernetes"]
    return row, component


def test_plugins_list_shows_kubernetes_active_with_a_kubeconfig(tmp_path):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\n")
    row, component = _kubernetes_row(tmp_path, kubeconfig)
    assert (row["status"], row["distribution"]) == ("active", "rex-k8s")
    assert (component["kind"], component["available"]) == ("provider", True)


def test_plugins_list_shows_kubernetes_unavailable_naming_what_is_missing(tmp_path):
    missing = tmp_path / "no-such-kubeconfig"
    row, component = _kubernetes_row(tmp_path, missing)
    assert row["status"] == "unavailable" and component["available"] is False
    assert "no cluster configured" in component["reason"]
    assert str(missing) in component["reason"] and "KUBECONFIG" in component["reason"]
    assert component["reason"] in row["reason"]


def test_serve_without_a_worker_image_stops_naming_the_option(tmp_path):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: "
                          "{server: 'http://127.0.0.1:9'}}]\nusers: [{name: u, user: {}}]\n"
                          "contexts: [{name: c, context: {cluster: c, user: u}}]\n"
                          "current-context: c\n")
    config = tmp_path / "rexd.toml"
    config.write_text('[pool]\ntarget_workers = 1\n[pool.provider]\nname = "kubernetes"\n')
    result = _rexd(tmp_path, kubeconfig, "serve", "--config", str(config), "--data-dir",
                   str(tmp_path / "data"), "--http", "127.0.0.1:0", REXCORE_PLUGINS="rex-k8s")
    assert result.returncode == 1, result.stderr
    assert "provider 'kubernetes' cannot be built" in result.stderr
    assert "set [pool.provider.options] image" in result.stderr
    assert "Traceback" not in result.stderr
