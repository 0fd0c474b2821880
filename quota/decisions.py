"""Pure decisions: from a matched route, the app's plan and the request's facts, either a denial
(feature gate, retention, bad input: no I/O) or the program of ops the store must run, and the
programs that settle it once the upstream answered.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any

from quota.identifiers import MAX_PARAM, IdPolicy, InvalidId
from quota.keys import (
    dau_key,
    escape,
    inflight_key,
    mau_key,
    online_key,
    pair_field,
    peak_key,
    rate_key,
    set_key,
    side_prefix,
    trash_key,
)
from quota.matrix import MauShare
from quota.plans import AppPlan
from quota.routes import Change, RateUse, Relation, RouteMap, RouteRule, Selector
from quota.store.program import (
    FIRST_SLICED,
    UNLIMITED,
    AddOp,
    BindOp,
    ClearOp,
    ConfirmOp,
    DrainOp,
    DropOp,
    LeaseOp,
    Op,
    Program,
    RateOp,
    Refusal,
    RemoveOp,
    RenewOp,
    TombstoneOp,
    UndoOp,
)

PLACEHOLDER = "~pending:"
# Activity sets (DAU per day, MAU per month) are kept this long: bills are computed from them.
KEEP_ACTIVITY_S = 400 * 86400


@dataclass(init=False, slots=True, unsafe_hash=True)  # built per request: see store/program.py on value classes
class Denial:
    status: int
    error: str
    description: str
    limit: str | None = None
    retry_after_ms: int = 0
    rate_limit: int = 0
    reset_ms: int = 0

    def __init__(
        self,
        status: int,
        error: str,
        description: str,
        limit: str | None = None,
        retry_after_ms: int = 0,
        rate_limit: int = 0,
        reset_ms: int = 0,
    ) -> None:
        self.status = status
        self.error = error
        self.description = description
        self.limit = limit
        self.retry_after_ms = retry_after_ms
        self.rate_limit = rate_limit
        self.reset_ms = reset_ms


class BadInput(Exception):
    pass


@dataclass(init=False)
class RequestPlan:
    """What one request asks of the store: `before` runs before the upstream is called; the rest
    is decided once the upstream answered (kept on 2xx, undone otherwise)."""

    before: Program = field(default_factory=Program)
    adds: list[int] = field(default_factory=list)  # indexes of AddOps in `before`
    binds: list[tuple[int, Change]] = field(default_factory=list)
    after: list[Change] = field(default_factory=list)
    # Reservations and claims to keep alive while the upstream works: (sorted set, member).
    held: list[tuple[str, str]] = field(default_factory=list)
    # Removals in flight: their tombstones, cleared when the upstream answered (either way).
    tombstones: list[TombstoneOp] = field(default_factory=list)

    def __init__(
        self,
        before: Program | None = None,
        adds: list[int] | None = None,
        binds: list[tuple[int, Change]] | None = None,
        after: list[Change] | None = None,
        held: list[tuple[str, str]] | None = None,
        tombstones: list[TombstoneOp] | None = None,
    ) -> None:
        self.before = Program() if before is None else before
        self.adds = [] if adds is None else adds
        self.binds = [] if binds is None else binds
        self.after = [] if after is None else after
        self.held = [] if held is None else held
        self.tombstones = [] if tombstones is None else tombstones

    @property
    def settles(self) -> bool:
        return bool(self.adds or self.after)

    @property
    def writes(self) -> bool:
        """The store program holds counter writes (adds, tombstones): the counters' outage policy applies."""
        return bool(self.adds or self.tombstones)


def admit(
    rule: RouteRule, app: AppPlan, params: dict[str, str], address: str, now_s: float, ids: IdPolicy
) -> dict[str, str] | Denial:
    """The checks of a request that need no I/O and no body: the app's IP allowlist, its ids, the
    account's state, the plan's features and retention. Returns the canonical params, or a Denial."""
    if not app.allows(address):
        return Denial(403, "forbidden_op", f"client address {address} is not in the app's IP allowlist")
    try:
        canonical = canonical_params(rule, params, ids)
    except BadInput as exc:
        return Denial(400, "illegal_argument", str(exc))
    return gate(rule, app, canonical, now_s) or canonical


def url_fits(scope: dict[str, Any], max_url_bytes: int) -> bool:
    return len(scope["path"]) + len(scope.get("query_string", b"")) <= max_url_bytes


def path_denial(scope: dict[str, Any], max_url_bytes: int) -> Denial | None:
    """The checks every request and WebSocket connection passes first: the URL's size, and a path
    an upstream may route differently from quota."""
    if not url_fits(scope, max_url_bytes):
        return Denial(414, "illegal_argument", f"URL over {max_url_bytes} bytes")
    if _odd_path(scope):
        return Denial(
            400,
            "illegal_argument",
            "a path starts with / and has no dot or empty segments, backslashes, encoded slashes, percents, "
            "#, ?, ;, spaces or control characters",
        )
    return None


