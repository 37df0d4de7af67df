"""REAPI digests and digest functions to rex's and back.

A request names its digest function by the ``DigestFunction`` enum, or not at all: then
rex assumes SHA-256, as REAPI clients before digest-function negotiation (Bazel 4-6) do.
"""

from __future__ import annotations

import grpc

from rex_reapi.errors import ReapiError
from rex_reapi.proto import remote_execution_pb2 as re_pb2
from rexcore.artifacts.digest import Digest, DigestFunction, InvalidDigestError

__all__ = [
    "PROTO_FUNCTIONS",
    "function_of",
    "function_value",
    "to_proto",
    "to_rex",
]

_Value = re_pb2.DigestFunction.Value
#: rex's digest functions by their REAPI enum value.
PROTO_FUNCTIONS: dict[int, DigestFunction] = {
    _Value.SHA256: DigestFunction.SHA256,
    _Value.BLAKE3: DigestFunction.BLAKE3,
}
_VALUES = {function: value for value, function in PROTO_FUNCTIONS.items()}


def function_value(function: DigestFunction) -> int:
    return _VALUES[function]


def function_of(value: int, supported: tuple[DigestFunction, ...]) -> DigestFunction:
    """The digest function a request names (SHA-256 when it names none); INVALID_ARGUMENT
    for one rex does not serve."""
    if value == _Value.UNKNOWN:
        value = _Value.SHA256
    function = PROTO_FUNCTIONS.get(value)
    if function is None or function not in supported:
        try:
            name = _Value.Name(value)
        except ValueError:
            name = str(value)
        served = ", ".join(f.value.upper() for f in supported)
        raise ReapiError(grpc.StatusCode.INVALID_ARGUMENT,
                         f"digest function {name} is not served here; use one of: {served}")
    return function


def to_rex(digest: re_pb2.Digest, function: DigestFunction, what: str = "digest") -> Digest:
    """A REAPI Digest as rex's; INVALID_ARGUMENT when the hash or size is malformed."""
    try:
        return Digest(function, digest.hash, digest.size_bytes)
    except InvalidDigestError as exc:
        raise ReapiError(grpc.StatusCode.INVALID_ARGUMENT, f"{what}: {exc}") from None


def to_proto(digest: Digest) -> re_pb2.Digest:
    return re_pb2.Digest(hash=digest.hash, size_bytes=digest.size)
