"""TLS and bearer tokens for the REAPI server.

``tls_certificate`` and ``tls_key`` make the server speak TLS (``grpcs://``; Bazel:
``--tls_certificate=CA.pem`` when the certificate is not signed by a CA the client
trusts); ``tls_client_ca`` adds mutual TLS: a client must present a certificate signed
by that CA (Bazel: ``--tls_client_certificate`` and ``--tls_client_key``).
``auth_tokens_file`` requires every call to carry ``authorization: Bearer <token>`` with
one of the tokens in that file (Bazel: ``--remote_header=Authorization=Bearer <token>``);
a call without one ends UNAUTHENTICATED before any handler runs. Health checks stay open
so that a load balancer can probe the server.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from rexcore.protocol import auth

__all__ = ["ReapiSecurityError", "TokenInterceptor", "server_credentials"]

#: Methods any caller may use: health probes.
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})


class ReapiSecurityError(Exception):
    """A TLS or token file that cannot be used; the message says which and why."""


def _read(path: str, what: str) -> bytes:
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ReapiSecurityError(f"REAPI: cannot read the {what} {path}: "
                                 f"{exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise ReapiSecurityError(f"REAPI: the {what} {path} is not PEM (no '-----BEGIN' line)")
    return data


def server_credentials(certificate: str, key: str, client_ca: str) -> grpc.ServerCredentials | None:
    """The server's TLS credentials, or None for plain text (no certificate)."""
    try:
        tls = auth.tls_configured(certificate, key)
    except ValueError as exc:
        raise ReapiSecurityError(f"REAPI: {exc}") from None
    if not tls:
        if client_ca:
            raise ReapiSecurityError("REAPI: tls_client_ca needs tls_certificate and tls_key "
                                     "(mutual TLS is TLS first)")
        return None
    chain = _read(certificate, "TLS certificate (tls_certificate)")
    private = _read(key, "TLS private key (tls_key)")
    roots = _read(client_ca, "client CA (tls_client_ca)") if client_ca else None
    return grpc.ssl_server_credentials([(private, chain)], root_certificates=roots,
                                       require_client_auth=roots is not None)


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that ends the call UNAUTHENTICATED."""
    async def refuse(context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await refuse(context)

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await refuse(context)
        yield  # pragma: no cover - abort raises

    codec = {"request_deserializer": handler.request_deserializer,
             "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming, **codec)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **codec)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming, **codec)
    return grpc.unary_unary_rpc_method_handler(unary, **codec)


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through only with ``authorization: Bearer <token>`` for a known token."""

    def __init__(self, tokens: frozenset[str]) -> None:
        self._tokens = auth.BearerTokens(tokens)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method in OPEN_METHODS:
            return handler
        headers = [value for key, value in details.invocation_metadata or ()
                   if key == "authorization"]
        if any(self._tokens.accepts(value) for value in headers):
            return handler
        why = ("a wrong token in its authorization header" if headers
               else "no authorization header")
        return _refusal(handler, f"this REAPI server requires 'authorization: Bearer "
                                 f"<token>' (Bazel: --remote_header=Authorization=Bearer "
                                 f"<token>); the call had {why}")