def _odd_path(scope: dict[str, Any]) -> bool:
    """A path an upstream may route differently from quota: dot segments (removed by RFC 3986
    normalisers such as nginx), empty segments (merged by nginx: `/demo//free` would be under no app
    here and under demo#free there), encoded slashes, backslashes raw or encoded (a WHATWG URL
    parser, as Node, Deno and Bun use, reads `\\` as `/`: `/demo\\free\\x` is one segment here,
    demo#free's path there), or a percent left after decoding (a gateway decoding twice reads
    `%252F` as a slash). No id of the API holds any of them. A path not starting with `/` (what an
    h11 server passes on of the target `http:/demo/...`) is under no app here, and the path
    `/demo/...` to a gateway that parses the target as a URL. Nor does an id hold a `#` (an h11
    server passes a fragment on in the path, a gateway's server drops it: `pre_send#x` a segment
    here, `pre_send` there), a `?` or `;` (decoded from %3F, or a matrix parameter Tomcat and
    Spring strip), a space or a character that does not print (NUL ends a C string)."""
    path: str = scope["path"]
    if not path.startswith("/") or "//" in path or "\\" in path or "%" in path:
        return True
    if "#" in path or "?" in path or ";" in path or " " in path or not path.isprintable():
        return True
    if "/." in path and any(seg in (".", "..") for seg in path.split("/")):
        return True
    raw: bytes = scope.get("raw_path") or b""
    return b"%" in raw and any(code in raw.lower() for code in (b"%2f", b"%5c", b"%2e"))


# The largest body quota reads (a route whose changes or costs name body fields): 600 recipients of
# 64 characters and a 5 KB message fit some times over.
MAX_PARSED_BODY_BYTES = 1 << 16


