"""Value types config options use, with their parsing (the converter registers them)."""

from __future__ import annotations

import re
from typing import NewType

__all__ = ["ByteSize", "HostPort", "format_size", "parse_host_port", "parse_size"]

#: A size in bytes; config accepts ``1048576``, ``"512MiB"``, ``"10GB"``, ``"2g"``.
ByteSize = NewType("ByteSize", int)

#: ``host:port`` (``[::1]:8981`` for IPv6); port 0 picks a free port.
HostPort = NewType("HostPort", str)

_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kb": 1000, "kib": 1024,
    "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1024**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1024**4, "tb": 1000**4, "tib": 1024**4,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")


def parse_size(value: int | str) -> int:
    """Bytes from an int or a string with a unit (KiB/MiB/GiB/TiB, KB/MB/GB/TB, k/m/g/t)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as 1048576 or '512MiB', got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size must not be negative, got {value}")
        return value
    if isinstance(value, str):
        match = _SIZE.fullmatch(value)
        if match and match.group(2).lower() in _UNITS:
            return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    raise ValueError(f"expected a size such as 1048576 or '512MiB', got {value!r}")


def format_size(size: int) -> str:
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        factor = _UNITS[unit.lower()]
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def parse_host_port(value: str) -> tuple[str, int]:
    """Split ``host:port``; raises ValueError naming the expected form."""
    if not isinstance(value, str):
        raise ValueError(f"expected 'host:port', got {value!r}")
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected 'host:port' such as '127.0.0.1:8981', got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)
