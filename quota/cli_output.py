"""What the `quota` command prints for people (the --json forms are for scripts).

Tables sized to their content, a DAU chart in the terminal, money as `8,557.975 元`, dates and
lists as people write them, and a progress bar on stderr for long work. Output degrades to ASCII
when the terminal cannot encode ✓, ✖, 元 or block characters, rather than crashing.
Standard library only: the CLI starts fast and nothing here reaches the request path.
"""

from __future__ import annotations

import csv
import io
import sys
import time
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import IO, Any

from quota.billing import Bill
from quota.display import day, grouped, listing, money, month_name, percent
from quota.matrix import Matrix, MauShare, Plan

# Past this many times the peak, an included-DAU line would flatten the bars: the chart scales to
# the data and says where the line is instead (as the dashboard's chart does).
OFF_CHART = 4
CHART_ROWS = 8


@dataclass(frozen=True)
class Symbols:
    yes: str
    no: str
    unit: str
    blocks: str
    line: str
    axis: str
    bar_full: str
    bar_empty: str
    dot: str


UNICODE = Symbols("✓", "✖", "元", " ▁▂▃▄▅▆▇█", "┄", "│", "█", "░", "·")
ASCII = Symbols("yes", "no", "CNY", "  ..::||#", "-", "|", "#", ".", "-")


def symbols(stream: IO[str] | None = None) -> Symbols:
    """Unicode when the stream's encoding can carry every symbol used, ASCII otherwise."""
    encoding = getattr(stream or sys.stdout, "encoding", None) or "ascii"
    sample = "".join((UNICODE.yes, UNICODE.no, UNICODE.unit, UNICODE.blocks, UNICODE.line, UNICODE.bar_empty))
    try:
        sample.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return ASCII
    return UNICODE


def words(name: str) -> str:
    return name.replace("_", " ")


def width(text: str) -> int:
    """Columns a string takes in a terminal: CJK characters (元) take two."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _pad(text: str, size: int, right: bool) -> str:
    gap = " " * max(0, size - width(text))
    return gap + text if right else text + gap


def table(rows: Sequence[Sequence[str]], *, right: Iterable[int] = (), indent: int = 0) -> str:
    """Columns as wide as their widest cell; columns in `right` are right-aligned (numbers).
    A row of one cell is a heading: it spans the table and sets no column's width."""
    if not rows:
        return ""
    aligned = set(right)
    body = [r for r in rows if len(r) > 1] or rows
    columns = max(len(r) for r in body)
    widths = [max((width(r[i]) for r in body if i < len(r)), default=0) for i in range(columns)]
    lines = []
    for row in rows:
        if len(row) == 1 and columns > 1:
            lines.append((" " * indent + row[0]).rstrip())
            continue
        cells = [_pad(c, widths[i], i in aligned) for i, c in enumerate(row)]
        lines.append((" " * indent + "  ".join(cells)).rstrip())
    return "\n".join(lines)


# ---- quota plans -------------------------------------------------------------------------------


def _limit_cell(value: Any, custom: bool) -> str:
    if value is None:
        text = "no limit"
    elif isinstance(value, MauShare):
        percent_text = f"{value.share * 100:f}".rstrip("0").rstrip(".")
        text = f"{percent_text}% MAU, min {grouped(value.floor)}"
    else:
        text = grouped(value)
    return text + "*" if custom else text


def _price_rows(plans: list[Plan], sym: Symbols) -> list[list[str]]:
    fee = ["monthly fee", *(money(p.price.monthly_fee, sym.unit) for p in plans)]
    included = ["included DAU", *(grouped(p.price.included_dau) for p in plans)]
    over = [
        "per 10,000 DAU over",
        *(
            "upgrade" if p.price.overage_per_10k_dau is None else money(p.price.overage_per_10k_dau, sym.unit)
            for p in plans
        ),
    ]
    return [fee, included, over]


