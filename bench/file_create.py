"""What creating a small file costs on a file system: CPU and wall time; prints JSON.

    python bench/file_create.py [DIR ...]      (default: the system's temp dir and /dev/shm)

In a fresh temp dir under each DIR, creates 1,000 files of 300 bytes (``open`` with
``O_CREAT|O_EXCL``, ``write``, ``close``), as the disk store and the action cache do for
an action's small blobs, and reports the mean wall and CPU microseconds per file. On some
ext4 file systems this depends on the directory (the inode allocator's search); when CPU
equals wall time, the cost is the kernel's work, not waiting for the disk.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from execute import _file_system

FILES = 1000


def measure(parent: str) -> dict[str, object]:
    directory = tempfile.mkdtemp(prefix="rex-create-", dir=parent)
    try:
        cpu, wall = time.process_time(), time.perf_counter()
        for index in range(FILES):
            fd = os.open(f"{directory}/f{index}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            os.write(fd, b"x" * 300)
            os.close(fd)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return {"fs": _file_system(Path(parent)), "wall_us": round(wall / FILES * 1e6, 1),
            "cpu_us": round(cpu / FILES * 1e6, 1)}


def main() -> int:
    parents = sys.argv[1:] or [tempfile.gettempdir(), "/dev/shm"]
    print(json.dumps({parent: measure(parent) for parent in parents}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