def parse_body(raw: bytes) -> Any:
    """A request body as JSON (None when empty); raises BadInput when it is not JSON, or when an
    object names a key twice, in any case: parsers differ on which one counts (Python's json takes
    the last; Go's encoding/json matches fields case-insensitively, `USERNAMES` or `uſernames` as
    `usernames`), and the gateway must read the ids quota counted. NaN and Infinity, which Python
    reads and JSON (RFC 8259) does not, are refused as a strict gateway refuses them, and so is a
    body not in UTF-8 (UTF-16, a byte-order mark)."""
    if not raw:
        return None
    if len(raw) > MAX_PARSED_BODY_BYTES:
        # Parsed, and each object checked for a key named twice in Python: a megabyte of `{}` or
        # `[]` took a sixth of a second, a stall of every request of the process, for one request
        # refused before any rate was hit. Bodies quota counts from are small (the vendor's: a
        # message's body and ext 5 KB, 600 recipients, 60 users).
        raise BadInput(f"request body over {MAX_PARSED_BODY_BYTES} bytes: more than any body quota counts from holds")
    try:
        # json.loads's own steps with a decoder built once: given the hook, json.loads builds a
        # decoder per call, which doubled the parse.
        # UTF-8 alone (RFC 8259), as the Content-Type quota admits says: a gateway reading the
        # same bytes as UTF-8 must find the same document, or none.
        return _DECODER.decode(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BadInput("request body is not valid JSON") from exc


def unreadable_body(headers: Iterable[Any]) -> str | None:
    """Why a body quota counts from cannot be read as the gateway reads it; None when it can. quota
    reads JSON in UTF-8 (RFC 8259), so a body must say so and nothing else: a gateway that decodes
    by a declared charset reads another document from the same bytes (in UTF-7, `+ACI-` is a quote:
    a key hidden inside a string to quota is a key of its own there), and one that reads form fields
    by their type finds fields quota never saw; Rack reads a body with no type as a form. A body
    must not be encoded either: quota reads its bytes, a gateway that inflates a `deflate` body
    reads what they decode to, and `{` opens a valid raw deflate block."""
    found: Any = None
    for header in headers:  # pairs as tuples or lists: ASGI allows either
        name, value = header[0], header[1]
        if name == b"content-type":
            if found is not None:
                return "request names its Content-Type twice"
            found = value
        elif name == b"content-encoding" and not (isinstance(value, bytes) and value.strip().lower() in _UNENCODED):
            return f"request body must not be encoded, found Content-Encoding {_shown(value)!r}"
    if found is None:
        return "request body must be JSON in UTF-8 (Content-Type: application/json), found no Content-Type"
    if isinstance(found, bytes) and _json_utf8(found):
        return None
    return f"request body must be JSON in UTF-8 (Content-Type: application/json), found Content-Type {_shown(found)!r}"


_UNENCODED = (b"", b"identity")


def _shown(value: Any) -> str:
    return value[:80].decode("latin-1") if isinstance(value, bytes) else repr(value)[:80]


def _json_utf8(value: bytes) -> bool:
    """`application/json`, with no parameter but a charset of UTF-8 (in any case, quoted or not)."""
    media, _, params = value.partition(b";")
    if media.strip().lower() != b"application/json":
        return False
    for param in params.split(b";"):
        name, _, given = param.partition(b"=")
        if not (name.strip() or given.strip()):
            continue  # an empty parameter (a trailing `;`)
        if name.strip().lower() != b"charset" or given.strip().strip(b'"').lower() not in (b"utf-8", b"utf8"):
            return False
    return True


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(pairs) > 1 and len({key.casefold() for key in out}) != len(pairs):
        raise BadInput("request body names a key twice (keys are compared without case)")
    return out


def _constant(name: str) -> Any:
    raise BadInput(f"request body is not valid JSON ({name[:10]} is not a JSON number)")


_DECODER = json.JSONDecoder(object_pairs_hook=_object, parse_constant=_constant)


def canonical_params(rule: RouteRule, params: dict[str, str], ids: IdPolicy) -> dict[str, str]:
    """Every path value bounded, every id canonical (a comma list only where the route map says so)."""
    out = dict(params)
    for name in ("org", "app"):
        if len(out.get(name, "")) > MAX_PARAM:
            raise BadInput(f"{name} is over {MAX_PARAM} characters")
    for name, param in rule.params:
        raw = params.get(name, "")
        if len(raw) > MAX_PARAM * (param.most or 1):
            raise BadInput(f"path parameter {name} is too long")
        try:
            if param.kind is None:
                continue
            if param.many:
                out[name] = ",".join(ids.canonical_list(param.kind, raw, param.most))
            else:
                out[name] = ids.canonical(param.kind, raw)
        except InvalidId as exc:
            raise BadInput(str(exc)) from exc
    return out


def gate(rule: RouteRule, app: AppPlan, params: dict[str, str], now_s: float) -> Denial | None:
    """Refusals that need no I/O: a frozen account, a feature the plan lacks, history too old."""
    if app.frozen:
        purge = app.account.purge_after
        return Denial(403, "forbidden_op", f"account {app.account.name} is frozen; its data is kept until {purge}")
    if rule.feature and not app.plan.features.get(rule.feature, False):
        return Denial(
            403,
            "forbidden_op",
            f"feature {rule.feature} is not in plan {app.plan.name}; upgrade to use it",
            rule.feature,
        )
    if rule.retention is not None:
        raw = params.get(rule.retention.path[0], "")
        try:
            # Ten ASCII digits: strptime alone reads 9 (`202611105` as Nov 10, 05h) where a gateway
            # may read another hour (Jan 11), older than the plan keeps.
            if len(raw) != 10 or not (raw.isascii() and raw.isdigit()):
                raise ValueError(raw)
            hour = datetime.strptime(raw, "%Y%m%d%H").replace(tzinfo=UTC)
        except ValueError:
            return Denial(400, "illegal_argument", f"time must be yyyyMMddHH, found {raw[:20]!r}")
        days = app.limits.get("message_retention_days")
        now = datetime.fromtimestamp(now_s, UTC)
        if isinstance(days, int) and hour < now - timedelta(days=days):
            return Denial(
                403,
                "forbidden_op",
                f"message_retention_days is {days} on plan {app.plan.name}: history before "
                f"{(now - timedelta(days=days)):%Y%m%d%H} is not kept",
                "message_retention_days",
            )
    return None


def select(selector: Selector, params: dict[str, str], body: Any, ids: IdPolicy, response: Any = None) -> list[str]:
    """The values a selector names, canonical, each once; BadInput when they are missing, not
    strings or not ids."""
    if selector.source == "path" and not selector.many:
        # One path value, canonical already (canonical_params): nothing to walk or deduplicate.
        raw = params.get(selector.path[0], "")
        if not raw:
            raise BadInput(f"{selector} is empty")
        return [raw]
    return list(dict.fromkeys(_named(selector, params, body, ids, response)))


def _named(selector: Selector, params: dict[str, str], body: Any, ids: IdPolicy, response: Any) -> list[str]:
    if selector.source == "path":
        raw = params.get(selector.path[0], "")
        # Path values are canonical already (canonical_params); only declared lists hold commas.
        values = raw.split(",") if selector.many else [raw]
        if not all(values):
            raise BadInput(f"{selector} is empty")
        return values
    root = body if selector.source == "body" else response
    found: list[Any] = [root]
    for part in selector.path:
        nxt: list[Any] = []
        for node in found:
            items = node if isinstance(node, list) else [node]
            for item in items:
                if not isinstance(item, dict) or part not in item:
                    raise BadInput(f"{selector} is missing")
                nxt.append(item[part])
        found = nxt
    flat = [v for node in found for v in (node if isinstance(node, list) else [node])]
    # Ids in a request are strings; an upstream may answer a numeric id, which is fine to bind.
    kinds = (str, int) if selector.source == "response" else (str,)
    if not flat or not all(isinstance(v, kinds) and not isinstance(v, bool) for v in flat):
        raise BadInput(f"{selector} must be a string or a list of strings")
    values = [str(v) for v in flat]
    if selector.kind is not None:
        try:
            values = [ids.canonical(selector.kind, v) for v in values]
        except InvalidId as exc:
            raise BadInput(f"{selector}: {exc}") from exc
    elif any(not v or len(v) > MAX_PARAM for v in values):
        raise BadInput(f"{selector} must be 1 to {MAX_PARAM} characters")
    return values


def left_in_place(selector: Selector, ids: IdPolicy, response: Any) -> set[str] | None:
    """The members a removal's answer says it did not remove (a route's `unless`, such as
    `response.data[result=false].user`: the items of `data` whose `result` is false). None when the
    answer does not say, unreadable or of another shape: the removal then takes nothing off (counted
    until `reconcile`), since taking off what the upstream kept would free what is still held."""
    found: list[Any] = [response]
    for part in selector.path:
        name, _, where = part.partition("[")
        nxt: list[Any] = []
        for node in found:
            for item in node if isinstance(node, list) else [node]:
                if not isinstance(item, dict) or name not in item:
                    return None
                nxt.append(item[name])
        if where:
            field, _, wanted = where.rstrip("]").partition("=")
            items = [i for n in nxt for i in (n if isinstance(n, list) else [n])]
            if not all(isinstance(i, dict) and isinstance(i.get(field), bool) for i in items):
                return None
            nxt = [i for i in items if i[field] is (wanted == "true")]
        found = nxt
    flat = [v for n in found for v in (n if isinstance(n, list) else [n])]
    if not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in flat):
        return None
    try:
        return {ids.canonical(selector.kind, str(v)) if selector.kind else str(v) for v in flat}
    except InvalidId:
        return None


