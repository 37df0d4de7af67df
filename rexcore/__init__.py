"""rexcore: the core of rex, a remote build execution service.

The Python API is importable from here (``from rexcore import RemoteService, SandboxSpec,
PoolConfig``); it is imported on first use, so ``import rexcore`` (what every plugin
does for ``hookimpl``) stays light. See docs/python-api.md.
"""

import importlib
from typing import Any

import pluggy

__version__ = "0.1.0"

#: Marks a plugin's hook implementations: ``@rexcore.hookimpl def rexcore_blob_stores(): ...``
hookimpl = pluggy.HookimplMarker("rexcore")
#: Marks hook specifications; a plugin may define hooks of its own with it.
hookspec = pluggy.HookspecMarker("rexcore")

#: The Python API: name -> module defining it.
_API = {
    "AsyncRemoteService": "rexcore.core.service",
    "ExecutionResult": "rexcore.core.remote_action",
    "PoolConfig": "rexcore.pool.config",
    "RemoteService": "rexcore.core.service",
    "SandboxSpec": "rexcore.serialization.sandbox_spec",
    "ServiceError": "rexcore.core.service",
    "ServiceMetrics": "rexcore.core.service",
    "ServiceStatus": "rexcore.core.service",
}

__all__ = [
    "AsyncRemoteService",
    "ExecutionResult",
    "PoolConfig",
    "RemoteService",
    "SandboxSpec",
    "ServiceError",
    "ServiceMetrics",
    "ServiceStatus",
    "__version__",
    "hookimpl",
    "hookspec",
]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'rexcore' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
