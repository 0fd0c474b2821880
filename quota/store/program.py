"""The program a store runs in one atomic step: every op is checked first, then all are applied.

Nothing is half-applied: if one check refuses, no op takes effect, save confirms (ConfirmOp), which
record what an upstream already answered and are applied first whatever the checks decide, so that
they can travel with a later program of the same app. Both stores run the same ops
with the same semantics (memory.py in Python, redis.py as one Lua script, lua/program.lua).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

UNLIMITED = -1
# Ops and outcomes are built on every request: value classes with slots, not frozen dataclasses,
# whose __init__ (one object.__setattr__ per field) costs about 1 µs an instance. Never mutated.
# Their __init__ is written out (init=False): the one dataclasses generates stays interpreted in
# the compiled build (about 250 ns a call, against 35 for a compiled one); dataclasses still gives
# them __eq__, __hash__ and __repr__. tests/store/test_programs.py holds each __init__ to its fields.


@dataclass(init=False, slots=True, unsafe_hash=True)
class RateOp:
    """A rate. sliding: floor(previous x weight) + current + cost must stay <= limit (two windows).
    exact: a log of hits; at most `limit` in any window [now - window_ms, now]."""

    key: str
    limit: int
    window_ms: int
    cost: int
    name: str
    exact: bool = False

    def __init__(self, key: str, limit: int, window_ms: int, cost: int, name: str, exact: bool = False) -> None:
        self.key = key
        self.limit = limit
        self.window_ms = window_ms
        self.cost = cost
        self.name = name
        self.exact = exact


@dataclass(init=False, slots=True, unsafe_hash=True)
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

    def __init__(
        self,
        limit: str,
        owner_key: str,
        cap: int,
        members: tuple[str, ...],
        reverse_limit: str = "",
        reverse_prefix: str = "",
        reverse_cap: int = UNLIMITED,
        reverse_value: str = "",
        pending_ttl_ms: int = 0,
        inflight_key: str = "",
        fields: tuple[str, ...] = (),
        claim_ttl_ms: int = 0,
        expire_s: int = 0,
        member_drop: str = "xm",
    ) -> None:
        self.limit = limit
        self.owner_key = owner_key
        self.cap = cap
        self.members = members
        self.reverse_limit = reverse_limit
        self.reverse_prefix = reverse_prefix
        self.reverse_cap = reverse_cap
        self.reverse_value = reverse_value
        self.pending_ttl_ms = pending_ttl_ms
        self.inflight_key = inflight_key
        self.fields = fields
        self.claim_ttl_ms = claim_ttl_ms
        self.expire_s = expire_s
        self.member_drop = member_drop


@dataclass(init=False, slots=True, unsafe_hash=True)
class ConfirmOp:
    """The upstream answered 2xx: this request's claims are settled (the members stand on their own).
    Applied before the program's checks, even when one refuses."""

    inflight_key: str
    fields: tuple[str, ...]

    def __init__(self, inflight_key: str, fields: tuple[str, ...]) -> None:
        self.inflight_key = inflight_key
        self.fields = fields


@dataclass(init=False, slots=True, unsafe_hash=True)
class TombstoneOp:
    """A removal is in flight: until it settles, adds of what it removes are refused, so a late
    removal can never erase an add that happened after the upstream removed (fields in inflight_key,
    counted, each with a deadline in inflight_key:due, renewed while the request lives). Unchecked,
    it is written whatever is in flight: a removal the upstream has already made, named only by its
    answer, marked as it is applied."""

    inflight_key: str
    fields: tuple[str, ...]
    ttl_ms: int
    symmetric: bool = False
    checked: bool = True

    def __init__(
        self, inflight_key: str, fields: tuple[str, ...], ttl_ms: int, symmetric: bool = False, checked: bool = True
    ) -> None:
        self.inflight_key = inflight_key
        self.fields = fields
        self.ttl_ms = ttl_ms
        self.symmetric = symmetric
        self.checked = checked


@dataclass(init=False, slots=True, unsafe_hash=True)
class ClearOp:
    """The removal settled (either way): its tombstones go."""

    inflight_key: str
    fields: tuple[str, ...]

    def __init__(self, inflight_key: str, fields: tuple[str, ...]) -> None:
        self.inflight_key = inflight_key
        self.fields = fields


