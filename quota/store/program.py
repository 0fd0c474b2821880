"""The program a store runs in one atomic step: every op is checked first, then all are applied.

Nothing is half-applied: if one check refuses, no op takes effect, save confirms (ConfirmOp), which
record what an upstream already answered and are applied first whatever the checks decide, so that
they can travel with a later program of the same app. Both stores run the same ops
with the same semantics (memory.py in Python, redis.py as one Lua script, lua/program.lua).
"""

from __future__ import annotations

from dataclasses import dataclass, field

UNLIMITED = -1
# Ops and outcomes are built on every request: value classes with slots, not frozen dataclasses,
# whose __init__ (one object.__setattr__ per field) costs about 1 µs an instance. Never mutated.


@dataclass(slots=True, unsafe_hash=True)
class RateOp:
    """A rate. sliding: floor(previous x weight) + current + cost must stay <= limit (two windows).
    exact: a log of hits; at most `limit` in any window [now - window_ms, now]."""

    key: str
    limit: int
    window_ms: int
    cost: int
    name: str
    exact: bool = False


@dataclass(slots=True, unsafe_hash=True)
class AddOp:
    """Add members to an owner's set, capped on the owner side and (optionally) on each member's side.

    The member side of member m is the set `reverse_prefix + escape(m)`, which gains `reverse_value`.
    With `pending_ttl_ms` the single member is a placeholder, reserved until bound or expired.
    With `inflight_key`, each member this request adds is claimed for `claim_ttl_ms` under its pair
    (`fields`, parallel to members): a request that finds the member already there but still claimed
    (its adder has not been answered) claims it too. An undo drops one claim and removes the member
    only when no claim is left (`UndoOp`); a request that succeeds confirms it (`ConfirmOp`), a
    confirm that travels with the app's next program. With `expire_s` the owner set expires
    (activity sets).
    """

    limit: str
    owner_key: str
    cap: int
    members: tuple[str, ...]
    reverse_limit: str = ""
    reverse_prefix: str = ""
    reverse_cap: int = UNLIMITED
    reverse_value: str = ""
    pending_ttl_ms: int = 0
    inflight_key: str = ""
    fields: tuple[str, ...] = ()
    claim_ttl_ms: int = 0
    expire_s: int = 0
    # Tombstones of removals in flight refuse the add (kind "busy"): the pair's, the owner's set
    # ("xo:<owner>"), and each member's own set ("<member_drop>:<member>", xo or xm by relation).
    member_drop: str = "xm"


@dataclass(slots=True, unsafe_hash=True)
class ConfirmOp:
    """The upstream answered 2xx: this request's claims are settled (the members stand on their own).
    Applied before the program's checks, even when one refuses."""

    inflight_key: str
    fields: tuple[str, ...]


@dataclass(slots=True, unsafe_hash=True)
class TombstoneOp:
    """A removal is in flight: until it settles, adds of what it removes are refused, so a late
    removal can never erase an add that happened after the upstream removed (fields in inflight_key,
    counted, each with a deadline in inflight_key:due, renewed while the request lives)."""

    inflight_key: str
    fields: tuple[str, ...]
    ttl_ms: int
    symmetric: bool = False


@dataclass(slots=True, unsafe_hash=True)
class ClearOp:
    """The removal settled (either way): its tombstones go."""

    inflight_key: str
    fields: tuple[str, ...]


@dataclass(slots=True, unsafe_hash=True)
class UndoOp:
    """The upstream failed: drop this request's claims; a member no claim holds any more is removed.
    A claim that lapsed meanwhile keeps its member (it may be real; reconcile settles drift).
    Without `inflight_key` (a create's placeholder) the members are removed outright."""

    owner_key: str
    members: tuple[str, ...]
    fields: tuple[str, ...] = ()
    reverse_prefix: str = ""
    reverse_value: str = ""
    inflight_key: str = ""


@dataclass(slots=True, unsafe_hash=True)
class RemoveOp:
    owner_key: str
    members: tuple[str, ...]
    reverse_prefix: str = ""
    reverse_value: str = ""


@dataclass(slots=True, unsafe_hash=True)
class DropOp:
    """Delete an owner's set in O(1): it is moved to `trash_key`, which DrainOps then empty in slices
    (removing `value` from each member's other-side set), so no script runs long on a huge room."""

    owner_key: str
    reverse_prefix: str
    value: str
    trash_key: str


@dataclass(slots=True, unsafe_hash=True)
class DrainOp:
    """Take up to `batch` members out of a dropped set; the outcome's `remaining` says how many are left.
    A slice costs Redis about 3 us a member (SPOP, escape, SREM): 200 keep each script near 0.6 ms
    (at most about 1.3 ms measured), well under a 5 ms slowlog even on a busy host."""

    trash_key: str
    reverse_prefix: str
    value: str
    batch: int = 200


