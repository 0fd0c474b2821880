"""Which headers cross the proxy (RFC 9110 §7.6.1) and the X-Forwarded-* it sets. Headers stay the
raw (lowercase name, value) byte pairs ASGI and the upstream connection both use."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Networks = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
Headers = list[tuple[bytes, bytes]]

# Connection-specific fields: they describe one hop, never the message (RFC 9110 §7.6.1). TE and
# Trailer are hop fields too; Proxy-* belong to the proxy the client talks to, which is us.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Not forwarded either: Host is the upstream's (the client's goes in X-Forwarded-Host); the ASGI
# server answers `Expect: 100-continue` itself, so the upstream must not send a second 100.
REQUEST_ONLY = frozenset({b"host", b"expect", b"content-length"})
# The WebSocket handshake is made again on the upstream hop by the client library.
WEBSOCKET_HANDSHAKE = frozenset(
    {b"sec-websocket-key", b"sec-websocket-version", b"sec-websocket-extensions", b"sec-websocket-protocol"}
)
# A method other than the request's: quota checked the request's own (a POST add), and a gateway
# framework honouring one of these (Express, Jersey, Rails) would do another (a DELETE, unchecked).
METHOD_OVERRIDES = frozenset({b"x-http-method-override", b"x-http-method", b"x-method-override"})
FORWARDED = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"})
# Other ways a request names its client or its way in (RFC 7239 and the common de facto ones):
# kept only from a trusted proxy, like X-Forwarded-*, so nobody else can choose what a gateway
# that reads them sees. Any other X-Forwarded-* (Port, Prefix, Server...) goes the same way.
CLIENT_CLAIMS = frozenset({b"forwarded", b"x-real-ip", b"true-client-ip", b"x-client-ip", b"x-original-forwarded-for"})


# Fields of the message itself that quota's checks read: its body's type, coding and length, its
# host, its credentials. A Connection naming one would have this hop drop it (RFC 9110 §7.6.1 lets a
# sender name only fields of the hop), and the gateway read the message otherwise than quota did:
# Rack reads an untyped body as a form, fields quota never counted.
MESSAGE_FIELDS = frozenset({b"content-type", b"content-encoding", b"content-length", b"host", b"authorization"})


def connection_names_the_message(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """Why the request cannot cross as it is ("" when it can): its Connection names a field of
    the message, which this hop would have to drop."""
    named = _named_by_connection(headers) & MESSAGE_FIELDS
    if not named:
        return ""
    fields = ", ".join(sorted(name.decode("latin-1") for name in named))
    return f"Connection names {fields}: a field of the message, not of one hop (RFC 9110 §7.6.1)"


def _named_by_connection(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    # A sender may list more hop-by-hop fields in Connection; they go no further than this hop.
    named: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named.update(token.strip().lower() for token in value.split(b",") if token.strip())
    return named


def upstream_request_headers(
    raw: Iterable[tuple[bytes, bytes]],
    *,
    peer: str,
    scheme: str,
    trusted: Networks,
    websocket: bool = False,
) -> Headers:
    """The client's headers less hop-by-hop ones, Host, framing and method overrides, with
    X-Forwarded-For/Proto/Host.

    Forwarding headers a client sent (X-Forwarded-*, Forwarded, X-Real-IP and the like) are kept (and
    For is appended to) only when its peer address is one of quota's trusted proxies; from anyone
    else they are replaced or dropped, so a client cannot forge the address the gateway sees.
    Content-Length is left to the client that frames the body.
    """
    raw = list(raw)
    dropped = HOP_BY_HOP | REQUEST_ONLY | METHOD_OVERRIDES | (WEBSOCKET_HANDSHAKE if websocket else frozenset())
    if any(name == b"connection" for name, _ in raw):
        dropped = dropped | _named_by_connection(raw)
    trusted_peer = bool(trusted) and _within(peer, trusted)
    out: Headers = []
    given: dict[bytes, bytes] = {}
    host = b""
    for name, value in raw:
        if name == b"host":
            host = value
        elif name in FORWARDED:
            given[name] = given[name] + b", " + value if name in given else value
        elif not trusted_peer and (name in CLIENT_CLAIMS or name.startswith(b"x-forwarded-")):
            continue
        elif name not in dropped:
            out.append((name, value))
    address = peer.encode()
    chain = given.get(b"x-forwarded-for", b"") if trusted_peer else b""
    out.append((b"x-forwarded-for", chain + b", " + address if chain and address else (chain or address)))
    proto = scheme.encode()
    out.append((b"x-forwarded-proto", given.get(b"x-forwarded-proto", proto) if trusted_peer else proto))
    forwarded_host = given.get(b"x-forwarded-host", host) if trusted_peer else host
    if forwarded_host:
        out.append((b"x-forwarded-host", forwarded_host))
    return out


def client_response_headers(headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    """The upstream's response headers less hop-by-hop ones, lowercased as ASGI wants them."""
    lowered = [(name.lower(), value) for name, value in headers]
    dropped = HOP_BY_HOP | _named_by_connection(lowered)
    return [(name, value) for name, value in lowered if name not in dropped]


def _within(ip: str, networks: Networks) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr in net for net in networks)
