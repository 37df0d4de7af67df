"""For scripts run in a process of their own (``python -c``): an action that leaves a
daemon behind (``setsid`` plus a background ``sleep``) and returns its pid."""

from __future__ import annotations

from pathlib import Path

from rexcore.sandbox.interface import SandboxRequest
from rexcore.sandbox.process import ProcessSandbox
from rexcore.serialization.sandbox_spec import SandboxSpec


async def run_daemon_action(sandbox: ProcessSandbox, root: Path, name: str) -> int:
    """Run the action in ``root``; the pid of the daemon it left, once it has exited."""
    pid_file = root / name
    command = (f"setsid sh -c 'sleep 300 & echo $! > {pid_file}' & "
               f"while [ ! -s {pid_file} ]; do sleep 0.01; done")
    result = await sandbox.run(SandboxRequest(
        exec_root=root, arguments=("/bin/sh", "-c", command), environment=(),
        working_directory="", spec=SandboxSpec(), stdout_path=root / "out",
        stderr_path=root / "err"))
    assert result.exit_code == 0, (root / "err").read_text()
    return int(pid_file.read_text())
