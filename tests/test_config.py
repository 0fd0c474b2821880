"""Validation: every fault names the file, the key, what was expected and what was found."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from quota.cli import EXIT_CONFIG
from quota.config import load_config
from quota.errors import ConfigError
from tests.conftest import run_cli
from tests.helpers import read_yaml, write_yaml


def edit(path: Path, change: object) -> None:
    doc = read_yaml(path)
    change(doc)  # type: ignore[operator]
    write_yaml(path, doc)


def problems(config_dir: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(config_dir)
    return str(info.value)


def test_shipped_config_is_valid() -> None:
    """`quota check-config` accepts the shipped config and exits 0."""
    result = run_cli("check-config", "config")
    assert result.returncode == 0, result.stderr
    assert "4 plans" in result.stdout


def test_unknown_key(config_dir: Path) -> None:
    """An unknown limit is named with its path."""
    edit(config_dir / "plans.yaml", lambda d: d["plans"]["pro"]["limits"].update(friend_per_user=5))
    text = problems(config_dir)
    assert "plans.yaml: plans.pro.limits.friend_per_user" in text and "unknown key" in text


def test_a_limit_past_what_a_counter_or_a_date_holds(config_dir: Path) -> None:
    """A cap past a trillion, a retention past 100 years, or an online floor past a trillion is
    refused by name: `unlimited` says it. Catches a plan whose history requests all fail (a date
    out of range) or whose cap Lua compares as a rounded double."""

    def huge(d: Any) -> None:
        limits = d["plans"]["pro"]["limits"]
        limits.update(friends_per_user=10**13, message_retention_days=36_501)
        d["plans"]["basic"]["limits"]["online_users"]["floor"] = 10**13

    edit(config_dir / "plans.yaml", huge)
    text = problems(config_dir)
    assert "plans.yaml: plans.pro.limits.friends_per_user: expected at most 1,000,000,000,000" in text, text
    assert "plans.pro.limits.message_retention_days: expected at most 36,500 (or 'unlimited')" in text, text
    assert "plans.basic.limits.online_users.floor: expected at most 1,000,000,000,000" in text, text


def test_a_date_with_a_time_is_refused(config_dir: Path) -> None:
    """A YAML timestamp where a day is asked for (`subscribed_on: 2026-01-01 10:00:00`) is refused
    by name. Catches it taken as a date (a datetime is one to Python): every request of the
    account's apps then failed comparing it with a day (a 500). Found by the review of 2026-12-02."""
    edit(config_dir / "accounts.yaml", lambda d: d["accounts"]["demo-pro"].update(subscribed_on="2026-01-01 10:00:00"))
    path = config_dir / "accounts.yaml"
    path.write_text(path.read_text().replace("'2026-01-01 10:00:00'", "2026-01-01 10:00:00"))
    assert "accounts.demo-pro.subscribed_on: expected a date YYYY-MM-DD" in problems(config_dir)


def test_wrong_type(config_dir: Path) -> None:
    """A string where a number belongs says what was expected and found."""
    edit(config_dir / "plans.yaml", lambda d: d["plans"]["basic"]["limits"].update(members_per_group="lots"))
    text = problems(config_dir)
    assert "plans.basic.limits.members_per_group: expected a whole number >= 0" in text and "'lots'" in text


def test_negative_number(config_dir: Path) -> None:
    """Negative caps are refused."""
    edit(config_dir / "plans.yaml", lambda d: d["plans"]["free"]["limits"].update(groups_per_app=-1))
    assert "plans.free.limits.groups_per_app: expected a whole number >= 0" in problems(config_dir)


@pytest.mark.parametrize("value", [5000, -1, "soon"])
def test_confirm_delay_is_bounded(config_dir: Path, value: object) -> None:
    """confirm_delay_ms holds claims that much longer: over a second (or not a number) is refused."""
    edit(config_dir / "quota.yaml", lambda d: d.update(confirm_delay_ms=value))
    text = problems(config_dir)
    assert "quota.yaml: confirm_delay_ms" in text and repr(value) in text
    edit(config_dir / "quota.yaml", lambda d: d.update(confirm_delay_ms=0))
    assert load_config(config_dir).settings.confirm_delay_ms == 0


