"""The route map: which REST route does what to which counter, compiled once into a segment trie.

Matching is by method and path segments, literal segments before parameters, so `/moderation/text`
wins over `/moderation/{kind}`. HEAD is matched as GET (servers answer HEAD on GET routes) and a
trailing slash is ignored (upstreams that serve `/x/` like `/x` get the same checks). A path under
an app that no route names gets the `unmatched` rule; a path under no app gets `other`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from quota.identifiers import Kind

Source = Literal["app", "path", "body", "response"]
RateKey = Literal["ip", "app", "user"]
Algorithm = Literal["sliding", "exact"]
# drop: the owner is deleted (a group); drop_member: the member is deleted (a user leaving every group).
Op = Literal["add", "remove", "drop", "drop_member"]
Unmatched = Literal["refuse", "rate-only"]
HTTP_METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH")
# A route's method that stands for every HTTP method no other route on its path takes (a feature
# gate over a path, whatever the method).
ANY = "ANY"


@dataclass(frozen=True)
class Selector:
    """Where a value comes from: the app itself, a path parameter, or a dotted path in a JSON body.

    Lists are walked: `body.usernames` on `{"usernames": ["a", "b"]}` and `body.username` on
    `[{"username": "a"}, {"username": "b"}]` both give `["a", "b"]`. A removal's `unless` may also
    filter a list's items: `response.data[result=false].user` (decisions.left_in_place). A path value is one id, or a
    comma list only where the route map declares the parameter a list (batch routes). `kind` says
    which id policy the values pass (None: not an id, only bounded).
    """

    source: Source
    path: tuple[str, ...] = ()
    kind: Kind | None = None
    many: bool = False

    def __str__(self) -> str:
        return ".".join((self.source, *self.path))


@dataclass(frozen=True)
class Relation:
    """A membership between owners and members, with a cap on each side.

    group_members: a group (owner) holds users (members), capped by members_per_group; each user
    holds the groups they joined, capped by groups_per_user. Symmetric relations (contacts) keep
    one set per user on both sides.
    """

    name: str
    owner_limit: str | None
    member_limit: str | None
    symmetric: bool = False
    owner_kind: Kind | None = "user"
    member_kind: Kind = "user"


@dataclass(frozen=True)
class Change:
    relation: str
    op: Op
    owner: Selector
    members: Selector | None
    max_batch: int | None = None
    # On a removal: the members the response says it did not remove (the vendor answers a batch
    # removal 200 with `result: false` for a group's owner, who stays a member).
    unless: Selector | None = None

    @property
    def binds_later(self) -> bool:
        """Create routes learn the new id from the response: reserve first, then bind."""
        return self.members is not None and self.members.source == "response"

    @property
    def binds_owner_later(self) -> bool:
        """A create whose creator joins what it creates (a group's owner is one of its members, and
        the group one of the owner's): the member's side is reserved first, under its own cap, and
        the new owner's set bound to the id the response names."""
        return self.op == "add" and self.owner.source == "response"


@dataclass(frozen=True)
class RateUse:
    name: str
    # A rate from the plan (rest_per_ip) or a fixed figure of this route ("30/second").
    amount: int | None
    window_s: int | None
    by: RateKey
    algorithm: Algorithm = "sliding"
    # A call counts as many hits as this names values (a message send: one per recipient), each
    # call naming at most `most`; None: a call is one hit.
    cost: Selector | None = None
    most: int | None = None


@dataclass(frozen=True)
class Param:
    """A path parameter that names an id: canonicalized before any check (None kind: bounded only)."""

    kind: Kind | None
    many: bool = False
    most: int | None = None


@dataclass(frozen=True)
class RouteRule:
    name: str
    method: str
    template: str
    rates: tuple[RateUse, ...]
    feature: str | None = None
    changes: tuple[Change, ...] = ()
    login: bool = False
    connection: bool = False
    retention: Selector | None = None
    user: Selector | None = None
    outage: Literal["open", "closed"] | None = None
    # Decide and report, but let refused requests through (rolling out a new plan sheet safely).
    shadow: bool = False
    # The template also covers every deeper path (a feature gate over a whole prefix).
    prefix: bool = False
    # Operator-only routes (the gateway's state dump): the admin token is needed, not an app's.
    admin: bool = False
    params: tuple[tuple[str, Param], ...] = ()
    # unmatched: the rule a path under an app gets when no route names it.
    refuse: bool = False
    # Body fields a request may not name (compared without case): what the gateway would do with
    # them is counted on another route (a create's initial members, on the member routes).
    refuses: tuple[str, ...] = ()

    # Asked on every request: computed once, when the rule is built (a cached_property costs a
    # descriptor call per read, several times a plain attribute's).
    needs_body: bool = field(init=False, default=False, compare=False, repr=False)
    # A create binds the id it answers; a batch delete may name what it removed.
    reads_response: bool = field(init=False, default=False, compare=False, repr=False)
    # Something is reserved before the upstream answers (a counter add, a free plan's login).
    holds: bool = field(init=False, default=False, compare=False, repr=False)
    # Only rates are counted, none by user or body: a request's plan depends on its client alone.
    rates_only: bool = field(init=False, default=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        selectors = [c.owner for c in self.changes] + [c.members for c in self.changes if c.members]
        selectors += [s for s in (self.user, self.retention) if s]
        selectors += [r.cost for r in self.rates if r.cost]
        responds = any(
            c.owner.source == "response" or (c.members and c.members.source == "response") or c.unless
            for c in self.changes
        )
        object.__setattr__(self, "needs_body", bool(self.refuses) or any(s.source == "body" for s in selectors))
        object.__setattr__(self, "reads_response", responds)
        object.__setattr__(self, "holds", any(c.op == "add" for c in self.changes) or self.login)
        counted = self.changes or self.login or self.connection or self.user or self.refuses
        only = not (counted or any(r.cost for r in self.rates))
        object.__setattr__(self, "rates_only", only)


@dataclass(init=False, slots=True)  # built per request: see store/program.py on value classes
class Match:
    rule: RouteRule
    params: dict[str, str]

    def __init__(self, rule: RouteRule, params: dict[str, str]) -> None:
        self.rule = rule
        self.params = params


@dataclass
class _Node:
    literal: dict[str, _Node] = field(default_factory=dict)
    # Parameters are positional: routes may name the same position differently ({username}, {owner}).
    param: _Node | None = None
    rules: dict[str, tuple[RouteRule, tuple[str, ...]]] = field(default_factory=dict)
    prefix_rules: dict[str, tuple[RouteRule, tuple[str, ...]]] = field(default_factory=dict)


@dataclass
class RouteMap:
    relations: dict[str, Relation]
    rules: tuple[RouteRule, ...]
    fallback: RouteRule
    unmatched: RouteRule
    _root: _Node = field(default_factory=_Node)

    def __post_init__(self) -> None:
        for rule in self.rules:
            node = self._root
            names: list[str] = []
            # Every template starts /{org}/{app}: those two segments are walked like any other.
            for seg in rule.template.strip("/").split("/"):
                if seg.startswith("{") and seg.endswith("}"):
                    names.append(seg[1:-1])
                    if node.param is None:
                        node.param = _Node()
                    node = node.param
                else:
                    node = node.literal.setdefault(seg, _Node())
            rules = node.prefix_rules if rule.prefix else node.rules
            if rule.method == ANY:
                # Every HTTP method a route of its own on the same path does not take, and every
                # other method (OPTIONS, TRACE, a server's own): match() looks those up as ANY.
                for method in (*HTTP_METHODS, ANY):
                    rules.setdefault(method, (rule, tuple(names)))
            else:
                rules[rule.method] = (rule, tuple(names))

    def match(self, method: str, path: str) -> Match:
        if method == "HEAD":
            method = "GET"
        elif method not in HTTP_METHODS and method != "WEBSOCKET":
            # No route names such a method, so only a route taking any method may hold it: a
            # gated path stays gated however a client spells its request.
            method = ANY
        trimmed = path.strip("/")
        segments = trimmed.split("/") if trimmed else []
        if len(segments) < 2 or not segments[0] or not segments[1] or not path.startswith("/"):
            return Match(self.fallback, {})
        # The walk's first path (a literal before a parameter, at every step) is the answer when it
        # ends at a rule: try it without recursion, and backtrack only when it does not.
        node: _Node | None = self._root
        values: list[str] = []
        for seg in segments:
            if not seg or node is None:
                node = None
                break
            child = node.literal.get(seg)
            if child is None:
                child = node.param
                values.append(seg)
            node = child
        entry = node and (node.rules.get(method) or node.prefix_rules.get(method))
        if entry:
            return Match(entry[0], _bind(entry[1], values))
        values = []
        found = self._walk(self._root, segments, 0, method, values)
        if found is not None:
            return found
        return Match(self.unmatched, {"org": segments[0], "app": segments[1]})

    def _walk(self, node: _Node, segs: list[str], i: int, method: str, values: list[str]) -> Match | None:
        if i == len(segs):
            entry = node.rules.get(method) or node.prefix_rules.get(method)
            return Match(entry[0], _bind(entry[1], values)) if entry else None
        seg = segs[i]
        if not seg:
            return None
        child = node.literal.get(seg)
        if child is not None:
            found = self._walk(child, segs, i + 1, method, values)
            if found is not None:
                return found
        if node.param is not None:
            values.append(seg)
            found = self._walk(node.param, segs, i + 1, method, values)
            values.pop()
            if found is not None:
                return found
        entry = node.prefix_rules.get(method)
        return Match(entry[0], _bind(entry[1], values)) if entry else None

    def templates(self) -> list[tuple[str, str]]:
        return [(r.method, r.template + ("/..." if r.prefix else "")) for r in self.rules]


def _bind(names: tuple[str, ...], values: list[str]) -> dict[str, str]:
    # Indexes, not dict(zip()): zip with its strict keyword is a generic call in the compiled build
    # (about 0.5 µs).
    return {names[i]: values[i] for i in range(min(len(names), len(values)))}
