"""Storage keys. Every key of an app starts with `q:{org#app}:`, a Redis Cluster hash tag, so that
one script can touch all of them; every value from a URL or a body is escaped before it is used.

    q:{org#app}:r:<route>:<rate>:<who>:<window>   a rate window (sliding-window counter)
    q:{org#app}:s:<relation>:<o|m>:<id>           a membership set (owner side / member side)
    q:{org#app}:s:...:pending                     reservations awaiting the id a create returns
    q:{org#app}:dau:<yyyymmdd>  :mau:<yyyymm>     users active on a day / in a month
    q:{org#app}:online   :peak                    connection leases (sorted set) / peak online per month
    q:{org#app}:s:<relation>:inflight             pairs added by requests still in flight (hash: claims)
    <set key>:dropped:<token>                     a deleted set, emptied in slices
"""

from __future__ import annotations

import hashlib
import re
from datetime import date
from functools import lru_cache

_UNSAFE = re.compile(rb"[^A-Za-z0-9_.\-]")


# Bounded small: its arguments include every client address a rate is keyed by (about 200 bytes an
# entry with the cache's own links), so a flood of distinct clients must not hold megabytes here.
@lru_cache(maxsize=1 << 12)
def escape(value: str) -> str:
    """Percent-encode every byte outside [A-Za-z0-9_.-]: braces, colons and '#' can't leak into a key.

    store/lua/program.lua carries the same function, for the keys a script derives itself.
    """
    raw = value.encode("utf-8", "surrogatepass")
    return _UNSAFE.sub(lambda m: b"%%%02X" % m.group()[0], raw).decode("ascii")


def app_prefix(appkey: str) -> str:
    org, _, app = appkey.partition("#")
    return "q:{" + escape(org) + "#" + escape(app) + "}:"


def signed_out_key(cookie: str) -> str:
    """Where a dashboard session signed out is marked until it would have expired: its cookie's
    SHA-256, so neither a client's bytes nor a session's secret names a key."""
    return "q:{dashboard}:out:" + hashlib.sha256(cookie.encode("utf-8", "surrogatepass")).hexdigest()


def set_key(prefix: str, relation: str, side: str, entity: str) -> str:
    return f"{prefix}s:{relation}:{side}:{escape(entity)}"


def side_prefix(prefix: str, relation: str, side: str) -> str:
    return f"{prefix}s:{relation}:{side}:"


def rate_key(prefix: str, route: str, rate: str, who: str) -> str:
    return f"{prefix}r:{route}:{escape(rate)}:{escape(who)}"


def dau_key(prefix: str, day: date) -> str:
    return f"{prefix}dau:{day:%Y%m%d}"


def mau_key(prefix: str, year: int, month: int) -> str:
    return f"{prefix}mau:{year:04d}{month:02d}"


def online_key(prefix: str) -> str:
    return prefix + "online"


def peak_key(prefix: str) -> str:
    return prefix + "peak"


def inflight_key(prefix: str, relation: str) -> str:
    """Pairs of a relation added by requests whose upstream has not answered yet (hash: pair -> claims)."""
    return f"{prefix}s:{relation}:inflight"


def pair_field(owner: str, member: str, symmetric: bool) -> str:
    # A symmetric pair (a friendship) is one field whichever side added it.
    a, b = escape(owner), escape(member)
    return f"{min(a, b)}|{max(a, b)}" if symmetric else f"{a}|{b}"


def names(field: str, entity: str, owner: bool, member: bool) -> bool:
    """Whether a field of a claims hash names the escaped `entity` on a side that holds its kind
    (`owner`, `member`: a group's id may be spelled as a user's): a pair `owner|member` (a
    friendship's either way), a removal's `rm:owner|member`, a dropped set's `xo:owner` or
    `xm:member`, a login's `dau:yyyymmdd|user` (a member). Escaped ids hold no `|`."""
    kind = field[:3]
    if kind == "xo:":
        return owner and field[3:] == entity
    if kind == "xm:":
        return member and field[3:] == entity
    left, _, right = (field[3:] if kind == "rm:" else field).partition("|")
    return (owner and left == entity) or (member and right == entity)


def trash_key(owner_key: str, token: str) -> str:
    return f"{owner_key}:dropped:{token}"
