"""Requests the server makes for submitters (callback_url): never into the host or its private networks.

Two checks. `url_problem` rejects what no callback URL needs (other schemes, user info, control
characters) and is cheap enough to run at submission time. `GuardedResolver` filters every address a
name resolves to, at connect time, so a name that resolves (or re-resolves, DNS rebinding) to loopback,
private, link-local, multicast, ... addresses is refused before any packet is sent. The operator opens
networks with `callback_allowed_networks`.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from tornado.netutil import Resolver

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# What an address is, for the refusal message; the first match wins.
_FORBIDDEN: list[tuple[str, list[str]]] = [
    ("unspecified", ["0.0.0.0/8", "::/128"]),
    ("loopback", ["127.0.0.0/8", "::1/128"]),
    ("private", ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"]),
    ("shared (CGNAT)", ["100.64.0.0/10"]),
    ("link-local", ["169.254.0.0/16", "fe80::/10"]),
    ("site-local", ["fec0::/10"]),
    ("multicast", ["224.0.0.0/4", "ff00::/8"]),
    ("reserved", ["240.0.0.0/4", "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "198.18.0.0/15",
                  "198.51.100.0/24", "203.0.113.0/24", "::/8", "100::/64", "2001::/23", "2001:db8::/32",
                  "64:ff9b:1::/48"]),
]
FORBIDDEN = [(kind, [ipaddress.ip_network(net) for net in nets]) for kind, nets in _FORBIDDEN]
NAT64 = ipaddress.ip_network("64:ff9b::/96")


class RefusedDestination(Exception):
    """A callback that must not be sent (not retried: trying again cannot make it allowed)."""


def parse_networks(networks: Iterable[str]) -> list[IPNetwork]:
    """The operator's allow-list; a bad entry is an error at start, naming the entry."""
    parsed = []
    for net in networks:
        try:
            parsed.append(ipaddress.ip_network(net, strict=False))
        except ValueError as exc:
            raise ValueError(f"callback_allowed_networks: {net!r} is not a network ({exc})") from None
    return parsed


def embedded_ipv4(addr: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (IPv4-mapped, NAT64 64:ff9b::/96, 6to4), if any."""
    if addr.version != 6:
        return None
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr in NAT64:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return addr.sixtofour


def refusal(addr: IPAddress, allowed: list[IPNetwork]) -> str | None:
    """Why `addr` may not be contacted for a submitter, or None when it may."""
    target = embedded_ipv4(addr) or addr
    if any(a in net for a in (addr, target) for net in allowed):
        return None
    shown = str(addr) if target is addr else f"{addr} (= {target})"
    for kind, nets in FORBIDDEN:
        if any(target in net for net in nets):
            return f"{kind} address {shown}"
    if not target.is_global or target.is_reserved or target.is_multicast:  # the stdlib's tables as backstop
        return f"non-global address {shown}"
    return None


def url_problem(url: str) -> str | None:
    """What is wrong with a callback URL before any lookup, or None. IP literals are left to the resolver."""
    if any(not c.isprintable() or c.isspace() for c in url):
        return "must not contain control characters or spaces"
    try:
        parts = urlsplit(url)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        valid = False
    if not valid:
        return "must be an http(s) URL"
    if "@" in parts.netloc:
        return "must not contain a user name or password"
    return None


def literal_refusal(url: str, allowed: list[IPNetwork]) -> str | None:
    """For a URL whose host is an IP literal: why that address is refused (no lookup), else None."""
    try:
        addr = ipaddress.ip_address(urlsplit(url).hostname or "")
    except ValueError:
        return None
    return refusal(addr, allowed)


class GuardedResolver(Resolver):
    """Wraps a resolver (the default one unless given) and drops every address `refusal` refuses.
    Raises RefusedDestination when none is left, so the HTTP client never connects."""

    def initialize(self, allowed: list[IPNetwork], resolver: Resolver | None = None) -> None:  # type: ignore[override]
        self.allowed = allowed
        self.resolver = resolver or Resolver()

    def close(self) -> None:
        self.resolver.close()

    async def resolve(self, host: str, port: int,
                      family: socket.AddressFamily = socket.AF_UNSPEC) -> list[tuple[int, Any]]:
        kept, refused = [], []
        for fam, sockaddr in await self.resolver.resolve(host, port, family):
            try:
                why = refusal(ipaddress.ip_address(sockaddr[0]), self.allowed)
            except ValueError:
                why = f"unparsable address {sockaddr[0]!r}"
            if why is None:
                kept.append((fam, sockaddr))
            elif why not in refused:
                refused.append(why)
        if not kept:
            raise RefusedDestination(f"{host!r} resolves only to " + ", ".join(refused or ["nothing"]))
        return kept
