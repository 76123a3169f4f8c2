"""bench/capacity.py: the budget and decision rules, and the whole pipeline at --quick size."""
import importlib.util
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load():
    spec = importlib.util.spec_from_file_location("capacity", os.path.join(ROOT, "bench", "capacity.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_budget_and_decision_rules():
    cap = load()
    assert cap.pick_budget([250, 500, 750, 1000], [90, 70, 66, 65]) == 750  # 66 <= 1.05 * 65, 70 is not
    assert cap.pick_budget([250, 500, 750, 1000], [90, 60, 66, 65]) == 500  # later points no better
    assert cap.pick_budget([250, 500], [50, 80]) == 250
    gap, pooled, wins = cap.decide([10.0, 11.0, 12.0], [5.0, 6.0, 7.0])
    assert gap == 5.0 and pooled == 1.0 and wins
    assert not cap.decide([10.0, 11.0, 12.0], [9.0, 10.0, 11.0])[2]  # a gap of 1 < 2 pooled std


def test_capacity_quick_pipeline(tmp_path, capsys):
    r = load().main(["--quick", "--out", str(tmp_path / "cap"), "--digits", str(tmp_path / "digits")])
    # sizes 8 and 32 x K 1, 2, 5, plus the own-pairs filter for size 8
    assert len(r["rows"]) == 9 and {x["reg"] for x in r["rows"] if x["size"] == 8} == {"all", "own"}
    assert all(np.isfinite([x["fd_data"], x["fd_teacher"], x["acc"], *x["fd_blocks"], *x["class_std"]]).all()
               and len(x["class_std"]) == 10 for x in r["rows"])
    assert set(r["budget"]) == {8, 32} and all(b in r["steps"] for b in r["budget"].values())
    assert os.path.exists(tmp_path / "cap" / "c8" / "tsm" / "K5p4" / "student.pt")  # Stage 0 for the small size
    assert not os.path.exists(tmp_path / "cap" / "c32" / "tsm")  # the teacher-size students start from the teacher
    assert "mean nothing" in capsys.readouterr().out
    # a longer curve reuses every run it shares, including their recorded CPU seconds
    cap = load()
    r2 = cap.main(["--quick", "--curve-iters", "6", "--out", str(tmp_path / "cap"), "--digits", str(tmp_path / "digits")])
    assert r2["steps"] == [2, 4, 6] and np.allclose(r2["curves"]["8"][:2], r["curves"]["8"], rtol=1e-4)  # same runs
    assert all(np.isfinite(x["wall"]) for x in r2["rows"] if x["wall"] is not None)
    assert all(np.isfinite(v) for v in r2["tsm_cost"].values())
    # one size of the ladder alone (a study split over sessions): the same runs, so the same rows
    r3 = cap.main(["--quick", "--sizes", "32", "--curve-iters", "6", "--out", str(tmp_path / "cap"),
                   "--digits", str(tmp_path / "digits")])
    assert {x["size"] for x in r3["rows"]} == {32} and len(r3["rows"]) == 3
    same = [(a["fd_data"], b["fd_data"]) for a in r3["rows"] for b in r2["rows"] if b["size"] == 32 and b["K"] == a["K"]]
    assert len(same) == 3 and np.allclose(*zip(*same), rtol=1e-4)
    # one filter and two K of a size (a cell against its baseline): the same runs, so the same rows
    r4 = cap.main(["--quick", "--sizes", "8", "--ks", "1", "5", "--pairs", "own", "--curve-iters", "6",
                   "--out", str(tmp_path / "cap"), "--digits", str(tmp_path / "digits")])
    assert [(x["reg"], x["K"]) for x in r4["rows"]] == [("own", 1), ("own", 5)]
    same = [(a["fd_data"], b["fd_data"]) for a in r4["rows"] for b in r2["rows"]
            if (b["size"], b["reg"], b["K"]) == (8, "own", a["K"])]
    assert len(same) == 2 and np.allclose(*zip(*same), rtol=1e-4)
    # K = 10 (one class per student) is opt-in: ten students, each on one class, against the same K = 1 runs
    r5 = cap.main(["--quick", "--sizes", "8", "--ks", "1", "10", "--pairs", "all", "--curve-iters", "6",
                   "--out", str(tmp_path / "cap"), "--digits", str(tmp_path / "digits")])
    assert [(x["reg"], x["K"]) for x in r5["rows"]] == [("all", 1), ("all", 10)]
    assert r5["rows"][1]["images"] == 10 * r5["rows"][0]["images"]
    assert os.path.exists(tmp_path / "cap" / "c8" / "tsm" / "K10p9" / "student.pt")
    k1 = [b["fd_data"] for b in r2["rows"] if (b["size"], b["reg"], b["K"]) == (8, "all", 1)]
    assert np.isclose(r5["rows"][0]["fd_data"], k1[0], rtol=1e-4)  # the same K = 1 run
    for bad in (["--curve-iters", "5"], ["--sizes", "12"], ["--sizes", "8", "8"], ["--ks", "2", "5"], ["--ks", "3"],
                ["--ks", "10"], ["--ks", "1", "10", "10"], ["--pairs", "own", "--sizes", "32"],
                ["--pairs", "own", "own"]):  # 5: not a multiple of 2; K = 1 is the baseline
        try:
            cap.main(["--quick", *bad])
        except SystemExit as e:
            assert e.code == 2
        else:
            raise AssertionError(f"{bad} was accepted")


def test_ladder_figure_reads_the_results_tables(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("capacity_ladder", os.path.join(ROOT, "bench", "capacity_ladder.py"))
    lad = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lad)
    cells, teacher, floor = lad.read(os.path.join(ROOT, "bench", "capacity_results_curve1800_sizes32.md"))  # committed
    assert set(cells) == {(32, "all", 1), (32, "all", 2), (32, "all", 5)} and 40 < teacher < floor < 50
    head = "| size (params) | pairs | K | FD to data | rest |\n| --- | --- | --- | --- | --- |\n"
    foot = "\nmean ± std. Teacher: FD to data {t}, label accuracy 0.99. Floors: real training digits vs held-out {f}.\n"
    tables = {"a": "| 8 ch (53k) | all | 1 | 80.00 ± 4.00 | x |\n| 8 ch (53k) | all | 10 | 60.00 ± 2.00 | x |\n"
                   "| 8 ch (53k) | own | 1 | 80.00 ± 4.00 | x |\n| 8 ch (53k) | own | 5 | 70.00 ± 3.00 | x |\n",
              "b": "| 8 ch (53k) | all | 1 | 80.00 ± 4.00 | x |\n| 16 ch (209k) | all | 1 | 61.50 ± 6.00 | x |\n",
              "bad": "| 8 ch (53k) | all | 1 | 79.00 ± 4.00 | x |\n"}
    for name, rows in tables.items():
        (tmp_path / f"{name}.md").write_text(head + rows + foot.format(t=44.7 if name != "b" else 44.6, f=46.7))
    out = tmp_path / "ladder.png"
    cells = lad.main(["--tables", str(tmp_path / "a.md"), str(tmp_path / "b.md"), "--out", str(out)])
    assert cells == {(8, "all", 1): (80.0, 4.0), (8, "all", 10): (60.0, 2.0), (16, "all", 1): (61.5, 6.0),
                     (8, "own", 1): (80.0, 4.0), (8, "own", 5): (70.0, 3.0)}
    assert out.stat().st_size > 0
    drawn = capsys.readouterr().out  # both filters; own pairs' K = 1 is F_DM's, drawn once
    assert "F_DM K = 1: 8 ch 80.00 ± 4.00, 16 ch 61.50 ± 6.00" in drawn and "own pairs K = 5: 8 ch 70.00" in drawn
    assert "own pairs K = 1" not in drawn
    lad.main(["--tables", str(tmp_path / "a.md"), "--pairs", "all", "--out", str(out)])
    assert "own pairs" not in capsys.readouterr().out
    try:  # the same cell with another value in two tables: not the same runs
        lad.merge([str(tmp_path / "a.md"), str(tmp_path / "bad.md")])
    except ValueError as e:
        assert "(8, 'all', 1)" in str(e)
    else:
        raise AssertionError("conflicting tables were merged")
