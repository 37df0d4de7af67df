"""Finding the coordinator: ``--coordinator``, ``$REX_COORDINATOR``, or a DNS SRV record.

A worker (or any client) names its coordinator by URL; where hosts come and go (a
Kubernetes Service, a fleet behind internal DNS) it can name an SRV record instead:
``srv:_rex._tcp.build.example.com``, or nothing at all, in which case ``_rex._tcp`` is
looked up in each of the resolver's search domains (``/etc/resolv.conf``). The record's
target and port become ``http://TARGET:PORT``; among several records the lowest priority
wins, and equal priorities are picked at random by weight (RFC 2782).
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence

__all__ = ["SRV_NAME", "CoordinatorNotFoundError", "discover_coordinator", "pick_srv_target"]

#: The SRV service label rex publishes and looks up.
SRV_NAME = "_rex._tcp"
SRV_PREFIX = "srv:"


class CoordinatorNotFoundError(Exception):
    """No coordinator was named and none could be found in DNS."""


def pick_srv_target(records: Sequence[tuple[int, int, str, int]],
                    rng: random.Random | None = None) -> tuple[str, int]:
    """``(priority, weight, target, port)`` records to the one to use: lowest priority,
    then a weighted random choice (weight 0 only when all are 0)."""
    if not records:
        raise CoordinatorNotFoundError("the SRV record set is empty")
    best = min(priority for priority, *_ in records)
    candidates = [r for r in records if r[0] == best]
    total = sum(weight for _, weight, *_ in candidates)
    chooser = rng or random.Random()
    if total == 0:
        _, _, target, port = chooser.choice(candidates)
        return target, port
    point = chooser.uniform(0, total)
    for _, weight, target, port in candidates:
        point -= weight
        if point <= 0:
            return target, port
    return candidates[-1][2], candidates[-1][3]


def _resolver(dns_server: str | None):  # noqa: ANN202 - dnspython is imported lazily
    import dns.resolver

    if not dns_server:
        return dns.resolver.Resolver()
    from rexcore.config.types import parse_host_port

    host, port = parse_host_port(dns_server if ":" in dns_server else f"{dns_server}:53")
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [host]
    resolver.port = port
    return resolver


def _lookup(name: str | None, dns_server: str | None) -> str:
    import dns.exception
    import dns.resolver

    resolver = _resolver(dns_server)
    resolver.lifetime = 5.0
    query = name or SRV_NAME
    try:
        answer = resolver.resolve(query, "SRV", search=name is None)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.NoNameservers,
            dns.exception.Timeout) as exc:
        where = (f"SRV record {name}" if name else
                 f"SRV record {SRV_NAME} in the search domains "
                 f"({', '.join(str(d) for d in resolver.search) or 'none configured'})")
        raise CoordinatorNotFoundError(f"no coordinator: {where} not found ({exc})") from None
    records = [(r.priority, r.weight, r.target.to_text(omit_final_dot=True), r.port)
               for r in answer]
    target, port = pick_srv_target(records)
    host = f"[{target}]" if ":" in target else target
    return f"http://{host}:{port}"


def discover_coordinator(explicit: str | None = None, *, dns_server: str | None = None,
                         environ: dict[str, str] | None = None) -> str:
    """The coordinator's URL (or ``host:port``) from, in order: ``explicit``,
    ``$REX_COORDINATOR``, the ``_rex._tcp`` SRV record of the search domains. A value
    ``srv:NAME`` is looked up as that SRV record. Raises :class:`CoordinatorNotFoundError`."""
    value = explicit or (environ if environ is not None else os.environ).get("REX_COORDINATOR")
    if value and not value.startswith(SRV_PREFIX):
        return value
    name = value[len(SRV_PREFIX):] if value else None
    try:
        return _lookup(name, dns_server)
    except CoordinatorNotFoundError as exc:
        if value:
            raise
        raise CoordinatorNotFoundError(
            f"{exc}; pass --coordinator URL, set REX_COORDINATOR, or publish an SRV record "
            f"{SRV_NAME}.<domain> naming the coordinator's native HTTP port"
        ) from None
