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
    assert "| unrun | 3 of 3 seeds run | not run yet |" in text and "| one |" not in text and "not kept (n = 4)" in text
    assert "counts at p = 1" in text and "pre-registered rule" not in text
    assert "counts at p = 1" not in verdicts.table(comparisons[:2], "a family")


def test_a_follow_up_reads_the_seeds_it_names_and_refuses_another_teacher(tmp_path, monkeypatch):
    import json
    rows = [dict(size=8, reg="own", K=5, seed=s, fd_data=60.0 + s) for s in (0, 1, 2, 20, 21)]
    for name, fd in (("a", 45.71), ("b", 44.66)):
        (tmp_path / name).mkdir()
        json.dump(dict(rows=[dict(r, fd_teacher=0, fd_blocks=[0], class_std=[0], wall=None) for r in rows],
                       teacher=dict(fd_data=fd), budget={"8": 1050}, hp=dict(samples=10)), open(tmp_path / name / "results.json", "w"))
    stats, values = verdicts.digits_cell(str(tmp_path / "a"), (8, "own", 5), (0, 1, 2))
    assert values == [60.0, 61.0, 62.0] and stats == pytest.approx((61.0, 1.0, 3))
    assert verdicts.digits_cell(str(tmp_path / "a"), (8, "own", 5))[1] == [60.0, 61.0, 62.0, 80.0, 81.0]
    with pytest.raises(ValueError, match="has 3 of the seeds"):
        verdicts.digits_cell(str(tmp_path / "a"), (8, "own", 5), (0, 1, 3, 20))
    assert verdicts.digits_cell(str(tmp_path / "none"), (8, "own", 5)) is None
    monkeypatch.setattr(verdicts, "DM_1050", str(tmp_path / "a"))
    monkeypatch.setattr(verdicts, "DM_1500", str(tmp_path / "b"))
    with pytest.raises(ValueError, match="different teachers"):
        verdicts.followups()


def test_a_cell_split_over_calls_pools_its_seeds_and_shows_nothing_until_all_have_run(tmp_path):
    import json

    def part(name, seeds, teacher=45.71, budget=1500):
        (tmp_path / name).mkdir()
        rows = [dict(size=8, reg="own", K=10, seed=s, fd_data=60.0 + s, fd_teacher=0, fd_blocks=[0], class_std=[0], wall=None)
                for s in seeds]
        json.dump(dict(rows=rows, teacher=dict(fd_data=teacher), budget={"8": budget}, hp=dict(samples=10)),
                  open(tmp_path / name / "results.json", "w"))
        return str(tmp_path / name)

    key, seeds = (8, "own", 10), (0, 1, 2, 20)
    a, b, c = part("a", (20, 2)), part("b", (0, 1)), str(tmp_path / "c")
    assert verdicts.pooled_cell([c], key, seeds) is None
    half = verdicts.pooled_cell([a, c], key, seeds)
    assert half == "2 of 4 seeds run (values shown when all are)" and "62" not in half
    stats, values = verdicts.pooled_cell([a, b, c], key, seeds)
    assert values == [60.0, 61.0, 62.0, 80.0] and stats == pytest.approx((65.75, (272.75 / 3) ** 0.5, 4))
    text = verdicts.table([("split", (stats, values), half)], "a family", rule=False)
    assert "| split | 4 of 4 seeds run | 2 of 4 seeds run (values shown when all are) | not run yet |" in text
    assert "60, 61" not in text
    with pytest.raises(ValueError, match="different teachers"):
        verdicts.pooled_cell([a, part("d", (0, 1), teacher=44.66)], key, seeds)
    with pytest.raises(ValueError, match="budget"):
        verdicts.pooled_cell([a, part("e", (0, 1), budget=1050)], key, seeds)
    with pytest.raises(ValueError, match="expected each of"):
        verdicts.pooled_cell([a, b, part("f", (1,))], key, seeds)


def test_each_follow_up_group_is_on_one_teacher_and_the_groups_may_differ(tmp_path, monkeypatch):
    import json
    for name, teacher in (("sep", 45.45), ("shr", 45.45), ("other", 44.0)):
        (tmp_path / name).mkdir()
        rows = [dict(size=8, reg="own", K=10, seed=0, fd_data=60.0, fd_teacher=0, fd_blocks=[0], class_std=[0], wall=None)]
        json.dump(dict(rows=rows, teacher=dict(fd_data=teacher), budget={"8": 1500}, hp=dict(samples=10)),
                  open(tmp_path / name / "results.json", "w"))
    monkeypatch.setattr(verdicts, "STACK_SEP", [str(tmp_path / "sep")])
    monkeypatch.setattr(verdicts, "STACK_SHR", [str(tmp_path / "shr")])
    assert verdicts.followups()[5][1] == "1 of 11 seeds run (values shown when all are)"  # SiD's group: another teacher
    monkeypatch.setattr(verdicts, "STACK_SHR", [str(tmp_path / "other")])
    with pytest.raises(ValueError, match="different teachers"):
        verdicts.followups()


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
    assert sid_vs_dm.digits.spread(cost["sid"]) == "15.0 [14.0, 18.0]"


def test_a_table_only_cell_reads_its_kept_seeds_and_refuses_ones_its_table_does_not_give(tmp_path):
    import json
    head = ("| size (params) | pairs | K | FD to data | FD to teacher | label acc. | per-partition FD | steps/student "
            "| images seen (all students) | CPU s (DM, all students) | K beats 1? (gap / 2 x pooled std) |")
    table = "\n".join([head, "| --- " * 11 + "|",
                       "| 16 ch (209k) | all | 1 | 60.68 ± 6.84 | 10.84 ± 1.21 | 0.994 ± 0.001 | 26.86 ± 2.19 | 1650 | 52,800 | 203 |  |",
                       "| 16 ch (209k) | all | 2 | 57.79 ± 4.68 | 7.99 ± 1.19 | 0.993 ± 0.001 | 22.14 ± 3.25 | 1650 | 105,600 | 413 | no |",
                       "", "mean ± std (ddof 1) over seeds [0, 1, 2]; 5000 routed samples per run. Teacher: FD to data 44.66, label accuracy 0.993. "
                       "Budgets (steps/student): {16: 1650}."])
    (tmp_path / "table.md").write_text(table)  # an old table: no within-class std column
    assert verdicts.digits_cell(str(tmp_path), (16, "all", 2)) == ((57.79, 4.68, 3), None)  # nothing kept: the table
    kept = dict(cells=[dict(size=16, reg="all", K=1, fd_data=[53.05, 62.73, 66.28]),
                       dict(size=16, reg="all", K=2, fd_data=[59.94, 61.01, 62.42])])  # K = 2: one value mistyped
    json.dump(kept, open(tmp_path / "seeds.json", "w"))
    stats, values = verdicts.digits_cell(str(tmp_path), (16, "all", 1))
    assert values == [53.05, 62.73, 66.28] and stats[0] == pytest.approx(60.687, abs=1e-3)
    with pytest.raises(ValueError, match="not table.md's 57.79"):
        verdicts.digits_cell(str(tmp_path), (16, "all", 2))
