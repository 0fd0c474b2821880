"""The `quota` command as a user types it: the store's one source, the config's, init, --version."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis as redis_sync

from quota.cli import main
from tests.conftest import RedisServer, run_cli

STATEFUL = [
    ["entitlements", "demo#free", "--user", "alice"],
    ["usage", "demo#free"],
    ["bill", "demo-basic", "--month", "2026-10"],
    ["change-plan", "demo-basic", "pro"],
    ["freeze", "demo-basic"],
    ["forget-user", "demo#free", "alice"],
    ["reconcile", "demo#free", "--source", "state.json"],
]


@pytest.mark.parametrize("argv", STATEFUL, ids=lambda a: a[0])
def test_stateful_commands_need_a_store(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --redis or QUOTA_REDIS_URL, a command on stored state exits 2 and says why, instead of
    answering from (or saving into) an empty in-memory store.
    Catches: success printed for work saved into a throwaway in-memory store."""
    monkeypatch.delenv("QUOTA_REDIS_URL", raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--redis" in err and "QUOTA_REDIS_URL" in err


@pytest.mark.redis
def test_redis_url_from_the_environment(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """QUOTA_REDIS_URL is the store when --redis is not given: a freeze is saved there.
    Catches: QUOTA_REDIS_URL ignored."""
    redis_server.flush()
    monkeypatch.setenv("QUOTA_REDIS_URL", redis_server.url)
    assert main(["freeze", "demo-basic", "--date", "2026-11-02", "--json"]) == 0
    client = redis_sync.Redis(port=redis_server.port)
    stored = b"".join(v for v in client.hgetall(next(k for k in client.keys() if client.type(k) == b"hash")).values())
    client.close()
    assert b"2026-11-02" in stored
    assert main(["bill", "demo-basic", "--month", "2026-10"]) == 0


def test_config_from_the_environment_and_init(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`quota init DIR` writes an editable copy that validates; QUOTA_CONFIG makes quota read it.
    Catches: QUOTA_CONFIG ignored, an init copy that does not validate, an init that overwrites."""
    target = tmp_path / "mine"
    assert main(["init", str(target)]) == 0
    assert sorted(p.name for p in target.iterdir()) == ["accounts.yaml", "plans.yaml", "quota.yaml", "routes.yaml"]
    plans = target / "plans.yaml"
    plans.write_text(plans.read_text().replace("friends_per_user: 100", "friends_per_user: 7", 1))
    monkeypatch.setenv("QUOTA_CONFIG", str(target))
    capsys.readouterr()
    assert main(["check-config"]) == 0
    assert str(target) in capsys.readouterr().out
    assert main(["plans", "--json"]) == 0
    assert '"friends_per_user": 7' in capsys.readouterr().out
    with pytest.raises(SystemExit, match="not empty"):
        main(["init", str(target)])


def test_version_and_bad_upstream() -> None:
    """`quota --version` names the version; `quota proxy` with a malformed --upstream says what it expects.
    Catches: a missing --version, a malformed upstream failing late or vaguely."""
    out = run_cli("--version")
    assert out.returncode == 0 and out.stdout.startswith("quota 0.")
    out = run_cli("proxy", "--upstream", "gateway:8080")
    assert out.returncode != 0 and "http(s)://host[:port][/prefix]" in out.stderr
    out = run_cli("proxy", "--upstream", "http://gateway:8080", "--read-timeout", "0")
    assert out.returncode != 0 and "--read-timeout must be above 0" in out.stderr


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--peak-dau", "20000", "--peak-dau", "-10000"], "--peak-dau is a number of users (0 or more), found -10000"),
        (["--peak-dau", "100", "--subscribed-on", "2026-12-05", "--month", "2026-11"], "is after the month 2026-11"),
        (["--peak-dau", "100", "--subscribed-on", "the 5th"], "--subscribed-on must be YYYY-MM-DD, found 'the 5th'"),
    ],
)
def test_a_what_if_bill_refuses_what_no_account_could_be_billed(args: list[str], said: str) -> None:
    """Catches a what-if bill taking a negative peak (one app's negative DAU cancelled another's
    overage: 888 元 for 20,000 DAU on basic), billing a month before its plan started, or a date that
    is no date with a traceback."""
    out = run_cli("bill", "--plan", "basic", *args)
    assert out.returncode != 0 and said in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.redis
def test_reconcile_sends_no_admin_token_over_plain_http_off_this_machine(redis_server: RedisServer) -> None:
    """Catches `quota reconcile --source http://...` sending QUOTA_ADMIN_TOKEN in clear to another
    host, where anyone on the path reads the token that opens every app's admin routes. Refused
    before any connection (192.0.2.1 is a documentation address: a try would hang or fail on the
    network, not name the refusal); https, and http to this machine, stay allowed (test_admin)."""
    token = {"QUOTA_ADMIN_TOKEN": "t" * 40}
    for host in ("192.0.2.1:9", "gateway.internal", "127.0.0.1.example.com"):
        out = run_cli(
            "reconcile",
            "demo#free",
            "--source",
            f"http://{host}/demo/free/_state",
            "--redis",
            redis_server.url,
            env=token,
            timeout=20,
        )
        assert out.returncode != 0 and "use https" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr and "t" * 40 not in out.stderr + out.stdout


@pytest.mark.redis
def test_urls_in_errors_hide_their_secrets(redis_server: RedisServer) -> None:
    """Catches a CLI error quoting a URL whole (audit of 2026-12-02): a source that did not answer,
    or a store URL of an unknown scheme, printed the password and the token they carried."""
    source = "http://ops:s3cret-pass@127.0.0.1:9/state?token=t0ken-in-query"
    out = run_cli("reconcile", "demo#free", "--source", source, "--redis", redis_server.url)
    assert out.returncode != 0 and "127.0.0.1:9/state" in out.stderr, out.stderr
    out2 = run_cli("usage", "demo#free", "--redis", "rediss+bogus://u:s3cret-pass@h:1/0?token=t0ken-in-query")
    assert out2.returncode != 0 and "rediss+bogus://u:***@h:1/0" in out2.stderr, out2.stderr
    out3 = run_cli("usage", "demo#free", "--redis", "redis+sentinel://:s3cret-pass@127.0.0.1:1")
    assert out3.returncode != 0 and "needs a service name" in out3.stderr, out3.stderr
    for said in (out.stdout + out.stderr, out2.stdout + out2.stderr, out3.stdout + out3.stderr):
        assert "s3cret-pass" not in said and "t0ken-in-query" not in said, said