def test_plan_missing_a_row(config_dir: Path) -> None:
    """A feature row one plan lacks and the others have is an error, not a default."""
    edit(config_dir / "plans.yaml", lambda d: d["plans"]["basic"]["features"]["capabilities"].pop("translation"))
    text = problems(config_dir)
    assert "plans.basic.features.capabilities.translation" in text and "free, pro, enterprise" in text


def test_missing_limit(config_dir: Path) -> None:
    """A plan without one of the public limits is an error."""
    edit(config_dir / "plans.yaml", lambda d: d["plans"]["pro"]["limits"].pop("groups_per_user"))
    assert "plans.pro.limits.groups_per_user: expected a value, found nothing (missing key)" in problems(config_dir)


def test_bad_rate(config_dir: Path) -> None:
    """A rate string that does not parse is named."""
    edit(config_dir / "plans.yaml", lambda d: d["plans"]["pro"]["rates"].update(rest_per_ip="100 per sec"))
    assert "plans.pro.rates.rest_per_ip: expected one rate such as '100/second'" in problems(config_dir)


@pytest.mark.parametrize(
    "rate",
    [
        "100/second, 1000/hour",  # `limits` would keep the first of the list, silently
        "100/second|5/minute",
        "10/0 seconds",  # `limits` reads a multiple of 0 as 1
        "0/second",  # refuses every call for ever: a feature switch is the way to close a route
        "100 per",
    ],
)
def test_a_rate_is_one_rate_of_at_least_one(config_dir: Path, rate: str) -> None:
    """Catches a rate loading as something other than what the operator wrote."""
    edit(config_dir / "plans.yaml", lambda d: d["plans"]["pro"]["rates"].update(rest_per_ip=rate))
    assert "plans.pro.rates.rest_per_ip: expected one rate such as '100/second'" in problems(config_dir)
    edit(config_dir / "quota.yaml", lambda d: d.update(fallback_rate=rate))
    assert "quota.yaml: fallback_rate: expected one rate" in problems(config_dir)


def test_a_key_written_twice_is_refused(config_dir: Path) -> None:
    """Catches YAML's last-one-wins on a key written twice: free's friends cap, 100 then 100000,
    would load as 100000. The file, the line and the key are named."""
    path = config_dir / "plans.yaml"
    text = path.read_text()
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("friends_per_user:"))
    indent = line[: len(line) - len(line.lstrip())]
    path.write_text(text.replace(line, f"{line}\n{indent}friends_per_user: 100000", 1))
    said = problems(config_dir)
    number = text.splitlines().index(line) + 2
    assert f"plans.yaml: line {number}, column {len(indent) + 1}: expected valid YAML" in said
    assert "key 'friends_per_user' is written twice" in said


@pytest.mark.parametrize(
    ("file", "change", "said"),
    [
        (
            "routes.yaml",
            lambda d: d["relations"]["group_members"].update(symmetric="false"),
            "relations.group_members.symmetric: expected true or false, found 'false'",
        ),
        ("quota.yaml", lambda d: d.update(trusted_proxies="10.0.0.1"), "trusted_proxies: expected a list"),
        ("quota.yaml", lambda d: d.update(trusted_proxies=0), "trusted_proxies: expected a list"),
        (
            "quota.yaml",
            lambda d: d.update(trusted_proxies=["unix", "unix:/run/nginx.sock"]),
            "trusted_proxies[1]: expected an IP address or network, or unix, found 'unix:/run/nginx.sock'",
        ),
    ],
)
def test_a_value_of_the_wrong_kind_is_named(config_dir: Path, file: str, change: Any, said: str) -> None:
    """Catches values read loosely: the string "false" taken as true, a string of one proxy read
    character by character, a 0 read as no proxies."""
    edit(config_dir / file, change)
    assert said in problems(config_dir)


