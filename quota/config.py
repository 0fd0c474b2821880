"""Reads config/*.yaml and validates all of it in one place, reporting every problem at once.

Files in a config directory:
    plans.yaml     the limit matrix (matrix.Plan per plan)
    routes.yaml    the route map (routes.RouteRule per route) and the relations it counts
    accounts.yaml  accounts, their plans, overrides and apps
    quota.yaml     settings of the middleware (optional)
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal

import yaml
from limits import parse as parse_rate

from quota.accounts import Account, Subscription
from quota.deadlines import DEFAULT_TIMEOUT_S
from quota.errors import ConfigError, Problem
from quota.identifiers import DEFAULT_RULES, KINDS, IdPolicy, IdRule, Kind
from quota.matrix import LIMIT_NAMES, PRICE_NAMES, RATE_NAMES, LimitValue, Matrix, MauShare, Plan, Price, Rate
from quota.routes import ANY, HTTP_METHODS, Change, Param, RateUse, Relation, RouteMap, RouteRule, Selector
from quota.tokens import MIN_LENGTH, masked_url

# quota/defaults is a symlink to the checkout's config/ (the one copy in git); building a wheel copies
# the files it points to into the package, so an installed quota finds its default config there.
DEFAULT_DIR = (Path(__file__).resolve().parent / "defaults").resolve()
# Webhook retries: a delivery gives up within minutes (at most 10 attempts, waits doubling from
# at most 60 s, each wait at most MAX_WEBHOOK_WAIT_S in quota/webhooks.py).
MAX_WEBHOOK_ATTEMPTS, MAX_WEBHOOK_RETRY_MS = 10, 60_000
# Matched whole (fullmatch: `$` would let a final newline through), each part at most 64.
APPKEY = re.compile(r"[A-Za-z0-9_.-]{1,64}#[A-Za-z0-9_.-]{1,64}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
METHODS = (*HTTP_METHODS, "WEBSOCKET", ANY)
# The built-in routes: what a path under no app, and a path under an app no route names, are held to.
RESERVED_ROUTE_NAMES = ("other", "unmatched")


@dataclass(frozen=True)
class Webhooks:
    """Usage-threshold webhooks (quota/webhooks.py): off when `urls` is empty."""

    urls: tuple[str, ...] = ()
    secret: str = ""
    thresholds: tuple[int, ...] = (80, 100)
    attempts: int = 5
    retry_base_ms: int = 500
    timeout_s: float = 5.0


@dataclass(frozen=True)
class Settings:
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    # `unix` in trusted_proxies: a peer with no network address (a unix socket, which ASGI servers
    # hand as no client at all) is a proxy on this machine, and X-Forwarded-For names the client.
    trusted_unix: bool = False
    admin_token: str | None = None
    # Read-only scope: metrics, entitlements, usage, bills, the dashboard (see quota/tokens.py).
    read_token: str | None = None
    admin_prefix: str = "/_quota"
    max_body_bytes: int = 1 << 20
    # A body quota reads (or the proxy buffers) must be in within this long of its start, else 408.
    body_timeout_s: int = DEFAULT_TIMEOUT_S
    # What a request meets when the store does not answer: rates fail open, counter writes closed.
    outage_rates: Literal["open", "closed"] = "open"
    outage_counters: Literal["open", "closed"] = "closed"
    storage_timeout_ms: int = 250
    lease_ttl_s: int = 60
    fallback_rate: Rate = Rate(100, 1, "100/second")
    # Wrong or missing tokens a client may send the admin API and the dashboard's sign-in in a
    # window before it is answered 429, right token or not (quota/lockout.py).
    wrong_tokens: Rate = Rate(10, 60, "10/minute")
    shadow: bool = False
    # How long a create's slot or a free plan's login waits for the upstream; renewed while it works.
    reservation_ttl_s: int = 60
    # How long an add's confirm may wait to ride with the app's next store call (quota/guard.py).
    confirm_delay_ms: int = 20
    # IPv6 clients are keyed by their network of this length: one host holds a whole /64.
    ipv6_prefix: int = 64
    # Path plus query string: longer ones are refused (414) before anything is read.
    max_url_bytes: int = 8192
    identifiers: IdPolicy = field(default_factory=IdPolicy)
    # RateLimit-Limit/Remaining/Reset on allowed responses too (refusals always carry them). Off
    # unless asked for: an allowed answer passes through untouched, headers included.
    ratelimit_headers: bool = False
    webhooks: Webhooks = field(default_factory=Webhooks)


@dataclass(frozen=True)
class Config:
    directory: Path
    matrix: Matrix
    routes: RouteMap
    accounts: dict[str, Account]
    settings: Settings = field(default_factory=Settings)


def load_config(directory: str | Path | None = None) -> Config:
    """Load and validate a config directory; raise ConfigError naming every file, key and fault."""
    root = Path(directory) if directory is not None else DEFAULT_DIR
    problems: list[Problem] = []
    docs = {name: _read(root / name, problems, required=name != "quota.yaml") for name in _FILES}
    if problems:
        raise ConfigError(problems)
    matrix = _Matrix(root / "plans.yaml", problems).build(docs["plans.yaml"])
    routes = _Routes(root / "routes.yaml", problems, matrix).build(docs["routes.yaml"])
    accounts = _Accounts(root / "accounts.yaml", problems, matrix).build(docs["accounts.yaml"])
    settings = _Settings(root / "quota.yaml", problems).build(docs["quota.yaml"] or {})
    if problems:
        raise ConfigError(problems)
    return Config(root, matrix, routes, accounts, settings)


_FILES = ("plans.yaml", "routes.yaml", "accounts.yaml", "quota.yaml")
# The largest whole limits: 100 years of history; a cap of a trillion (past any real app, within
# the 2**53 that Lua's numbers hold exactly).
MAX_RETENTION_DAYS = 36_500
MAX_LIMIT = 10**12

# libyaml's parser where PyYAML has it: the pure-Python one spends some 120 ms on the shipped
# config, which every start, reload and `quota` command pays.
try:
    from yaml import CSafeLoader as _SafeLoader
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    from yaml import SafeLoader as _SafeLoader  # type: ignore[assignment]


def _read(path: Path, problems: list[Problem], *, required: bool) -> Any:
    if not path.exists():
        if required:
            problems.append(Problem(str(path), "(file)", "a YAML file", _Said("no such file")))
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        problems.append(Problem(str(path), f"byte {exc.start}", "text in UTF-8", _Said(exc.reason)))
        return None
    except OSError as exc:
        # A directory in the file's place, a file it may not read: named, as a YAML error is.
        problems.append(Problem(str(path), "(file)", "a readable file", _Said(exc.strerror or str(exc))))
        return None
    try:
        return yaml.load(text, Loader=_UniqueKeys)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(file)"
        problems.append(Problem(str(path), where, "valid YAML", _Said(str(getattr(exc, "problem", exc)))))
        return None


class _UniqueKeys(_SafeLoader):
    """PyYAML's safe loader, refusing a key written twice in one mapping: it would keep the last
    silently (a plan's `friends_per_user: 100` then `friends_per_user: 100000` is 100000)."""


def _unique_mapping(loader: _SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        try:
            twice = key in seen
        except TypeError:  # an unhashable key: construct_mapping says so
            continue
        if twice:
            raise yaml.constructor.ConstructorError(
                "while reading a mapping", node.start_mark, f"key {key!r} is written twice", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeys.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _scalar_or_fail(tag: str) -> Callable[[_SafeLoader, yaml.ScalarNode], Any]:
    """PyYAML's own constructor of `tag`, whose errors (`2026-02-30`, an int of 5,000 digits,
    `!!bool maybe`, `!!timestamp soon`) become a YAML error at the value's line, not a traceback."""
    construct = _UniqueKeys.yaml_constructors[tag]

    def checked(loader: _SafeLoader, node: yaml.ScalarNode) -> Any:
        try:
            return construct(loader, node)
        except (ValueError, LookupError, AttributeError, TypeError, ArithmeticError) as exc:
            said = f"{str(node.value)[:40]!r} cannot be read as {tag.rsplit(':', 1)[-1]}: {exc or type(exc).__name__}"
            raise yaml.constructor.ConstructorError(None, None, said, node.start_mark) from None

    return checked


for _kind in ("null", "bool", "int", "float", "binary", "timestamp"):
    _UniqueKeys.add_constructor(f"tag:yaml.org,2002:{_kind}", _scalar_or_fail(f"tag:yaml.org,2002:{_kind}"))

_RATE_SHAPE = re.compile(r"(\d{1,12})\s*(?:/|per)\s*(?:(\d{1,12})\s*)?[a-zA-Z]+")


class _Said(str):
    """A description of what was found, printed as is (other values are shown with repr)."""


def _show(value: Any) -> str:
    if isinstance(value, _Said):
        return str(value)
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Checker:
    def __init__(self, path: Path, problems: list[Problem]) -> None:
        self.file = str(path)
        self.problems = problems

    def fail(self, key: str, expected: str, found: Any) -> None:
        self.problems.append(Problem(self.file, key, expected, _show(found)))

    def mapping(
        self, node: Any, key: str, required: tuple[str, ...] = (), optional: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        if not isinstance(node, dict):
            self.fail(key, "a mapping", node)
            return {}
        for name in required:
            if name not in node:
                self.fail(f"{key}.{name}", "a value", _Said("nothing (missing key)"))
        if required or optional:
            for name in node:
                if name not in required and name not in optional:
                    allowed = ", ".join((*required, *optional))
                    self.fail(f"{key}.{name}", f"one of the known keys ({allowed})", _Said(f"unknown key {name!r}"))
        return node

    def whole(self, node: Any, key: str, minimum: int = 0) -> int | None:
        if isinstance(node, bool) or not isinstance(node, int):
            self.fail(key, f"a whole number >= {minimum}", node)
            return None
        if node < minimum:
            self.fail(key, f"a whole number >= {minimum}", node)
            return None
        return node

    def bounded(self, value: int, key: str, name: str) -> int:
        """A whole limit no larger than a counter or a date can hold: a retention reaching back past
        the year 1 would fail every history request (a date out of range), and a cap past 2**53 is
        not the number Lua's doubles compare. Larger is what `unlimited` says."""
        most = MAX_RETENTION_DAYS if name == "message_retention_days" else MAX_LIMIT
        if value > most:
            self.fail(key, f"at most {most:,} (or 'unlimited')", value)
            return most
        return value

    def money(self, node: Any, key: str) -> Decimal | None:
        if isinstance(node, float):
            self.fail(key, 'an amount written as a string ("888") so it stays exact', node)
            return None
        try:
            value = Decimal(str(node))
        except InvalidOperation:
            self.fail(key, "an amount of money", node)
            return None
        if not value.is_finite() or value < 0 or value > MAX_LIMIT:
            # Bounded as a limit is: `1e999999999` is a finite Decimal no bill could be rounded from.
            self.fail(key, f"an amount from 0 to {MAX_LIMIT:,}", node)
            return None
        return value

    def rate(self, node: Any, key: str) -> Rate | None:
        # One rate, checked here before `limits` parses it: it keeps the first of a list
        # ("100/second, 1000/hour") and reads a multiple of 0 ("10/0 seconds") as 1.
        shape = _RATE_SHAPE.fullmatch(node.strip()) if isinstance(node, str) else None
        try:
            if shape is None or int(shape[1]) < 1 or (shape[2] is not None and int(shape[2]) < 1):
                raise ValueError
            item = parse_rate(node)
        except ValueError:
            self.fail(key, "one rate such as '100/second' or '10/2 minutes' (at least 1, per at least 1 unit)", node)
            return None
        return Rate(item.amount, item.get_expiry(), node)

    def boolean(self, node: Any, key: str) -> bool | None:
        if not isinstance(node, bool):
            self.fail(key, "true or false", node)
            return None
        return node


class _Matrix(_Checker):
    def build(self, doc: Any) -> Matrix:
        top = self.mapping(doc, "(top)", required=("plans",))
        plans_node = self.mapping(top.get("plans", {}), "plans")
        plans: dict[str, Plan] = {}
        for name, node in plans_node.items():
            plan = self._plan(str(name), node)
            if plan:
                plans[str(name)] = plan
        self._same_keys(plans_node)
        return Matrix(plans)

    def _plan(self, name: str, node: Any) -> Plan | None:
        key = f"plans.{name}"
        node = self.mapping(node, key, required=("price", "limits", "rates", "features"))
        price = self.mapping(node.get("price", {}), f"{key}.price", required=PRICE_NAMES)
        limits_node = self.mapping(node.get("limits", {}), f"{key}.limits", required=LIMIT_NAMES)
        rates_node = self.mapping(node.get("rates", {}), f"{key}.rates", required=RATE_NAMES)
        sections = self.mapping(node.get("features", {}), f"{key}.features")
        limits: dict[str, LimitValue] = {}
        custom: set[str] = set()
        for lname, value in limits_node.items():
            if lname not in LIMIT_NAMES:
                continue
            if isinstance(value, dict) and set(value) == {"custom"}:
                custom.add(lname)
                value = value["custom"]
            limits[lname] = self._limit(value, f"{key}.limits.{lname}", lname)
        features: dict[str, bool] = {}
        feature_sections: dict[str, tuple[str, ...]] = {}
        for section, rows in sections.items():
            rows = self.mapping(rows, f"{key}.features.{section}")
            feature_sections[str(section)] = tuple(rows)
            for fname, flag in rows.items():
                if fname in features:
                    self.fail(f"{key}.features.{section}.{fname}", "a feature name used once", _Said("a repeated name"))
                checked = self.boolean(flag, f"{key}.features.{section}.{fname}")
                features[str(fname)] = bool(checked)
        fee = self.money(price.get("monthly_fee"), f"{key}.price.monthly_fee")
        included = self.whole(price.get("included_dau"), f"{key}.price.included_dau")
        overage_node = price.get("overage_per_10k_dau")
        overage = None if overage_node is None else self.money(overage_node, f"{key}.price.overage_per_10k_dau")
        rates = {r: self.rate(rates_node.get(r), f"{key}.rates.{r}") for r in rates_node if r in RATE_NAMES}
        if fee is None or included is None or any(v is None for v in rates.values()):
            return None
        return Plan(
            name=name,
            price=Price(fee, included, overage),
            limits=limits,
            custom=frozenset(custom),
            features=features,
            feature_sections=feature_sections,
            rates={k: v for k, v in rates.items() if v is not None},
        )

    def _limit(self, value: Any, key: str, name: str) -> LimitValue:
        if value == "unlimited":
            return None
        if name == "online_users" and isinstance(value, dict):
            node = self.mapping(value, key, required=("share_of_mau", "floor"))
            share = self.money(node.get("share_of_mau"), f"{key}.share_of_mau")
            floor = self.whole(node.get("floor"), f"{key}.floor")
            floor = None if floor is None else self.bounded(floor, f"{key}.floor", name)
            if share is not None and share > 1:
                self.fail(f"{key}.share_of_mau", "a share between 0 and 1", share)
            return MauShare(share or Decimal(0), floor or 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            self.fail(key, "a whole number >= 0, 'unlimited' or {custom: <default>}", value)
            return 0
        return self.bounded(value, key, name)

    def _same_keys(self, plans_node: dict[str, Any]) -> None:
        # A row present in one plan and missing from another is a hole in the sheet, not a default.
        def rows(plan: Any) -> set[str]:
            if not isinstance(plan, dict):
                return set()
            out: set[str] = set()
            for part in ("price", "limits", "rates"):
                if isinstance(plan.get(part), dict):
                    out |= {f"{part}.{k}" for k in plan[part]}
            for section, fs in (plan.get("features") or {}).items() if isinstance(plan.get("features"), dict) else ():
                if isinstance(fs, dict):
                    out |= {f"features.{section}.{f}" for f in fs}
            return out

        every = {name: rows(plan) for name, plan in plans_node.items()}
        union = set().union(*every.values()) if every else set()
        for name, have in every.items():
            for missing in sorted(union - have):
                if missing.split(".")[0] in ("features",):
                    others = [n for n, h in every.items() if missing in h]
                    self.fail(
                        f"plans.{name}.{missing}",
                        f"the row the other plans have ({', '.join(others)})",
                        _Said("nothing (missing key)"),
                    )


class _Routes(_Checker):
    def __init__(self, path: Path, problems: list[Problem], matrix: Matrix) -> None:
        super().__init__(path, problems)
        self.matrix = matrix
        self.features = set(matrix.feature_names)
        self.ids: dict[str, Param] = {}

    def build(self, doc: Any) -> RouteMap:
        top = self.mapping(
            doc, "(top)", required=("relations", "default_rates", "routes"), optional=("ids", "unmatched")
        )
        relations = {}
        for name, node in self.mapping(top.get("relations", {}), "relations").items():
            key = f"relations.{name}"
            node = self.mapping(node, key, optional=("owner_limit", "member_limit", "symmetric", "owners", "members"))
            for side in ("owner_limit", "member_limit"):
                if node.get(side) is not None and node[side] not in LIMIT_NAMES:
                    self.fail(f"{key}.{side}", f"a limit of the matrix ({', '.join(LIMIT_NAMES)})", node[side])
            owners, members = node.get("owners", "user"), node.get("members", "user")
            if owners not in (*KINDS, "app"):
                self.fail(f"{key}.owners", "app, user or room", owners)
            if members not in KINDS:
                self.fail(f"{key}.members", "user or room", members)
            relations[str(name)] = Relation(
                str(name),
                node.get("owner_limit"),
                node.get("member_limit"),
                self.boolean(node.get("symmetric", False), f"{key}.symmetric") or False,
                None if owners == "app" else owners,
                members if members in KINDS else "user",
            )
        self.ids = self._ids(top.get("ids") or {})
        unmatched = top.get("unmatched", "refuse")
        if unmatched not in ("refuse", "rate-only"):
            self.fail("unmatched", "refuse or rate-only", unmatched)
        defaults = self._rates(top.get("default_rates"), "default_rates", costs=False)
        rules: list[RouteRule] = []
        names: set[str] = set()
        routes_node = top.get("routes", [])
        if not isinstance(routes_node, list):
            self.fail("routes", "a list of routes", routes_node)
            routes_node = []
        shapes: dict[tuple[str, str, bool], str] = {}
        for i, node in enumerate(routes_node):
            rule = self._route(node, f"routes[{i}]", relations, defaults)
            if rule:
                if rule.name in names:
                    self.fail(f"routes[{i}].name", "a name used once", rule.name)
                elif rule.name in RESERVED_ROUTE_NAMES:
                    # Plans and rate keys are per route name: a route named like a built-in one would
                    # share them (an unmapped path could set a plan the real route then reuses).
                    self.fail(f"routes[{i}].name", f"a name other than {' or '.join(RESERVED_ROUTE_NAMES)}", rule.name)
                # Two routes on one method and path shape: the second could never match.
                shape = (rule.method, re.sub(r"\{[a-z_]+\}", "{}", rule.template), rule.prefix)
                if shape in shapes:
                    self.fail(
                        f"routes[{i}].path",
                        f"a path no other {rule.method} route has",
                        _Said(f"{rule.template} (same as {shapes[shape]})"),
                    )
                shapes[shape] = rule.name
                names.add(rule.name)
                rules.append(rule)
        fallback = RouteRule(RESERVED_ROUTE_NAMES[0], "*", "*", defaults)
        refuse = unmatched != "rate-only"
        rest = RouteRule(RESERVED_ROUTE_NAMES[1], "*", "/{org}/{app}/...", defaults, refuse=refuse)
        return RouteMap(relations, tuple(rules), fallback, rest)

    def _ids(self, node: Any) -> dict[str, Param]:
        """Path parameters that name ids: `user`, `room`, or a comma list `users`/`rooms` (batch routes)."""
        out: dict[str, Param] = {}
        for name, kind in self.mapping(node, "ids").items():
            many = isinstance(kind, str) and kind.endswith("s") and kind[:-1] in KINDS
            base = kind[:-1] if many else kind
            if base not in KINDS:
                self.fail(f"ids.{name}", "user, room, users or rooms", kind)
                continue
            out[str(name)] = Param(base, many)
        return out

    def _rates(self, node: Any, key: str, costs: bool = True) -> tuple[RateUse, ...]:
        """A route's rates (`costs`: one may count a call as the values its body names)."""
        if not isinstance(node, list):
            self.fail(key, "a list of {rate, by}", node)
            return ()
        out = []
        for i, item in enumerate(node):
            optional = ("algorithm", "cost", "most") if costs else ("algorithm",)
            item = self.mapping(item, f"{key}[{i}]", required=("rate", "by"), optional=optional)
            rate, by = item.get("rate"), item.get("by")
            algorithm = item.get("algorithm", "sliding")
            cost = most = None
            if "cost" in item:
                cost = self._selector(item["cost"], f"{key}[{i}].cost", ("body",), set())
                if "most" not in item:
                    self.fail(f"{key}[{i}].most", "the most values one call may name", _Said("nothing (missing key)"))
                    continue
            if "most" in item:
                if "cost" not in item:
                    self.fail(f"{key}[{i}].most", "most only beside a cost", item["most"])
                    continue
                most = self.whole(item["most"], f"{key}[{i}].most", 1)
            if by not in ("ip", "app", "user"):
                self.fail(f"{key}[{i}].by", "one of ip, app, user", by)
                continue
            if algorithm not in ("sliding", "exact"):
                self.fail(
                    f"{key}[{i}].algorithm", "sliding (a weighted two-window counter) or exact (a log)", algorithm
                )
                continue
            if rate in RATE_NAMES:
                amounts: dict[int, str] = {}  # each amount, with the first plan that has it
                for plan in self.matrix.plans.values():
                    if rate in plan.rates:
                        amounts.setdefault(plan.rates[rate].amount, plan.name)
                least = min(amounts, default=None)
                if most is not None and least is not None and most > least:
                    # A call naming more than some plan's rate ever admits could never pass there.
                    self.fail(f"{key}[{i}].most", f"at most plan {amounts[least]}'s {rate}, {least}", most)
                    continue
                out.append(RateUse(rate, None, None, by, algorithm, cost, most))
            else:
                parsed = self.rate(rate, f"{key}[{i}].rate")
                if parsed:
                    name = f"{parsed.amount}/{parsed.window_s}s"
                    if most is not None and most > parsed.amount:
                        # A call naming more than the rate ever admits could never pass.
                        self.fail(f"{key}[{i}].most", f"at most the rate's {parsed.amount}", most)
                        continue
                    out.append(RateUse(name, parsed.amount, parsed.window_s, by, algorithm, cost, most))
        return tuple(out)

    def _selector(self, node: Any, key: str, sources: tuple[str, ...], params: set[str]) -> Selector | None:
        if not isinstance(node, str) or not node:
            self.fail(key, f"a selector ({' | '.join(s + '.<name>' for s in sources)})", node)
            return None
        source, *path = node.split(".")
        if source not in sources or (source != "app" and not path) or (source == "app" and path):
            self.fail(key, f"a selector starting with one of {', '.join(sources)}", node)
            return None
        if source == "path" and (len(path) != 1 or path[0] not in params):
            self.fail(key, f"a parameter of the route's path ({', '.join(sorted(params))})", node)
            return None
        if not key.endswith(".unless") and any(not _FIELD.fullmatch(part) for part in path):
            # A filter step (name[field=true]) is for a removal's unless alone: on what a request
            # names, it would let the client choose what is counted.
            self.fail(key, "steps of a field name (letters, digits, _ and -)", node)
            return None
        return Selector(source, tuple(path))  # type: ignore[arg-type]

    def _route(
        self, node: Any, key: str, relations: dict[str, Relation], defaults: tuple[RateUse, ...]
    ) -> RouteRule | None:
        node = self.mapping(
            node,
            key,
            required=("name", "method", "path"),
            optional=(
                "rates",
                "feature",
                "changes",
                "login",
                "connection",
                "retention",
                "user",
                "outage",
                "shadow",
                "prefix",
                "admin",
                "refuses",
            ),
        )
        method, template = node.get("method"), node.get("path")
        if method not in METHODS:
            self.fail(f"{key}.method", f"one of {', '.join(METHODS)}", method)
        if not isinstance(template, str) or not template.startswith("/{org}/{app}"):
            self.fail(f"{key}.path", "a path template starting /{org}/{app}", template)
            return None
        odd = [seg for seg in template.split("/")[1:] if not _TEMPLATE_SEGMENT.fullmatch(seg)]
        if odd:
            # A brace left open would be matched as a literal; an empty segment never matches.
            self.fail(f"{key}.path", "segments that are {name} or letters, digits, _ . ~ -", _Said(repr(odd[0])))
            return None
        params = set(re.findall(r"\{([a-z_]+)\}", template))
        feature = node.get("feature")
        if feature is not None and feature not in self.features:
            self.fail(f"{key}.feature", "a feature of the matrix", _Said(f"unknown feature {feature!r}"))
        rates = self._rates(node["rates"], f"{key}.rates") if "rates" in node else defaults
        if method == "WEBSOCKET" and any(r.cost for r in rates):
            self.fail(f"{key}.rates", "no cost on a WEBSOCKET route (a connection has no body)", node.get("rates"))
        changes = []
        for j, ch in enumerate(node.get("changes") or []):
            ck = f"{key}.changes[{j}]"
            ch = self.mapping(ch, ck, required=("relation", "op", "owner"), optional=("members", "max_batch", "unless"))
            if ch.get("relation") not in relations:
                self.fail(f"{ck}.relation", f"a relation ({', '.join(relations)})", ch.get("relation"))
                continue
            if ch.get("op") not in ("add", "remove", "drop", "drop_member"):
                self.fail(f"{ck}.op", "one of add, remove, drop, drop_member", ch.get("op"))
                continue
            # Removals are applied after the upstream succeeded, so they may read its response; an
            # add may name its owner or its members from the response, not both (see binds_owner_later).
            owner = self._selector(ch.get("owner"), f"{ck}.owner", ("app", "path", "body", "response"), params)
            members = None
            if ch["op"] not in ("drop", "drop_member") or "members" in ch:
                members = self._selector(ch.get("members"), f"{ck}.members", ("path", "body", "response"), params)
            max_batch = self.whole(ch["max_batch"], f"{ck}.max_batch", 1) if "max_batch" in ch else None
            rel = relations[ch["relation"]]
            # drop_member's owner is the member being deleted (a user leaving every room).
            owner_kind = rel.member_kind if ch["op"] == "drop_member" else rel.owner_kind
            owner = self._kind(owner, owner_kind, f"{ck}.owner")
            members = self._kind(members, rel.member_kind, f"{ck}.members")
            if ch["op"] == "add" and owner and owner.source == "response":
                path_list = members is not None and members.source == "path" and members.many
                if members is not None and (members.source == "response" or path_list):
                    expected = "a path or body selector of one id when the owner comes from the response"
                    self.fail(f"{ck}.members", expected, ch.get("members"))
                    continue
                if rel.symmetric or not rel.member_limit:
                    # Only the member's side is checked before the upstream call: it needs a cap.
                    expected = "a path or body selector (an owner from the response needs a member_limit)"
                    self.fail(f"{ck}.owner", expected, ch.get("owner"))
                    continue
            unless = None
            if "unless" in ch:
                if ch["op"] != "remove":
                    self.fail(f"{ck}.unless", "no unless: it names what a removal left in place", ch["unless"])
                    continue
                unless = self._selector(ch["unless"], f"{ck}.unless", ("response",), params)
                steps = unless.path if unless is not None else ()
                if unless is not None and not (
                    all(_SELECTOR_STEP.fullmatch(part) for part in steps)
                    and any("[" in part for part in steps)
                    and _FIELD.fullmatch(steps[-1])
                ):
                    expected = "response.<list>[<field>=true|false].<id field>: the members the answer kept"
                    self.fail(f"{ck}.unless", expected, ch["unless"])
                    continue
                unless = self._kind(unless, rel.member_kind, f"{ck}.unless")
            if owner:
                changes.append(Change(ch["relation"], ch["op"], owner, members, max_batch, unless))
        retention = user = None
        if "retention" in node:
            retention = self._selector(node["retention"], f"{key}.retention", ("path",), params)
        if "user" in node:
            user = self._kind(
                self._selector(node["user"], f"{key}.user", ("path", "body"), params), "user", f"{key}.user"
            )
        most = {
            c.members.path[0]: c.max_batch for c in changes if c.members and c.members.source == "path" and c.max_batch
        }
        route_params = tuple(
            (name, replace(self.ids.get(name, Param(None)), most=most.get(name)))
            for name in re.findall(r"\{([a-z_]+)\}", template)
            if name not in ("org", "app")
        )
        login = bool(self.boolean(node.get("login", False), f"{key}.login"))
        connection = bool(self.boolean(node.get("connection", False), f"{key}.connection"))
        if (login or connection) and user is None:
            self.fail(f"{key}.user", "a selector naming the user who logs in", _Said("nothing (missing key)"))
        if connection and method != "WEBSOCKET":
            # A lease is released when its connection closes: an HTTP request has none to close.
            self.fail(f"{key}.connection", "true only on a WEBSOCKET route", _Said(f"a {method} route"))
        shadow = bool(self.boolean(node.get("shadow", False), f"{key}.shadow"))
        refuses: list[str] = []
        listed = node.get("refuses", [])
        if not isinstance(listed, list):
            self.fail(f"{key}.refuses", "a list of body fields (body.members)", listed)
            listed = []
        for j, item in enumerate(listed):
            found = self._selector(item, f"{key}.refuses[{j}]", ("body",), params)
            if found is not None and len(found.path) != 1:
                self.fail(f"{key}.refuses[{j}]", "a field at the top of the body (body.members)", item)
            elif found is not None:
                refuses.append(found.path[0])
        outage = node.get("outage")
        if outage not in (None, "open", "closed"):
            self.fail(f"{key}.outage", "open or closed", outage)
        return RouteRule(
            name=str(node.get("name")),
            method=str(method),
            template=template,
            rates=rates,
            feature=feature,
            changes=tuple(changes),
            login=login,
            connection=connection,
            retention=retention,
            user=user,
            outage=outage,
            shadow=shadow,
            prefix=bool(self.boolean(node.get("prefix", False), f"{key}.prefix")),
            admin=bool(self.boolean(node.get("admin", False), f"{key}.admin")),
            params=route_params,
            refuses=tuple(refuses),
        )

    def _kind(self, selector: Selector | None, kind: Kind | None, key: str) -> Selector | None:
        """The id policy a selector's values pass: the relation's side, or the path parameter's kind."""
        if selector is None or selector.source == "app":
            return selector
        if selector.source == "path":
            param = self.ids.get(selector.path[0])
            if kind is not None and (param is None or param.kind != kind):
                self.fail(key, f"a path parameter declared a {kind} id under ids:", selector.path[0])
                return None
            return replace(selector, kind=kind, many=bool(param and param.many))
        return replace(selector, kind=kind, many=True)


class _Accounts(_Checker):
    def __init__(self, path: Path, problems: list[Problem], matrix: Matrix) -> None:
        super().__init__(path, problems)
        self.matrix = matrix

    def build(self, doc: Any) -> dict[str, Account]:
        top = self.mapping(doc, "(top)", required=("accounts",))
        accounts: dict[str, Account] = {}
        owner: dict[str, str] = {}
        for name, node in self.mapping(top.get("accounts", {}), "accounts").items():
            key = f"accounts.{name}"
            node = self.mapping(
                node,
                key,
                required=("plan", "apps"),
                optional=("overrides", "subscribed_on", "frozen_on", "ip_allowlist", "dashboard_token_sha256"),
            )
            plan_name = node.get("plan")
            plan = self.matrix.plans.get(plan_name) if isinstance(plan_name, str) else None
            if plan is None:
                self.fail(f"{key}.plan", f"a plan of the matrix ({', '.join(self.matrix.plans)})", plan_name)
            apps = node.get("apps") or []
            if not isinstance(apps, list):
                self.fail(f"{key}.apps", "a list of appkeys org#app", apps)
                apps = []
            for i, app in enumerate(apps):
                if not isinstance(app, str) or not APPKEY.fullmatch(app):
                    self.fail(f"{key}.apps[{i}]", "an appkey org#app", app)
                elif app in owner:
                    self.fail(
                        f"{key}.apps[{i}]", "an app held by one account only", _Said(f"{app} (also in {owner[app]})")
                    )
                else:
                    owner[app] = str(name)
            if plan is not None and isinstance(apps, list) and len(apps) > 1 and not plan_may_hold(plan, len(apps)):
                self.fail(f"{key}.apps", one_app_rule(plan), _Said(f"{len(apps)} apps"))
            overrides = self.overrides(node.get("overrides") or {}, f"{key}.overrides", plan)
            start = self._date(node.get("subscribed_on", date(2000, 1, 1)), f"{key}.subscribed_on")
            frozen = self._date(node["frozen_on"], f"{key}.frozen_on") if node.get("frozen_on") else None
            allow = node.get("ip_allowlist") or []
            for i, net in enumerate(allow if isinstance(allow, list) else [allow]):
                try:
                    ipaddress.ip_network(str(net), strict=False)
                except ValueError:
                    self.fail(f"{key}.ip_allowlist[{i}]", "an IP address or network (10.0.0.0/8)", net)
            # The customer's own dashboard login: only its SHA-256 lives in the config and the store.
            token_hash = node.get("dashboard_token_sha256")
            if token_hash is not None and not (isinstance(token_hash, str) and _SHA256.fullmatch(token_hash)):
                self.fail(
                    f"{key}.dashboard_token_sha256", "64 lowercase hex digits (sha256sum of the token)", token_hash
                )
                token_hash = None
            accounts[str(name)] = Account(
                name=str(name),
                apps=tuple(a for a in apps if isinstance(a, str)),
                subscriptions=(Subscription(str(plan_name), start or date(2000, 1, 1)),),
                overrides=overrides,
                frozen_on=frozen,
                ip_allowlist=tuple(str(n) for n in allow),
                dashboard_token_sha256=token_hash,
            )
        return accounts

    def overrides(self, node: Any, key: str, plan: Plan | None) -> dict[str, int | None]:
        """An account's overrides: only limits its plan marks custom, each a whole number or unlimited."""
        overrides: dict[str, int | None] = {}
        for lname, value in self.mapping(node, key).items():
            okey = f"{key}.{lname}"
            if lname not in LIMIT_NAMES:
                self.fail(okey, f"a limit of the matrix ({', '.join(LIMIT_NAMES)})", _Said(f"unknown limit {lname!r}"))
            elif plan is not None and lname not in plan.custom:
                custom = ", ".join(sorted(plan.custom)) or "none"
                self.fail(okey, f"a limit plan {plan.name} lets an account set (custom: {custom})", lname)
            elif value == "unlimited":
                overrides[lname] = None
            else:
                checked = self.whole(value, okey)
                if checked is not None:
                    overrides[lname] = self.bounded(checked, okey, lname)
        return overrides

    def _date(self, node: Any, key: str) -> date | None:
        if isinstance(node, datetime):  # a YAML timestamp: a day is asked for, and compared as one
            self.fail(key, "a date YYYY-MM-DD", node)
            return None
        if isinstance(node, date):
            return node
        try:
            return date.fromisoformat(str(node))
        except ValueError:
            self.fail(key, "a date YYYY-MM-DD", node)
            return None


class _Settings(_Checker):
    def build(self, doc: Any) -> Settings:
        node = self.mapping(
            doc,
            "(top)",
            optional=(
                "trusted_proxies",
                "admin_token",
                "read_token",
                "admin_prefix",
                "max_body_bytes",
                "body_timeout_s",
                "outage",
                "storage_timeout_ms",
                "lease_ttl_s",
                "fallback_rate",
                "wrong_tokens",
                "shadow",
                "reservation_ttl_s",
                "ipv6_prefix",
                "max_url_bytes",
                "identifiers",
                "ratelimit_headers",
                "webhooks",
                "confirm_delay_ms",
            ),
        )
        base = Settings()
        proxies = []
        unix = False
        listed = node.get("trusted_proxies")
        if listed is not None and not isinstance(listed, list):
            self.fail("trusted_proxies", "a list of IP addresses or networks, or unix", listed)
        for i, net in enumerate(listed if isinstance(listed, list) else []):
            if net == "unix":
                unix = True
                continue
            try:
                proxies.append(ipaddress.ip_network(str(net), strict=False))
            except ValueError:
                self.fail(f"trusted_proxies[{i}]", "an IP address or network, or unix", net)
        outage = self.mapping(node.get("outage") or {}, "outage", optional=("rates", "counters"))
        for part in ("rates", "counters"):
            if part in outage and outage[part] not in ("open", "closed"):
                self.fail(f"outage.{part}", "open or closed", outage[part])
        token, read_token = node.get("admin_token"), node.get("read_token")
        for name, value in (("admin_token", token), ("read_token", read_token)):
            if value is not None and (not isinstance(value, str) or len(value) < MIN_LENGTH):
                self.fail(name, f"a string of at least {MIN_LENGTH} characters", _Said("a shorter value"))
        fallback = self.rate(node["fallback_rate"], "fallback_rate") if "fallback_rate" in node else base.fallback_rate
        wrong = self.rate(node["wrong_tokens"], "wrong_tokens") if "wrong_tokens" in node else base.wrong_tokens
        return Settings(
            trusted_proxies=tuple(proxies),
            trusted_unix=unix,
            admin_token=token,
            read_token=read_token,
            admin_prefix=str(node.get("admin_prefix", base.admin_prefix)),
            max_body_bytes=self.whole(node.get("max_body_bytes", base.max_body_bytes), "max_body_bytes", 1) or 1,
            body_timeout_s=self._seconds(node.get("body_timeout_s", base.body_timeout_s), "body_timeout_s", 3600),
            outage_rates=outage.get("rates", base.outage_rates),
            outage_counters=outage.get("counters", base.outage_counters),
            storage_timeout_ms=self.whole(
                node.get("storage_timeout_ms", base.storage_timeout_ms), "storage_timeout_ms", 1
            )
            or 1,
            lease_ttl_s=self.whole(node.get("lease_ttl_s", base.lease_ttl_s), "lease_ttl_s", 1) or 1,
            fallback_rate=fallback or base.fallback_rate,
            wrong_tokens=wrong or base.wrong_tokens,
            shadow=bool(self.boolean(node.get("shadow", False), "shadow")),
            reservation_ttl_s=self.whole(node.get("reservation_ttl_s", base.reservation_ttl_s), "reservation_ttl_s", 1)
            or 1,
            ipv6_prefix=self._prefix(node.get("ipv6_prefix", base.ipv6_prefix)),
            max_url_bytes=self.whole(node.get("max_url_bytes", base.max_url_bytes), "max_url_bytes", 256) or 256,
            identifiers=self._identifiers(node.get("identifiers") or {}),
            ratelimit_headers=bool(self.boolean(node.get("ratelimit_headers", False), "ratelimit_headers")),
            webhooks=self._webhooks(node.get("webhooks")),
            confirm_delay_ms=self._confirm_delay(node.get("confirm_delay_ms", base.confirm_delay_ms)),
        )

    def _seconds(self, node: Any, key: str, most: int) -> int:
        value = self.whole(node, key, 1)
        if value is not None and value > most:
            self.fail(key, f"a whole number of seconds from 1 to {most}", node)
            value = None
        return value or 1

    def _confirm_delay(self, node: Any) -> int:
        # Claims are held this much longer (a removal of what was just added waits); a second at most.
        value = self.whole(node, "confirm_delay_ms")
        if value is None or value > 1000:
            if value is not None:
                self.fail("confirm_delay_ms", "a whole number of milliseconds from 0 to 1000", node)
            return Settings().confirm_delay_ms
        return value

    def _webhooks(self, node: Any) -> Webhooks:
        if node is None:
            return Webhooks()
        node = self.mapping(
            node, "webhooks", required=("urls",), optional=("secret_env", "thresholds", "attempts", "retry_base_ms")
        )
        urls = node.get("urls")
        if not isinstance(urls, list) or not all(isinstance(u, str) and re.match(r"https?://[^\s]+$", u) for u in urls):
            # Shown masked: a URL may carry a password or a token.
            shown = [masked_url(u) if isinstance(u, str) else u for u in urls] if isinstance(urls, list) else urls
            self.fail("webhooks.urls", "a list of http(s) URLs", shown)
            urls = []
        thresholds = node.get("thresholds", [80, 100])
        if (
            not isinstance(thresholds, list)
            or not thresholds
            or not all(isinstance(t, int) and not isinstance(t, bool) and 1 <= t <= 100 for t in thresholds)
        ):
            self.fail("webhooks.thresholds", "a list of percentages from 1 to 100", thresholds)
            thresholds = [80, 100]
        env = node.get("secret_env", "QUOTA_WEBHOOK_SECRET")
        secret = os.environ.get(env, "") if isinstance(env, str) else ""
        if urls and len(secret) < MIN_LENGTH:
            self.fail(
                "webhooks.secret_env",
                f"the name of an environment variable holding a signing secret of {MIN_LENGTH}+ characters",
                _Said(f"{env!r}, which holds {len(secret)} characters"),
            )
        # Bounded: a delivery's retries end within minutes, and a shutdown waits for none longer.
        attempts = self.whole(node.get("attempts", 5), "webhooks.attempts", 1) or 5
        if attempts > MAX_WEBHOOK_ATTEMPTS:
            self.fail("webhooks.attempts", f"at most {MAX_WEBHOOK_ATTEMPTS}", attempts)
            attempts = 5
        base = self.whole(node.get("retry_base_ms", 500), "webhooks.retry_base_ms", 1) or 500
        if base > MAX_WEBHOOK_RETRY_MS:
            self.fail("webhooks.retry_base_ms", f"at most {MAX_WEBHOOK_RETRY_MS}", base)
            base = 500
        return Webhooks(tuple(urls), secret, tuple(sorted(set(thresholds))), attempts, base)

    def _prefix(self, node: Any) -> int:
        value = self.whole(node, "ipv6_prefix", 1)
        if value is None or value > 128:
            self.fail("ipv6_prefix", "a prefix length from 1 to 128", node)
            return 64
        return value

    def _identifiers(self, node: Any) -> IdPolicy:
        rules = dict(DEFAULT_RULES)
        for kind, spec in self.mapping(node, "identifiers", optional=KINDS).items():
            key = f"identifiers.{kind}"
            spec = self.mapping(spec, key, required=("pattern",), optional=("fold_case",))
            pattern = spec.get("pattern")
            try:
                compiled = re.compile(pattern) if isinstance(pattern, str) else None
            except re.error as exc:
                self.fail(f"{key}.pattern", "a regular expression", _Said(f"{pattern!r}: {exc}"))
                continue
            if compiled is None:
                self.fail(f"{key}.pattern", "a regular expression", pattern)
                continue
            # Ids end up in storage keys and in Lua: a policy must bound their length and exclude ','.
            # And in paths, which refuse what a server or gateway may read otherwise (decisions.
            # _odd_path): an id holding one could be counted and never named again.
            if any(compiled.fullmatch(bad) for bad in _NO_IDS):
                expected = (
                    "a pattern that bounds length (<= 256) and excludes ',', '/', '.', '..' and what no path"
                    " holds (space, # ? ; % \\ and characters that do not print)"
                )
                self.fail(f"{key}.pattern", expected, pattern)
                continue
            fold = self.boolean(spec.get("fold_case", False), f"{key}.fold_case")
            rules[kind] = IdRule(str(pattern), bool(fold))  # type: ignore[index]
        return IdPolicy(rules)


# Changes made at run time (admin API, CLI) pass the same checks, with the same messages, as accounts.yaml.
def plan_may_hold(plan: Plan, apps: int) -> bool:
    """Whether an account on `plan` may hold this many apps. A plan without overage holds one: its
    included DAU are the account's (usage sums the apps' peaks), and its ceiling, held per app
    and exact under concurrency, would let each further app add as many again."""
    return apps <= 1 or plan.price.overage_per_10k_dau is not None


def one_app_rule(plan: Plan) -> str:
    return f"one app on plan {plan.name} (no overage: its {plan.price.included_dau} DAU are the account's)"


# One step of a selector: a field name; in a removal's unless, also a list's items whose field is
# true or false (name[field=false]).
_FIELD = re.compile(r"[A-Za-z0-9_-]+")
# A literal segment is never `.` or `..`: no request path holds one (decisions._odd_path).
_TEMPLATE_SEGMENT = re.compile(r"\{[a-z_]+\}|(?!\.\.?$)[A-Za-z0-9_.~-]+")
# What an id pattern must not match (the checks above and decisions._odd_path's).
_NO_IDS = (
    "a" * 257,
    "a,b",
    ".",
    "..",
    "a/b",
    "a b",
    "a#b",
    "a?b",
    "a;b",
    "a%b",
    "a\\b",
    "a\x00b",
    "a\u200bb",
    "a\xa0b",
)
_SELECTOR_STEP = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\[[A-Za-z_][A-Za-z0-9_]*=(true|false)\])?")


def validate_account(matrix: Matrix, name: str, node: Any, source: str = "request body") -> Account:
    """One account in accounts.yaml's shape; raises ConfigError naming every fault."""
    problems: list[Problem] = []
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
        problems.append(Problem(source, "name", "1-64 characters of A-Z a-z 0-9 _ . -", _show(name)))
        raise ConfigError(problems)
    accounts = _Accounts(Path(source), problems, matrix).build({"accounts": {name: node}})
    if problems:
        raise ConfigError(problems)
    return accounts[name]


def validate_overrides(
    matrix: Matrix, plan: str | None, node: Any, source: str = "request body"
) -> dict[str, int | None]:
    problems: list[Problem] = []
    found = _Accounts(Path(source), problems, matrix).overrides(node, "overrides", matrix.plans.get(plan or ""))
    if problems:
        raise ConfigError(problems)
    return found


def validate_appkey(appkey: Any, source: str = "request body") -> str:
    if not isinstance(appkey, str) or not APPKEY.fullmatch(appkey):
        raise ConfigError([Problem(source, "app", "an appkey org#app", _show(appkey))])
    return appkey
