"""What a chunked blob is: its chunking parameters, its manifest, and the transfer errors.

A large blob moves as content-defined chunks (see :mod:`rexcore.artifacts.chunking`). The
:class:`ChunkManifest` names the blob, the parameters it was cut with and its chunks in
order; every chunk is itself a blob in the CAS, addressed with the blob's digest function.
A manifest that does not add up cannot be built, so one that exists is consistent.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

import attrs

from rexcore.artifacts.digest import Digest
from rexcore.serialization import codec

__all__ = [
    "REAPI_CHUNKING",
    "BlobMismatchError",
    "ChunkManifest",
    "ChunkingParams",
    "ChunkingParamsError",
    "CorruptChunkError",
    "InvalidManifestError",
    "ManifestNotFoundError",
    "MissingChunksError",
    "TransferError",
]

_E = TypeVar("_E", bound=BaseException)
_KiB = 1 << 10
_MiB = 1 << 20


class TransferError(Exception):
    """Base of every chunking and chunked-transfer error; a transfer that raises one
    committed nothing (no output file, no manifest)."""


class ChunkingParamsError(TransferError, ValueError):
    """Chunking parameters outside what FastCDC 2020 (as rex runs it) supports."""


class InvalidManifestError(TransferError, ValueError):
    """A chunk manifest does not add up (sizes, digest functions, chunk limits)."""


class ManifestNotFoundError(TransferError, LookupError):
    """The remote holds no chunk manifest for the blob."""

    def __init__(self, blob: Digest) -> None:
        super().__init__(
            f"the remote has no chunk manifest for {blob}; upload the blob first "
            "(or fetch it whole if the remote stores it unchunked)"
        )
        self.blob = blob


class MissingChunksError(TransferError):
    """Chunks a manifest names are not where they should be."""

    def __init__(self, blob: Digest | None, missing: Sequence[Digest], where: str) -> None:
        shown = ", ".join(str(d) for d in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        subject = f"the manifest of {blob}" if blob is not None else "a manifest"
        super().__init__(
            f"{subject} names {len(missing)} chunk(s) {where} lacks: {shown}{more}; "
            "upload the blob again to restore them"
        )
        self.blob = blob
        self.missing = tuple(missing)


class CorruptChunkError(TransferError):
    """A chunk's bytes do not match its digest (or cannot be decoded)."""

    def __init__(self, digest: Digest, cause: str) -> None:
        super().__init__(f"chunk {digest} is corrupt: {cause}; nothing was committed")
        self.digest = digest


class BlobMismatchError(TransferError):
    """The whole blob does not match its digest: the chunks verify but do not make up the
    blob, or the source file changed while it was sent."""


