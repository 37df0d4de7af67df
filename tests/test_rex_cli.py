"""The ``rex`` CLI as a user runs it: a subprocess against a real server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import pytest

from rexcore import __version__
from rexcore.artifacts.action_cache import create_action_cache
from rexcore.artifacts.digest import DigestFunction, digest_of
from rexcore.artifacts.disk import DiskBlobStore
from rexcore.config.types import HostPort
from rexcore.core.runtime import ServiceRuntime
from rexcore.plugins.descriptors import ComponentContext
from rexcore.protocol.http_server import NativeHttpOptions, NativeHttpProtocol

REPO = Path(__file__).resolve().parent.parent


@attrs.frozen
class Ran:
    returncode: int
    stdout: str
    stderr: str


async def rex(*args: str, **env: str) -> Ran:
    """Run ``python -m rexcore.cli.rex`` without blocking the server in this event loop."""
    environment = {k: v for k, v in os.environ.items() if k != "REX_SERVER"}
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    environment.update(env)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "rexcore.cli.rex",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=environment,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return Ran(process.returncode, stdout.decode(), stderr.decode())


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[str]:
    store = DiskBlobStore(tmp_path / "data" / "cas")
    runtime = ServiceRuntime(
        config=None,
        data_dir=tmp_path / "data",
        blob_store=store,
        action_cache=create_action_cache(tmp_path / "data", store),
        plugins=None,
    )
    protocol = NativeHttpProtocol(
        NativeHttpOptions(listen=HostPort("127.0.0.1:0")),
        ComponentContext(data_dir=tmp_path),
        runtime,
    )
    await protocol.start()
    try:
        yield protocol.url
    finally:
        await protocol.stop()
        await store.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("function", list(DigestFunction))
async def test_put_then_get_gives_back_an_identical_file(
    server: str, tmp_path: Path, function: DigestFunction
) -> None:
    data = os.urandom(3 << 20)
    source = tmp_path / "input.bin"
    source.write_bytes(data)
    put = await rex(
        "--server", server, "cas", "put", str(source), "--digest-function", function.value
    )
    assert put.returncode == 0, put.stderr
    assert put.stdout == f"{digest_of(data, function)}\n"

    target = tmp_path / "output.bin"
    got = await rex("--server", server, "cas", "get", put.stdout.strip(), "-o", str(target))
    assert got.returncode == 0, got.stderr
    assert target.read_bytes() == data
    assert got.stdout == ""


async def test_get_accepts_hash_and_size_with_a_digest_function(
    server: str, tmp_path: Path
) -> None:
    source = tmp_path / "input.bin"
    source.write_bytes(b"hello rex\n")
    put = await rex("--server", server, "cas", "put", str(source), "--digest-function", "sha256")
    short = put.stdout.strip().split("/", 1)[1]
    target = tmp_path / "output.bin"
    got = await rex(
        "--server", server, "cas", "get", short, "--digest-function", "sha256", "-o", str(target)
    )
    assert got.returncode == 0, got.stderr
    assert target.read_bytes() == b"hello rex\n"


async def test_server_comes_from_rex_server_without_a_scheme(server: str, tmp_path: Path) -> None:
    source = tmp_path / "input.bin"
    source.write_bytes(b"x" * 100)
    put = await rex("cas", "put", str(source), REX_SERVER=server.removeprefix("http://"))
    assert put.returncode == 0, put.stderr
    assert put.stdout.strip() == str(digest_of(b"x" * 100))


async def test_forced_progress_bar_keeps_stdout_to_the_digest(server: str, tmp_path: Path) -> None:
    source = tmp_path / "input.bin"
    source.write_bytes(os.urandom(1 << 20))
    put = await rex("--server", server, "cas", "put", str(source), "--progress")
    assert put.returncode == 0, put.stderr
    assert put.stdout.strip() == str(digest_of(source.read_bytes()))


async def test_get_of_a_missing_digest_fails_with_a_clear_message(
    server: str, tmp_path: Path
) -> None:
    digest = digest_of(b"never uploaded")
    target = tmp_path / "output.bin"
    got = await rex("--server", server, "cas", "get", str(digest), "-o", str(target))
    assert got.returncode == 1
    assert got.stderr.startswith("rex: error: ")
    assert str(digest) in got.stderr and "not in the store" in got.stderr
    assert got.stderr.count("\n") == 1
    assert not list(tmp_path.glob("*output.bin*"))


@pytest.mark.parametrize(
    ("digest", "cause"),
    [
        ("blake3/abc/12", "64 lowercase hex"),
        ("md5/" + "a" * 64 + "/3", "unknown digest function"),
        ("a" * 64 + "/many", "not a whole number"),
        ("just-text", "not of the form"),
    ],
)
async def test_bad_digest_is_a_usage_error_naming_it(
    server: str, tmp_path: Path, digest: str, cause: str
) -> None:
    got = await rex("--server", server, "cas", "get", digest, "-o", str(tmp_path / "out"))
    assert got.returncode == 2
    assert got.stderr.startswith("rex: error: ")
    assert cause in got.stderr and got.stderr.count("\n") == 1


async def test_server_down_is_reported_with_the_url(tmp_path: Path) -> None:
    source = tmp_path / "input.bin"
    source.write_bytes(b"data")
    url = f"http://127.0.0.1:{_free_port()}"
    put = await rex("--server", url, "cas", "put", str(source))
    assert put.returncode == 1
    assert put.stderr.startswith("rex: error: cannot reach the rex server at " + url)
    assert "rexd serve" in put.stderr and "REX_SERVER" in put.stderr
    assert put.stderr.count("\n") == 1


async def test_put_of_a_missing_file_names_it(server: str, tmp_path: Path) -> None:
    missing = tmp_path / "nope.bin"
    put = await rex("--server", server, "cas", "put", str(missing))
    assert put.returncode == 1
    assert put.stderr.startswith("rex: error: ") and str(missing) in put.stderr


async def test_usage_errors_exit_2_and_version_prints_it() -> None:
    assert (await rex("cas")).returncode == 2
    assert (await rex("cas", "get", "blake3/x/1")).returncode == 2  # no -o
    version = await rex("--version")
    assert (version.returncode, version.stdout.strip()) == (0, f"rex {__version__}")