@pytest.mark.parametrize(
    ("rate", "where", "said"),
    [
        ({"cost": "body.to"}, "most", "expected the most values one call may name, found nothing"),
        ({"most": 5}, "most", "expected most only beside a cost, found 5"),
        ({"cost": "body.to", "most": 21}, "most", "expected at most the rate's 20, found 21"),
        ({"cost": "path.org", "most": 3}, "cost", "expected a selector starting with one of body"),
        ({"cost": "body.to", "most": 0}, "most", "expected a whole number >= 1, found 0"),
        ({"rate": "rest_per_ip", "cost": "body.to", "most": 200}, "most", "expected at most plan free's rest_per_ip"),
    ],
)
def test_a_rate_counted_per_value_names_its_bound(config_dir: Path, rate: dict, where: str, said: str) -> None:
    """A rate that counts a call as the values its body names needs `most` (within the rate), and a
    body selector; `most` alone means nothing."""

    def change(d: dict) -> None:
        route = next(r for r in d["routes"] if r["name"] == "messages.groups")
        route["rates"] = [{"rate": "20/second", "by": "app"} | rate]

    edit(config_dir / "routes.yaml", change)
    text = problems(config_dir)
    assert "routes.yaml: routes[" in text and f"].rates[0].{where}: {said}" in text, text


def test_a_connection_has_no_body_to_count(config_dir: Path) -> None:
    """Catches a per-value cost on a WEBSOCKET route, which would refuse every connection."""

    def change(d: dict) -> None:
        route = next(r for r in d["routes"] if r["method"] == "WEBSOCKET")
        route["rates"] = [{"rate": "20/second", "by": "app", "cost": "body.to", "most": 3}]

    edit(config_dir / "routes.yaml", change)
    assert "].rates: expected no cost on a WEBSOCKET route (a connection has no body)" in problems(config_dir)


@pytest.mark.parametrize(
    ("refuses", "said"),
    [
        ("body.members", "refuses: expected a list of body fields (body.members), found 'body.members'"),
        (["path.org"], "refuses[0]: expected a selector starting with one of body, found 'path.org'"),
        (["body.a.b"], "refuses[0]: expected a field at the top of the body (body.members), found 'body.a.b'"),
    ],
)
def test_a_refused_field_is_one_at_the_top_of_the_body(config_dir: Path, refuses: Any, said: str) -> None:
    """Catches a `refuses` entry that could never match (a path value, a nested field) passing as
    if it guarded something."""

    def change(d: dict) -> None:
        next(r for r in d["routes"] if r["name"] == "groups.create")["refuses"] = refuses

    edit(config_dir / "routes.yaml", change)
    text = problems(config_dir)
    assert "]." + said in text, text


def test_default_rates_count_calls(config_dir: Path) -> None:
    """A per-value cost in default_rates would make every route read its body: refused."""
    edit(config_dir / "routes.yaml", lambda d: d["default_rates"][0].update(cost="body.to", most=5))
    text = problems(config_dir)
    assert "routes.yaml: default_rates[0].cost: expected one of the known keys (rate, by, algorithm)" in text, text


def test_a_free_account_holds_one_app(config_dir: Path) -> None:
    """Catches a free account given several apps, each with the whole free DAU allowance."""
    edit(config_dir / "accounts.yaml", lambda d: d["accounts"]["demo-free"]["apps"].append("demo#free2"))
    expected = "accounts.demo-free.apps: expected one app on plan free (no overage: its 100 DAU are the account's)"
    assert f"accounts.yaml: {expected}, found 2 apps" in problems(config_dir)


def test_float_money(config_dir: Path) -> None:
    """Money written as a float is refused: it must stay exact."""
    edit(config_dir / "plans.yaml", lambda d: d["plans"]["pro"]["price"].update(monthly_fee=2888.5))
    assert "plans.pro.price.monthly_fee" in problems(config_dir)


