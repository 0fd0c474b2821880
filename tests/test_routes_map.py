"""The route trie (quota/routes.py) and the route map's validation (quota/config.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from quota.config import load_config
from quota.errors import ConfigError
from quota.routes import RouteMap, RouteRule
from quota.store.memory import MemoryStore
from tests.conftest import Clock, make_client
from tests.helpers import read_yaml, write_yaml


@pytest.fixture(scope="module")
def routes() -> RouteMap:
    return load_config().routes


def name(routes: RouteMap, method: str, path: str) -> str:
    return routes.match(method, path).rule.name


def test_head_is_matched_as_get(routes: RouteMap) -> None:
    """Catches HEAD falling to `unmatched`/`other` (a 404, or a request that skips the GET route's rates)."""
    assert name(routes, "HEAD", "/demo/pro/users") == "users.list"
    assert name(routes, "HEAD", "/demo/pro/chatgroups/12") == "groups.get"
    assert routes.match("HEAD", "/demo/pro/users/alice").params["username"] == "alice"


def test_only_slashes_are_trimmed(routes: RouteMap) -> None:
    """Catches a trim that takes other characters with the slashes: `/users/X` (a capital, folded
    later) must name user X, not list the users."""
    assert name(routes, "GET", "/demo/pro/users/X") == "users.get"
    assert routes.match("GET", "/Xdemo/pro/users/uX").params == {"org": "Xdemo", "app": "pro", "username": "uX"}


def test_trailing_slash_is_ignored(routes: RouteMap) -> None:
    """Catches `/x/` escaping the checks of `/x` (an upstream that serves both would be unmetered)."""
    assert name(routes, "GET", "/demo/pro/users/") == "users.list"
    assert name(routes, "POST", "/demo/pro/chatgroups/12/users/bob/") == "groups.add_member"
    assert routes.match("POST", "/demo/pro/chatgroups/12/users/bob/").params == {
        "org": "demo",
        "app": "pro",
        "group_id": "12",
        "username": "bob",
    }


def test_literal_beats_parameter_and_prefix(routes: RouteMap) -> None:
    """Catches a prefix (or parameter) route shadowing a literal one: `/moderation/text` needs
    text_moderation, not the realtime_moderation gate of the `/moderation` prefix; and
    `/users/{u}/joined_chatgroups` is not `/users/{u}` plus something."""
    assert name(routes, "PUT", "/demo/pro/moderation/text") == "moderation.text"
    assert name(routes, "PUT", "/demo/pro/moderation/image") == "moderation.image"
    assert name(routes, "PUT", "/demo/pro/callbacks/pre_send") == "callbacks.pre_send"
    assert name(routes, "GET", "/demo/pro/users/bob/joined_chatgroups") == "groups.joined"
    # A user literally named like a literal segment is still a parameter where no literal applies.
    assert routes.match("GET", "/demo/pro/users/users").params["username"] == "users"


def test_prefix_routes_cover_deeper_paths(routes: RouteMap) -> None:
    """Catches a feature gate over a prefix that stops at one level, or at one method: any depth
    under `/moderation` and `/callbacks`, by any method, needs the prefix route's feature (or the
    nearer kind's), and the bare prefix itself is covered."""
    assert name(routes, "PUT", "/demo/pro/moderation/other") == "moderation.other"
    assert name(routes, "PUT", "/demo/pro/moderation/a/b/c/d") == "moderation.other"
    assert name(routes, "PUT", "/demo/pro/moderation") == "moderation.other"
    assert name(routes, "PUT", "/demo/pro/moderation/text/deeper") == "moderation.text"
    assert name(routes, "PUT", "/demo/pro/callbacks/x/y/") == "callbacks.other"
    assert name(routes, "GET", "/demo/pro/moderation/text") == "moderation.text"
    assert name(routes, "DELETE", "/demo/pro/callbacks/pre_send") == "callbacks.pre_send"
    # A method no route can name is gated too: ANY stands for every method.
    assert name(routes, "OPTIONS", "/demo/pro/moderation/text") == "moderation.text"
    assert name(routes, "TRACE", "/demo/pro/callbacks/x") == "callbacks.other"


def overlapping() -> RouteMap:
    """A map where literals and parameters compete at the same place, beside prefix routes."""
    templates = [
        ("GET", "/{org}/{app}/users/{username}", False),
        ("GET", "/{org}/{app}/users/me", False),
        ("GET", "/{org}/{app}/users/me/{thing}", False),
        ("GET", "/{org}/{app}/{kind}/me", False),
        ("GET", "/{org}/{app}/{kind}/{id}", False),
        ("GET", "/{org}/{app}/users", True),
        ("POST", "/{org}/{app}/users/{username}/x", False),
    ]
    rules = tuple(
        RouteRule(f"r{i}", method, template, rates=(), prefix=prefix)
        for i, (method, template, prefix) in enumerate(templates)
    )
    return RouteMap({}, rules, RouteRule("other", "*", "", rates=()), RouteRule("unmatched", "*", "", rates=()))


@pytest.mark.parametrize("any_first", [True, False])
def test_a_route_of_any_method_yields_to_a_named_one(any_first: bool) -> None:
    """Catches `method: ANY` taking a method another route on the same path names (whichever comes
    first in the file), or missing one it should take: a method no route can name (OPTIONS,
    TRACE, a server's own) is the ANY route's, not the unmatched rule's (found by the review of
    2026-12-02: under `unmatched: rate-only` such a method passed a gated path on the rate alone)."""
    listed = [
        RouteRule("any", "ANY", "/{org}/{app}/things", rates=()),
        RouteRule("put", "PUT", "/{org}/{app}/things", rates=()),
    ]
    rules = tuple(listed if any_first else reversed(listed))
    routes = RouteMap({}, rules, RouteRule("other", "*", "", rates=()), RouteRule("unmatched", "*", "", rates=()))
    assert name(routes, "PUT", "/demo/pro/things") == "put"
    for method in ("GET", "HEAD", "POST", "DELETE", "PATCH"):
        assert name(routes, method, "/demo/pro/things") == "any", method
    for method in ("OPTIONS", "TRACE", "PROPFIND"):
        assert name(routes, method, "/demo/pro/things") == "any", method
        assert name(routes, method, "/demo/pro/elsewhere") == "unmatched", method


@pytest.mark.parametrize("which", ["configured", "overlapping"])
def test_first_path_shortcut_agrees_with_the_full_walk(routes: RouteMap, which: str) -> None:
    """match() tries the walk's first path (literal before parameter) without recursion, then falls
    back to the backtracking walk. Over every template, filled with ids and with words that are
    literal segments elsewhere (which force backtracking), both must name the same rule and params.
    Catches: a shortcut that takes a parameter where the walk takes a literal, or that accepts a
    path the walk would have matched elsewhere."""
    routes = routes if which == "configured" else overlapping()
    words = sorted({seg for rule in routes.rules for seg in rule.template.split("/") if seg and "{" not in seg})
    checked = 0
    for rule in routes.rules:
        segs = rule.template.strip("/").split("/")
        for fill in ["u1", "12", *words]:
            for extra in ("", "/deeper", "/"):
                path = "/" + "/".join(fill if s.startswith("{") else s for s in segs) + extra
                for method in ("GET", "POST", "PUT", "DELETE"):
                    got = routes.match(method, path)
                    trimmed = path.strip("/").split("/")
                    walked = routes._walk(routes._root, trimmed, 0, method, [])
                    want = (walked.rule.name, walked.params) if walked else ("unmatched", None)
                    assert (got.rule.name, got.params if walked else None) == want, (method, path)
                    checked += 1
    assert checked > 100


def test_unmatched_under_an_app_and_other(routes: RouteMap) -> None:
    """Catches a path under an app that no route names slipping through unmetered (must be
    `unmatched`, refused by default), an empty segment matching a parameter, and a path under
    no app being treated as an app's (`other`: the general per-IP rate only)."""
    unmatched = routes.match("GET", "/demo/pro/nothing/here")
    assert unmatched.rule.name == "unmatched" and unmatched.rule.refuse
    assert unmatched.params == {"org": "demo", "app": "pro"}
    assert name(routes, "DELETE", "/demo/pro/token") == "unmatched"
    assert name(routes, "GET", "/demo/pro/users//joined_chatgroups") == "unmatched"
    # A route that is not a prefix covers its own path only, not deeper ones.
    assert name(routes, "GET", "/demo/pro/users/u1/nothing") == "unmatched"
    for path in ("/", "/demo", "/demo/", "//pro", "favicon.ico"):
        other = routes.match("GET", path)
        assert other.rule.name == "other" and other.params == {}, path


async def test_unknown_app_and_unnamed_path_are_404() -> None:
    """Catches an unknown app let through unmetered on some path (it is 404 on every path, named
    or not), and an unnamed path under a known app reaching the upstream."""
    store = MemoryStore()
    async with make_client(store, Clock()) as c:
        for method, path in (
            ("GET", "/nobody/none/users"),
            ("POST", "/nobody/none/chatgroups"),
            ("GET", "/nobody/none/anything/at/all"),
            ("HEAD", "/demo/pro/not-a-route"),
            ("PATCH", "/demo/pro/users"),
        ):
            r = await c.request(method, path)
            assert r.status_code == 404, (method, path, r.text)
        # Past quota (the gateway itself redirects `/users/` to `/users`).
        assert (await c.head("/demo/pro/users/")).status_code in (200, 307)
    assert not store.sets


# Config validation


def edit_routes(config_dir: Path, change: Any) -> str:
    path = config_dir / "routes.yaml"
    doc = read_yaml(path)
    change(doc)
    write_yaml(path, doc)
    with pytest.raises(ConfigError) as info:
        load_config(config_dir)
    return str(info.value)


def route(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return next(r for r in doc["routes"] if r["name"] == name)


def test_undeclared_path_param_in_a_change(config_dir: Path) -> None:
    """Catches a change reading a path parameter that `ids:` does not declare: it would count a
    value no id policy checked (`zz,victim`, `ALICE`, 10 KB of text)."""
    text = edit_routes(config_dir, lambda d: d["ids"].pop("friend"))
    # contacts.add and contacts.remove (routes[6], routes[7]) both read path.friend.
    for index in (6, 7):
        assert (
            f"routes.yaml: routes[{index}].changes[0].members: expected a path parameter declared a user id "
            "under ids:, found 'friend'" in text
        ), text


def test_path_param_declared_as_the_wrong_kind(config_dir: Path) -> None:
    """Catches a room parameter counted under the user policy (or the reverse)."""
    text = edit_routes(config_dir, lambda d: d["ids"].update(group_id="user"))
    assert "declared a room id under ids:" in text and "group_id" in text


def test_duplicate_method_and_path_shape(config_dir: Path) -> None:
    """Catches a second route on the same method and path shape (other parameter names): it could
    never match, so its rates and counters would silently never apply."""

    def dup(doc: dict[str, Any]) -> None:
        doc["routes"].append({"name": "users.get2", "method": "GET", "path": "/{org}/{app}/users/{owner}"})

    text = edit_routes(config_dir, dup)
    assert "path: expected a path no other GET route has" in text and "users.get" in text


def test_bad_algorithm(config_dir: Path) -> None:
    """Catches a typo'd `algorithm` silently falling back to the sliding window."""
    text = edit_routes(
        config_dir,
        lambda d: route(d, "groups.joined").update(rates=[{"rate": "50/second", "by": "ip", "algorithm": "log"}]),
    )
    assert "rates[0].algorithm" in text and "'log'" in text


def test_exact_algorithm_is_accepted(config_dir: Path) -> None:
    """Catches `algorithm: exact` not reaching the RateOp (the route would keep the sliding window)."""
    path = config_dir / "routes.yaml"
    doc = read_yaml(path)
    route(doc, "groups.joined")["rates"] = [{"rate": "50/second", "by": "ip", "algorithm": "exact"}]
    write_yaml(path, doc)
    rule = load_config(config_dir).routes.match("GET", "/demo/pro/users/bob/joined_chatgroups").rule
    assert [r.algorithm for r in rule.rates] == ["exact"]
