"""The entry point of rex-reapi: registers the ``reapi`` protocol."""

from __future__ import annotations

from collections.abc import Iterator

from rexcore import hookimpl
from rexcore.plugins.descriptors import CliOption, ProtocolDescriptor

__all__ = ["rexcore_protocols"]


@hookimpl
def rexcore_protocols() -> Iterator[ProtocolDescriptor]:
    from rex_reapi.options import ReapiOptions
    from rex_reapi.server import create_reapi_protocol

    yield ProtocolDescriptor(
        name="reapi",
        factory=create_reapi_protocol,
        options_type=ReapiOptions,
        description="Bazel Remote Execution API v2 over gRPC (CAS, ByteStream, action cache, "
                    "execution, operations, health, reflection)",
        cli_options=(
            CliOption("--listen", "listen", "address of the REAPI gRPC server (default "
                      "127.0.0.1:8980)", metavar="HOST:PORT"),
        ),
    )