@attrs.frozen
class ChunkingParams:
    """FastCDC 2020 parameters; the defaults are the REAPI ones (``FastCdc2020Params``).

    Only ``avg_size`` and ``seed`` travel in REAPI capabilities; ``min_size`` and
    ``max_size`` follow from the average (a quarter and four times it) unless given, as the
    spec's test vectors do (``max_size=65535``). A blob smaller than ``max_size`` is not
    chunked: its manifest has one chunk, the blob itself.
    """

    #: The expected chunk size (a power of two); REAPI peers accept 1 KiB to 1 MiB.
    avg_size: int = 512 * _KiB
    min_size: int = attrs.field(
        default=attrs.Factory(lambda self: self.avg_size // 4, takes_self=True)
    )
    max_size: int = attrs.field(
        default=attrs.Factory(lambda self: self.avg_size * 4, takes_self=True)
    )
    #: FastCDC's normalized-chunking level (NC); REAPI fixes it at 2.
    normalization: int = 2
    #: XORed into the gear table; 0 is the paper's table.
    seed: int = 0

    def __attrs_post_init__(self) -> None:
        avg, low, high = self.avg_size, self.min_size, self.max_size
        if avg & (avg - 1) or not _KiB <= avg <= 4 * _MiB:
            raise ChunkingParamsError(
                f"chunking avg_size must be a power of two from 1 KiB to 4 MiB, got {avg}; "
                f"the REAPI default is {512 * _KiB}"
            )
        if not 64 <= low <= min(avg, _MiB):
            raise ChunkingParamsError(
                f"chunking min_size must be from 64 bytes to min(avg_size, 1 MiB), got {low} "
                f"(avg_size {avg}); leave it unset for avg_size/4"
            )
        if not max(avg, _KiB) <= high <= 16 * _MiB:
            raise ChunkingParamsError(
                f"chunking max_size must be from max(avg_size, 1 KiB) to 16 MiB, got {high} "
                f"(avg_size {avg}); leave it unset for avg_size*4"
            )
        if self.normalization not in (0, 1, 2, 3):
            raise ChunkingParamsError(
                f"chunking normalization must be 0, 1, 2 or 3, got {self.normalization}; "
                "REAPI uses 2"
            )
        if not 0 <= self.seed < 1 << 63:
            # pyfastcdc shifts the seed left by one within 64 bits
            raise ChunkingParamsError(
                f"chunking seed must be from 0 to 2**63-1, got {self.seed}; REAPI uses 0"
            )


#: The REAPI FastCDC 2020 parameters: average 512 KiB, min 128 KiB, max 2 MiB, NC 2, seed 0.
REAPI_CHUNKING = ChunkingParams()


def _as_tuple(chunks: Iterable[Digest]) -> tuple[Digest, ...]:
    return tuple(chunks)


@attrs.frozen
class ChunkManifest:
    """A blob as an ordered list of chunk digests; validated when built (and decoded)."""

    blob: Digest
    params: ChunkingParams
    chunks: tuple[Digest, ...] = attrs.field(converter=_as_tuple)

    def __attrs_post_init__(self) -> None:
        blob, chunks, params = self.blob, self.chunks, self.params
        if not chunks:
            raise InvalidManifestError(f"the manifest of {blob} lists no chunks")
        foreign = [c for c in chunks if c.function is not blob.function]
        if foreign:
            raise InvalidManifestError(
                f"the manifest of {blob} mixes digest functions: chunk {foreign[0]} is not "
                f"{blob.function.value}; a manifest's chunks use its blob's function"
            )
        total = sum(c.size for c in chunks)
        if total != blob.size:
            raise InvalidManifestError(
                f"the manifest of {blob} is inconsistent: its {len(chunks)} chunk(s) add up "
                f"to {total} bytes, the blob has {blob.size}"
            )
        if len(chunks) == 1:
            if chunks[0] != blob:
                raise InvalidManifestError(
                    f"the manifest of {blob} has one chunk, {chunks[0]}, which is not the "
                    "blob itself"
                )
            return
        if blob.size < params.max_size:
            raise InvalidManifestError(
                f"the manifest of {blob} splits a blob smaller than max_size "
                f"({params.max_size} bytes); such blobs are one chunk"
            )
        for chunk in chunks:
            if not 0 < chunk.size <= params.max_size:
                raise InvalidManifestError(
                    f"the manifest of {blob} has chunk {chunk} of {chunk.size} bytes; chunks "
                    f"are 1 to max_size ({params.max_size}) bytes"
                )

    @property
    def offsets(self) -> list[int]:
        """Where each chunk starts in the blob (same order as :attr:`chunks`)."""
        return [0, *itertools.accumulate(c.size for c in self.chunks[:-1])]

    def placements(self) -> dict[Digest, list[int]]:
        """Each distinct chunk and every offset it occupies (a chunk may repeat)."""
        where: dict[Digest, list[int]] = {}
        for chunk, offset in zip(self.chunks, self.offsets, strict=True):
            where.setdefault(chunk, []).append(offset)
        return where

    def __iter__(self) -> Iterator[tuple[int, Digest]]:
        """``(offset, chunk)`` pairs in blob order."""
        return zip(self.offsets, self.chunks, strict=True)

    def to_json(self) -> bytes:
        """The wire form (the project's JSON codec)."""
        return codec.encode(self)

    @classmethod
    def from_json(cls, data: bytes) -> ChunkManifest:
        """Decode and validate; any flaw raises :class:`InvalidManifestError`."""
        try:
            return codec.decode(data, cls)
        except codec.WireFormatError as exc:
            flaw = _nested(exc, InvalidManifestError)
            raise InvalidManifestError(
                str(flaw) if flaw is not None else f"invalid chunk manifest: {exc}"
            ) from exc


def _nested(exc: BaseException, kind: type[_E]) -> _E | None:
    """The first ``kind`` inside ``exc``'s causes and exception groups."""
    if isinstance(exc, kind):
        return exc
    inner = [*getattr(exc, "exceptions", ()), exc.__cause__]
    for candidate in inner:
        if candidate is not None and (found := _nested(candidate, kind)) is not None:
            return found
    return None
