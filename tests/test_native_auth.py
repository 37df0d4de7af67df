"""Bearer tokens on the native HTTP API: a real rexd with a local worker, real clients."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from rexcore.artifacts.digest import digest_of
from rexcore.protocol.client import RexClient, RexClientError
from tests._real_rexd import rexd_environment, stdout_of, submit, wait_until
from tests.conftest import run_rexd

CLIENT_TOKEN = "client-token-1"
JOIN_TOKEN = "worker-join-secret"


def _get(url: str, token: str = "") -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


async def test_with_auth_tokens_file_clients_and_workers_must_present_a_token(
    rexd_processes, tmp_path
):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# rex clients\n{CLIENT_TOKEN}\n")
    server = rexd_processes.serve(workers=1, config={
        "protocols": {"native": {"auth_tokens_file": str(tokens)}},
        "scheduler": {"join_token": JOIN_TOKEN},
    })
    assert "bearer tokens required" in server.log()
    # Probes stay open; everything else asks for a token.
    assert _get(f"{server.url}/healthz")[0] in (200, 503)
    status, headers, body = _get(f"{server.url}/v1/status")
    assert status == 401 and headers.get("WWW-Authenticate") == "Bearer"
    error = json.loads(body)["error"]
    assert error["code"] == "unauthenticated" and "rex --token" in error["message"]
    assert _get(f"{server.url}/v1/status", "wrong")[0] == 401
    assert _get(f"{server.url}/v1/status", CLIENT_TOKEN)[0] == 200

    # The local worker joined with the join token, which it presents on every request.
    async def joined() -> bool:
        answer = json.loads(_get(f"{server.url}/v1/status", CLIENT_TOKEN)[2])
        return answer["workers_total"] >= 1
    await wait_until(joined, "the local worker to join")

    for token in ("", "wrong"):
        async with RexClient(server.url, token=token) as anonymous:
            with pytest.raises(RexClientError, match="unauthenticated|Bearer"):
                await anonymous.find_missing([digest_of(b"x")])
            with pytest.raises(RexClientError, match="unauthenticated|Bearer"):
                await submit(anonymous, "echo never")  # uploads, then the lean execute
    async with RexClient(server.url, token=CLIENT_TOKEN) as client:
        view = await submit(client, "echo ran with a token")
        done = await client.wait_operation(view.name, wait_s=60)
        assert done.status == "ok", done.message
        assert await stdout_of(client, done) == "ran with a token\n"

    # The CLI: REX_TOKEN (or --token), and a clear refusal without it.
    env = {**rexd_environment(), "REX_SERVER": server.url}
    cli = [sys.executable, "-m", "rexcore.cli.rex", "run", "--", "/bin/echo", "via the cli"]
    refused = await asyncio.to_thread(subprocess.run, cli, env=env, capture_output=True,
                                      text=True, timeout=120, check=False)
    assert refused.returncode != 0 and "--token" in refused.stderr, refused.stderr
    ran = await asyncio.to_thread(subprocess.run, cli, env={**env, "REX_TOKEN": CLIENT_TOKEN},
                                  capture_output=True, text=True, timeout=120, check=False)
    assert ran.returncode == 0 and ran.stdout == "via the cli\n", ran.stderr


def test_auth_tokens_file_without_a_join_token_is_refused_at_start(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("t\n")
    config = tmp_path / "rexd.toml"
    config.write_text(f'[protocols.native]\nauth_tokens_file = "{tokens}"\n')
    result = run_rexd("serve", "--config", str(config), "--data-dir", str(tmp_path / "d"),
                      "--http", "127.0.0.1:0", "--workers", "0",
                      REXCORE_DISABLE_PLUGIN_AUTOLOAD="1")
    assert result.returncode != 0
    assert "auth_tokens_file needs scheduler.join_token" in result.stderr
    assert "Traceback" not in result.stderr
    empty = tmp_path / "empty"
    empty.write_text("\n# none\n")
    config.write_text(f'[protocols.native]\nauth_tokens_file = "{empty}"\n'
                      '[scheduler]\njoin_token = "j"\n')
    result = run_rexd("serve", "--config", str(config), "--data-dir", str(tmp_path / "d"),
                      "--http", "127.0.0.1:0", "--workers", "0",
                      REXCORE_DISABLE_PLUGIN_AUTOLOAD="1")
    assert result.returncode != 0 and "holds no token" in result.stderr


def test_a_token_that_cannot_go_in_a_header_is_refused_by_the_client():
    with pytest.raises(RexClientError, match="printable ASCII"):
        RexClient("http://127.0.0.1:1", token="two\r\nlines")