@dataclass(init=False, slots=True, unsafe_hash=True)
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

    def __init__(
        self,
        owner_key: str,
        members: tuple[str, ...],
        fields: tuple[str, ...] = (),
        reverse_prefix: str = "",
        reverse_value: str = "",
        inflight_key: str = "",
    ) -> None:
        self.owner_key = owner_key
        self.members = members
        self.fields = fields
        self.reverse_prefix = reverse_prefix
        self.reverse_value = reverse_value
        self.inflight_key = inflight_key


@dataclass(init=False, slots=True, unsafe_hash=True)
class RemoveOp:
    owner_key: str
    members: tuple[str, ...]
    reverse_prefix: str = ""
    reverse_value: str = ""

    def __init__(
        self, owner_key: str, members: tuple[str, ...], reverse_prefix: str = "", reverse_value: str = ""
    ) -> None:
        self.owner_key = owner_key
        self.members = members
        self.reverse_prefix = reverse_prefix
        self.reverse_value = reverse_value


@dataclass(init=False, slots=True, unsafe_hash=True)
class DropOp:
    """Delete an owner's set in O(1): it is moved to `trash_key`, which DrainOps then empty in slices
    (removing `value` from each member's other-side set), so no script runs long on a huge room."""

    owner_key: str
    reverse_prefix: str
    value: str
    trash_key: str

    def __init__(self, owner_key: str, reverse_prefix: str, value: str, trash_key: str) -> None:
        self.owner_key = owner_key
        self.reverse_prefix = reverse_prefix
        self.value = value
        self.trash_key = trash_key


# Members a script takes out of dropped sets (DrainOp.batch). A settlement that drops at most
# FIRST_SLICED sets (one user's deletion: friends, groups, chatrooms) takes a slice of each with
# the drops; one that drops more (a batch deletion) drains them all after.
SLICE = 200
FIRST_SLICED = 3


@dataclass(init=False, slots=True, unsafe_hash=True)
class DrainOp:
    """Take up to `batch` members out of a dropped set; the outcome's `remaining` says how many are left.
    A slice costs Redis about 3 us a member (SPOP, escape, SREM): 200 keep each script near 0.6 ms
    (at most about 1.3 ms measured), well under a 5 ms slowlog even on a busy host."""

    trash_key: str
    reverse_prefix: str
    value: str
    batch: int = SLICE

    def __init__(self, trash_key: str, reverse_prefix: str, value: str, batch: int = SLICE) -> None:
        self.trash_key = trash_key
        self.reverse_prefix = reverse_prefix
        self.value = value
        self.batch = batch


@dataclass(init=False, slots=True, unsafe_hash=True)
class BindOp:
    """Bind a create's placeholder to the id the upstream answered. The id is counted even if the
    placeholder expired meanwhile: the upstream created it. With member == placeholder the
    reservation just becomes permanent (a 2xx whose id could not be read still counts). With
    `reverse_prefix`, the id's own set (`reverse_prefix + escape(member)`) gains `reverse_value`:
    a new group holds its owner, whose set the placeholder was reserved in."""

    owner_key: str
    placeholder: str
    member: str
    reverse_prefix: str = ""
    reverse_value: str = ""

    def __init__(
        self, owner_key: str, placeholder: str, member: str, reverse_prefix: str = "", reverse_value: str = ""
    ) -> None:
        self.owner_key = owner_key
        self.placeholder = placeholder
        self.member = member
        self.reverse_prefix = reverse_prefix
        self.reverse_value = reverse_value


@dataclass(init=False, slots=True, unsafe_hash=True)
class RenewOp:
    """Push the deadline of live reservations (sorted-set members) to now + ttl; expired ones stay gone."""

    key: str
    members: tuple[str, ...]
    ttl_ms: int

    def __init__(self, key: str, members: tuple[str, ...], ttl_ms: int) -> None:
        self.key = key
        self.members = members
        self.ttl_ms = ttl_ms


