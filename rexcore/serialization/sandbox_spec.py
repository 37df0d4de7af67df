"""SandboxSpec: the contract between the executor and any sandbox.

It says which paths are inputs (read-only for the action), which are outputs, which temp
dirs to provide, and the limits: memory, cpus, pids, timeout, network. Build one with
:meth:`SandboxSpec.builder`::

    spec = (SandboxSpec.builder()
            .input("src/main.c").output("out/main.o").temp("tmp")
            .max_memory(512 * 2**20).max_cpu(2).timeout(60).build())
"""

from __future__ import annotations

from typing import Self

import attrs

from rexcore.serialization.action import check_relative_path

__all__ = ["SandboxSpec", "SandboxSpecBuilder"]


def _paths(values: tuple[str, ...]) -> tuple[str, ...]:
    for value in values:
        check_relative_path(value, "sandbox path")
    return values


def _positive_or_none(_instance: object, attribute: attrs.Attribute, value: float | None) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"{attribute.name} must be positive, got {value}")


@attrs.frozen
class SandboxSpec:
    """What a sandbox must provide for one action (``None`` limits mean the server default)."""

    inputs: tuple[str, ...] = attrs.field(default=(), converter=tuple, validator=lambda i, a, v: _paths(v))
    outputs: tuple[str, ...] = attrs.field(default=(), converter=tuple, validator=lambda i, a, v: _paths(v))
    temp_dirs: tuple[str, ...] = attrs.field(default=(), converter=tuple, validator=lambda i, a, v: _paths(v))
    memory_bytes: int | None = attrs.field(default=None, validator=_positive_or_none)
    cpus: float | None = attrs.field(default=None, validator=_positive_or_none)
    pids: int | None = attrs.field(default=None, validator=_positive_or_none)
    timeout_s: float | None = attrs.field(default=None, validator=_positive_or_none)
    network: bool = False

    @classmethod
    def builder(cls) -> SandboxSpecBuilder:
        return SandboxSpecBuilder()


class SandboxSpecBuilder:
    """Fluent construction of a :class:`SandboxSpec`; ``build()`` validates."""

    def __init__(self) -> None:
        self._inputs: list[str] = []
        self._outputs: list[str] = []
        self._temps: list[str] = []
        self._limits: dict[str, object] = {}

    def input(self, path: str) -> Self:
        self._inputs.append(path)
        return self

    def output(self, path: str) -> Self:
        self._outputs.append(path)
        return self

    def temp(self, path: str) -> Self:
        self._temps.append(path)
        return self

    def max_memory(self, size_bytes: int) -> Self:
        self._limits["memory_bytes"] = size_bytes
        return self

    def max_cpu(self, cpus: float) -> Self:
        self._limits["cpus"] = cpus
        return self

    def max_pids(self, pids: int) -> Self:
        self._limits["pids"] = pids
        return self

    def timeout(self, seconds: float) -> Self:
        self._limits["timeout_s"] = seconds
        return self

    def network(self, enabled: bool = True) -> Self:
        self._limits["network"] = enabled
        return self

    def build(self) -> SandboxSpec:
        return SandboxSpec(inputs=tuple(self._inputs), outputs=tuple(self._outputs),
                           temp_dirs=tuple(self._temps), **self._limits)  # type: ignore[arg-type]
