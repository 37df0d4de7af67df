"""Starting a real ``rexd serve`` for a benchmark: a subprocess on a free port."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_LISTENING = re.compile(r"rexd: native listening on (http://\S+)")


def start_rexd(data_dir: Path, *args: str) -> tuple[subprocess.Popen[str], str]:
    """``rexd serve --data-dir DATA_DIR --http 127.0.0.1:0 ARGS``; returns it and its URL."""
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
    seen: list[str] = []
    for line in process.stderr:
        seen.append(line)
        if match := _LISTENING.search(line):
            # Keep reading stderr so the server never blocks on a full pipe.
            threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()
            return process, match.group(1)
    process.wait()
    raise SystemExit(f"bench: rexd serve exited {process.returncode}: {''.join(seen[-5:])}")


def stop_rexd(process: subprocess.Popen[str]) -> None:
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