def test_broken_yaml_names_line(config_dir: Path) -> None:
    """Unparseable YAML names the file and the line."""
    (config_dir / "accounts.yaml").write_text("accounts:\n  a: [unclosed\n")
    text = problems(config_dir)
    assert "accounts.yaml: line" in text and "valid YAML" in text


@pytest.mark.parametrize(
    ("file", "text", "said"),
    [
        ("accounts.yaml", b"accounts:\n  a:\n    plan: free\n    subscribed_on: 2026-02-30\n", "line 4"),
        ("accounts.yaml", b"accounts:\n  a:\n    plan: free\n    subscribed_on: 2026-13-01\n", "month must be"),
        ("quota.yaml", b"max_body_bytes: " + b"9" * 5000 + b"\n", "line 1"),
        ("quota.yaml", b"# caf\xe9 (Latin-1)\nmax_body_bytes: 1024\n", "byte 5: expected text in UTF-8"),
        ("quota.yaml", b"max_body_bytes: !!float soon\n", "'soon' cannot be read as float"),
        ("quota.yaml", b"ratelimit_headers: !!bool maybe\n", "'maybe' cannot be read as bool"),
        ("quota.yaml", b"x: !!timestamp soon\n", "'soon' cannot be read as timestamp"),
        ("quota.yaml", b"x: !!binary abc\n", "failed to decode base64"),
    ],
)
def test_a_file_yaml_cannot_read_is_named(config_dir: Path, file: str, text: bytes, said: str) -> None:
    """Catches a date that is no date, an int past Python's digit limit or a byte not in UTF-8
    ending `quota check-config` with a traceback (found by the audit of 2026-12-02): each is a
    problem of its file, at its line, and the command exits as for any invalid config."""
    (config_dir / file).write_bytes(text)
    result = run_cli("check-config", str(config_dir))
    assert result.returncode == EXIT_CONFIG and "Traceback" not in result.stderr, result.stderr
    assert f"{file}: " in result.stderr and said in result.stderr, result.stderr


@pytest.mark.parametrize(
    "path", ["/{org}/{app}/token/{x", "/{org}/{app}/users/", "/{org}/{app}/a}b", "/{org}/{app}//x"]
)
def test_a_path_template_is_whole_segments(config_dir: Path, path: str) -> None:
    """Catches a brace left open loading as a literal segment (a route no request names as meant),
    or an empty segment (a route that never matches)."""
    edit(config_dir / "routes.yaml", lambda d: d["routes"].append({"name": "odd", "method": "GET", "path": path}))
    assert "routes.yaml: routes[" in problems(config_dir) and "segments that are {name}" in problems(config_dir)


@pytest.mark.parametrize(
    "pattern",
    [
        "[a-z0-9]+",  # unbounded
        "[a-z,]{1,64}",  # a comma splits batch lists
        "[a-z/]{1,64}",
        "[a-z.]{1,64}",  # `.` and `..` are dot segments
        "[a-z ]{1,64}",
        "[a-z#]{1,64}",  # what no path may hold: an id of it could be counted, never named again
        "[a-z;]{1,64}",
        "[^,/.]{1,64}",  # % \\ ? and what does not print
        "(?!\\.\\.?$)[^,/]{1,64}",
    ],
)
def test_an_id_pattern_admits_only_what_keys_and_paths_hold(config_dir: Path, pattern: str) -> None:
    """Catches an id policy whose ids break a storage key or a batch list, or cannot be named in a
    path (refused there: `#`, `;`, a space...): each is named at load; a plain one loads."""
    (config_dir / "quota.yaml").write_text(f"identifiers: {{user: {{pattern: '{pattern}'}}}}\n")
    assert "identifiers.user.pattern: expected a pattern that bounds length" in problems(config_dir)
    (config_dir / "quota.yaml").write_text("identifiers: {user: {pattern: '[a-z0-9_]{1,64}'}}\n")
    assert load_config(config_dir).settings.identifiers.rules["user"].pattern == "[a-z0-9_]{1,64}"


