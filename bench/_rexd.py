"""Starting a real ``rexd serve`` for a benchmark: a subprocess on a free port."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def start_rexd(data_dir: Path, *args: str, protocol: str = "native",
               workers: int = 0) -> tuple[subprocess.Popen[str], str]:
    """``rexd serve --data-dir DATA_DIR --http 127.0.0.1:0 ARGS``; returns it and the URL
    ``protocol`` listens on (``http://...`` for native, ``grpc://...`` for reapi), once
    ``workers`` local workers have joined too."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "rexcore.cli.rexd", "serve", "--data-dir", str(data_dir),
         "--http", "127.0.0.1:0", *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env=env,
    )
    assert process.stderr is not None
    listening = re.compile(rf"rexd: {re.escape(protocol)} listening on (\S+)")
    seen: list[str] = []
    url, joined = "", 0
    for line in process.stderr:
        seen.append(line)
        if match := listening.search(line):
            url = match.group(1)
        joined += " joined" in line
        if url and joined >= workers:
            # Keep reading stderr so the server never blocks on a full pipe.
            threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()
            return process, url
    process.wait()
    raise SystemExit(f"bench: rexd serve exited {process.returncode}: {''.join(seen[-5:])}")


def stop_rexd(process: subprocess.Popen[str]) -> None:
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
