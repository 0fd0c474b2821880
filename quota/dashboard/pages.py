"""The dashboard's pages, rendered to HTML from the reports (quota/dashboard/reports.py)."""

from __future__ import annotations

from decimal import Decimal
from urllib.parse import quote

from quota.billing import Bill
from quota.dashboard.charts import daily_chart, minute_spark, usage_bar
from quota.dashboard.html import Safe, el, join
from quota.dashboard.reports import AccountMonth, AppMonth, Cap
from quota.display import day, grouped, money, month_name, percent


def layout(title: str, body: object, *, base: str, csrf: str | None = None) -> Safe:
    nav = None
    if csrf is not None:
        nav = el(
            "header",
            el("a", el("strong", "quota"), href=f"{base}/"),
            el("a", "All apps", href=f"{base}/"),
            el(
                "form",
                el("input", type="hidden", name="csrf", value=csrf),
                el("button", "Log out", type="submit"),
                method="post",
                action=f"{base}/logout",
            ),
        )
    head = el(
        "head",
        el("meta", charset="utf-8"),
        el("meta", name="viewport", content="width=device-width, initial-scale=1"),
        el("title", f"{title} · quota"),
        el("link", rel="stylesheet", href=f"{base}/style.css"),
    )
    return Safe("<!doctype html>" + el("html", head, el("body", nav, el("main", el("h1", title), body)), lang="en"))


def login(base: str, error: str | None = None) -> Safe:
    form = el(
        "form",
        el(
            "p",
            "Paste the read-only token (QUOTA_READ_TOKEN) or the admin token. It is exchanged for a session cookie.",
        ),
        el("p", error, class_="error") if error else None,
        el("label", "Token", for_="token"),
        el("input", type="password", name="token", id="token", autocomplete="off", required=True, autofocus=True),
        el("button", "Sign in", type="submit"),
        method="post",
        action=f"{base}/login",
        class_="login",
    )
    return layout("Sign in to the usage dashboard", form, base=base)


def _cap_name(cap: Cap) -> str:
    return cap.name.replace("_", " ")


def _hot_cap(cap: Cap) -> str:
    return f"{_cap_name(cap)}: {grouped(cap.used)} of {grouped(cap.limit or 0)} ({percent(cap.used, cap.limit)})"


def _app_link(base: str, appkey: str) -> Safe:
    org, _, app = appkey.partition("#")
    return el("a", appkey, href=f"{base}/apps/{quote(org, safe='')}/{quote(app, safe='')}")


def _month_query(year: int, month: int) -> str:
    return f"?month={year:04d}-{month:02d}"


def _bill_cell(bill: Bill | None) -> str:
    return money(bill.total) if bill is not None else "no subscription"


def overview(accounts: list[AccountMonth], year: int, month: int, *, base: str, csrf: str) -> Safe:
    head = el(
        "tr",
        el("th", "Account / app"),
        el("th", "Plan"),
        el("th", "DAU today / included", class_="num"),
        el("th", "Peak DAU this month", class_="num"),
        el("th", "Bill so far", class_="num"),
        el("th", "Forecast to month end", class_="num"),
        el("th", "Caps at 80% or more"),
    )
    rows: list[Safe] = []
    q = _month_query(year, month)
    for acc in accounts:
        rows.append(
            el(
                "tr",
                el("td", el("a", acc.account.name, href=f"{base}/accounts/{quote(acc.account.name, safe='')}{q}")),
                el("td", acc.plan or "none"),
                el("td"),
                el("td"),
                el("td", _bill_cell(acc.bill), class_="num", data_total=acc.bill.total if acc.bill else None),
                el(
                    "td",
                    _bill_cell(acc.forecast),
                    class_="num",
                    data_forecast=acc.forecast.total if acc.forecast else None,
                ),
                el("td"),
                class_="account",
                data_account=acc.account.name,
            )
        )
        for app in acc.apps:
            hot = app.hot
            rows.append(
                el(
                    "tr",
                    el("td", _app_link(base, app.appkey)),
                    el("td", app.plan),
                    el("td", f"{grouped(app.today_dau)} / {grouped(app.included_dau)}", class_="num"),
                    el("td", grouped(app.peak_dau), class_="num", data_peak_dau=app.peak_dau),
                    el("td"),
                    el("td"),
                    el(
                        "td",
                        join(
                            el(
                                "div",
                                _hot_cap(c),
                                class_="hot",
                                data_cap=c.name,
                            )
                            for c in hot
                        )
                        if hot
                        else el("span", "none", class_="muted"),
                    ),
                    data_app=app.appkey,
                )
            )
    body = join(
        [
            el(
                "p",
                f"{month_name(year, month)}. Bills as they stand now; the forecast runs each app's last two weeks' "
                "DAU trend to the month's end.",
                class_="muted",
            ),
            el("table", el("thead", head), el("tbody", join(rows)), id="apps"),
        ]
    )
    return layout("All apps", body, base=base, csrf=csrf)


def _tile(label: str, value: object, name: str, hot: bool = False) -> Safe:
    return el(
        "div",
        el("div", label, class_="muted"),
        el("div", value, class_="value hot" if hot else "value", data_tile=name),
        class_="tile",
    )


def _unsplit(n: int | None) -> str:
    # A month-wide figure of a month the app was partly another account's: not this account's to see.
    return grouped(n) if n is not None else "— (held by another account part of the month)"


