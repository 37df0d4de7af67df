"""The ActionCache service: REAPI results by REAPI action digest."""

from __future__ import annotations

import grpc

from rex_reapi.backend import ReapiBackend, unary
from rex_reapi.convert import get_many, result_from_proto
from rex_reapi.digests import to_rex
from rex_reapi.errors import ReapiError
from rex_reapi.proto import remote_execution_pb2 as re_pb2
from rex_reapi.proto import remote_execution_pb2_grpc as re_grpc
from rexcore.artifacts.action_cache import MissingBlobsError
from rexcore.artifacts.digest import Digest, DigestFunction
from rexcore.artifacts.store import StorageError

__all__ = ["ActionCacheService", "inline_outputs"]


async def inline_outputs(backend: ReapiBackend, result: re_pb2.ActionResult, function: DigestFunction,
                         stdout: bool, stderr: bool, files: frozenset[str]) -> None:
    """Fill ``stdout_raw``/``stderr_raw``/``contents`` where asked, within max_inline_size
    (in total); what does not fit stays a digest only, as the spec allows."""
    budget = backend.options.max_inline_size
    wanted: list[tuple[object, str, Digest]] = []
    for asked, field in ((stdout, "stdout"), (stderr, "stderr")):
        if asked and result.HasField(f"{field}_digest"):
            wanted.append((result, f"{field}_raw",
                           to_rex(getattr(result, f"{field}_digest"), function)))
    for file in result.output_files:
        if file.path in files:
            wanted.append((file, "contents", to_rex(file.digest, function)))
    fitting = []
    for holder, field, digest in wanted:
        if digest.size <= budget:
            fitting.append((holder, field, digest))
            budget -= digest.size
    blobs = await get_many(backend.store, [digest for _, _, digest in fitting])
    for (holder, field, _), data in zip(fitting, blobs):
        if isinstance(data, StorageError):  # gone meanwhile: the digest still says it
            continue
        if isinstance(data, BaseException):
            raise data
        setattr(holder, field, data)


class ActionCacheService(re_grpc.ActionCacheServicer):
    def __init__(self, backend: ReapiBackend) -> None:
        self.backend = backend

    @unary
    async def GetActionResult(self, request: re_pb2.GetActionResultRequest,
                              context: grpc.aio.ServicerContext) -> re_pb2.ActionResult:
        backend = self.backend
        backend.check_instance(request.instance_name)
        function = backend.function(request.digest_function)
        digest = to_rex(request.action_digest, function, "action_digest")
        cached = await backend.cache.get(digest) if backend.cache_enabled else None
        if cached is None:
            raise ReapiError(grpc.StatusCode.NOT_FOUND, f"no result for action {digest} is cached")
        result = cached.proto()
        if request.inline_stdout or request.inline_stderr or request.inline_output_files:
            await inline_outputs(backend, result, function, request.inline_stdout,
                                 request.inline_stderr, frozenset(request.inline_output_files))
        return result

    @unary
    async def UpdateActionResult(self, request: re_pb2.UpdateActionResultRequest,
                                 context: grpc.aio.ServicerContext) -> re_pb2.ActionResult:
        backend = self.backend
        backend.check_instance(request.instance_name)
        if not backend.updates_allowed:
            why = ("the action cache is switched off (storage.action_cache.enabled)"
                   if not backend.cache_enabled else
                   "clients may not write it (storage.action_cache.allow_client_updates)")
            raise ReapiError(grpc.StatusCode.PERMISSION_DENIED,
                             f"UpdateActionResult is refused: {why}")
        function = backend.function(request.digest_function)
        digest = to_rex(request.action_digest, function, "action_digest")
        result = re_pb2.ActionResult()
        result.CopyFrom(request.action_result)
        cached = await result_from_proto(result, function, backend.store)
        try:
            await backend.cache.put(digest, cached, inline=True)
        except MissingBlobsError as exc:  # evicted between the check and the write
            raise ReapiError(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from None
        return result