def _cap(app: AppPlan, limit: str | None) -> int:
    value = app.limits.get(limit) if limit else None
    return value if isinstance(value, int) else UNLIMITED


def _sides(routes: RouteMap, app: AppPlan, change: Change, owner: str) -> tuple[Relation, str, str]:
    rel = routes.relations[change.relation]
    owner_side = side_prefix(app.prefix, rel.name, "o")
    member_side = side_prefix(app.prefix, rel.name, "o" if rel.symmetric else "m")
    if change.op == "drop_member" and not rel.symmetric:
        return rel, set_key(app.prefix, rel.name, "m", owner), owner_side
    return rel, set_key(app.prefix, rel.name, "o", owner), member_side if (rel.member_limit or rel.symmetric) else ""


def _owner(
    change: Change, app: AppPlan, params: dict[str, str], body: Any, ids: IdPolicy, response: Any = None
) -> list[str]:
    if change.owner.source == "app":
        return [app.appkey]
    return select(change.owner, params, body, ids, response)


def _rate_templates(rule: RouteRule, app: AppPlan) -> tuple[tuple[RateUse, str, int, int, bool], ...]:
    """A route's rates under an app's plan, each with its key less the client part."""
    out = []
    for use in rule.rates:
        rate = app.plan.rates.get(use.name)
        amount, window_s = (rate.amount, rate.window_s) if rate else (use.amount or 0, use.window_s or 1)
        prefix = rate_key(app.prefix, rule.name, use.name, "")
        out.append((use, prefix, amount, window_s * 1000, use.algorithm == "exact"))
    return tuple(out)


# Clients whose plans one route keeps under one app's plan (see _Compiled): enough for the servers of
# an app calling from a few addresses; a client with many addresses only has its plans built anew.
SHARED_PLANS = 64


class _AddTemplate:
    """An add of a route under an app's plan, less the ids a request names: its relation's keys and
    caps, the same for every request."""

    def __init__(self, routes: RouteMap, app: AppPlan, change: Change) -> None:
        rel = routes.relations[change.relation]
        self.symmetric = rel.symmetric
        self.owner_side = side_prefix(app.prefix, rel.name, "o")  # + escape(owner): the owner's set
        member_side = side_prefix(app.prefix, rel.name, "o" if rel.symmetric else "m")
        self.reverse_prefix = member_side if (rel.member_limit or rel.symmetric) else ""
        self.limit, self.cap = rel.owner_limit or "", _cap(app, rel.owner_limit)
        self.reverse_limit, self.reverse_cap = rel.member_limit or "", _cap(app, rel.member_limit)
        self.inflight = inflight_key(app.prefix, rel.name)
        self.member_drop = "xo" if rel.symmetric else "xm"


