"""rexcore: the core of rex, a remote build execution service."""

import pluggy

__version__ = "0.1.0"

#: Marks a plugin's hook implementations: ``@rexcore.hookimpl def rexcore_blob_stores(): ...``
hookimpl = pluggy.HookimplMarker("rexcore")
#: Marks hook specifications; a plugin may define hooks of its own with it.
hookspec = pluggy.HookspecMarker("rexcore")

__all__ = ["__version__", "hookimpl", "hookspec"]
