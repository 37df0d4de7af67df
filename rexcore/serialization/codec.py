"""The wire codec: attrs classes to and from JSON (orjson), with one cattrs converter.

Digests travel as their string form ``function/hash/size``; bytes as base64 is never
needed because blobs travel through the CAS, not inside JSON documents.

Structuring takes a fast path first: a second converter without detailed validation and
with direct hooks for the shapes the schemas use (homogeneous tuples, pairs, optional
fields, digests remembered by their text), about three times faster on the worker
protocol's messages. Whatever it cannot structure goes through ``wire_converter``, so a
bad document fails with the same ``$.path`` message as ever; the fast hooks are never
more lenient than cattrs' own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from types import UnionType
from typing import Any, TypeVar, Union, get_origin

import cattrs
import orjson
from cattrs.preconf.orjson import make_converter

from rexcore.artifacts.digest import Digest, InvalidDigestError, parse_digest

__all__ = ["WireFormatError", "decode", "encode", "structure", "unstructure", "wire_converter"]

T = TypeVar("T")


class WireFormatError(ValueError):
    """A JSON document does not match the schema it was sent as."""


#: The converter of record (its errors carry ``$.path``). A structure hook registered on
#: it must go on ``_fast_converter`` below too, or the fast path would not know it.
wire_converter = make_converter(forbid_extra_keys=True)
wire_converter.register_unstructure_hook(Digest, str)


def _structure_digest(value: Any, _type: type) -> Digest:
    if not isinstance(value, str):
        raise InvalidDigestError(f"a digest must be a string function/hash/size, got {value!r}")
    return parse_digest(value)


wire_converter.register_structure_hook(Digest, _structure_digest)

# -- the fast path ------------------------------------------------------------------------

#: Digests by their text: the same few (empty blobs, input roots...) recur in every message.
_parsed_digests: dict[str, Digest] = {}
_PARSED_DIGESTS_MAX = 4096


def _structure_digest_fast(value: Any, _type: type) -> Digest:
    digest = _parsed_digests.get(value)  # TypeError for an unhashable value: slow path
    if digest is None:
        digest = _structure_digest(value, _type)
        if len(_parsed_digests) >= _PARSED_DIGESTS_MAX:
            _parsed_digests.clear()
        _parsed_digests[value] = digest
    return digest


_fast_converter = make_converter(forbid_extra_keys=True, detailed_validation=False)
_fast_converter.register_structure_hook(Digest, _structure_digest_fast)


def _is_homogeneous_tuple(cls: Any) -> bool:
    args = getattr(cls, "__args__", None)
    return get_origin(cls) is tuple and args is not None and len(args) == 2 and args[1] is ...


def _homogeneous_tuple_hook(cls: Any) -> Callable[[Any, Any], tuple[Any, ...]]:
    item = cls.__args__[0]
    convert = _fast_converter.get_structure_hook(item)

    def structure_tuple(value: Any, _type: Any) -> tuple[Any, ...]:
        if isinstance(value, (str, bytes, dict)):  # iterable, yet never a JSON array
            raise TypeError(f"expected an array, got {type(value).__name__}")
        return tuple([convert(element, item) for element in value])

    return structure_tuple


def _is_pair(cls: Any) -> bool:
    args = getattr(cls, "__args__", None)
    return get_origin(cls) is tuple and args is not None and len(args) == 2 and ... not in args


def _pair_hook(cls: Any) -> Callable[[Any, Any], tuple[Any, Any]]:
    first, second = cls.__args__
    convert_first = _fast_converter.get_structure_hook(first)
    convert_second = _fast_converter.get_structure_hook(second)

    def structure_pair(value: Any, _type: Any) -> tuple[Any, Any]:
        if type(value) is not list or len(value) != 2:
            raise TypeError(f"expected an array of 2, got {value!r}")
        return (convert_first(value[0], first), convert_second(value[1], second))

    return structure_pair


def _is_optional(cls: Any) -> bool:
    args = getattr(cls, "__args__", None)
    return (
        get_origin(cls) in (Union, UnionType) and args is not None and len(args) == 2
        and type(None) in args
    )


def _optional_hook(cls: Any) -> Callable[[Any, Any], Any]:
    inner = next(arg for arg in cls.__args__ if arg is not type(None))
    convert = _fast_converter.get_structure_hook(inner)

    def structure_optional(value: Any, _type: Any) -> Any:
        return None if value is None else convert(value, inner)

    return structure_optional


_fast_converter.register_structure_hook_factory(_is_homogeneous_tuple, _homogeneous_tuple_hook)
_fast_converter.register_structure_hook_factory(_is_pair, _pair_hook)
_fast_converter.register_structure_hook_factory(_is_optional, _optional_hook)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, cattrs.BaseValidationError):
        messages = cattrs.transform_error(exc, path="$")
        return "; ".join(messages)
    return str(exc)


def unstructure(obj: Any) -> Any:
    return wire_converter.unstructure(obj)


def structure(data: Any, cls: type[T]) -> T:
    with contextlib.suppress(Exception):  # the precise path below says what is wrong
        return _fast_converter.structure(data, cls)
    try:
        return wire_converter.structure(data, cls)
    except (cattrs.BaseValidationError, ValueError, TypeError, KeyError) as exc:
        raise WireFormatError(f"invalid {cls.__name__}: {_describe(exc)}") from exc


def encode(obj: Any) -> bytes:
    return orjson.dumps(wire_converter.unstructure(obj))


def decode(data: bytes, cls: type[T]) -> T:
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise WireFormatError(f"invalid {cls.__name__}: body is not JSON ({exc})") from exc
    return structure(raw, cls)
