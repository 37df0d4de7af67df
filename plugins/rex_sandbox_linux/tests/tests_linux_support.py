"""Helpers shared by the linux sandbox's test modules."""

from __future__ import annotations

import os


def host_namespace(kind: str) -> str:
    """The worker's (this process's) namespace of ``kind``, as ``/proc`` names it."""
    return os.readlink(f"/proc/self/ns/{kind}")
