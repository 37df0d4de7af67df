"""``[protocols.reapi]``: where the REAPI server listens and what it allows."""

from __future__ import annotations

import attrs

from rexcore.config.types import ByteSize, HostPort

__all__ = ["ReapiOptions"]


@attrs.frozen(kw_only=True)
class ReapiOptions:
    """Options of the ``reapi`` protocol (``[protocols.reapi]`` in rexd.toml)."""

    #: Where to listen, ``host:port``; port 0 picks a free port.
    listen: HostPort = attrs.field(default=HostPort("127.0.0.1:8980"))
    #: The instance names clients may use; any other is refused with INVALID_ARGUMENT.
    instance_names: tuple[str, ...] = attrs.field(default=("",), converter=tuple)
    #: The most bytes one BatchUpdateBlobs or BatchReadBlobs may move (announced in
    #: Capabilities); larger transfers go through ByteStream.
    max_batch_total_size: ByteSize = attrs.field(
        default=ByteSize(4 << 20), validator=attrs.validators.gt(ByteSize(0))
    )
    #: Bytes per ByteStream.Read response message.
    read_chunk_size: ByteSize = attrs.field(
        default=ByteSize(1 << 20), validator=attrs.validators.gt(ByteSize(0))
    )
    #: Directories per GetTree page when the client asks for none (or more).
    max_tree_page_size: int = attrs.field(default=10_000, validator=attrs.validators.gt(0))
    #: Seconds between operation updates (stage QUEUED or EXECUTING) on an Execute or
    #: WaitExecution stream while the action waits or runs; completion is sent at once.
    update_interval_s: float = attrs.field(default=5.0, validator=attrs.validators.gt(0))
    #: Seconds in-flight calls get to finish on stop before they are cancelled.
    shutdown_grace_s: float = attrs.field(default=5.0, validator=attrs.validators.ge(0))
    #: PEM certificate chain: with ``tls_key``, the server speaks TLS (``grpcs://``).
    tls_certificate: str = ""
    #: PEM private key of ``tls_certificate``.
    tls_key: str = attrs.field(default="", repr=False)
    #: PEM CA bundle: clients must present a certificate it signed (mutual TLS).
    tls_client_ca: str = ""
    #: File of bearer tokens, one per line: every call must carry ``authorization: Bearer
    #: <token>`` with one of them (health checks excepted). Empty: no token is asked for.
    auth_tokens_file: str = ""
    #: Largest stdout/stderr inlined into a result when the client asks for it.
    max_inline_size: ByteSize = attrs.field(
        default=ByteSize(1 << 20), validator=attrs.validators.ge(ByteSize(0))
    )
