"""The one cattrs converter config goes through, and its error reporting.

Every config class and every component's options class is structured here, so a typo
anywhere (core or plugin) fails the same way: a :class:`ConfigError` listing each problem
with its ``$.path``.
"""

from __future__ import annotations

from typing import Any, TypeVar

import cattrs
from cattrs.errors import ForbiddenExtraKeysError
from cattrs.gen import make_dict_structure_fn
from cattrs.v import format_exception

from rexcore.artifacts.digest import DigestFunction
from rexcore.config.types import ByteSize, HostPort, format_size, parse_host_port, parse_size

__all__ = ["ConfigError", "structure_config", "unstructure_config"]

T = TypeVar("T")


class ConfigError(ValueError):
    """The config is invalid; ``problems`` holds one ``$.path: message`` line each."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        self.source = source
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"invalid {source}:\n{lines}")


def _structure_size(value: Any, _type: type) -> int:
    return ByteSize(parse_size(value))


def _structure_host_port(value: Any, _type: type) -> str:
    parse_host_port(value)
    return HostPort(value)


def _structure_digest_function(value: Any, _type: type) -> DigestFunction:
    if not isinstance(value, str):
        raise ValueError(f"expected a digest function name, got {value!r}")
    return DigestFunction.parse(value)


def _strict_scalar(kind: type) -> Any:
    # cattrs would turn "3" into 3 and 1 into True; a config file deserves a type error.
    def structure(value: Any, _type: type) -> Any:
        if type(value) is not kind and not (kind is float and type(value) is int):
            raise TypeError(f"expected {kind.__name__}, got {type(value).__name__} {value!r}")
        return kind(value)

    return structure


def _make_converter() -> cattrs.Converter:
    converter = cattrs.Converter(forbid_extra_keys=True)
    for kind in (int, float, str, bool):
        converter.register_structure_hook(kind, _strict_scalar(kind))
    converter.register_structure_hook(ByteSize, _structure_size)
    converter.register_unstructure_hook(ByteSize, format_size)
    converter.register_structure_hook(HostPort, _structure_host_port)
    converter.register_structure_hook(DigestFunction, _structure_digest_function)
    converter.register_unstructure_hook(DigestFunction, lambda f: f.value)
    # Keep forbid_extra_keys on classes generated lazily (plugins' options types).
    converter.register_structure_hook_factory(
        lambda cls: hasattr(cls, "__attrs_attrs__"),
        lambda cls: make_dict_structure_fn(cls, converter, _cattrs_forbid_extra_keys=True),
    )
    return converter


_converter = _make_converter()


def _format_exception(exc: BaseException, type_: Any) -> str:
    if isinstance(exc, ForbiddenExtraKeysError):
        return f"unknown key(s) {', '.join(sorted(exc.extra_fields))}"
    if isinstance(exc, KeyError):
        return "required key is missing"
    if isinstance(exc, (ValueError, TypeError)) and str(exc):
        return str(exc)  # our hooks and validators phrase their own messages
    return format_exception(exc, type_)


def _problems(exc: BaseException, path: str) -> list[str]:
    if isinstance(exc, cattrs.BaseValidationError):
        messages = cattrs.transform_error(exc, path=path, format_exception=_format_exception)
        return [_rewrite(m) for m in messages]
    return [f"{path}: {exc}"]


def _rewrite(message: str) -> str:
    # cattrs says "message @ $.a.b"; we lead with the path, which is what a reader scans for.
    text, sep, where = message.rpartition(" @ ")
    return f"{where}: {text}" if sep else message


def structure_config(data: Any, cls: type[T], *, path: str = "$", source: str = "config") -> T:
    """Structure ``data`` into ``cls`` or raise :class:`ConfigError` with ``$.path`` lines."""
    try:
        return _converter.structure(data, cls)
    except Exception as exc:
        raise ConfigError(_problems(exc, path), source) from exc


def unstructure_config(obj: Any) -> Any:
    return _converter.unstructure(obj)