class _Compiled:
    """A route under an app's plan, worked out once: its rates, each with its key less the client
    part; its adds, less the ids; and, for a route that only counts rates, the plan of each recent
    client, which is the same for every request it sends. Plans are shared between requests: nothing
    changes a plan once built."""

    def __init__(self, routes: RouteMap, rule: RouteRule, app: AppPlan) -> None:
        self.rates = _rate_templates(rule, app)
        self.adds = [_AddTemplate(routes, app, c) if c.op == "add" else None for c in rule.changes]
        self.shared: dict[str, RequestPlan] | None = {} if rule.rates_only else None


def _rate_ops(
    rates: tuple[tuple[RateUse, str, int, int, bool], ...],
    client: str,
    user: str | None,
    body: Any,
    ids: IdPolicy,
) -> list[Op]:
    ops: list[Op] = []
    for use, prefix, amount, window_ms, exact in rates:
        who = client if use.by == "ip" else (user or "") if use.by == "user" else "app"
        ops.append(RateOp(prefix + escape(who), amount, window_ms, _cost(use, body, ids), use.name, exact))
    return ops


def _refused(rule: RouteRule, body: dict[str, Any]) -> None:
    named = {key.casefold() for key in body}
    for field_name in rule.refuses:
        if field_name.casefold() in named:
            raise BadInput(
                f"body.{field_name} is not accepted by {rule.name}: what it would change is counted on "
                "its own route (members: add them once the group or room exists)"
            )


def _cost(use: RateUse, body: Any, ids: IdPolicy) -> int:
    """The hits one call counts: one, or one per value its cost names, as many times as named (an
    upstream that sends to a recipient named twice sends twice)."""
    if use.cost is None:
        return 1
    named = _named(use.cost, {}, body, ids, None)
    if any("," in value for value in named):
        # No id holds a comma: a gateway splitting one would send to more than quota counted.
        raise BadInput(f"{use.cost} names one id an entry; a comma would split it")
    n = len(named)
    # `most` is at most every plan's rate (config): a call past it is a 400, never a 429 forever.
    if use.most is not None and n > use.most:
        raise BadInput(f"{use.cost} names {n} values; at most {use.most} per call")
    return n


def plan_request(
    routes: RouteMap,
    rule: RouteRule,
    app: AppPlan,
    params: dict[str, str],
    body: Any,
    client: str,
    now_ms: int,
    *,
    ids: IdPolicy,
    lease_ttl_ms: int,
    reservation_ttl_ms: int,
    conn_id: str = "",
    today: date | None = None,
) -> RequestPlan:
    """Build the ops of one request; raises BadInput when the body lacks what a counted route needs,
    or names what it refuses. `client` is the client's rate key (its address, or its IPv6 network)."""
    if rule.refuses and isinstance(body, dict):
        _refused(rule, body)
    compiled = app.compiled.get(rule.name)
    if compiled is None:
        compiled = app.compiled[rule.name] = _Compiled(routes, rule, app)
    shared = compiled.shared
    if shared is not None:
        found = shared.get(client)
        if found is None:
            if len(shared) >= SHARED_PLANS:
                shared.clear()
            found = shared[client] = RequestPlan(Program(_rate_ops(compiled.rates, client, None, None, ids)))
        return found
    user = select(rule.user, params, body, ids)[0] if rule.user is not None else None
    plan = RequestPlan(Program(_rate_ops(compiled.rates, client, user, body, ids)))
    ops = plan.before.ops
    changes = rule.changes
    for i in range(len(changes)):
        change, add = changes[i], compiled.adds[i]
        if add is None:
            plan.after.append(change)
            if change.owner.source != "response" and not (change.members and change.members.source == "response"):
                _tombstone(plan, routes, app, change, params, body, ids, reservation_ttl_ms)
            continue
        if change.binds_owner_later:
            _reserve_for_owner(plan, change, add, params, body, ids, reservation_ttl_ms)
            continue
        owners = _owner(change, app, params, body, ids)
        if len(owners) != 1:
            raise BadInput(f"{change.owner} must name one {change.relation} owner")
        owner = owners[0]
        inflight, fields = "", tuple[str, ...]()
        if change.binds_later:
            members: list[str] = [PLACEHOLDER + uuid.uuid4().hex]
            plan.binds.append((len(ops), change))
        else:
            assert change.members is not None
            members = select(change.members, params, body, ids)
            inflight = add.inflight
            fields = tuple([pair_field(owner, m, add.symmetric) for m in members])
        if change.max_batch and len(members) > change.max_batch:
            raise BadInput(f"{change.members} holds {len(members)} ids; at most {change.max_batch} per call")
        _add(
            plan,
            AddOp(
                add.limit,
                add.owner_side + escape(owner),
                add.cap,
                tuple(members),
                add.reverse_limit,
                add.reverse_prefix,
                add.reverse_cap,
                owner,
                reservation_ttl_ms if change.binds_later else 0,
                inflight,
                fields,
                reservation_ttl_ms,
                0,
                add.member_drop,
            ),
        )
    if today is None:
        today = datetime.fromtimestamp(now_ms / 1000, UTC).date()
    if rule.login and user is not None:
        # A login is counted as it happens and undone if the upstream refuses it, like any add:
        # a user's id in today's and this month's activity, claimed while the upstream answers.
        # A plan that cannot bill overage refuses new users past its included DAU.
        dau_cap = app.dau_cap
        activity = inflight_key(app.prefix, "activity")
        for key, limit, cap in (
            (dau_key(app.prefix, today), "included_dau", dau_cap),
            (mau_key(app.prefix, today.year, today.month), "", UNLIMITED),
        ):
            field = key[len(app.prefix) :] + "|" + escape(user)
            _add(
                plan,
                AddOp(
                    limit,
                    key,
                    cap,
                    (user,),
                    inflight_key=activity,
                    fields=(field,),
                    claim_ttl_ms=reservation_ttl_ms,
                    expire_s=KEEP_ACTIVITY_S,
                ),
            )
    if rule.connection:
        ops.append(lease_op(app, today, conn_id, lease_ttl_ms))
    return plan


