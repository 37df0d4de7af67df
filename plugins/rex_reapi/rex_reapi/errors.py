"""REAPI errors: gRPC status codes with the ``google.rpc.Status`` details the spec asks for.

Handlers raise :class:`ReapiError`; the servicer wrapper turns it into the call's status,
with the rich status (and its details, such as a PreconditionFailure listing each missing
blob) in the ``grpc-status-details-bin`` trailer that REAPI clients read.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from rexcore.artifacts.digest import Digest, DigestFunction

__all__ = [
    "STATUS_CODES",
    "ReapiError",
    "blob_subject",
    "missing_blobs_error",
    "rpc_status",
]

#: rex's operation/status names to google.rpc codes.
STATUS_CODES: dict[str, int] = {
    "ok": code_pb2.OK,
    "cancelled": code_pb2.CANCELLED,
    "unknown": code_pb2.UNKNOWN,
    "invalid_argument": code_pb2.INVALID_ARGUMENT,
    "deadline_exceeded": code_pb2.DEADLINE_EXCEEDED,
    "not_found": code_pb2.NOT_FOUND,
    "already_exists": code_pb2.ALREADY_EXISTS,
    "permission_denied": code_pb2.PERMISSION_DENIED,
    "resource_exhausted": code_pb2.RESOURCE_EXHAUSTED,
    "failed_precondition": code_pb2.FAILED_PRECONDITION,
    "aborted": code_pb2.ABORTED,
    "out_of_range": code_pb2.OUT_OF_RANGE,
    "unimplemented": code_pb2.UNIMPLEMENTED,
    "internal": code_pb2.INTERNAL,
    "unavailable": code_pb2.UNAVAILABLE,
    "data_loss": code_pb2.DATA_LOSS,
    "unauthenticated": code_pb2.UNAUTHENTICATED,
}

_GRPC_CODES = {code.value[0]: code for code in grpc.StatusCode}


class ReapiError(Exception):
    """A request failed with ``code``; ``details`` are packed into the rich status."""

    def __init__(self, code: grpc.StatusCode, message: str,
                 details: Iterable[object] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = list(details)

    @classmethod
    def from_status(cls, status: str, message: str) -> ReapiError:
        number = STATUS_CODES.get(status, code_pb2.UNKNOWN)
        return cls(_GRPC_CODES.get(number, grpc.StatusCode.UNKNOWN), message)

    def status(self) -> status_pb2.Status:
        return rpc_status(self.code.value[0], self.message, self.details)


def rpc_status(code: int, message: str = "", details: Iterable[object] = ()) -> status_pb2.Status:
    packed = []
    for detail in details:
        holder = any_pb2.Any()
        holder.Pack(detail)  # type: ignore[arg-type]
        packed.append(holder)
    return status_pb2.Status(code=code, message=message, details=packed)


def blob_subject(digest: Digest) -> str:
    """How the spec names a blob in a PreconditionFailure: ``blobs/{fn/}{hash}/{size}``,
    the function segment only for functions newer than SHA-256."""
    if digest.function is DigestFunction.SHA256:
        return f"blobs/{digest.hash}/{digest.size}"
    return f"blobs/{digest.function.value}/{digest.hash}/{digest.size}"


def missing_blobs_error(missing: Iterable[Digest], what: str) -> ReapiError:
    """FAILED_PRECONDITION with one MISSING violation per blob, as Bazel expects (it then
    uploads them and retries)."""
    missing = list(missing)
    failure = error_details_pb2.PreconditionFailure(violations=[
        error_details_pb2.PreconditionFailure.Violation(
            type="MISSING", subject=blob_subject(digest),
            description=f"{what} {digest} is not in the CAS",
        )
        for digest in missing
    ])
    shown = ", ".join(str(d) for d in missing[:5])
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    return ReapiError(
        grpc.StatusCode.FAILED_PRECONDITION,
        f"{len(missing)} blob(s) of the {what} are not in the CAS ({shown}{more}); upload "
        "them and execute again",
        [failure],
    )
