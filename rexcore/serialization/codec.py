"""The wire codec: attrs classes to and from JSON (orjson), with one cattrs converter.

Digests travel as their string form ``function/hash/size``; bytes as base64 is never
needed because blobs travel through the CAS, not inside JSON documents.
"""

from __future__ import annotations

from typing import Any, TypeVar

import cattrs
import orjson
from cattrs.preconf.orjson import make_converter

from rexcore.artifacts.digest import Digest, InvalidDigestError, parse_digest

__all__ = ["WireFormatError", "decode", "encode", "structure", "unstructure", "wire_converter"]

T = TypeVar("T")


class WireFormatError(ValueError):
    """A JSON document does not match the schema it was sent as."""


wire_converter = make_converter(forbid_extra_keys=True)
wire_converter.register_unstructure_hook(Digest, str)


def _structure_digest(value: Any, _type: type) -> Digest:
    if not isinstance(value, str):
        raise InvalidDigestError(f"a digest must be a string function/hash/size, got {value!r}")
    return parse_digest(value)


wire_converter.register_structure_hook(Digest, _structure_digest)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, cattrs.BaseValidationError):
        messages = cattrs.transform_error(exc, path="$")
        return "; ".join(messages)
    return str(exc)


def unstructure(obj: Any) -> Any:
    return wire_converter.unstructure(obj)


def structure(data: Any, cls: type[T]) -> T:
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