def activity_ops(app: AppPlan, today: date, user: str) -> list[Op]:
    """A user still active on `today` (a connection held open past midnight): in the day's DAU and
    the month's MAU, held to the plan's DAU ceiling as a login is (a plan without overage: free).
    Past it the connection ends; a paid plan's DAU past its included ones are billed."""
    return [
        AddOp("included_dau", dau_key(app.prefix, today), app.dau_cap, (user,), expire_s=KEEP_ACTIVITY_S),
        AddOp("", mau_key(app.prefix, today.year, today.month), UNLIMITED, (user,), expire_s=KEEP_ACTIVITY_S),
    ]


def lease_op(app: AppPlan, today: date, conn_id: str, ttl_ms: int) -> LeaseOp:
    limit = app.limits.get("online_users")
    op = LeaseOp(
        online_key=online_key(app.prefix),
        peak_key=peak_key(app.prefix),
        month=f"{today:%Y%m}",
        conn=conn_id,
        ttl_ms=ttl_ms,
        cap=limit if isinstance(limit, int) else UNLIMITED,
    )
    if not isinstance(limit, MauShare):
        return op
    last = today.replace(day=1) - timedelta(days=1)
    return replace(
        op,
        cap=limit.floor,
        share_bp=int(limit.share * 10000),
        mau_last_key=mau_key(app.prefix, last.year, last.month),
        mau_this_key=mau_key(app.prefix, today.year, today.month),
    )


def _tombstone(
    plan: RequestPlan,
    routes: RouteMap,
    app: AppPlan,
    change: Change,
    params: dict[str, str],
    body: Any,
    ids: IdPolicy,
    ttl_ms: int,
) -> None:
    """Mark what a removal will remove, so no add of it passes until the upstream has answered."""
    rel = routes.relations[change.relation]
    fields: list[str] = []
    for owner in _owner(change, app, params, body, ids):
        if change.op == "remove":
            assert change.members is not None
            members = select(change.members, params, body, ids)
            fields += ["rm:" + pair_field(owner, m, rel.symmetric) for m in members]
        else:
            fields.append(_dropped_field(change, rel, owner))
    op = TombstoneOp(inflight_key(app.prefix, rel.name), tuple(fields), ttl_ms, rel.symmetric)
    plan.tombstones.append(op)
    plan.before.ops.append(op)
    plan.held.extend((op.inflight_key + ":due", f) for f in fields)


def _reserve_for_owner(
    plan: RequestPlan,
    change: Change,
    add: _AddTemplate,
    params: dict[str, str],
    body: Any,
    ids: IdPolicy,
    ttl_ms: int,
) -> None:
    """The creator of a room joins it: a placeholder in the creator's own set, under its cap (the
    groups a user may be in), bound to the room's id once the response names it."""
    assert change.members is not None
    members = select(change.members, params, body, ids)
    if len(members) != 1:
        raise BadInput(f"{change.members} must name one {change.relation} member")
    plan.binds.append((len(plan.before.ops), change))
    placeholder = PLACEHOLDER + uuid.uuid4().hex
    owner_key = add.reverse_prefix + escape(members[0])
    _add(plan, AddOp(add.reverse_limit, owner_key, add.reverse_cap, (placeholder,), pending_ttl_ms=ttl_ms))


def _dropped_field(change: Change, rel: Relation, owner: str) -> str:
    """The tombstone of a whole set dropped: every pair naming `owner` on the side it is dropped from."""
    return ("xo:" if change.op == "drop" or rel.symmetric else "xm:") + escape(owner)


