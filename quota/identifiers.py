"""Identifiers quota counts: canonicalized and validated before anything touches a counter.

Every id a request names (a user, a group, a chatroom; from the path, the body or the upstream's
answer) goes through `IdPolicy.canonical`. The default policy is the vendor's: user ids are
case-insensitive, 1-64 characters of a-z 0-9 _ - . once folded to lowercase; room ids are what
the gateway issues (digits). Whatever fails is refused with 400 before it is counted, so `Alice`
and `alice` are one user, and `zz,victim` is no user at all (a comma never splits a single id).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["user", "room"]
KINDS: tuple[Kind, ...] = ("user", "room")
# Any path value quota reads but does not count (an hour, a kind) is still bounded.
MAX_PARAM = 256


class InvalidId(ValueError):
    pass


@dataclass(frozen=True)
class IdRule:
    pattern: str
    fold_case: bool = False
    compiled: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "compiled", re.compile(self.pattern))


# `.` and `..` are no ids (an upstream that removes dot segments would route them elsewhere), and a
# room id has one spelling (07 and 7 are one group to a gateway that parses numbers).
DEFAULT_RULES: dict[Kind, IdRule] = {
    "user": IdRule(r"(?!\.\.?$)[a-z0-9_.\-]{1,64}", fold_case=True),
    "room": IdRule(r"0|[1-9][0-9]{0,31}"),
}


# Valid ids seen lately, of each kind, with their canonical spelling: the same users and rooms come
# back request after request, and a cached answer skips the fold and the pattern. At most this many
# of each kind (then forgotten at once): a client naming fresh ids only makes its own ids cost more.
KNOWN_IDS = 4096


@dataclass(frozen=True)
class IdPolicy:
    rules: dict[Kind, IdRule] = field(default_factory=lambda: dict(DEFAULT_RULES))
    known: dict[Kind, dict[str, str]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "known", {kind: {} for kind in self.rules})

    def canonical(self, kind: Kind, value: str) -> str:
        known = self.known[kind]
        found = known.get(value)
        if found is not None:
            return found
        rule = self.rules[kind]
        # Folding first: the vendor treats ALICE and alice as one id. Non-ASCII letters never fold
        # into ASCII ones here (str.lower on ASCII only), so no Unicode trick lands on another id.
        folded = value.lower() if rule.fold_case and value.isascii() else value
        if not rule.compiled.fullmatch(folded):
            shown = folded[:40].encode("ascii", "backslashreplace").decode("ascii")
            raise InvalidId(f"{kind} id {shown!r} is not valid: expected {rule.pattern}")
        if len(known) >= KNOWN_IDS:
            known.clear()
        known[value] = folded
        return folded

    def canonical_list(self, kind: Kind, raw: str, most: int | None) -> list[str]:
        """A comma list of ids (batch routes only); each must pass on its own."""
        values = raw.split(",")
        if most is not None and len(values) > most:
            raise InvalidId(f"{len(values)} ids in one call; at most {most}")
        return list(dict.fromkeys(self.canonical(kind, v) for v in values))
