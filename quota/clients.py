"""Who the client is: its address, from X-Forwarded-For only behind a trusted proxy, and its rate key.

quota's `trusted_proxies` is the one authority: every X-Forwarded-For line is read (a client can
send its own line before a proxy appends another), hops may carry ports (`1.2.3.4:5678`,
`[2001:db8::1]:443`), and the list is walked from the right past trusted hops; the first hop that is
not a trusted proxy is the client. Servers must not rewrite the peer address themselves (`quota
serve` turns uvicorn's proxy headers off). A server on a unix socket names no peer: its requests
share one address ("") unless `unix` is among the trusted proxies, when the proxy in front of it
(nginx, say) is trusted like any other and X-Forwarded-For is walked the same way. IPv6 clients
are keyed by their network (/64 by default): one host holds a whole /64 and could otherwise take a
fresh budget per address.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
# Peers seen by one process: a bounded cache, so trust is decided once per peer, not per request.
PEER_CACHE = 4096


def parse_hop(hop: str) -> Address | None:
    """An address from one hop: bare, `v4:port`, `[v6]` or `[v6]:port`."""
    hop = hop.strip()
    if hop.startswith("["):
        host, sep, rest = hop[1:].partition("]")
        if not sep or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
        hop = host
    elif hop.count(":") == 1:
        host, _, port = hop.partition(":")
        if not port.isdigit():
            return None
        hop = host
    try:
        addr = ipaddress.ip_address(hop)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


class ClientAddress:
    def __init__(self, trusted: tuple[Network, ...], ipv6_prefix: int = 64, unix: bool = False) -> None:
        self.trusted = trusted
        self.ipv6_prefix = ipv6_prefix
        self.unix = unix
        self._peers: dict[str, bool] = {}
        self._spelled: dict[str, str] = {}
        self._key = lru_cache(maxsize=PEER_CACHE)(self._rate_key)

    def _is_trusted(self, addr: Address) -> bool:
        return any(addr in net for net in self.trusted)

    def _peer_trusted(self, peer: str) -> bool:
        known = self._peers.get(peer)
        if known is None:
            addr = parse_hop(peer)
            known = addr is not None and self._is_trusted(addr)
            if len(self._peers) >= PEER_CACHE:
                self._peers.clear()
            self._peers[peer] = known
        return known

    def address(self, scope: dict[str, Any]) -> str:
        """The client's address as text (the peer's, unless a trusted proxy forwarded the request)."""
        client = scope.get("client")
        peer = self._canonical(str(client[0])) if client else ""
        if not peer:
            if not self.unix:
                return peer
        elif not self.trusted or not self._peer_trusted(peer):
            return peer
        lines = [value for name, value in scope["headers"] if name == b"x-forwarded-for"]
        if not lines:
            return peer
        hops = [h for h in b",".join(lines).decode("latin-1").split(",") if h.strip()]
        for hop in reversed(hops):
            addr = parse_hop(hop)
            if addr is None:
                # A trusted proxy wrote something that is no address: trust stops here.
                return peer
            if not self._is_trusted(addr):
                return str(addr)
        first = parse_hop(hops[0]) if hops else None
        return str(first) if first is not None else peer

    def _canonical(self, peer: str) -> str:
        # One spelling per address (an IPv4-mapped IPv6 peer is its IPv4 address), so allowlists,
        # trust and rate keys agree on who it is.
        known = self._spelled.get(peer)
        if known is None:
            addr = parse_hop(peer)
            known = str(addr) if addr is not None else peer[:64]
            if len(self._spelled) >= PEER_CACHE:
                self._spelled.clear()
            self._spelled[peer] = known
        return known

    def key(self, address: str) -> str:
        """The rate key of an address: itself for IPv4, its network for IPv6."""
        return str(self._key(address))

    def _rate_key(self, address: str) -> str:
        addr = parse_hop(address)
        if isinstance(addr, ipaddress.IPv6Address):
            return str(ipaddress.IPv6Network((addr, self.ipv6_prefix), strict=False))
        return str(addr) if addr is not None else address[:64]