def _add(plan: RequestPlan, op: AddOp) -> None:
    plan.adds.append(len(plan.before.ops))
    plan.before.ops.append(op)
    if op.pending_ttl_ms:
        plan.held.append((op.owner_key + ":pending", op.members[0]))
    if op.inflight_key:
        plan.held.extend((op.inflight_key + ":due", f) for f in op.fields)


def renew_program(plan: RequestPlan, ttl_ms: int) -> Program:
    keys: dict[str, list[str]] = {}
    for key, member in plan.held:
        keys.setdefault(key, []).append(member)
    return Program([RenewOp(k, tuple(m), ttl_ms) for k, m in keys.items()])


def undo_ops(plan: RequestPlan, added: tuple[tuple[str, ...], ...]) -> Program:
    """The upstream failed or the client went away: drop this request's claims and holds. A member
    another unsettled request also added stays until that one settles too."""
    program = Program()
    adds = [plan.before.ops[i] for i in plan.adds]
    # A fail-open outcome added nothing and reports nothing: stop at the shorter. (Indexes, not
    # zip(): zip with its strict keyword is a generic call in the compiled build, about 0.5 µs.)
    for i in range(min(len(adds), len(added))):
        op, members = adds[i], added[i]
        assert isinstance(op, AddOp)
        if members:
            program.ops.append(
                UndoOp(
                    op.owner_key, members, _fields(op, members), op.reverse_prefix, op.reverse_value, op.inflight_key
                )
            )
    program.ops.extend(ClearOp(t.inflight_key, t.fields) for t in plan.tombstones)
    return program


def confirm_ops(plan: RequestPlan, added: tuple[tuple[str, ...], ...]) -> list[ConfirmOp]:
    """Settle the claims of this request's adds: the members stand on their own from now on."""
    out = []
    for i in range(min(len(plan.adds), len(added))):
        op, members = plan.before.ops[plan.adds[i]], added[i]
        assert isinstance(op, AddOp)
        if op.inflight_key and members:
            out.append(ConfirmOp(op.inflight_key, _fields(op, members)))
    return out


def _fields(op: AddOp, members: tuple[str, ...]) -> tuple[str, ...]:
    if not op.inflight_key:
        return ()
    if len(op.members) != len(op.fields):
        raise ValueError(f"{len(op.members)} members and {len(op.fields)} claim fields")
    by_member = {op.members[i]: op.fields[i] for i in range(len(op.members))}
    return tuple(by_member[m] for m in members)


@dataclass(init=False)
class Settlement:
    """What a 2xx answer changes: one atomic program, which drops a deleted set and drains its first
    slice; the rest of each dropped set drained in slices; then, where sets were dropped, the
    removal's tombstones cleared, so that no add naming what is being deleted passes while a later
    slice could still take it out again. `unmarks` clear the tombstones the program itself writes
    (marks): sent only if it ran, since a clear counts a tombstone down, and one without its mark
    would lift another request's."""

    program: Program
    drains: list[DrainOp] = field(default_factory=list)
    # Creates whose answer named no id we could read: their slot stays taken (counted, unnamed).
    unbound: int = 0
    clears: list[Op] = field(default_factory=list)
    unmarks: list[Op] = field(default_factory=list)

    def __init__(
        self,
        program: Program,
        drains: list[DrainOp] | None = None,
        unbound: int = 0,
        clears: list[Op] | None = None,
        unmarks: list[Op] | None = None,
    ) -> None:
        self.program = program
        self.drains = [] if drains is None else drains
        self.unbound = unbound
        self.clears = [] if clears is None else clears
        self.unmarks = [] if unmarks is None else unmarks


