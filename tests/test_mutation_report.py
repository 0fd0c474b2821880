"""tests/mutation_report.py: survivors matched to their explanations, and the score it prints."""

from __future__ import annotations

import pytest

from tests.helpers import read_yaml
from tests.mutation_report import EXPLAINED, Mutant, explain, render

pytestmark = pytest.mark.one_build


def test_every_explanation_is_complete() -> None:
    """Catches an explanation that cannot match anything (a missing key) or says nothing."""
    entries = read_yaml(EXPLAINED)
    assert entries and all(set(e) == {"function", "minus", "plus", "why"} and e["why"].strip() for e in entries)


def test_survivors_are_matched_and_scored() -> None:
    """A survivor matching an explanation (exactly, or `*` for any mutation of the line) is listed
    as explained, one that does not is listed as open, and the scores count both ways.
    Catches: a report that calls an unexplained survivor explained, or miscounts."""
    entry = read_yaml(EXPLAINED)[0]
    name = entry["function"] + "__mutmut_1"
    explained = Mutant(name, "survived", entry["minus"], entry["plus"])
    other = Mutant(entry["function"] + "__mutmut_2", "survived", "x = 1", "x = 2")
    killed = [Mutant(entry["function"] + f"__mutmut_{i}", "killed") for i in range(3, 11)]
    explain([explained, other, *killed])
    assert explained.why == entry["why"] and other.why == ""
    text = render([explained, other, *killed])
    module = explained.module
    assert f"| {module} | 10 | 0 | 8 | 2 | 0 | 1 | 80.0% | 88.9% |" in text
    assert "## Survivors explained (1)" in text and "## Survivors not explained (1)" in text
    assert f"`{other.name}` (survived): `-x = 1` / `+x = 2`" in text
