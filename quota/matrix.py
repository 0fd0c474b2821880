"""The limit matrix: plans, their prices, limits, features and rates, as frozen values."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal

# The public schema: `quota plans --json` and the entitlement API use exactly these names.
LIMIT_NAMES = (
    "friends_per_user",
    "registered_users",
    "online_users",
    "message_retention_days",
    "groups_per_app",
    "members_per_group",
    "groups_per_user",
    "chatrooms_per_app",
    "members_per_chatroom",
    "chatrooms_per_user",
)
PRICE_NAMES = ("monthly_fee", "included_dau", "overage_per_10k_dau")
RATE_NAMES = ("rest_per_ip", "history_export_per_app")


@dataclass(frozen=True)
class Rate:
    amount: int
    window_s: int
    text: str

    @property
    def window_ms(self) -> int:
        return self.window_s * 1000


@dataclass(frozen=True)
class MauShare:
    """A cap that follows activity: max(floor, share x max(last month's MAU, this month's MAU))."""

    share: Decimal
    floor: int

    def cap(self, mau_last_month: int, mau_this_month: int) -> int:
        return max(self.floor, int(self.share * max(mau_last_month, mau_this_month)))

    def describe(self) -> str:
        percent = f"{self.share * 100:f}".rstrip("0").rstrip(".")
        return f"{percent}% of MAU (floor {self.floor})"


# None is unlimited (无上限).
LimitValue = int | MauShare | None


@dataclass(frozen=True)
class Price:
    monthly_fee: Decimal
    included_dau: int
    # None: the plan cannot go over its included DAU (free must upgrade instead).
    overage_per_10k_dau: Decimal | None


@dataclass(frozen=True)
class Plan:
    name: str
    price: Price
    limits: dict[str, LimitValue]
    # Limits an account may override (the seed's 自定义).
    custom: frozenset[str]
    features: dict[str, bool]
    feature_sections: dict[str, tuple[str, ...]]
    rates: dict[str, Rate]


@dataclass(frozen=True)
class Matrix:
    plans: dict[str, Plan] = field(default_factory=dict)

    @property
    def feature_names(self) -> tuple[str, ...]:
        names: dict[str, None] = {}
        for plan in self.plans.values():
            names.update(dict.fromkeys(plan.features))
        return tuple(names)


def limit_to_json(value: LimitValue) -> object:
    if isinstance(value, MauShare):
        return {"share_of_mau": str(value.share), "floor": value.floor}
    return value
