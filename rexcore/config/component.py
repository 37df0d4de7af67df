"""A component choice in config: ``{name, options}``."""

from __future__ import annotations

from typing import Any

import attrs

__all__ = ["ComponentRef"]


@attrs.frozen
class ComponentRef:
    """Which component to use and its options (checked against its ``options_type``)."""

    name: str
    options: dict[str, Any] = attrs.field(factory=dict)
