"""Charts as inline SVG, drawn on the server: no script, no CDN, nothing for the page to fetch.

Each data point is an element carrying its value (`data-value`) and a <title> a browser shows on
hover, so the numbers behind a chart can be read back from the page.
"""

from __future__ import annotations

from datetime import date

from quota.dashboard.html import Safe, el, join

HOT_RATIO = 0.8
# Past this many times the peak, an included-DAU line would flatten every bar to nothing: the
# chart scales to the data and says where the line is instead.
OFF_CHART = 4


def _grouped(n: int) -> str:
    return f"{n:,}"


def daily_chart(days: dict[date, int], included: int, *, width: int = 760, height: int = 260) -> Safe:
    """Bars of DAU per day, the included-DAU line, the peak marked."""
    left, right, top_pad, bottom = 56, 12, 16, 28
    plot_w, plot_h = width - left - right, height - top_pad - bottom
    peak = max(days.values(), default=0)
    line_shown = included <= OFF_CHART * max(peak, 1)
    top = max(peak, included if line_shown else 0, 1)
    step = plot_w / max(len(days), 1)
    parts: list[Safe] = []
    for fraction in (0, 0.5, 1):
        y = top_pad + plot_h * (1 - fraction)
        parts.append(el("line", x1=left, x2=width - right, y1=f"{y:.1f}", y2=f"{y:.1f}", class_="grid"))
        parts.append(el("text", _grouped(round(top * fraction)), x=left - 6, y=f"{y + 4:.1f}", class_="axis end"))
    for i, (day, value) in enumerate(days.items()):
        h = plot_h * value / top
        x = left + i * step + step * 0.15
        cls = "bar peak" if value == peak and peak else "bar"
        parts.append(
            el(
                "rect",
                el("title", f"{day.isoformat()}: {_grouped(value)} DAU"),
                x=f"{x:.1f}",
                y=f"{top_pad + plot_h - h:.1f}",
                width=f"{step * 0.7:.1f}",
                height=f"{h:.1f}",
                class_=cls,
                data_day=day.isoformat(),
                data_value=value,
            )
        )
        if day.day == 1 or day.day % 5 == 0:
            parts.append(el("text", day.day, x=f"{x + step * 0.35:.1f}", y=height - 10, class_="axis mid"))
    if line_shown:
        y = top_pad + plot_h * (1 - included / top)
        parts.append(
            el("line", x1=left, x2=width - right, y1=f"{y:.1f}", y2=f"{y:.1f}", class_="included", data_value=included)
        )
        parts.append(el("text", f"included {_grouped(included)}", x=width - right, y=f"{y - 4:.1f}", class_="axis end"))
    label = f"Daily active users per day; peak {_grouped(peak)}; included {_grouped(included)}"
    return el(
        "svg",
        el("title", label),
        join(parts),
        viewBox=f"0 0 {width} {height}",
        role="img",
        class_="chart daily",
        aria_label=label,
    )


def usage_bar(used: int, limit: int | None, *, width: int = 220, height: int = 14) -> Safe:
    """One cap as a used/limit bar; at HOT_RATIO or more it is drawn hot."""
    if limit is None:
        return el(
            "svg",
            el("title", f"{_grouped(used)} used, no limit"),
            viewBox=f"0 0 {width} {height}",
            class_="bar-chart none",
        )
    ratio = min(1.0, used / limit) if limit > 0 else 1.0
    hot = limit <= 0 or used >= HOT_RATIO * limit
    return el(
        "svg",
        el("title", f"{_grouped(used)} of {_grouped(limit)}"),
        el("rect", x=0, y=0, width=width, height=height, class_="track"),
        el("rect", x=0, y=0, width=f"{width * ratio:.1f}", height=height, class_="fill hot" if hot else "fill"),
        viewBox=f"0 0 {width} {height}",
        class_="bar-chart",
        data_used=used,
        data_limit=limit,
    )


def minute_spark(series: list[int], *, width: int = 180, height: int = 24) -> Safe:
    """Refusals per minute over the last hour, oldest on the left."""
    top = max(max(series, default=0), 1)
    step = width / max(len(series), 1)
    bars = [
        el(
            "rect",
            x=f"{i * step:.1f}",
            y=f"{height - height * n / top:.1f}",
            width=f"{max(step - 0.5, 0.5):.1f}",
            height=f"{height * n / top:.1f}",
            class_="bar",
            data_value=n,
        )
        for i, n in enumerate(series)
        if n
    ]
    return el(
        "svg",
        el("title", f"{sum(series):,} in the last hour"),
        join(bars),
        viewBox=f"0 0 {width} {height}",
        class_="spark",
    )
