"""Id canonicalization (quota/identifiers.py): the answers a policy gives once it has seen an id are
the answers a fresh policy gives, and what it remembers stays bounded."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quota.identifiers import KINDS, KNOWN_IDS, IdPolicy, InvalidId, Kind

WARM = IdPolicy()
IDS = st.one_of(
    st.text(alphabet="aAzZ09_.-,é İ", max_size=70),
    st.sampled_from(["Alice", "ALICE", "alice", ".", "..", "0", "07", "7", "a" * 64, "a" * 65, "K\u212a"]),
)


def answer(policy: IdPolicy, kind: Kind, value: str) -> str:
    try:
        return policy.canonical(kind, value)
    except InvalidId as exc:
        return f"refused: {exc}"


@given(st.sampled_from(KINDS), IDS)
def test_a_remembered_id_gets_a_fresh_policys_answer(kind: Kind, value: str) -> None:
    """Catches a cached answer that differs from the computed one: an id refused once and let
    through from the cache, a case variant cached under another's spelling, a user id answered
    for a room id of the same text."""
    fresh = answer(IdPolicy(), kind, value)
    assert answer(WARM, kind, value) == fresh
    assert answer(WARM, kind, value) == fresh
    other: Kind = "room" if kind == "user" else "user"
    assert answer(WARM, other, value) == answer(IdPolicy(), other, value)


def test_what_a_policy_remembers_is_bounded() -> None:
    """Catches the remembered ids growing with every fresh id a client names."""
    policy = IdPolicy()
    for i in range(KNOWN_IDS * 2 + 10):
        assert policy.canonical("user", f"U{i}") == f"u{i}"
    assert 0 < len(policy.known["user"]) <= KNOWN_IDS
    with pytest.raises(InvalidId):
        policy.canonical("user", "bad id")
    assert "bad id" not in policy.known["user"]
