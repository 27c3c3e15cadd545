"""The mutation benchmark's report (benchmarks/mutation.py): what each surviving mutant changed, read from mutmut's
mutants/ folder, why it lives, and that every survivor the docs list is explained. mutmut itself is not run here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from benchmarks.mutation import GROUPS, NOT_EXPLAINED, ONE_BY_ONE, explain, mutant_changes, survivors_markdown

ROOT = Path(__file__).resolve().parents[1]
SURVIVOR_LINE = re.compile(r"^- `(?P<name>[^`]+)`: `(?P<removed>.*)` -> `(?P<added>.*)`")


def test_a_mutants_change_is_read_against_its_functions_original(tmp_path):
    (tmp_path / "mutants" / "pkg").mkdir(parents=True)
    (tmp_path / "mutants" / "pkg" / "mod.py").write_text(
        "def x_scale__mutmut_orig(a):\n    b = a * 2\n    return b\n\n\n"
        "def x_scale__mutmut_3(a):\n    b = a / 2\n    return b\n")
    assert mutant_changes(tmp_path, ["pkg.mod.x_scale__mutmut_3", "pkg.gone.x_f__mutmut_1"]) == {
        "pkg.mod.x_scale__mutmut_3": ("b = a * 2", "b = a / 2")}


def test_survivors_are_grouped_by_rule_or_by_their_own_reason_and_the_rest_are_not_explained():
    assert explain("clients.holder.x_key_padding__mutmut_10", 'raise UsageError("padding differs")',
                   'raise UsageError("XXpadding differsXX")')[0] == "message text"
    group, why = explain("clients.holder.x_key_padding__mutmut_13", "return int(conv.padding[0])",
                         "return int(conv.padding[1])")
    assert group == "explained one by one" and "refuses a layer whose two paddings differ" in why
    assert explain("clients.holder.x_key_padding__mutmut_99", "return 0", "return 1")[0] == "not explained"


def test_the_markdown_names_each_survivor_with_its_groups_reason_or_its_own():
    survivors = [
        {"mutant": "m.x_f__mutmut_1", "removed": "a", "added": "b", "group": "explained one by one", "why": "its own"},
        {"mutant": "m.x_g__mutmut_2", "removed": "c", "added": "d", "group": "message text",
         "why": next(why for group, _, why in GROUPS if group == "message text")},
    ]
    text = survivors_markdown({"survived": 2, "mutants": 9, "killed": 7, "other": 0, "survivors": survivors,
                               "survivor_groups": {"explained one by one": 1, "message text": 1}})
    assert text.startswith("# Surviving mutants: 2 of 9")
    assert "- `m.x_f__mutmut_1`: `a` -> `b`: its own" in text
    assert "- `m.x_g__mutmut_2`: `c` -> `d`\n" in text and "changes only the wording" in text


@pytest.mark.parametrize("document", ["docs/mutation-survivors.md", "docs/mutation-survivors-holder.md"])
def test_every_survivor_the_docs_list_is_explained_by_the_benchmark(document):
    """The docs' groups were computed from each mutant's whole change (the listing shortens it); the ones explained
    one by one must still be explained by name, so that an explanation is never dropped while its mutant lives."""
    group, by_name = None, []
    for line in (ROOT / document).read_text().splitlines():
        if line.startswith("## "):
            group = line[3:].rsplit(" (", 1)[0]
            assert group != NOT_EXPLAINED
        match = SURVIVOR_LINE.match(line)
        if match and group == ONE_BY_ONE:
            by_name.append(match["name"])
    assert len(by_name) > 20
    assert [name for name in by_name if explain(name, "", "")[0] != ONE_BY_ONE] == []
