"""HTML built from parts that escape whatever they are given.

Every string that reaches a page goes through `el` or `text`, which escape it, unless it is already
`Safe` (markup this module or charts.py built). So a page cannot carry an app name, a route or a
user id unescaped: there is no template in which to forget it.
"""

from __future__ import annotations

import html
from collections.abc import Iterable


class Safe(str):
    """Markup already escaped; only this module and charts.py make it."""


def text(value: object) -> Safe:
    return value if isinstance(value, Safe) else Safe(html.escape(str(value), quote=True))


def _children(children: Iterable[object]) -> str:
    out: list[str] = []
    for child in children:
        if child is None:
            continue
        if isinstance(child, str | int):
            out.append(text(child))
        elif isinstance(child, Iterable):
            out.append(_children(child))
        else:
            out.append(text(child))
    return "".join(out)


def attrs(values: dict[str, object]) -> str:
    # Attribute names are this package's literals (class_ -> class); values are escaped, quotes included.
    parts = []
    for name, value in values.items():
        if value is None or value is False:
            continue
        key = name.rstrip("_").replace("_", "-")
        parts.append(f" {key}" if value is True else f' {key}="{text(value)}"')
    return "".join(parts)


SVG_VOID = frozenset({"rect", "line", "circle", "path", "polyline"})
VOID = frozenset({"input", "meta", "link", "br", "hr", "img"}) | SVG_VOID


def el(tag: str, *children: object, **attributes: object) -> Safe:
    if tag in VOID and not children:
        return Safe(f"<{tag}{attrs(attributes)}/>" if tag in SVG_VOID else f"<{tag}{attrs(attributes)}>")
    return Safe(f"<{tag}{attrs(attributes)}>{_children(children)}</{tag}>")


def join(parts: Iterable[object]) -> Safe:
    return Safe(_children(parts))