def plans_table(matrix: Matrix, *, show_all: bool = False, sym: Symbols = UNICODE) -> str:
    """Prices, limits and rates of every plan, then the features that differ between plans
    (every feature with `show_all`). Plans are columns."""
    names = list(matrix.plans)
    plans = [matrix.plans[n] for n in names]
    rows: list[list[str]] = [["", *names]]
    rows.append(["Price"])
    rows += [["  " + r[0], *r[1:]] for r in _price_rows(plans, sym)]
    rows.append(["Limits"])
    for key in plans[0].limits:
        rows.append(["  " + words(key), *(_limit_cell(p.limits[key], key in p.custom) for p in plans)])
    rows.append(["Rates"])
    for key in plans[0].rates:
        rows.append(["  " + words(key), *(p.rates[key].text for p in plans)])
    features = list(matrix.feature_names)
    differing = [f for f in features if len({p.features.get(f) for p in plans}) > 1]
    shown = features if show_all else differing
    same = len(features) - len(differing)
    if show_all:
        rows.append([f"Features (all {len(features)})"])
    else:
        rows.append([f"Features that differ ({len(differing)} of {len(features)})"])
    for f in shown:
        rows.append(["  " + words(f), *(sym.yes if p.features.get(f) else sym.no for p in plans)])
    out = table(rows)
    notes = []
    if any(p.custom for p in plans):
        notes.append("* custom: the value shown unless the account's contract sets another")
    if not show_all and same:
        notes.append(f"{same} more features are the same on every plan: quota plans --all lists them")
    return out + "\n\n" + "\n".join(notes) if notes else out


# ---- quota usage -------------------------------------------------------------------------------


def dau_chart(daily: dict[str, int], included: int, *, sym: Symbols = UNICODE, rows: int = CHART_ROWS) -> str:
    """Bars of DAU per day, CHART_ROWS high, eighth-blocks for the top of each bar, the included
    DAU as a dotted line across (or a note when it is far above the peak)."""
    values = list(daily.values())
    peak = max(values, default=0)
    line_shown = included <= OFF_CHART * max(peak, 1)
    top = max(peak, included if line_shown else 0, 1)
    line_row = min(rows - 1, int(included / top * rows)) if line_shown and included else None
    label_w = len(grouped(top))
    lines = []
    for r in range(rows - 1, -1, -1):
        cells = []
        for v in values:
            eighths = round(v / top * rows * 8) - r * 8
            if eighths >= 8:
                cell = sym.blocks[8]
            elif eighths > 0:
                cell = sym.blocks[eighths]
            else:
                cell = sym.line if r == line_row else " "
            cells.append(cell + (sym.line if r == line_row else " "))
        label = grouped(top) if r == rows - 1 else ("0" if r == 0 else "")
        tail = f" included {grouped(included)}" if r == line_row else ""
        lines.append(f"{label.rjust(label_w)} {sym.axis}{''.join(cells).rstrip()}{tail}")
    ticks = "".join(f"{int(d[-2:]):<2d}" if int(d[-2:]) == 1 or int(d[-2:]) % 5 == 0 else "  " for d in daily)
    lines.append(" " * label_w + "  " + ticks.rstrip())
    if not line_shown:
        lines.append(
            f"included {grouped(included)} DAU is above the chart (the peak is {percent(peak, included)} of it)"
        )
    return "\n".join(lines)


def _usage_cell(figures: dict[str, Any]) -> list[str]:
    used, limit = figures["used"], figures["limit"]
    return [grouped(used), "no limit" if limit is None else grouped(limit), percent(used, limit) if limit else ""]


def usage_text(report: dict[str, Any], sym: Symbols = UNICODE) -> str:
    year, month = (int(x) for x in report["month"].split("-"))
    daily: dict[str, int] = report["dau"]
    peak = report["peak_dau"]
    peak_day = next((d for d, n in daily.items() if n == peak), None) if peak else None
    included = report.get("included_dau")
    head = f"{report['app']} {sym.dot} {month_name(year, month)} {sym.dot} plan {report['plan']}"
    peak_text = f"peak {grouped(peak)}" + (f" on {day(date.fromisoformat(peak_day))}" if peak_day else "")
    parts = [head, "", f"Daily active users ({peak_text})"]
    if included is not None:
        parts.append(dau_chart(daily, included, sym=sym))
    parts += ["", f"MAU {grouped(report['mau'])}   peak online {grouped(report['peak_online'])}", ""]
    rows = [["Cap", "used", "limit", ""]]
    rows += [[words(name), *_usage_cell(figures)] for name, figures in report["limits"].items()]
    parts.append(table(rows, right=(1, 2, 3)))
    return "\n".join(parts)


# ---- quota bill --------------------------------------------------------------------------------


