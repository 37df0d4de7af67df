"""rex-sandbox-linux: the hermetic ``linux`` sandbox (bubblewrap namespaces + cgroups).

Importable on every OS; only :mod:`rex_sandbox_linux.sandbox` touches Linux interfaces,
and only when a sandbox is built or probed.
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
