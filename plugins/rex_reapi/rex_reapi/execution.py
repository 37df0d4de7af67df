"""The Execution and Operations services: REAPI actions run by rex's scheduler.

Execute first looks the REAPI action up in rex-reapi's action cache (a hit answers at
once). Otherwise the Action, Command and input tree are converted to rex's form (see
:mod:`rex_reapi.convert`) and submitted to the scheduler, which merges identical
in-flight actions, queues by priority and hands the action to a worker. The operation
streams QUEUED/EXECUTING updates every ``update_interval_s`` and its completion at once;
a successful, cacheable result is cached under the REAPI action digest.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator

import attrs
import grpc
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import empty_pb2

from rex_reapi.action_cache import inline_outputs
from rex_reapi.backend import ReapiBackend, log, streaming, unary
from rex_reapi.convert import CachedReapiResult, OutputLayout, convert_action
from rex_reapi.digests import function_value, to_proto, to_rex
from rex_reapi.errors import STATUS_CODES, ReapiError, missing_blobs_error, rpc_status
from rex_reapi.proto import remote_execution_pb2 as re_pb2
from rex_reapi.proto import remote_execution_pb2_grpc as re_grpc
from rexcore.artifacts.action_cache import MissingBlobsError
from rexcore.artifacts.digest import Digest
from rexcore.scheduler.operations import (
    MissingInputsError,
    Operation,
    OperationNotFoundError,
    SchedulerError,
    new_operation_name,
)
from rexcore.scheduler.scheduler import Scheduler
from rexcore.serialization.action import InvalidActionError

__all__ = ["ExecutionService", "OperationsService"]

_Stage = re_pb2.ExecutionStage.Value
_STAGES = {"queued": _Stage.QUEUED, "executing": _Stage.EXECUTING, "completed": _Stage.COMPLETED}
#: Operations whose REAPI particulars (action digest, output layout) are remembered.
_REMEMBERED = 100_000
#: Cache-hit operations (they have no scheduler operation) kept for GetOperation/WaitExecution.
_HITS_REMEMBERED = 10_000


@attrs.frozen
class _Submitted:
    """What the REAPI side must know about an operation to report it."""

    action_digest: Digest  # the REAPI action digest
    layout: OutputLayout
    cacheable: bool
    inline_stdout: bool = False
    inline_stderr: bool = False
    inline_files: frozenset[str] = frozenset()


class _Operations:
    """Operation protos from rex operations; shared by Execution and Operations."""

    def __init__(self, backend: ReapiBackend) -> None:
        self.backend = backend
        self.submitted: OrderedDict[str, _Submitted] = OrderedDict()
        self.hits: OrderedDict[str, operations_pb2.Operation] = OrderedDict()

    def remember(self, name: str, submitted: _Submitted) -> None:
        self.submitted[name] = submitted
        while len(self.submitted) > _REMEMBERED:
            self.submitted.popitem(last=False)

    def remember_hit(self, message: operations_pb2.Operation) -> None:
        self.hits[message.name] = message
        while len(self.hits) > _HITS_REMEMBERED:
            self.hits.popitem(last=False)

    @property
    def scheduler(self) -> Scheduler:
        scheduler = self.backend.runtime.scheduler
        if scheduler is None:
            raise ReapiError(grpc.StatusCode.UNIMPLEMENTED,
                             "remote execution is off on this server (scheduler.enabled = "
                             "false); it serves the cache only")
        return scheduler

    async def get(self, name: str) -> Operation:
        try:
            return await self.scheduler.get(name)
        except OperationNotFoundError as exc:
            raise ReapiError(grpc.StatusCode.NOT_FOUND, str(exc)) from None

    async def proto(self, op: Operation) -> operations_pb2.Operation:
        submitted = self.submitted.get(op.name)
        digest = submitted.action_digest if submitted is not None else op.action_digest
        metadata = re_pb2.ExecuteOperationMetadata(
            stage=_STAGES.get(op.state, _Stage.UNKNOWN), action_digest=to_proto(digest),
            digest_function=function_value(digest.function),
        )
        message = operations_pb2.Operation(name=op.name, done=op.done)
        message.metadata.Pack(metadata)
        if op.done:
            message.response.Pack(await self.response(op, submitted))
        return message

    async def response(self, op: Operation, submitted: _Submitted | None) -> re_pb2.ExecuteResponse:
        response = re_pb2.ExecuteResponse(cached_result=op.cached, message=op.message)
        code = STATUS_CODES.get(op.status, STATUS_CODES["unknown"])
        response.status.CopyFrom(rpc_status(code, op.message if code else ""))
        if op.result is None:
            return response
        layout = submitted.layout if submitted is not None else OutputLayout()
        result, referenced = await self.backend.results.to_proto(op.result, layout)
        if (code == 0 and op.result.exit_code == 0 and submitted is not None
                and submitted.cacheable and self.backend.cache_enabled):
            try:
                # A small entry is written right here: cheaper than a thread hop.
                await self.backend.cache.put(submitted.action_digest,
                                             CachedReapiResult.of(result, referenced),
                                             inline=True)
            except MissingBlobsError as exc:
                log.warning("result of %s not cached: %s", submitted.action_digest, exc)
        if submitted is not None and (submitted.inline_stdout or submitted.inline_stderr
                                      or submitted.inline_files):
            await inline_outputs(self.backend, result, submitted.action_digest.function,
                                 submitted.inline_stdout, submitted.inline_stderr,
                                 submitted.inline_files)
        response.result.CopyFrom(result)
        return response

    async def follow(self, op: Operation) -> AsyncIterator[operations_pb2.Operation]:
        """The operation now, an update every interval while it runs, and its end."""
        yield await self.proto(op)
        scheduler = self.scheduler
        interval = self.backend.options.update_interval_s
        while not op.done:
            if not scheduler.accepting:
                raise ReapiError(grpc.StatusCode.UNAVAILABLE,
                                 f"the server is shutting down; call WaitExecution({op.name}) "
                                 "on it once it is back")
            op = await scheduler.wait(op.name, interval)
            yield await self.proto(op)


class ExecutionService(re_grpc.ExecutionServicer):
    def __init__(self, backend: ReapiBackend, operations: _Operations) -> None:
        self.backend = backend
        self.operations = operations

    @streaming
    async def Execute(self, request: re_pb2.ExecuteRequest,
                      context: grpc.aio.ServicerContext) -> AsyncIterator[operations_pb2.Operation]:
        backend = self.backend
        backend.check_instance(request.instance_name)
        scheduler = self.operations.scheduler
        function = backend.function(request.digest_function)
        action_digest = to_rex(request.action_digest, function, "action_digest")
        if not request.skip_cache_lookup and backend.cache_enabled:
            cached = await backend.cache.get(action_digest)
            if cached is not None:
                yield await self._cache_hit(request, action_digest, cached)
                return
        converted = await convert_action(action_digest, backend.store, backend.inputs,
                                         scheduler.config.max_timeout_s)
        try:
            op = await scheduler.submit(
                converted.native_digest,
                priority=request.execution_policy.priority,
                skip_cache_lookup=request.skip_cache_lookup,
                blobs=converted.blobs(),
                native_cache=False,  # REAPI results are cached by the REAPI digest
            )
        except MissingInputsError as exc:
            raise missing_blobs_error(exc.missing, "action") from None
        except InvalidActionError as exc:
            raise ReapiError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        except SchedulerError as exc:
            raise ReapiError.from_status(exc.status, str(exc)) from None
        self.operations.remember(op.name, _Submitted(
            action_digest, converted.layout, not converted.do_not_cache,
            request.inline_stdout, request.inline_stderr,
            frozenset(request.inline_output_files),
        ))
        async for message in self.operations.follow(op):
            yield message

    async def _cache_hit(self, request: re_pb2.ExecuteRequest, digest: Digest,
                         cached: CachedReapiResult) -> operations_pb2.Operation:
        result = cached.proto()
        if request.inline_stdout or request.inline_stderr or request.inline_output_files:
            await inline_outputs(self.backend, result, digest.function, request.inline_stdout,
                                 request.inline_stderr, frozenset(request.inline_output_files))
        response = re_pb2.ExecuteResponse(result=result, cached_result=True,
                                          status=rpc_status(0))
        metadata = re_pb2.ExecuteOperationMetadata(
            stage=_Stage.COMPLETED, action_digest=to_proto(digest),
            digest_function=function_value(digest.function))
        # A cache hit creates no scheduler operation: remembered here so that its name,
        # unique like any other, still answers GetOperation and WaitExecution.
        message = operations_pb2.Operation(name=new_operation_name(), done=True)
        message.metadata.Pack(metadata)
        message.response.Pack(response)
        self.operations.remember_hit(message)
        return message

    @streaming
    async def WaitExecution(self, request: re_pb2.WaitExecutionRequest,
                            context: grpc.aio.ServicerContext) -> AsyncIterator[operations_pb2.Operation]:
        hit = self.operations.hits.get(request.name)
        if hit is not None:
            yield hit
            return
        op = await self.operations.get(request.name)
        async for message in self.operations.follow(op):
            yield message


class OperationsService(operations_pb2_grpc.OperationsServicer):
    """google.longrunning.Operations: Get and Cancel (List and Delete are not served)."""

    def __init__(self, operations: _Operations) -> None:
        self.operations = operations

    @unary
    async def GetOperation(self, request: operations_pb2.GetOperationRequest,
                           context: grpc.aio.ServicerContext) -> operations_pb2.Operation:
        hit = self.operations.hits.get(request.name)
        if hit is not None:
            return hit
        return await self.operations.proto(await self.operations.get(request.name))

    @unary
    async def CancelOperation(self, request: operations_pb2.CancelOperationRequest,
                              context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        if request.name in self.operations.hits:  # done already: nothing to cancel
            return empty_pb2.Empty()
        try:
            await self.operations.scheduler.cancel(request.name)
        except OperationNotFoundError as exc:
            raise ReapiError(grpc.StatusCode.NOT_FOUND, str(exc)) from None
        return empty_pb2.Empty()

    @unary
    async def ListOperations(self, request: operations_pb2.ListOperationsRequest,
                             context: grpc.aio.ServicerContext) -> operations_pb2.ListOperationsResponse:
        raise ReapiError(grpc.StatusCode.UNIMPLEMENTED, "ListOperations is not served by rex")

    @unary
    async def DeleteOperation(self, request: operations_pb2.DeleteOperationRequest,
                              context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        raise ReapiError(grpc.StatusCode.UNIMPLEMENTED, "DeleteOperation is not served by rex")

    @unary
    async def WaitOperation(self, request: operations_pb2.WaitOperationRequest,
                            context: grpc.aio.ServicerContext) -> operations_pb2.Operation:
        hit = self.operations.hits.get(request.name)
        if hit is not None:
            return hit
        op = await self.operations.get(request.name)
        timeout = request.timeout.ToTimedelta().total_seconds() if request.HasField("timeout") else 30.0
        if not op.done:
            op = await self.operations.scheduler.wait(op.name, max(0.0, timeout))
        return await self.operations.proto(op)


def make_operations(backend: ReapiBackend) -> _Operations:
    return _Operations(backend)