@dataclass(slots=True, unsafe_hash=True)
class BindOp:
    """Bind a create's placeholder to the id the upstream answered. The id is counted even if the
    placeholder expired meanwhile: the upstream created it. With member == placeholder the
    reservation just becomes permanent (a 2xx whose id could not be read still counts)."""

    owner_key: str
    placeholder: str
    member: str


@dataclass(slots=True, unsafe_hash=True)
class RenewOp:
    """Push the deadline of live reservations (sorted-set members) to now + ttl; expired ones stay gone."""

    key: str
    members: tuple[str, ...]
    ttl_ms: int


@dataclass(slots=True, unsafe_hash=True)
class LeaseOp:
    """Hold (or renew) a connection lease that expires unless renewed: a killed worker leaks nothing.

    The cap is `cap`, or with share_bp > 0: max(cap, share_bp/10000 x max(MAU last month, this month)).
    """

    online_key: str
    peak_key: str
    month: str
    conn: str
    ttl_ms: int
    cap: int
    share_bp: int = 0
    mau_last_key: str = ""
    mau_this_key: str = ""


@dataclass(slots=True, unsafe_hash=True)
class ReleaseOp:
    """Release a connection lease."""

    online_key: str
    conn: str


Op = (
    RateOp
    | AddOp
    | UndoOp
    | ConfirmOp
    | TombstoneOp
    | ClearOp
    | RemoveOp
    | DropOp
    | DrainOp
    | BindOp
    | RenewOp
    | LeaseOp
    | ReleaseOp
)


@dataclass(slots=True, unsafe_hash=True)
class RateState:
    name: str
    limit: int
    remaining: int
    reset_ms: int


@dataclass(slots=True, unsafe_hash=True)
class Refusal:
    """Why a program was refused. kind: rate, owner, member, busy, online."""

    op_index: int
    kind: str
    used: int
    cap: int
    # rate: milliseconds until a retry can pass; owner: room left; member: the member over its cap.
    retry_after_ms: int = 0
    reset_ms: int = 0
    room: int = 0
    who: str = ""


@dataclass(slots=True, unsafe_hash=True)
class Outcome:
    refusal: Refusal | None = None
    rates: tuple[RateState, ...] = ()
    # For each AddOp, in order: the members it really added (undo removes exactly these).
    added: tuple[tuple[str, ...], ...] = ()
    # For each AddOp, in order: the owner set's size once applied (for near-limit metrics).
    sizes: tuple[int, ...] = ()
    online: int = 0
    # DrainOp: members still in the dropped set.
    remaining: int = 0
    # The store did not answer and the outage policy let the request through unchecked.
    unchecked: bool = False

    @property
    def allowed(self) -> bool:
        return self.refusal is None


@dataclass
class Program:
    ops: list[Op] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.ops)

    def route_key(self) -> str:
        """A key of the program's app (its first op's), to route it by: all share one hash tag."""
        op = self.ops[0]
        for attr in ("key", "owner_key", "inflight_key", "trash_key", "dau_key", "online_key"):
            if hasattr(op, attr):
                return str(getattr(op, attr))
        raise TypeError(op)

    def app_prefix(self) -> str:
        """`q:{org#app}:` of the program's keys."""
        key = self.route_key()
        return key[: key.find("}:") + 2]


def sliding_window(prev: int, cur: int, elapsed_ms: int, window_ms: int) -> int:
    """The weighted count of a sliding-window counter, in integers so both stores agree exactly."""
    return prev * (window_ms - elapsed_ms) // window_ms + cur


def retry_after_ms(prev: int, cur: int, elapsed_ms: int, window_ms: int, limit: int, cost: int) -> int:
    """How long until `cost` more would fit, if nothing else is counted meanwhile (exact, by bisection)."""
    if cost > limit:
        return 2 * window_ms

    def fits(t: int) -> bool:
        e = elapsed_ms + t
        if e < window_ms:
            return sliding_window(prev, cur, e, window_ms) + cost <= limit
        e -= window_ms
        if e < window_ms:
            return sliding_window(cur, 0, e, window_ms) + cost <= limit
        return True

    lo, hi = 0, 2 * window_ms
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid + 1
    return max(1, lo)


def log_retry_ms(hits: list[int], now_ms: int, window_ms: int, limit: int, cost: int) -> int:
    """Exact log: how long until `cost` more fit. `hits` are the live timestamps, oldest first.
    A hit at t counts while now <= t + window_ms (the window is closed at both ends)."""
    if cost > limit:
        return 2 * window_ms
    over = len(hits) + cost - limit
    if over <= 0:
        return 0
    return max(1, hits[over - 1] + window_ms + 1 - now_ms)