def app_page(
    app: AppMonth, refusals: dict[tuple[str, str, str], list[int]], year: int, month: int, *, base: str, csrf: str
) -> Safe:
    cap = app.online_cap
    cap_text = grouped(cap) if cap is not None else "no limit"
    tiles = el(
        "div",
        _tile("Plan", app.plan, "plan"),
        _tile(f"DAU on {day(app.today)}", f"{grouped(app.today_dau)} / {grouped(app.included_dau)}", "today_dau"),
        _tile("Peak DAU", grouped(app.peak_dau), "peak_dau"),
        _tile("MAU", _unsplit(app.mau), "mau"),
        _tile(
            "Online now / cap", f"{grouped(app.online_now)} / {cap_text}", "online", Cap("", app.online_now, cap).hot
        ),
        _tile(
            "Peak online this month / cap",
            f"{_unsplit(app.peak_online)} / {cap_text}",
            "peak_online",
            Cap("", app.peak_online or 0, cap).hot,
        ),
        class_="tiles",
    )
    cap_rows = [
        el(
            "tr",
            el("td", _cap_name(c)),
            el("td", usage_bar(c.used, c.limit)),
            el(
                "td",
                f"{grouped(c.used)} / {grouped(c.limit) if c.limit is not None else 'no limit'}",
                class_="num hot" if c.hot else "num",
                data_used=c.used,
                data_limit=c.limit,
            ),
            el("td", percent(c.used, c.limit), class_="num"),
            el("td", c.entity or "", class_="muted"),
            data_cap=c.name,
            class_="hot" if c.hot else None,
        )
        for c in app.caps
    ]
    caps = el(
        "table",
        el(
            "thead",
            el(
                "tr",
                el("th", "Cap"),
                el("th", "Used"),
                el("th", "Used / limit", class_="num"),
                el("th", "%", class_="num"),
                el("th", "Nearest entity"),
            ),
        ),
        el("tbody", join(cap_rows)),
        id="caps",
    )
    refusal_rows = [
        el(
            "tr",
            el("td", route),
            el("td", limit or "(none)"),
            el("td", outcome),
            el("td", grouped(sum(series)), class_="num", data_refusals=sum(series)),
            el("td", minute_spark(series)),
        )
        for (route, limit, outcome), series in sorted(refusals.items(), key=lambda kv: -sum(kv[1]))
    ]
    refused = (
        el(
            "table",
            el(
                "thead",
                el(
                    "tr",
                    el("th", "Route"),
                    el("th", "Limit"),
                    el("th", "Outcome"),
                    el("th", "Last hour", class_="num"),
                    el("th", "Per minute"),
                ),
            ),
            el("tbody", join(refusal_rows)),
            id="refusals",
        )
        if refusal_rows
        else el("p", "No refusals in the last hour (this worker).", class_="muted", id="refusals")
    )
    features = el(
        "ul",
        join(
            el(
                "li",
                ("✓ " if on else "✖ ") + name.replace("_", " "),
                class_=None if on else "muted",
                data_feature=name,
                data_on=str(on).lower(),
            )
            for name, on in app.features.items()
        ),
        class_="features",
    )
    body = join(
        [
            tiles,
            el("h2", f"Daily active users, {month_name(year, month)}"),
            daily_chart(app.daily, app.included_dau),
            el("h2", "Caps"),
            caps,
            el("h2", "Refusals over the last hour"),
            refused,
            el("h2", "Features of the plan"),
            features,
        ]
    )
    return layout(app.appkey, body, base=base, csrf=csrf)


def account_page(acc: AccountMonth, year: int, month: int, *, base: str, csrf: str) -> Safe:
    bill = acc.bill
    parts: list[object] = [el("p", f"{month_name(year, month)}, plan {acc.plan or 'none'}.", class_="muted")]
    if bill is None:
        parts.append(el("p", "No subscription in this month: nothing to bill."))
    else:
        lines: list[tuple[str, str, str, Decimal | int]] = []
        fee_note = ""
        if bill.prorated_days:
            used, days = bill.prorated_days
            fee_note = f"prorated: {used} of {days} days"
        lines.append(("plan_fee", f"Plan fee ({bill.plan})", fee_note, bill.plan_fee))
        for a in bill.apps:
            lines.append(("app", f"Peak DAU of {a.app}", f"on {day(a.day)}" if a.day else "no activity", a.peak_dau))
        lines.append(("usage", "Usage (sum of peaks)", "", bill.usage))
        lines.append(("included", "Included DAU", "", bill.included))
        lines.append(("excess", "Excess DAU", "", bill.excess))
        price = (
            money(bill.overage_price) + " per 10,000 DAU"
            if bill.overage_price is not None
            else "no overage on this plan"
        )
        lines.append(("overage", "Overage", price, bill.overage))
        rows = []
        for key, label, note, value in lines:
            shown = money(value) if isinstance(value, Decimal) else grouped(value)
            rows.append(
                el(
                    "tr",
                    el("td", label),
                    el("td", note, class_="muted"),
                    el("td", shown, class_="num", data_line=key, data_value=str(value)),
                )
            )
        rows.append(
            el(
                "tr",
                el("th", "Total"),
                el("th"),
                el("th", money(bill.total), class_="num", data_line="total", data_value=str(bill.total)),
            )
        )
        parts.append(el("table", el("tbody", join(rows)), id="bill"))
    notes = [*acc.notes, *(bill.notes if bill else ())]
    if notes:
        parts.append(el("h2", "Notes"))
        parts.append(el("ul", join(el("li", n) for n in notes), id="notes"))
    parts.append(el("h2", "Apps"))
    parts.append(el("ul", join(el("li", _app_link(base, a)) for a in acc.account.apps)))
    return layout(f"Bill of {acc.account.name}", join(parts), base=base, csrf=csrf)
