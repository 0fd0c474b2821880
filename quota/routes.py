"""The route map: which REST route does what to which counter, compiled once for matching."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

Source = Literal["app", "path", "body", "response"]
RateKey = Literal["ip", "app", "user"]
# drop: the owner is deleted (a group); drop_member: the member is deleted (a user leaving every group).
Op = Literal["add", "remove", "drop", "drop_member"]


@dataclass(frozen=True)
class Selector:
    """Where a value comes from: the app itself, a path parameter, or a dotted path in a JSON body.

    Lists are walked: `body.usernames` on `{"usernames": ["a", "b"]}` and `body.username` on
    `[{"username": "a"}, {"username": "b"}]` both give `["a", "b"]`. Path values split on commas,
    as the vendor's batch-delete routes do (`/users/u1,u2`).
    """

    source: Source
    path: tuple[str, ...] = ()

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


@dataclass(frozen=True)
class Change:
    relation: str
    op: Op
    owner: Selector
    members: Selector | None
    max_batch: int | None = None

    @property
    def binds_later(self) -> bool:
        """Create routes learn the new id from the response: reserve first, then bind."""
        return self.members is not None and self.members.source == "response"


@dataclass(frozen=True)
class RateUse:
    name: str
    # A rate from the plan (rest_per_ip) or a fixed figure of this route ("30/second").
    amount: int | None
    window_s: int | None
    by: RateKey


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

    # Asked on every request: computed once per rule (a frozen dataclass keeps cached values).
    @cached_property
    def needs_body(self) -> bool:
        selectors = [c.owner for c in self.changes] + [c.members for c in self.changes if c.members]
        selectors += [s for s in (self.user, self.retention) if s]
        return any(s.source == "body" for s in selectors)

    @cached_property
    def reads_response(self) -> bool:
        """A create binds the id it answers; a batch delete may name what it removed."""
        return any(c.owner.source == "response" or (c.members and c.members.source == "response") for c in self.changes)


_PARAM = re.compile(r"\{([a-z_]+)\}")


def compile_template(template: str) -> re.Pattern[str]:
    pattern = ""
    last = 0
    for m in _PARAM.finditer(template):
        pattern += re.escape(template[last : m.start()]) + f"(?P<{m.group(1)}>[^/]+)"
        last = m.end()
    pattern += re.escape(template[last:])
    return re.compile(pattern + "$")


@dataclass(frozen=True)
class Match:
    rule: RouteRule
    params: dict[str, str]


@dataclass
class RouteMap:
    relations: dict[str, Relation]
    rules: tuple[RouteRule, ...]
    fallback: RouteRule
    _index: dict[tuple[str, int], list[tuple[re.Pattern[str], RouteRule]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Index by method and segment count so a request tries a handful of patterns, not all.
        for rule in self.rules:
            key = (rule.method, rule.template.count("/"))
            self._index.setdefault(key, []).append((compile_template(rule.template), rule))

    def match(self, method: str, path: str) -> Match:
        for pattern, rule in self._index.get((method, path.count("/")), ()):
            m = pattern.match(path)
            if m:
                return Match(rule, m.groupdict())
        return Match(self.fallback, _app_params(path))


def _app_params(path: str) -> dict[str, str]:
    parts = path.split("/")
    if len(parts) >= 3 and parts[1] and parts[2]:
        return {"org": parts[1], "app": parts[2]}
    return {}