def after_ops(
    routes: RouteMap,
    plan: RequestPlan,
    app: AppPlan,
    params: dict[str, str],
    body: Any,
    response: Any,
    added: tuple[tuple[str, ...], ...],
    ids: IdPolicy,
    ttl_ms: int,
    answered: bool = True,
) -> Settlement:
    """The upstream answered 2xx: confirm this request's claims, bind reservations to the ids it
    returned, lift its tombstones and apply its removals. `ttl_ms`: how long a mark lasts from the
    settlement's clock unless renewed (the plan's `held` names them for the renewals). Not
    `answered` (a 504: whether the upstream did it is unknown): what was counted is kept (claims
    confirmed, reservations kept unbound), nothing is taken off, as counts may drift up only."""
    done = Settlement(Program())
    ops = done.program.ops
    ops.extend(confirm_ops(plan, added))
    for index, change in plan.binds:
        op = plan.before.ops[index]
        assert isinstance(op, AddOp) and change.members is not None
        later = change.owner if change.binds_owner_later else change.members
        try:
            real = select(later, params, body, ids, response)[0]
        except BadInput:
            # Something was created (2xx) that we cannot name: it keeps its slot rather than go uncounted.
            real = op.members[0]
            done.unbound += 1
        if change.binds_owner_later and real != op.members[0]:
            # The room's own set gains its creator, as a member added later would be counted.
            rel = routes.relations[change.relation]
            creator = select(change.members, params, body, ids)[0]
            ops.append(BindOp(op.owner_key, op.members[0], real, side_prefix(app.prefix, rel.name, "o"), creator))
        else:
            ops.append(BindOp(op.owner_key, op.members[0], real))
    removals = plan.after if answered else []
    for change in removals:
        try:
            owners = _owner(change, app, params, body, ids, response)
        except BadInput:
            continue
        for owner in owners:
            rel, owner_key, reverse_prefix = _sides(routes, app, change, owner)
            if change.op == "remove":
                assert change.members is not None
                try:
                    members = tuple(select(change.members, params, body, ids, response))
                except BadInput:
                    continue
                if change.unless is not None:
                    kept = left_in_place(change.unless, ids, response)
                    if kept is None:
                        continue  # the answer does not say what it removed: nothing is taken off
                    members = tuple(m for m in members if m not in kept)
                    if not members:
                        continue
                ops.append(RemoveOp(owner_key, members, reverse_prefix, owner))
            else:
                dropped, drain = drop(owner_key, reverse_prefix, owner)
                if change.owner.source == "response":
                    # Named only by the answer, so not marked before the upstream call (_tombstone):
                    # marked in the drop's own script instead, and kept (renewed) until drained.
                    field = _dropped_field(change, rel, owner)
                    mark = TombstoneOp(inflight_key(app.prefix, rel.name), (field,), ttl_ms, rel.symmetric, False)
                    done.unmarks.append(ClearOp(mark.inflight_key, mark.fields))
                    ops.append(mark)
                    plan.held.append((mark.inflight_key + ":due", field))
                ops.append(dropped)
                done.drains.append(drain)
    clears: list[Op] = [ClearOp(t.inflight_key, t.fields) for t in plan.tombstones]
    if done.drains:
        # A first slice goes with the drops, atomically, for at most FIRST_SLICED sets: a batch
        # deletion of 100 users drops 300 sets, and a slice of each in one script held Redis some
        # 300 ms, past storage_timeout_ms (every other call timed out and the breaker opened). What
        # is left drains after, slice by slice, its members tombstoned meanwhile.
        if len(done.drains) <= FIRST_SLICED:
            ops.extend(DrainOp(d.trash_key, d.reverse_prefix, d.value) for d in done.drains)
        done.clears = clears
    else:
        ops.extend(clears)
    return done


def drop(owner_key: str, reverse_prefix: str, value: str) -> tuple[DropOp, DrainOp]:
    """Delete a set at once and empty it in slices afterwards (run the DrainOp until none remain)."""
    trash = trash_key(owner_key, uuid.uuid4().hex)
    return DropOp(owner_key, reverse_prefix, value, trash), DrainOp(trash, reverse_prefix, value)


def denial_for(refusal: Refusal, plan: RequestPlan, app: AppPlan) -> Denial:
    """Shape a store refusal the way the IM vendor does (reference §5)."""
    return denial_of(refusal, plan.before.ops, app)


def denial_of(refusal: Refusal, ops: list[Op], app: AppPlan) -> Denial:
    """`denial_for` of a program's ops (a connection's renewal, which plans no request)."""
    op = ops[refusal.op_index]
    pname = app.plan.name
    if isinstance(op, RateOp):
        return Denial(
            429,
            "reach_limit",
            f"This request has reached api limit ({op.name}: {op.limit} per {op.window_ms // 1000}s)",
            op.name,
            refusal.retry_after_ms,
            op.limit,
            refusal.reset_ms,
        )
    if refusal.kind == "busy":
        return Denial(
            409,
            "conflict",
            f"a removal of {refusal.who or 'this'} is in flight; retry when it has been answered",
            None,
            retry_after_ms=1000,
        )
    if isinstance(op, AddOp) and op.limit == "included_dau":
        return Denial(
            403,
            "forbidden_op",
            f"plan {pname} allows {refusal.cap} daily active users and today has "
            f"{refusal.used}; upgrade to let new users in",
            "included_dau",
        )
    if isinstance(op, AddOp):
        friends = op.limit == "friends_per_user"
        error = "exceed_limit" if friends else "forbidden_op"
        if refusal.kind == "owner":
            return Denial(
                403,
                error,
                f"{op.limit} is {refusal.cap} on plan {pname}: {refusal.used} used, room for {refusal.room} more",
                op.limit,
            )
        return Denial(
            403,
            error,
            f"{op.reverse_limit} is {refusal.cap} on plan {pname}: user {refusal.who} already has {refusal.used}",
            op.reverse_limit,
        )
    return Denial(
        403,
        "forbidden_op",
        f"online_users is {refusal.cap} on plan {pname} and {refusal.used} are online",
        "online_users",
    )
