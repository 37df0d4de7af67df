"""HTTPS on the native API: a real rexd with a local worker, real clients (RexClient, the
rex CLI, a `rexd worker` of its own) trusting a test CA."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from rexcore.protocol.client import RexClient, RexClientError
from tests._certificates import make_certificates
from tests._real_rexd import rexd_environment, stdout_of, submit, wait_until
from tests.conftest import run_rexd


async def test_the_native_api_over_https_serves_clients_and_workers_that_trust_its_ca(
    rexd_processes, tmp_path
):
    certs = make_certificates(tmp_path / "certs")
    server = rexd_processes.serve(workers=1, config={"protocols": {"native": {
        "tls_certificate": str(certs.server_cert), "tls_key": str(certs.server_key)}}})
    assert server.url.startswith("https://127.0.0.1:") and "HTTPS" in server.log()
    url = server.url.replace("127.0.0.1", "localhost")  # the name on the certificate
    async with RexClient(url, ca_file=str(certs.ca)) as client:
        # The local worker joined over the loopback listener rexd keeps for it.
        await wait_until(lambda: _workers(client), "the local worker to join")
        view = await submit(client, "echo over https")
        done = await client.wait_operation(view.name, wait_s=60)
        assert done.status == "ok", done.message
        assert await stdout_of(client, done) == "over https\n"

        # A worker of its own, started by hand against the HTTPS URL with --ca-file.
        worker = await asyncio.to_thread(
            subprocess.Popen, [sys.executable, "-m", "rexcore.cli.rexd", "worker", "--coordinator", url,
             "--ca-file", str(certs.ca), "--data-dir", str(tmp_path / "worker"),
             "--worker-id", "by-hand"],
            env=rexd_environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            await wait_until(lambda: _workers(client, 2), "the second worker to join")
        finally:
            worker.terminate()
            await asyncio.to_thread(worker.wait, 60)

    # Without the CA the client says what to do; plain HTTP gets nowhere.
    async with RexClient(url) as untrusting:
        with pytest.raises(RexClientError, match="does not trust.*--ca-file"):
            await untrusting.status()
    async with RexClient(url.replace("https://", "http://")) as plain:
        with pytest.raises(RexClientError):
            await plain.status()

    # The CLI, with REX_CA_FILE.
    env = {**rexd_environment(), "REX_SERVER": url, "REX_CA_FILE": str(certs.ca)}
    ran = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "rexcore.cli.rex", "run", "--", "/bin/echo",
                         "cli over https"],
        env=env, capture_output=True, text=True, timeout=120, check=False)
    assert ran.returncode == 0 and ran.stdout == "cli over https\n", ran.stderr


async def _workers(client: RexClient, count: int = 1) -> bool:
    return (await client.status()).workers_total >= count


def test_tls_needs_both_certificate_and_key(tmp_path):
    certs = make_certificates(tmp_path / "certs")
    config = tmp_path / "rexd.toml"
    config.write_text(f'[protocols.native]\ntls_certificate = "{certs.server_cert}"\n')
    result = run_rexd("serve", "--config", str(config), "--data-dir", str(tmp_path / "d"),
                      "--http", "127.0.0.1:0", "--workers", "0",
                      REXCORE_DISABLE_PLUGIN_AUTOLOAD="1")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "TLS needs both tls_certificate and tls_key; tls_key is not set" in result.stderr
    config.write_text(f'[protocols.native]\ntls_certificate = "{certs.server_cert}"\n'
                      f'tls_key = "{certs.rogue_key}"\n')  # not the certificate's key
    result = run_rexd("serve", "--config", str(config), "--data-dir", str(tmp_path / "d"),
                      "--http", "127.0.0.1:0", "--workers", "0",
                      REXCORE_DISABLE_PLUGIN_AUTOLOAD="1")
    assert result.returncode != 0 and "cannot load tls_certificate" in result.stderr


def test_a_worker_with_an_unusable_ca_file_stops_with_one_line(tmp_path):
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate\n")
    for ca_file in (str(tmp_path / "missing.pem"), str(not_pem)):
        result = run_rexd("worker", "--coordinator", "https://localhost:1", "--ca-file", ca_file,
                          "--data-dir", str(tmp_path / "worker"),
                          REXCORE_DISABLE_PLUGIN_AUTOLOAD="1")
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
        assert f"cannot use the CA file {ca_file}" in result.stderr
