"""The studies' verdicts (bench/verdicts.py): the reports' tests tables are what the script computes from the
committed results; a follow-up not run yet shows as such and counts at p = 1; step costs are timed in
alternating rounds (bench/sid_vs_dm.py)."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import significance  # noqa: E402
import verdicts  # noqa: E402


def test_the_reports_tables_are_the_scripts_output():
    for (doc, mark), text in verdicts.main(["--print"]).items():
        report = open(os.path.join(ROOT, "docs", doc)).read()
        end = verdicts.MARKS[1] if mark == verdicts.MARKS[0] else verdicts.FOLLOW_MARKS[1]
        assert report.split(mark, 1)[1].split(end, 1)[0].strip() == text.strip(), (doc, mark)


def test_a_follow_up_not_run_shows_so_and_counts_at_p_1():
    a, b = ((70.0, 3.0, 3), [67.0, 70.0, 73.0]), ((62.0, 2.0, 4), None)
    comparisons = [("one", a, b), ("two", b, a), ("unrun", a, None)]
    results, holm = verdicts.tests(comparisons)
    assert results[2] is None
    assert holm == pytest.approx(significance.holm([results[0][2], results[1][2], 1.0]))
    text = verdicts.table(comparisons, "a family", rule=False, rows=[1, 2])
    assert "| unrun | not run yet |" in text and "| one |" not in text and "not kept (n = 4)" in text
    assert "counts at p = 1" in text and "pre-registered rule" not in text
    assert "counts at p = 1" not in verdicts.table(comparisons[:2], "a family")


def test_joined_cells_pool_the_seeds_of_two_calls():
    first, later = ((1.0, 1.0, 3), [0.0, 1.0, 2.0]), ((5.0, 1.0, 2), [4.3, 5.7])
    stats, values = verdicts.joined(first, later)
    assert values == [0.0, 1.0, 2.0, 4.3, 5.7] and stats == pytest.approx(significance.combine(first[0], later[0]))
    assert verdicts.joined(first, None) is None
    assert verdicts.joined(((1.0, 1.0, 3), None), later)[1] is None  # one side kept only its mean +- std


def test_step_costs_alternate_the_losses_round_by_round(monkeypatch):
    import sid_vs_dm
    calls = []

    def fake_step(argv):
        loss = argv[argv.index("--loss") + 1]
        calls.append(loss)
        return dict(ms_per_iter=10.0 if loss == "dm" else 12.0 + len(calls))

    monkeypatch.setattr(sid_vs_dm.dm_step, "main", fake_step)
    cost = sid_vs_dm.step_costs(3, 2)
    assert calls == ["dm", "sid", "sid", "dm", "dm", "sid"]
    assert cost["sid"] == [14.0, 15.0, 18.0] and cost["ratio"] == pytest.approx([1.4, 1.5, 1.8])
    assert sid_vs_dm.spread(cost["sid"]) == "15.0 [14.0, 18.0]"
