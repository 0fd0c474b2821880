"""Which headers cross the proxy (RFC 9110 §7.6.1) and the X-Forwarded-* it sets."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from multidict import CIMultiDict

Networks = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]

# Connection-specific fields: they describe one hop, never the message (RFC 9110 §7.6.1). TE and
# Trailer are hop fields too; Proxy-* belong to the proxy the client talks to, which is us.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# The WebSocket handshake is made again on the upstream hop by the client library.
WEBSOCKET_HANDSHAKE = frozenset(
    {"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-accept"}
)
FORWARDED = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"})


def _named_by_connection(headers: Iterable[tuple[str, str]]) -> set[str]:
    # A sender may list more hop-by-hop fields in Connection; they go no further than this hop.
    named: set[str] = set()
    for name, value in headers:
        if name == "connection":
            named.update(token.strip().lower() for token in value.split(",") if token.strip())
    return named


def _decoded(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [(name.decode("latin-1").lower(), value.decode("latin-1")) for name, value in raw]


def upstream_request_headers(
    raw: Iterable[tuple[bytes, bytes]],
    *,
    peer: str,
    scheme: str,
    trusted: Networks,
    websocket: bool = False,
) -> CIMultiDict[str]:
    """The client's headers less hop-by-hop ones and Host, with X-Forwarded-For/Proto/Host set.

    Forwarding headers a client sent are kept (and For is appended to) only when its peer address is
    one of quota's trusted proxies; from anyone else they are replaced, so a client cannot forge
    the address the gateway sees.
    """
    headers = _decoded(raw)
    dropped = HOP_BY_HOP | _named_by_connection(headers) | (WEBSOCKET_HANDSHAKE if websocket else frozenset())
    trusted_peer = bool(trusted) and _within(peer, trusted)
    out: CIMultiDict[str] = CIMultiDict()
    given: dict[str, str] = {}
    host = ""
    for name, value in headers:
        if name == "host":
            host = value
        elif name in FORWARDED:
            given[name] = f"{given[name]}, {value}" if name in given else value
        elif name not in dropped:
            out.add(name, value)
    chain = given.get("x-forwarded-for", "") if trusted_peer else ""
    out["X-Forwarded-For"] = f"{chain}, {peer}" if chain and peer else (chain or peer)
    out["X-Forwarded-Proto"] = given.get("x-forwarded-proto", scheme) if trusted_peer else scheme
    forwarded_host = given.get("x-forwarded-host", host) if trusted_peer else host
    if forwarded_host:
        out["X-Forwarded-Host"] = forwarded_host
    return out


def client_response_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The upstream's response headers less hop-by-hop ones, as ASGI wants them."""
    decoded = _decoded(headers)
    dropped = HOP_BY_HOP | _named_by_connection(decoded)
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in decoded if name not in dropped]


def _within(ip: str, networks: Networks) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr in net for net in networks)