@dataclass(init=False, slots=True, unsafe_hash=True)
class LeaseOp:
    """Hold (or renew) a connection lease that expires unless renewed: a killed worker leaks nothing.

    The cap is `cap`, or with share_bp > 0: max(cap, share_bp/10000 x max(MAU last month, this month)).
    A lease already held is renewed whatever the count, unless `recheck`: then it must fit under the
    cap among the others, as a new one would (a plan's cap changed since it was taken).
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
    recheck: bool = False

    def __init__(
        self,
        online_key: str,
        peak_key: str,
        month: str,
        conn: str,
        ttl_ms: int,
        cap: int,
        share_bp: int = 0,
        mau_last_key: str = "",
        mau_this_key: str = "",
        recheck: bool = False,
    ) -> None:
        self.online_key = online_key
        self.peak_key = peak_key
        self.month = month
        self.conn = conn
        self.ttl_ms = ttl_ms
        self.cap = cap
        self.share_bp = share_bp
        self.mau_last_key = mau_last_key
        self.mau_this_key = mau_this_key
        self.recheck = recheck


@dataclass(init=False, slots=True, unsafe_hash=True)
class ReleaseOp:
    """Release a connection lease."""

    online_key: str
    conn: str

    def __init__(self, online_key: str, conn: str) -> None:
        self.online_key = online_key
        self.conn = conn


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


@dataclass(init=False, slots=True, unsafe_hash=True)
class RateState:
    name: str
    limit: int
    remaining: int
    reset_ms: int

    def __init__(self, name: str, limit: int, remaining: int, reset_ms: int) -> None:
        self.name = name
        self.limit = limit
        self.remaining = remaining
        self.reset_ms = reset_ms


@dataclass(init=False, slots=True, unsafe_hash=True)
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

    def __init__(
        self,
        op_index: int,
        kind: str,
        used: int,
        cap: int,
        retry_after_ms: int = 0,
        reset_ms: int = 0,
        room: int = 0,
        who: str = "",
    ) -> None:
        self.op_index = op_index
        self.kind = kind
        self.used = used
        self.cap = cap
        self.retry_after_ms = retry_after_ms
        self.reset_ms = reset_ms
        self.room = room
        self.who = who


@dataclass(init=False, slots=True, unsafe_hash=True)
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

    def __init__(
        self,
        refusal: Refusal | None = None,
        rates: tuple[RateState, ...] = (),
        added: tuple[tuple[str, ...], ...] = (),
        sizes: tuple[int, ...] = (),
        online: int = 0,
        remaining: int = 0,
        unchecked: bool = False,
    ) -> None:
        self.refusal = refusal
        self.rates = rates
        self.added = added
        self.sizes = sizes
        self.online = online
        self.remaining = remaining
        self.unchecked = unchecked

    @property
    def allowed(self) -> bool:
        return self.refusal is None


@dataclass(init=False)
class Program:
    ops: list[Op] = field(default_factory=list)
    # A store's encoding of the ops, kept by the store that ran them: a read route's program is
    # shared by every request of one client (decisions._Compiled) and sent as the same bytes, less
    # the clock. A program's ops are never changed once it has run.
    packed: tuple[int, bytes, bytes] | None = field(default=None, init=False, compare=False, repr=False)
    # The program whose ops these begin with, when confirms waiting for a ride were appended to it
    # (StoreGuard): a store may reuse the base's kept encoding and pack the confirms alone.
    base: Program | None = field(default=None, init=False, compare=False, repr=False)

    def __init__(self, ops: list[Op] | None = None) -> None:
        self.ops = [] if ops is None else ops
        self.packed = None
        self.base = None

    def extended(self, ops: Sequence[Op]) -> Program:
        """This program's ops, then `ops`: the indexes of its own are kept (a refusal names one)."""
        out = Program([*self.ops, *ops])
        out.base = self
        return out

    def __bool__(self) -> bool:
        return bool(self.ops)

    def route_key(self) -> str:
        """A key of the program's app (its first op's), to route it by: all share one hash tag."""
        op = self.ops[0]
        # isinstance, not getattr by name: a native attribute read in the compiled build. Tuples of
        # classes, not `A | B`: compiled, a union is built at each call and checked the slow way
        # (some 2,000 instructions a call, where a tuple is a few type comparisons).
        if isinstance(op, (RateOp, RenewOp)):
            return op.key
        if isinstance(op, (AddOp, UndoOp, RemoveOp, DropOp, BindOp)):
            return op.owner_key
        if isinstance(op, (ConfirmOp, TombstoneOp, ClearOp)):
            return op.inflight_key
        if isinstance(op, DrainOp):
            return op.trash_key
        return op.online_key

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
