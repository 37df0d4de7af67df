"""The plugin module of rex-sandbox-linux: registers the ``linux`` sandbox.

Registration imports nothing Linux-only: the factory and the probe import the sandbox
module when they are called.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from rexcore import hookimpl
from rexcore.plugins.descriptors import ComponentContext, ProbeResult, SandboxDescriptor
from rex_sandbox_linux.options import LinuxSandboxOptions

__all__ = ["rexcore_sandboxes"]

#: Above ``process`` (0): ``auto`` picks ``linux`` whenever its probe passes.
PREFERENCE = 100


def _create(options: LinuxSandboxOptions, context: ComponentContext) -> Any:
    from rex_sandbox_linux.sandbox import create_linux_sandbox

    return create_linux_sandbox(options, context)


def _probe() -> ProbeResult:
    from rex_sandbox_linux.sandbox import probe_linux_sandbox

    return probe_linux_sandbox()


@hookimpl
def rexcore_sandboxes() -> Iterator[SandboxDescriptor]:
    yield SandboxDescriptor(
        name="linux", factory=_create, options_type=LinuxSandboxOptions,
        platforms="linux", probe=_probe, preference=PREFERENCE,
        description="hermetic: bubblewrap namespaces (user, mount, pid, ipc, uts, net, "
                    "cgroup) + cgroup limits (memory, cpu, pids)",
    )
