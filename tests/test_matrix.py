"""The limit matrix against the seed, row by row. The expected table is written from
shared/seed/im-plan-pricing.zh.md by hand, not generated from the YAML."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.conftest import run_cli

PLANS = ("free", "basic", "pro", "enterprise")
U = None  # 无上限

# (limit, free, basic, pro, enterprise); enterprise values are the 自定义 defaults.
SEED_LIMITS = [
    ("friends_per_user", 100, 250, 1000, 10000),
    ("registered_users", U, U, U, U),
    ("message_retention_days", 7, 90, 180, 180),
    ("groups_per_app", 100, 100000, 50000, 100000),  # basic: "10,0000" = 10 万
    ("members_per_group", 100, 250, 1000, 5000),
    ("groups_per_user", 100, 1000, 2000, 10000),
    ("chatrooms_per_app", 100, 10000, 50000, 100000),
    ("members_per_chatroom", 100, 2000, 10000, 200000),
    ("chatrooms_per_user", 100, 1000, 2000, 10000),
]
SEED_CUSTOM_ON_ENTERPRISE = {
    "online_users",
    "message_retention_days",
    "groups_per_app",
    "members_per_group",
    "groups_per_user",
    "chatrooms_per_app",
    "members_per_chatroom",
    "chatrooms_per_user",
}
SEED_PRICE = [
    ("monthly_fee", "0", "888", "2888", "4888"),
    ("included_dau", 100, 10000, 10000, 10000),
    ("overage_per_10k_dau", None, "850", "850", "850"),
]
PRO_ONLY = {
    "message_event_callbacks",
    "user_status_callbacks",
    "pre_send_callbacks",
    "group_read_receipts",
    "translation",
    "message_report",
    "realtime_moderation",
    "user_id_filtering",
    "text_moderation",
    "image_moderation",
    "audio_moderation",
    "video_moderation",
    "moderation_labels",
    "message_escalation",
}
EVERY_PLAN = {
    "user_attributes",
    "all_message_types",
    "custom_messages",
    "passthrough_messages",
    "offline_messages",
    "chatroom_broadcast",
    "chatroom_global_mute",
    "chatroom_message_priority",
    "chatroom_allowlist",
    "chatroom_history",
    "multi_device",
    "read_receipts",
    "message_recall",
    "do_not_disturb",
    "server_conversations",
    "uikit_callkit",
    "offline_push",
    "group_file_sharing",
    "image_thumbnails",
    "receive_offline_messages",
    "group_chatroom_notifications",
    "reactions",
    "threads",
    "presence",
    "ban_users",
    "mute_users",
    "mute_all",
    "usage_monitoring",
    "quality_monitoring",
    "tls_encryption",
    "file_encryption",
    "personal_data_deletion",
    "ip_allowlist",
    "iso27001",
    "gdpr",
    "soc2",
    "hipaa",
    "global_acceleration",
    "rest_system_messages",
    "rest_user_messages",
    "rest_group_messages",
    "rest_chatroom_messages",
    "rest_ban_users",
    "rest_block_users",
    "rest_message_recall",
    "rest_user_status",
    "sdk_android",
    "sdk_ios",
    "sdk_web",
    "sdk_mini_program",
}


@pytest.fixture(scope="module")
def plans() -> dict[str, Any]:
    result = run_cli("plans", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["plans"]


def test_four_plans(plans: dict[str, Any]) -> None:
    """The matrix has exactly the seed's four plans."""
    assert tuple(plans) == PLANS


@pytest.mark.parametrize("row", SEED_LIMITS, ids=[r[0] for r in SEED_LIMITS])
def test_limits_match_seed(plans: dict[str, Any], row: tuple[Any, ...]) -> None:
    """Every numeric limit is the seed's value, unlimited is null."""
    name, *values = row
    assert [plans[p]["limits"][name] for p in PLANS] == values


def test_online_users_rule_is_data(plans: dict[str, Any]) -> None:
    """Catches the online-user rule drifting from the plan sheet: 50 on free; 10% of MAU with floors
    of 500 (basic) and 1,000 (pro, enterprise's default), rounded down."""
    from quota.config import load_config
    from quota.matrix import MauShare

    assert plans["free"]["limits"]["online_users"] == 50
    floors = {"basic": 500, "pro": 1000, "enterprise": 1000}
    for p, floor in floors.items():
        rule = plans[p]["limits"]["online_users"]
        assert rule["share_of_mau"] == "0.10" and rule["floor"] == floor
    matrix = load_config().matrix
    basic = matrix.plans["basic"].limits["online_users"]
    assert isinstance(basic, MauShare)
    assert [basic.cap(0, 0), basic.cap(6009, 0), basic.cap(0, 6009), basic.cap(7001, 6999)] == [500, 600, 600, 700]


def test_enterprise_custom_rows(plans: dict[str, Any]) -> None:
    """Exactly the seed's 自定义 rows may be overridden, and only on enterprise."""
    assert set(plans["enterprise"]["custom"]) == SEED_CUSTOM_ON_ENTERPRISE
    for p in ("free", "basic", "pro"):
        assert plans[p]["custom"] == []


@pytest.mark.parametrize("row", SEED_PRICE, ids=[r[0] for r in SEED_PRICE])
def test_price_matches_seed(plans: dict[str, Any], row: tuple[Any, ...]) -> None:
    """Fees, included DAU and overage prices are the seed's, money as exact strings."""
    name, *values = row
    assert [plans[p]["price"][name] for p in PLANS] == values


def test_rates(plans: dict[str, Any]) -> None:
    """一般 100/秒 per IP; the history file once a minute per app."""
    for p in PLANS:
        assert plans[p]["rates"] == {"rest_per_ip": "100/second", "history_export_per_app": "1/minute"}


def test_features_match_seed(plans: dict[str, Any]) -> None:
    """Every ✓/✖ row: pro-only features off on free and basic, everything else on everywhere."""
    for p in PLANS:
        features = plans[p]["features"]
        assert set(features) == PRO_ONLY | EVERY_PLAN
        higher = p in ("pro", "enterprise")
        assert {f for f in PRO_ONLY if features[f]} == (PRO_ONLY if higher else set())
        assert all(features[f] for f in EVERY_PLAN)


def test_plans_table_has_plans_as_columns() -> None:
    """`quota plans` prints a table whose header is the four plans."""
    result = run_cli("plans")
    assert result.returncode == 0
    header = result.stdout.splitlines()[0].split()
    assert header == list(PLANS)
    assert "groups per app" in result.stdout and "100,000" in result.stdout
