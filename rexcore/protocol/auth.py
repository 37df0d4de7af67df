"""Bearer tokens, the shared secret clients present to a rex server, and the checks
both servers share (a TLS certificate and key set together, what counts as loopback).

A protocol with an ``auth_tokens_file`` (the native HTTP API, rex-reapi's gRPC server)
reads it once at start: one token per line, blank lines and ``#`` comments skipped. A
request passes when it carries ``Authorization: Bearer <token>`` for one of them.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable
from pathlib import Path

__all__ = ["BearerTokens", "TokenFileError", "is_loopback", "load_tokens", "tls_configured"]


class TokenFileError(ValueError):
    """A token file that cannot be used; the message names the option and the cause."""


def load_tokens(path: str, option: str = "auth_tokens_file") -> frozenset[str]:
    """The tokens in ``path`` (see the module docstring); TokenFileError if none."""
    try:
        text = Path(path).expanduser().read_text()
    except (OSError, UnicodeDecodeError) as exc:
        cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise TokenFileError(f"cannot read {option} {path}: {cause}") from None
    tokens = frozenset(line.strip() for line in text.splitlines()
                       if line.strip() and not line.lstrip().startswith("#"))
    if not tokens:
        raise TokenFileError(f"{option} {path} holds no token (one per line; blank lines and "
                             "# comments are skipped)")
    return tokens


class BearerTokens:
    """The tokens a server accepts; :meth:`accepts` checks an ``Authorization`` value."""

    def __init__(self, tokens: Iterable[str]) -> None:
        self._tokens = [token.encode() for token in tokens if token]
        if not self._tokens:
            raise ValueError("BearerTokens needs at least one token")

    def __len__(self) -> int:
        return len(self._tokens)

    def accepts(self, header: str | bytes | None) -> bool:
        if not header:
            return False
        text = header.decode(errors="replace") if isinstance(header, bytes) else header
        scheme, _, presented = text.strip().partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return False
        candidate = presented.strip().encode()
        # Compared with every token, so the time taken does not tell which one matched.
        return sum(hmac.compare_digest(candidate, token) for token in self._tokens) > 0


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address, or ``localhost``) is this host's loopback: what a
    server listening there, or a peer connecting from there, leaves to this host."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def tls_configured(certificate: str, key: str) -> bool:
    """Whether a server's ``tls_certificate`` and ``tls_key`` ask for TLS; ValueError
    when only one of the two is set."""
    if bool(certificate) != bool(key):
        missing = "tls_key" if certificate else "tls_certificate"
        raise ValueError(f"TLS needs both tls_certificate and tls_key; {missing} is not set")
    return bool(certificate)
