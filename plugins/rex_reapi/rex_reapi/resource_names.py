"""ByteStream resource names, as REAPI defines them.

Reads: ``{instance}/blobs/{function/}{hash}/{size}`` or
``{instance}/compressed-blobs/{compressor}/{function/}{hash}/{size}``; writes put
``uploads/{uuid}/`` before ``blobs`` and may end in ``/{metadata}``. The instance name may
span several segments (or be empty, without its slash); the function segment is left out
for SHA-256.
"""

from __future__ import annotations

import attrs
import grpc

from rex_reapi.errors import ReapiError
from rexcore.artifacts.digest import Digest, DigestFunction, InvalidDigestError

__all__ = ["ResourceName", "parse_read_name", "parse_write_name"]

COMPRESSORS = ("identity", "zstd")
_FUNCTIONS = {function.value: function for function in DigestFunction}


@attrs.frozen
class ResourceName:
    instance_name: str
    digest: Digest
    #: ``identity`` for ``blobs/``, else the compressor of ``compressed-blobs/``.
    compressor: str = "identity"


def _bad(name: str, why: str) -> ReapiError:
    return ReapiError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"malformed resource name {name!r}: {why}; expected "
        "'{instance}/[uploads/{uuid}/]blobs/{[blake3/]hash}/{size}' or "
        "'.../compressed-blobs/zstd/...'",
    )


def _parse(name: str, segments: list[str], start: int, instance: str, allow_metadata: bool,
           supported: tuple[DigestFunction, ...]) -> ResourceName:
    kind = segments[start]
    rest = segments[start + 1:]
    compressor = "identity"
    if kind == "compressed-blobs":
        if not rest:
            raise _bad(name, "no compressor after compressed-blobs")
        compressor, rest = rest[0], rest[1:]
        if compressor not in COMPRESSORS or compressor == "identity":
            raise _bad(name, f"compressor {compressor!r} is not served (use zstd)")
    function = DigestFunction.SHA256
    if rest and rest[0] in _FUNCTIONS:
        function, rest = _FUNCTIONS[rest[0]], rest[1:]
    elif rest and rest[0].isalpha() and len(rest[0]) < 16:
        raise _bad(name, f"digest function {rest[0]!r} is not served")
    if function not in supported:
        raise _bad(name, f"digest function {function.value} is not served")
    if len(rest) < 2 or (len(rest) > 2 and not allow_metadata):
        raise _bad(name, "expected {hash}/{size} after the blob kind")
    hash_, size = rest[0], rest[1]
    if not size.isdigit():
        raise _bad(name, f"size {size!r} is not a whole number")
    try:
        digest = Digest(function, hash_, int(size))
    except InvalidDigestError as exc:
        raise _bad(name, str(exc)) from None
    return ResourceName(instance, digest, compressor)


def _blob_kind_index(segments: list[str], first: int) -> int:
    for index in range(first, len(segments)):
        if segments[index] in ("blobs", "compressed-blobs"):
            return index
    return -1


def parse_read_name(name: str, supported: tuple[DigestFunction, ...]) -> ResourceName:
    segments = name.split("/")
    index = _blob_kind_index(segments, 0)
    if index < 0:
        raise _bad(name, "no blobs/ or compressed-blobs/ segment")
    return _parse(name, segments, index, "/".join(segments[:index]), False, supported)


def parse_write_name(name: str, supported: tuple[DigestFunction, ...]) -> ResourceName:
    segments = name.split("/")
    try:
        uploads = segments.index("uploads")
    except ValueError:
        raise _bad(name, "no uploads/{uuid}/ segment") from None
    if uploads + 2 >= len(segments) or segments[uploads + 2] not in ("blobs", "compressed-blobs"):
        raise _bad(name, "expected uploads/{uuid}/blobs/...")
    return _parse(name, segments, uploads + 2, "/".join(segments[:uploads]), True, supported)