def bill_text(bill: Bill, sym: Symbols = UNICODE) -> str:
    year, month = (int(x) for x in bill.month.split("-"))
    whose = "What-if bill" if bill.account == "-" else f"Bill of {bill.account}"
    lines = [f"{whose} {sym.dot} {month_name(year, month)} {sym.dot} plan {bill.plan}", ""]
    rows = []
    for a in bill.apps:
        when = f"on {day(a.day)}" if a.day else "" if a.peak_dau else "no activity"
        rows.append([f"peak DAU of {a.app}", grouped(a.peak_dau), when])
    rows.append(["usage (sum of peaks)", grouped(bill.usage), ""])
    rows.append(["included DAU", grouped(bill.included), ""])
    rows.append(["excess DAU", grouped(bill.excess), ""])
    prorated = f"{bill.prorated_days[0]} of {bill.prorated_days[1]} days" if bill.prorated_days else ""
    rows.append(["plan fee", money(bill.plan_fee, sym.unit), prorated])
    price = "no overage on this plan"
    if bill.overage_price is not None:
        price = f"{money(bill.overage_price, sym.unit)} per 10,000 DAU"
    rows.append(["overage", money(bill.overage, sym.unit), price])
    rows.append(["total", money(bill.total, sym.unit), ""])
    lines.append(table(rows, right=(1,)))
    lines += [f"note: {n}" for n in bill.notes]
    return "\n".join(lines)


BILL_COLUMNS = ("account", "plan", "usage", "included_dau", "excess", "plan_fee", "overage", "total")


