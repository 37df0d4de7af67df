"""The ``reapi`` protocol adapter: one grpc.aio server with every REAPI service on it."""

from __future__ import annotations

import logging

import grpc
from google.longrunning import operations_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rex_reapi.action_cache import ActionCacheService
from rex_reapi.backend import ReapiBackend
from rex_reapi.cas import ByteStreamService, CapabilitiesService, CasService
from rex_reapi.execution import ExecutionService, OperationsService, make_operations
from rex_reapi.options import ReapiOptions
from rex_reapi.proto import bytestream_pb2, remote_execution_pb2
from rex_reapi.proto import remote_execution_pb2_grpc as re_grpc
from rex_reapi.security import ReapiSecurityError, TokenInterceptor, server_credentials
from rex_reapi.wire import MalformedMessageError, WriteChunk, decode_write_request
from rexcore.config.types import parse_host_port
from rexcore.core.runtime import ServiceRuntime
from rexcore.plugins.descriptors import ComponentContext
from rexcore.protocol.auth import TokenFileError, is_loopback, load_tokens

__all__ = ["ReapiProtocol", "ReapiProtocolError", "create_reapi_protocol"]

log = logging.getLogger("rex_reapi")

#: Headroom over max_batch_total_size for a batch request's framing (digests, statuses).
_MESSAGE_SLACK = 1 << 20


class ReapiProtocolError(ValueError):
    """The REAPI server is misconfigured (a malformed ``listen`` address, a TLS or token
    file that cannot be used)."""


def _service_names() -> list[str]:
    re_services = remote_execution_pb2.DESCRIPTOR.services_by_name
    names = [re_services[name].full_name for name in
             ("Execution", "ActionCache", "ContentAddressableStorage", "Capabilities")]
    names.append(bytestream_pb2.DESCRIPTOR.services_by_name["ByteStream"].full_name)
    names.append("google.longrunning.Operations")
    return names


def _write_request(raw: bytes) -> WriteChunk | MalformedMessageError:
    # Returned, not raised: grpc.aio would end the call UNKNOWN; the Write handler answers
    # INVALID_ARGUMENT, naming the upload.
    try:
        return decode_write_request(raw)
    except MalformedMessageError as exc:
        return exc


def _add_bytestream(servicer: ByteStreamService, server: grpc.aio.Server) -> None:
    """ByteStream as the generated code would register it, except for the payloads
    (``wire``): Write's requests are decoded by hand, their data a view of the received
    bytes, and Read's responses arrive already serialized. The chunks are the bulk of
    every transfer and are copied less so."""
    handlers = {
        "Read": grpc.unary_stream_rpc_method_handler(
            servicer.Read, request_deserializer=bytestream_pb2.ReadRequest.FromString,
            response_serializer=bytes),
        "Write": grpc.stream_unary_rpc_method_handler(
            servicer.Write, request_deserializer=_write_request,
            response_serializer=bytestream_pb2.WriteResponse.SerializeToString),
        "QueryWriteStatus": grpc.unary_unary_rpc_method_handler(
            servicer.QueryWriteStatus,
            request_deserializer=bytestream_pb2.QueryWriteStatusRequest.FromString,
            response_serializer=bytestream_pb2.QueryWriteStatusResponse.SerializeToString),
    }
    name = bytestream_pb2.DESCRIPTOR.services_by_name["ByteStream"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))


class ReapiProtocol:
    """``await start()`` listens, ``await stop()`` drains in-flight calls then stops."""

    def __init__(self, options: ReapiOptions, context: ComponentContext,
                 runtime: ServiceRuntime) -> None:
        try:
            self._host, self._port = parse_host_port(options.listen)
        except ValueError as exc:
            raise ReapiProtocolError(f"REAPI: bad listen address: {exc}") from None
        self.options = options
        self.runtime = runtime
        try:
            self._credentials = server_credentials(
                options.tls_certificate, options.tls_key, options.tls_client_ca)
            self._tokens = (load_tokens(options.auth_tokens_file)
                            if options.auth_tokens_file else frozenset())
        except ReapiSecurityError as exc:
            raise ReapiProtocolError(str(exc)) from None
        except TokenFileError as exc:
            raise ReapiProtocolError(f"REAPI: {exc}") from None
        self.scheme = "grpcs" if self._credentials is not None else "grpc"
        self._server: grpc.aio.Server | None = None
        self._bytestream: ByteStreamService | None = None
        self._health: health.aio.HealthServicer | None = None
        self._bound_port = 0

    async def start(self) -> None:
        """Listen and serve; raises OSError when the address cannot be bound."""
        if self._server is not None:
            return
        backend = ReapiBackend(self.runtime, self.options)
        await backend.cache.open()
        limit = self.options.max_batch_total_size + _MESSAGE_SLACK
        interceptors = [TokenInterceptor(self._tokens)] if self._tokens else []
        server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
        ])
        operations = make_operations(backend)
        self._bytestream = ByteStreamService(backend)
        re_grpc.add_CapabilitiesServicer_to_server(CapabilitiesService(backend), server)
        re_grpc.add_ContentAddressableStorageServicer_to_server(CasService(backend), server)
        re_grpc.add_ActionCacheServicer_to_server(ActionCacheService(backend), server)
        re_grpc.add_ExecutionServicer_to_server(ExecutionService(backend, operations), server)
        operations_pb2_grpc.add_OperationsServicer_to_server(OperationsService(operations), server)
        _add_bytestream(self._bytestream, server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        names = _service_names()
        reflection.enable_server_reflection(
            [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        host = f"[{self._host}]" if ":" in self._host else self._host
        try:
            address = f"{host}:{self._port}"
            self._bound_port = (server.add_insecure_port(address) if self._credentials is None
                                else server.add_secure_port(address, self._credentials))
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {self.options.listen}: {exc}") from None
        if not self._bound_port:
            raise OSError(f"cannot listen on {self.options.listen}: address in use or invalid")
        await server.start()
        for name in ["", *names]:
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._server = server
        log.info("REAPI listening on %s (%s)", ", ".join(self.addresses), self._security())
        if not self._tokens and not self.options.tls_client_ca and not is_loopback(self._host):
            log.warning(
                "REAPI listens on %s with no client authentication: anyone who can reach "
                "it can run commands on the workers and write the cache. Set "
                "[protocols.reapi] auth_tokens_file or tls_client_ca, or listen on "
                "127.0.0.1", self.options.listen)

    def _security(self) -> str:
        parts = ["TLS" if self._credentials is not None else "plain text"]
        if self.options.tls_client_ca:
            parts.append("client certificates required")
        if self._tokens:
            parts.append(f"bearer tokens required ({len(self._tokens)} known)")
        return ", ".join(parts)

    async def stop(self) -> None:
        """Report NOT_SERVING, stop accepting calls, give running ones the grace period."""
        server, self._server = self._server, None
        if server is None:
            return
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        await server.stop(self.options.shutdown_grace_s)
        if self._bytestream is not None:
            await self._bytestream.close()

    @property
    def addresses(self) -> list[str]:
        if self._server is None:
            return []
        host = f"[{self._host}]" if ":" in self._host else self._host
        return [f"{host}:{self._bound_port}"]


def create_reapi_protocol(options: ReapiOptions, context: ComponentContext,
                          runtime: ServiceRuntime) -> ReapiProtocol:
    """The ``reapi`` protocol descriptor's factory."""
    return ReapiProtocol(options, context, runtime)