@pytest.mark.parametrize("fee", ["1e999999999", "1000000000001", "-1"])
def test_money_is_bounded(config_dir: Path, fee: str) -> None:
    """Catches a fee no bill can be rounded from (`1e999999999` is a finite Decimal)."""
    edit(config_dir / "plans.yaml", lambda d: d["plans"]["pro"]["price"].update(monthly_fee=fee))
    assert "plans.pro.price.monthly_fee: expected an amount from 0 to 1,000,000,000,000" in problems(config_dir)


def test_route_unknown_feature_and_limit(config_dir: Path) -> None:
    """A route naming an unknown feature, or a relation naming an unknown limit, is an error."""

    def change(d: dict) -> None:
        d["routes"][0]["feature"] = "teleportation"
        d["relations"]["contacts"]["owner_limit"] = "friends_per_person"

    edit(config_dir / "routes.yaml", change)
    text = problems(config_dir)
    assert "routes.yaml: routes[0].feature" in text and "teleportation" in text
    assert "relations.contacts.owner_limit" in text and "friends_per_person" in text


@pytest.mark.parametrize("name", ["unmatched", "other"])
def test_route_named_like_a_built_in_one(config_dir: Path, name: str) -> None:
    """Catches a route named `unmatched` or `other` being accepted: plans are kept per route name, so
    an unmapped path sent first would leave its rates-only plan for the real route to reuse, and the
    route's counted adds would be skipped (a cap walked past). `quota check-config` names it."""

    def change(d: dict) -> None:
        d["routes"][0]["name"] = name

    edit(config_dir / "routes.yaml", change)
    assert f"routes.yaml: routes[0].name: expected a name other than other or unmatched, found {name!r}" in problems(
        config_dir
    )
    result = run_cli("check-config", str(config_dir))
    assert result.returncode != 0 and "routes[0].name" in result.stderr + result.stdout


def test_connection_on_an_http_route(config_dir: Path) -> None:
    """Catches `connection: true` accepted on an HTTP route: every plain request would take an online
    slot under one empty connection id, never released by a close (audit of 2026-12-01)."""

    def change(d: dict) -> None:
        route = next(r for r in d["routes"] if r.get("connection"))
        route["method"] = "GET"

    edit(config_dir / "routes.yaml", change)
    text = problems(config_dir)
    assert ".connection: expected true only on a WEBSOCKET route, found a GET route" in text, text


def test_route_bad_selector(config_dir: Path) -> None:
    """A change whose selector names a path parameter the route lacks is an error."""
    edit(
        config_dir / "routes.yaml",
        lambda d: d["routes"].append(
            {
                "name": "x",
                "method": "POST",
                "path": "/{org}/{app}/x/{a}",
                "changes": [{"relation": "contacts", "op": "add", "owner": "path.b", "members": "path.a"}],
            }
        ),
    )
    assert "changes[0].owner: expected a parameter of the route's path (a, app, org)" in problems(config_dir)


