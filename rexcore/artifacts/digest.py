"""Content digests: which hash function, which hash, how many bytes.

rex speaks SHA-256 (what Bazel 4-6 use) and BLAKE3 (REAPI ``DigestFunction`` 9). Every
blob address names its function, so one store holds blobs of both.
"""

from __future__ import annotations

import enum
import hashlib
import re
from typing import Protocol

import attrs
import blake3

__all__ = [
    "Digest",
    "DigestFunction",
    "Hasher",
    "InvalidDigestError",
    "digest_of",
    "parse_digest",
]


class InvalidDigestError(ValueError):
    """A digest string or field is malformed (bad function name, hash or size)."""


class Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> object: ...

    def hexdigest(self) -> str: ...


# blake3 releases the GIL and hashes with several threads above this size; below it the
# thread start-up costs more than it saves.
_BLAKE3_MULTITHREAD_MIN = 1 << 20


class DigestFunction(enum.Enum):
    """A hash function rex addresses blobs with; the value is its name in addresses."""

    SHA256 = "sha256"
    BLAKE3 = "blake3"

    @property
    def hex_length(self) -> int:
        return 64

    def hasher(self, *, expected_size: int = 0) -> Hasher:
        """A fresh incremental hasher; ``expected_size`` lets BLAKE3 use threads."""
        if self is DigestFunction.SHA256:
            return hashlib.sha256()
        if expected_size >= _BLAKE3_MULTITHREAD_MIN:
            return blake3.blake3(max_threads=blake3.blake3.AUTO)
        return blake3.blake3()

    @property
    def empty(self) -> Digest:
        """The digest of zero bytes, which every store holds implicitly."""
        return _EMPTY[self]

    @classmethod
    def parse(cls, name: str) -> DigestFunction:
        try:
            return cls(name.lower())
        except ValueError:
            known = ", ".join(f.value for f in cls)
            raise InvalidDigestError(
                f"unknown digest function {name!r}; rex supports: {known}"
            ) from None


_HEX = re.compile(r"[0-9a-f]{64}")


@attrs.frozen(order=True, repr=False, cache_hash=True)
class Digest:
    """A blob's address: ``function/hash/size``, e.g. ``blake3/af13.../1024``."""

    function: DigestFunction
    hash: str
    size: int

    def __attrs_post_init__(self) -> None:
        if not _HEX.fullmatch(self.hash):
            raise InvalidDigestError(
                f"{self.function.value} hash must be 64 lowercase hex characters, got {self.hash!r}"
            )
        if self.size < 0:
            raise InvalidDigestError(f"blob size must not be negative, got {self.size}")

    def __str__(self) -> str:
        return f"{self.function.value}/{self.hash}/{self.size}"

    def __repr__(self) -> str:
        return f"Digest({self})"

    @property
    def is_empty(self) -> bool:
        return self.size == 0 and self == self.function.empty


def parse_digest(text: str, default_function: DigestFunction | None = None) -> Digest:
    """Parse ``function/hash/size`` (or ``hash/size`` when a default function is given)."""
    parts = text.strip().split("/")
    if len(parts) == 2 and default_function is not None:
        function, (hash_, size_text) = default_function, parts
    elif len(parts) == 3:
        function = DigestFunction.parse(parts[0])
        hash_, size_text = parts[1], parts[2]
    else:
        form = "function/hash/size" + (" or hash/size" if default_function else "")
        raise InvalidDigestError(f"digest {text!r} is not of the form {form}")
    if not size_text.isdigit():
        raise InvalidDigestError(f"digest {text!r} has a size that is not a whole number")
    return Digest(function, hash_, int(size_text))


def digest_of(data: bytes | memoryview, function: DigestFunction = DigestFunction.BLAKE3) -> Digest:
    """The digest of an in-memory blob."""
    hasher = function.hasher(expected_size=len(data))
    hasher.update(data)
    return Digest(function, hasher.hexdigest(), len(data))


_EMPTY = {
    DigestFunction.SHA256: Digest(DigestFunction.SHA256, hashlib.sha256().hexdigest(), 0),
    DigestFunction.BLAKE3: Digest(DigestFunction.BLAKE3, blake3.blake3().hexdigest(), 0),
}
