"""How numbers, money, dates and lists read to people: shared by the CLI and the dashboard.

Plain functions of the standard library only; the request path never needs them.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date
from decimal import Decimal

YUAN = "元"


def grouped(n: int) -> str:
    return f"{n:,}"


def money(amount: Decimal, unit: str = YUAN) -> str:
    """8557.975 -> '8,557.975 元': exact, as stored (bills are already rounded to 0.001)."""
    if not isinstance(amount, Decimal):
        raise TypeError(f"money is a Decimal, found {type(amount).__name__}")
    return f"{amount:,} {unit}"


def day(d: date | None, empty: str = "never") -> str:
    """2026-03-31 -> '31 Mar 2026' (month names in English whatever the locale)."""
    if d is None:
        return empty
    return f"{d.day} {MONTHS[d.month - 1]} {d.year}"


def month_name(year: int, month: int) -> str:
    return f"{FULL_MONTHS[month - 1]} {year}"


def listing(items: Sequence[object], empty: str = "none") -> str:
    """['a'] -> 'a'; ['a', 'b', 'c'] -> 'a, b and c'."""
    words = [str(i) for i in items]
    if not words:
        return empty
    if len(words) == 1:
        return words[0]
    return ", ".join(words[:-1]) + " and " + words[-1]


def percent(used: int, limit: int | None) -> str:
    if limit is None:
        return "no limit"
    if limit <= 0:
        return "100%"
    return f"{100 * used / limit:.0f}%"


MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
FULL_MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