_REMOVE = {"relation": "group_members", "op": "remove", "owner": "path.a", "members": "path.a"}


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (
            {"relation": "contacts", "op": "add", "owner": "response.data.id", "members": "path.a"},
            "changes[0].owner: expected a path or body selector (an owner from the response needs a member_limit)",
        ),
        (
            {"relation": "app_groups", "op": "add", "owner": "response.data.id", "members": "path.a"},
            "changes[0].owner: expected a path or body selector (an owner from the response needs a member_limit)",
        ),
        (
            {"relation": "group_members", "op": "add", "owner": "response.data.id", "members": "response.data.u"},
            "changes[0].members: expected a path or body selector of one id when the owner comes from the response",
        ),
        (
            {"relation": "group_members", "op": "add", "owner": "path.a", "members": "body.u", "unless": "response.x"},
            "changes[0].unless: expected no unless: it names what a removal left in place",
        ),
        (
            {**_REMOVE, "unless": "body.x"},
            "changes[0].unless: expected a selector starting with one of response",
        ),
        (
            {**_REMOVE, "unless": "response.["},
            "changes[0].unless: expected response.<list>[<field>=true|false].<id field>: the members the answer kept",
        ),
        (
            {**_REMOVE, "unless": "response.data[result=false]"},
            "changes[0].unless: expected response.<list>[<field>=true|false].<id field>",
        ),
        (
            {**_REMOVE, "unless": "response.data.user"},
            "changes[0].unless: expected response.<list>[<field>=true|false].<id field>",
        ),
        (
            {"relation": "group_members", "op": "add", "owner": "path.a", "members": "body.usernames[x=true]"},
            "changes[0].members: expected steps of a field name (letters, digits, _ and -)",
        ),
        (
            {"relation": "group_members", "op": "add", "owner": "response.data.id", "members": "path.usernames"},
            "changes[0].members: expected a path or body selector of one id when the owner comes from the response",
        ),
    ],
)
def test_route_response_selectors_where_they_hold(config_dir: Path, change: dict[str, str], said: str) -> None:
    """Catches an add reading both sides from the response (nothing to check before the call), an
    owner from the response on a relation with no member cap to reserve under, and `unless` off a
    removal or in a form the selector does not read: each named, with the file and key."""
    route = {"name": "x", "method": "POST", "path": "/{org}/{app}/x/{a}/{usernames}", "changes": [change]}
    edit(config_dir / "routes.yaml", lambda d: d["routes"].append(route))
    text = problems(config_dir)
    assert said in text and "routes.yaml" in text, text


def test_override_only_where_custom(config_dir: Path) -> None:
    """Overrides are allowed only for limits the plan marks custom."""
    edit(
        config_dir / "accounts.yaml", lambda d: d["accounts"]["demo-basic"].update(overrides={"members_per_group": 999})
    )
    text = problems(config_dir)
    assert "accounts.demo-basic.overrides.members_per_group" in text and "plan basic" in text


def test_account_unknown_plan_and_bad_appkey(config_dir: Path) -> None:
    """An account on a plan that does not exist, or with a malformed appkey, is an error."""
    edit(config_dir / "accounts.yaml", lambda d: d["accounts"]["demo-pro"].update(plan="platinum", apps=["nohash"]))
    text = problems(config_dir)
    assert "accounts.demo-pro.plan" in text and "platinum" in text and "apps[0]" in text


def test_all_problems_reported_at_once(config_dir: Path) -> None:
    """Several faults in several files come back together."""
    edit(config_dir / "plans.yaml", lambda d: d["plans"]["free"]["limits"].update(groups_per_app=-1))
    edit(config_dir / "quota.yaml", lambda d: d.update(outage={"rates": "sometimes"}))
    text = problems(config_dir)
    assert "plans.yaml" in text and "quota.yaml: outage.rates" in text


def test_check_config_cli_fails_with_messages(config_dir: Path) -> None:
    """`quota check-config DIR` exits non-zero and prints the key."""
    edit(config_dir / "plans.yaml", lambda d: d["plans"]["free"]["limits"].update(groups_per_app=-1))
    result = run_cli("check-config", str(config_dir))
    assert result.returncode != 0
    assert "plans.free.limits.groups_per_app" in result.stderr


def test_serve_refuses_bad_config_before_serving(config_dir: Path) -> None:
    """`quota serve` with a bad config exits before binding a port."""
    edit(config_dir / "plans.yaml", lambda d: d["plans"]["free"]["limits"].update(groups_per_app=-1))
    result = run_cli("serve", "--config", str(config_dir), "--port", "1", timeout=30)
    assert result.returncode != 0 and "plans.free.limits.groups_per_app" in result.stderr
