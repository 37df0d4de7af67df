"""BuildGrid as a reference REAPI server for benchmarks: its own venv, a CAS-only config.

The venv lives in ``<repo>/.bench/buildgrid-venv`` (ignored by git) and is created on first
use with ``python3.11 -m venv`` and ``pip install buildgrid==VERSION`` from PyPI; BuildGrid
0.4.x runs on Python 3.11 (0.9.x needs 3.13).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections import deque
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / ".bench" / "buildgrid-venv"
VERSION = "0.4.4"

# Disk CAS (one file per blob, as rex's disk store), the in-memory LRU action cache (the
# only local action cache BuildGrid has), CAS + ByteStream + ActionCache on the empty
# instance name, no auth, no metrics.
_CONFIG = """\
description: rex bench reference (CAS + ByteStream + ActionCache)
server:
  - !channel
    address: "127.0.0.1:{port}"
    insecure-mode: true
authorization:
  method: none
monitoring:
  enabled: false
grpc-server-options:
  grpc.so_reuseport: 0
  grpc.max_receive_message_length: 8388608
  grpc.max_send_message_length: 8388608
storages:
  - !disk-storage &main-storage
    path: {cas}
caches:
  - !lru-action-cache &main-action
    storage: *main-storage
    max-cached-refs: 100000
    allow-updates: true
    cache-failed-actions: true
instances:
  - name: ""
    services:
      - !action-cache
        cache: *main-action
      - !cas
        storage: *main-storage
      - !bytestream
        storage: *main-storage
"""


def ensure_venv(version: str = VERSION) -> Path:
    """The ``bgd`` of a venv with buildgrid ``version``, creating the venv if needed."""
    bgd = VENV / "bin" / "bgd"
    python = VENV / "bin" / "python"
    if bgd.exists() and _installed_version(python) == version:
        return bgd
    interpreter = shutil.which("python3.11")
    if interpreter is None:
        raise SystemExit("bench: BuildGrid 0.4 needs python3.11 on PATH to build its venv")
    if not python.exists():
        subprocess.run([interpreter, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", f"buildgrid=={version}"],
                   check=True)
    return bgd


def _installed_version(python: Path) -> str | None:
    if not python.exists():
        return None
    done = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('buildgrid'))"],
        capture_output=True, text=True, check=False)
    return done.stdout.strip() if done.returncode == 0 else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_buildgrid(work: Path, version: str = VERSION,
                    timeout: float = 120.0) -> tuple[subprocess.Popen[str], str]:
    """``bgd server start`` on a free port with its disk CAS under ``work``; returns the
    process and ``HOST:PORT`` once the port answers gRPC."""
    bgd = ensure_venv(version)
    cas = work / "cas"
    cas.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    config = work / "buildgrid.yml"
    config.write_text(_CONFIG.format(port=port, cas=cas))
    process = subprocess.Popen(
        [str(bgd), "server", "start", str(config)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, cwd=work,
    )
    tail: deque[str] = deque(maxlen=20)
    assert process.stdout is not None
    threading.Thread(target=lambda: tail.extend(process.stdout), daemon=True).start()
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"bench: bgd server exited {process.returncode}: {''.join(tail)}")
        with grpc.insecure_channel(address) as channel:
            try:
                grpc.channel_ready_future(channel).result(timeout=1.0)
                return process, address
            except grpc.FutureTimeoutError:
                pass
    stop_buildgrid(process)
    raise SystemExit(f"bench: bgd server did not listen on {address}: {''.join(tail)}")


def stop_buildgrid(process: subprocess.Popen[str]) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