def bills_csv(bills: Sequence[Bill]) -> str:
    """One row per account; money as plain decimals (no unit, no separators) for spreadsheets."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["month", *BILL_COLUMNS, "prorated_days", "notes"])
    for b in bills:
        data = b.to_json()
        prorated = f"{b.prorated_days[0]}/{b.prorated_days[1]}" if b.prorated_days else ""
        writer.writerow([b.month, *(data[c] for c in BILL_COLUMNS), prorated, "; ".join(b.notes)])
    return out.getvalue()


def bills_text(bills: Sequence[Bill], not_billed: Sequence[str], month: str, sym: Symbols = UNICODE) -> str:
    year, mon = (int(x) for x in month.split("-"))
    rows = [["account", "plan", "usage", "excess", "plan fee", "overage", "total"]]
    for b in bills:
        rows.append(
            [
                b.account,
                b.plan,
                grouped(b.usage),
                grouped(b.excess),
                money(b.plan_fee, sym.unit),
                money(b.overage, sym.unit),
                money(b.total, sym.unit),
            ]
        )
    total = sum((b.total for b in bills), Decimal(0))
    rows.append(["total", "", "", "", "", "", money(total, sym.unit)])
    out = [f"Bills for {month_name(year, mon)}: {len(bills)} accounts", "", table(rows, right=(2, 3, 4, 5, 6))]
    if not_billed:
        out.append(f"\nnot billed (no subscription in {month}): {listing(sorted(not_billed))}")
    return "\n".join(out)


# ---- records (entitlements, accounts, forget-user, reconcile) ----------------------------------

NONE_WORDS = {
    "limit": "no limit",
    "remaining": "no limit",
    "frozen_on": "not frozen",
    "purge_after": "not frozen",
    "end": "open-ended",
    "day": "no activity",
    "dashboard_token_sha256": "not set",
}


def _scalar(key: str, value: Any, parent: str, sym: Symbols) -> str:
    if value is None:
        return "no limit" if parent in ("limits", "overrides") else NONE_WORDS.get(key, "none")
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return grouped(value)
    if isinstance(value, str) and len(value) == 10 and value[4] == "-" and value[7] == "-":
        try:
            return day(date.fromisoformat(value))
        except ValueError:
            return value
    return str(value)


def _subscription(s: dict[str, Any]) -> str:
    start = day(date.fromisoformat(s["start"]))
    end = f" until {day(date.fromisoformat(s['end']))}" if s.get("end") else " (open-ended)"
    return f"{s['plan']} from {start}{end}"


def record_text(data: dict[str, Any], sym: Symbols = UNICODE) -> str:
    """A nested record as indented `name  value` lines, with lists and dates as people write them."""
    lines: list[str] = []

    def walk(node: dict[str, Any], indent: int, parent: str) -> None:
        rows: list[list[str]] = []

        def flush() -> None:
            if rows:
                lines.append(table(rows, indent=indent))
                rows.clear()

        for key, value in node.items():
            if key == "features" and isinstance(value, dict) and all(isinstance(v, bool) for v in value.values()):
                off = [words(k) for k, on in value.items() if not on]
                rows.append(["features", f"{len(value) - len(off)} of {len(value)} in the plan"])
                rows.append(["  not in it", listing(off)])
            elif isinstance(value, dict) and set(value) == {"share_of_mau", "floor"}:
                rows.append([words(key), _limit_cell(MauShare(Decimal(value["share_of_mau"]), value["floor"]), False)])
            elif isinstance(value, dict) and set(value) == {"used", "limit", "remaining"}:
                used, limit = value["used"], value["limit"]
                shown = (
                    f"{grouped(used)} of {grouped(limit)} ({percent(used, limit)})"
                    if limit is not None
                    else (f"{grouped(used)} (no limit)")
                )
                rows.append([words(key), shown])
            elif isinstance(value, dict):
                flush()
                lines.append(" " * indent + words(key))
                if value:
                    walk(value, indent + 2, key)
                else:
                    lines.append(" " * (indent + 2) + "none")
            elif isinstance(value, list):
                if key == "subscriptions":
                    shown = "; ".join(_subscription(s) for s in value) or "none"
                else:
                    shown = listing([_scalar(key, v, key, sym) for v in value], NONE_WORDS.get(key, "none"))
                    if key == "ip_allowlist" and not value:
                        shown = "any address"
                rows.append([words(key), shown])
            else:
                rows.append([words(key), _scalar(key, value, parent, sym)])
        flush()

    walk(data, 0, "")
    return "\n".join(lines)


# ---- progress ----------------------------------------------------------------------------------


class Progress:
    """A bar on stderr for long work, drawn only on a terminal (pipes and CI logs stay clean),
    redrawn at most every REDRAW_S, ending on its own line."""

    REDRAW_S = 0.1
    WIDTH = 30

    def __init__(self, label: str, total: int = 0, stream: IO[str] | None = None) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.stream = stream or sys.stderr
        self.shown = bool(getattr(self.stream, "isatty", lambda: False)())
        self.sym = symbols(self.stream)
        self._drawn = 0.0

    def __call__(self, done: int, total: int | None = None) -> None:
        self.done = done
        if total is not None:
            self.total = total
        now = time.monotonic()
        if self.shown and (now - self._drawn >= self.REDRAW_S or done >= self.total):
            self._drawn = now
            self._draw()

    def _draw(self) -> None:
        total = max(self.total, 1)
        filled = min(self.WIDTH, self.WIDTH * self.done // total)
        bar = self.sym.bar_full * filled + self.sym.bar_empty * (self.WIDTH - filled)
        self.stream.write(
            f"\r{self.label} {bar} {grouped(self.done)}/{grouped(self.total)} {100 * self.done // total:3d}%"
        )
        self.stream.flush()

    def close(self) -> None:
        if self.shown:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()


def explanation(found: Any) -> str:
    """`quota explain` for people: the route, what applies, the figures, then the verdict."""
    d = found.decision
    lines = [
        f"{found.method} {found.path}",
        f"  route     {found.route}" + (f"  (app {found.app})" if found.app else ""),
    ]
    if found.feature:
        lines.append(f"  feature   {found.feature}")
    if found.retention_days is not None:
        lines.append(f"  retention {found.retention_days} days")
    for r in found.rates:
        left = "none left" if r.remaining is None else f"{r.remaining} left after this one"
        kind = "exact" if r.exact else "sliding"
        counts = "" if r.cost == 1 else f", this one counts {r.cost}"
        lines.append(f"  rate      {r.name}: {r.limit} per {r.window_s:g} s ({kind}){counts}, {left}")
    for c in found.counters:
        cap = "no cap" if c.cap is None else f"cap {c.cap}"
        lines.append(f"  counter   {c.limit}: {c.used} used, {cap}, this request adds {c.adding}")
    if d.allowed:
        lines.append("  decision  allowed")
    else:
        retry = f", retry after {d.retry_after_s} s" if d.retry_after_s else ""
        lines.append(f"  decision  refused: {d.status} {d.error} ({d.limit or '-'}){retry}")
        lines.append(f"            {d.reason}")
    return "\n".join(lines)
