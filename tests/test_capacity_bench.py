"""bench/capacity.py: the budget and decision rules, and the whole pipeline at --quick size."""
import importlib.util
import json
import os
import shutil

import numpy as np
import pytest

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


def test_report_applies_the_rule_to_every_cell():
    """Synthetic rows with three seeds: one clear win (gap 20 against 2 x pooled std 2), one clear no."""
    cap = load()
    rows = []
    cells = ((8, 1, [80.0, 81.0, 82.0]), (8, 2, [60.0, 61.0, 62.0]), (8, 5, [79.0, 81.0, 83.0]),
             (16, 1, [80.0, 81.0, 82.0]), (16, 2, [78.5, 79.5, 80.5]))  # the last: 1 < gap / pooled std < 2
    for size, K, fds in cells:
        for seed, fd in enumerate(fds):
            rows.append(dict(size=size, params=53000, reg="all", seed=seed, K=K, steps=100, images=K * 3200, wall=1.0,
                             fd_data=fd, fd_teacher=fd / 2, acc=0.99, fd_blocks=[fd] * 5, class_std=[30.0] * 10))
    hp = dict(load().FULL, sizes=(8, 16), ks=(1, 2, 5), seeds=(0, 1, 2))
    table = cap.report(dict(hp=hp, rows=rows, teacher=dict(fd_data=44.0, acc=0.99, class_std=[40.0] * 10),
                            floor=dict(fd_teacher=8.0, fd_blocks=[14.0] * 5), floor_data=46.0, budget={8: 100},
                            tsm_cost={}, clf_acc=0.98, total_s=1.0))
    lines = [line for line in table.splitlines() if line.startswith("| 8 ch")]
    assert lines[1].endswith("| yes (20.00 / 2.00) |") and "| 2 | 61.00 ± 1.00 |" in lines[1]
    assert lines[2].endswith("| no (0.00 / 3.16) |")  # pooled std sqrt((1 + 4) / 2) = 1.58
    assert lines[0].endswith("|  |")  # the baseline has no verdict
    assert [line for line in table.splitlines() if line.startswith("| 16 ch")][1].endswith("| no (1.50 / 2.00) |")


def test_capacity_quick_pipeline(tmp_path, capsys):
    r = load().main(["--quick", "--out", str(tmp_path / "cap"), "--digits", str(tmp_path / "digits")])
    # sizes 8 and 32 x K 1, 2, 5, plus the own-pairs filter for size 8
    assert len(r["rows"]) == 9 and {x["reg"] for x in r["rows"] if x["size"] == 8} == {"all", "own"}
    assert all(np.isfinite([x["fd_data"], x["fd_teacher"], x["acc"], *x["fd_blocks"], *x["class_std"]]).all()
               and len(x["class_std"]) == 10 for x in r["rows"])
    assert set(r["budget"]) == {8, 32} and all(b in r["steps"] for b in r["budget"].values())
    assert os.path.exists(tmp_path / "cap" / "c8" / "tsm" / "K5p4" / "student.pt")  # Stage 0 for the small size
    assert not os.path.exists(tmp_path / "cap" / "c32" / "tsm")  # the teacher-size students start from the teacher
    printed = capsys.readouterr().out
    assert "mean nothing" in printed and "results: " + os.path.join(  # the folder the full protocol would write
        ROOT, "bench", "results", "capacity", "curve4_sizes8-32_ks1-2-5_pairsall-own") + " (not" in printed
    import glob
    import torch
    for reg in ("own", "all"):  # the own-pairs cells really trained with --reg-pairs own, F_DM's with all
        found = glob.glob(str(tmp_path / "cap" / "c8" / reg / "seed0" / "K5" / "s*" / "p*" / "resume-*.pt"))
        assert len(found) == 5 and {torch.load(f, weights_only=True)["config"]["reg_pairs"] for f in found} == {reg}
    # a longer curve reuses every run it shares, including their recorded CPU seconds
    cap = load()
    r2 = cap.main(["--quick", "--curve-iters", "6", "--out", str(tmp_path / "cap"), "--digits", str(tmp_path / "digits")])
    assert r2["steps"] == [2, 4, 6] and np.allclose(r2["curves"]["8"][:2], r["curves"]["8"], rtol=1e-4)  # same runs
    assert all(np.isfinite(x["wall"]) for x in r2["rows"] if x["wall"] is not None)
    assert all(np.isfinite(v) for v in r2["tsm_cost"].values())
    # one size of the ladder alone (a study split over calls): the same runs, so the same rows
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
    # --stacked: each K = 5 cell as one stacked run, the same runs up to float rounding; --shared-fake: one fake
    # score per cell, from the K = 1 TSM student, in folders of their own
    for mode in ("stacked", "shared"):
        flag = "--stacked" if mode == "stacked" else "--shared-fake"
        r6 = cap.main(["--quick", "--sizes", "8", "--ks", "1", "5", "--pairs", "own", "--curve-iters", "6", flag,
                       "--out", str(tmp_path / "cap"), "--digits", str(tmp_path / "digits")])
        assert cap.results_name(r6["hp"]).endswith(f"pairsown_{mode}") and [x["K"] for x in r6["rows"]] == [1, 5]
        assert np.isclose(r6["rows"][0]["fd_data"], r4["rows"][0]["fd_data"], rtol=1e-4)  # K = 1: the same run
        found = glob.glob(str(tmp_path / "cap" / "c8" / f"own_{mode}" / "seed0" / "K5" / "s*" / "resume-*.pt"))
        cfg = torch.load(found[0], weights_only=True)["config"]
        assert len(found) == 1 and cfg["all_students"] and cfg["reg_pairs"] == "own"
        assert cfg["init"].endswith(os.path.join("K5p{k}", "student.pt"))
        assert cfg["shared_fake"] == (mode == "shared")
        assert cfg["fake_init"].endswith(os.path.join("tsm", "K1p0", "student.pt") if mode == "shared" else "")
        if mode == "stacked":
            assert np.isclose(r6["rows"][1]["fd_data"], r4["rows"][1]["fd_data"], rtol=1e-3)
    # --loss sid: SiD's own K = 1 curve and cells, beside DM's, from the same TSM starts
    r7 = cap.main(["--quick", "--sizes", "8", "--ks", "1", "5", "--pairs", "own", "--curve-iters", "6", "--stacked",
                   "--loss", "sid", "--out", str(tmp_path / "cap"), "--digits", str(tmp_path / "digits")])
    assert cap.results_name(r7["hp"]).endswith("pairsown_stacked_sid") and [x["K"] for x in r7["rows"]] == [1, 5]
    assert os.path.exists(tmp_path / "cap" / "c8" / "curve_sid" / "student_000006.pt")
    found = glob.glob(str(tmp_path / "cap" / "c8" / "own_stacked_sid" / "seed0" / "K5" / "s*" / "resume-*.pt"))
    cfg = torch.load(found[0], weights_only=True)["config"]
    assert cfg["loss"] == "sid" and cfg["beta1"] == 0.0 and cfg["init"].endswith(os.path.join("K5p{k}", "student.pt"))
    assert r7["rows"][0]["fd_data"] != r4["rows"][0]["fd_data"]  # another run than DM's (the same seed would give the same)
    # --budget: every student at the imposed steps, no curve (seed 0's K = 1 is a run of its own); --seeds: other seeds
    r8 = cap.main(["--quick", "--sizes", "8", "--ks", "1", "5", "--pairs", "own", "--stacked", "--budget", "3", "--seeds", "20",
                   "--out", str(tmp_path / "cap"), "--digits", str(tmp_path / "digits")])
    assert cap.results_name(r8["hp"]).endswith("pairsown_stacked_seeds20_budget3") and r8["steps"] == []
    assert [(x["seed"], x["K"], x["steps"]) for x in r8["rows"]] == [(20, 1, 3), (20, 5, 3)]
    assert os.path.exists(tmp_path / "cap" / "c8" / "all" / "seed20" / "K1" / "s3" / "p0" / "student.pt")
    assert "imposed by --budget" in cap.report(r8)
    # a folder's cells read back from its table (runs older than results.json) as from its rows, to the table's digits
    os.makedirs(tmp_path / "fold")
    (tmp_path / "fold" / "table.md").write_text(cap.report(r7))
    from_table = cap.summarize(str(tmp_path / "fold"))
    (tmp_path / "fold" / "results.json").write_text(json.dumps(r7, default=float))
    from_rows = cap.summarize(str(tmp_path / "fold"))
    assert from_table["cells"].keys() == from_rows["cells"].keys() == {(8, "own", 1), (8, "own", 5)}
    for k in ("teacher", "budget", "samples", "seeds"):
        assert np.allclose(from_table[k], from_rows[k], atol=0.005) if k == "teacher" else from_table[k] == from_rows[k], k
    for key, c in from_rows["cells"].items():
        for m in ("fd_data", "fd_teacher", "fd_blocks", "class_std", "class_std_low"):
            assert np.allclose(from_table["cells"][key][m][::2], c[m][::2], atol=0.05), (key, m)
    for bad in (["--curve-iters", "5"], ["--sizes", "12"], ["--sizes", "8", "8"], ["--ks", "2", "5"], ["--ks", "3"],
                ["--ks", "10"], ["--ks", "1", "10", "10"], ["--pairs", "own", "--sizes", "32"],
                ["--pairs", "own", "own"], ["--sizes", "32", "--ks", "1", "10"], ["--budget", "0"], ["--seeds", "1", "1"]):  # 5: not a multiple of 2; K = 1 is the baseline
        with pytest.raises(SystemExit) as e:
            cap.main(["--quick", *bad])
        assert e.value.code == 2, bad


def test_ladder_figure_reads_the_results_tables(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("capacity_ladder", os.path.join(ROOT, "bench", "capacity_ladder.py"))
    lad = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lad)
    cells, teacher, floor = lad.read(os.path.join(ROOT, "bench", "results", "capacity", "curve1800_sizes32_ks1-2-5_pairsall",
                                                  "table.md"))  # committed
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
    cells = lad.main(["--tables", str(tmp_path / "a.md"), str(tmp_path / "b.md"), "--out", str(out), "--reports"])
    assert cells == {(8, "all", 1): (80.0, 4.0), (8, "all", 10): (60.0, 2.0), (16, "all", 1): (61.5, 6.0),
                     (8, "own", 1): (80.0, 4.0), (8, "own", 5): (70.0, 3.0)}
    assert out.stat().st_size > 0
    drawn = capsys.readouterr().out  # both filters; own pairs' K = 1 is F_DM's, drawn once
    assert "F_DM K = 1: 8 ch 80.00 ± 4.00, 16 ch 61.50 ± 6.00" in drawn and "own pairs K = 5: 8 ch 70.00" in drawn
    assert "own pairs K = 1" not in drawn
    lad.main(["--tables", str(tmp_path / "a.md"), "--pairs", "all", "--out", str(out), "--reports"])
    assert "own pairs" not in capsys.readouterr().out
    with pytest.raises(ValueError) as e:  # the same cell with another value in two tables: not the same runs
        lad.merge([str(tmp_path / "a.md"), str(tmp_path / "bad.md")])
    assert "(8, 'all', 1)" in str(e.value)


def test_results_folders_are_named_by_every_axis_and_record_their_run(tmp_path):
    cap = load()
    full = dict(cap.FULL, pairs=("all", "own"))
    assert cap.results_name(full) == "curve1800_sizes8-16-32_ks1-2-5-10_pairsall-own"  # the final table's protocol
    assert cap.results_name(dict(full, sizes=(16,))) == "curve1800_sizes16_ks1-2-5_pairsall"  # K = 10, own: size 8 only
    assert cap.results_name(dict(full, sizes=(8,), ks=(1, 10), pairs=("own",))) == "curve1800_sizes8_ks1-10_pairsown"
    for folder in os.listdir(os.path.join(ROOT, "bench", "results", "capacity")):  # committed results: names the script gives
        assert folder.startswith("curve1800_sizes") and "_ks" in folder and "_pairs" in folder, folder
    info = cap.digits.save_run(str(tmp_path / "r"), "bench/capacity.py", ["--sizes", "8"], 12.4)
    assert info["command"] == "python bench/capacity.py --sizes 8" and info["seconds"] == 12
    assert len(info["commit"].split("-")[0]) == 40 and info["torch"] and "cores" in info["cpu"]
    assert (tmp_path / "r" / "run.json").exists()


def test_the_final_table_in_the_docs_is_the_scripts(tmp_path):
    """docs/capacity.md and README.md hold exactly what bench/capacity_ladder.py writes from the committed tables."""
    spec = importlib.util.spec_from_file_location("capacity_ladder", os.path.join(ROOT, "bench", "capacity_ladder.py"))
    lad = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lad)
    cells = lad.merge(lad.TABLES)[0]
    for path in lad.REPORTS:
        base = os.path.relpath(os.path.join(ROOT, "bench", "results", "capacity"), os.path.dirname(path))
        text = open(path).read()
        assert lad.BEGIN + "\n" + lad.final_table(cells, lad.TABLES, base) + "\n" + lad.END in text, path
    assert "| 8 ch (53k), 1500 | own pairs | 81.58 ± 2.76 |" in lad.final_table(cells, lad.TABLES, ".")
    doc = tmp_path / "r.md"
    doc.write_text("intro\n" + lad.BEGIN + "\nold\n" + lad.END + "\nafter\n")
    lad.write_between_markers(str(doc), "new")
    assert doc.read_text() == "intro\n" + lad.BEGIN + "\nnew\n" + lad.END + "\nafter\n"
    doc.write_text("no markers")
    with pytest.raises(ValueError) as e:
        lad.write_between_markers(str(doc), "new")
    assert "markers" in str(e.value)


def test_shared_against_separate_applies_the_rule_per_cell(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("stack_quality", os.path.join(ROOT, "bench", "stack_quality.py"))
    sq = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sq)
    row = lambda reg, K, seed, fd: dict(size=8, reg=reg, K=K, seed=seed, fd_data=fd, fd_teacher=1.0, fd_blocks=[2.0],  # noqa: E731
                                        class_std=[30.0, 20.0], wall=10.0)
    study = lambda rows, t=45.0: dict(budget={"8": 1500}, teacher=dict(fd_data=t), hp=dict(samples=5000), rows=rows)  # noqa: E731
    k1 = [row("all", 1, s, 80.0 + s) for s in range(3)]
    sep_own = study(k1 + [row("own", 5, s, 60.0 + s) for s in range(3)] + [row("own", 10, s, 60.0 + s) for s in range(3)])
    sep_all = study(k1 + [row("all", 5, s, 56.0 + s) for s in range(3)])  # the separate cells in two calls
    shr = study(k1 + [row("own", 5, s, 61.0 + s) for s in range(3)] + [row("own", 10, s, 70.0 + 2 * s) for s in range(3)]
                + [row("all", 5, s, 50.0 + s) for s in range(3)] + [row("all", 10, s, 50.0) for s in range(3)])
    for name, r in (("sep_own", sep_own), ("sep_all", sep_all), ("shr", shr)):
        os.makedirs(tmp_path / name)
        (tmp_path / name / "results.json").write_text(json.dumps(r))
    seps = [str(tmp_path / "sep_own"), str(tmp_path / "sep_all")]
    doc = tmp_path / "doc.md"
    doc.write_text(f"before\n{sq.BEGIN}\nold\n{sq.END}\nafter\n")
    verdicts = sq.main(["--separate", *seps, "--shared", str(tmp_path / "shr"), "--reports", str(doc)])
    # K = 5: gap +1, pooled std 1: within 2; K = 10: gap +11 (means 72 vs 61), pooled sqrt((4 + 1) / 2) = 1.58
    assert verdicts[("own", 5)] == (1.0, 2.0, False)
    assert np.isclose(verdicts[("own", 10)][0], 11.0) and verdicts[("own", 10)][2]
    assert verdicts[("all", 5)] == (-6.0, 2.0, True)  # F_DM, from the second separate folder
    text = doc.read_text()
    assert "old" not in text and text.startswith("before") and text.endswith("after\n")
    assert "| yes, worse (+11.00 / 3.16) |" in text and "| no (+1.00 / 2.00) |" in text
    assert "| yes, better (-6.00 / 2.00) |" in text
    assert "| 10 | 5.00x |" in text and "| 10 | 10.00x |" in text  # K runs of 10 s each against one of 10 s
    assert text.count("| 10 | — (another call) |") == 3  # the separate cells ran in other calls: no ratio
    assert ("all", 10) not in verdicts and "| not compared: the separate cell was not run |" in text
    assert "the sum of K single runs (separate)" in text  # separate folders not named _stacked: K single runs
    draws = tmp_path / "draws.md"
    draws.write_text(f"{sq.TABLES['draws'][0]}\n{sq.TABLES['draws'][1]}\n")
    stacked = [str(tmp_path / "sep_own_stacked"), str(tmp_path / "sep_all_stacked")]
    for old, new in zip(seps, stacked):
        shutil.copytree(old, new)
    assert sq.main(["--separate", *stacked, "--shared", str(tmp_path / "shr"), "--table", "draws", "--reports", str(draws)]) == verdicts
    text = draws.read_text()
    assert "| yes, worse (+11.00 / 3.16) |" in text and "one stacked msd.py run of all K students (DM stage" in text
    for bad, words in ((dict(shr, teacher=dict(fd_data=44.0)), "different teachers"),
                       (dict(shr, budget={"8": 900}), "budgets")):
        (tmp_path / "shr" / "results.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError) as e:  # two teachers or two budgets: not one study
            sq.main(["--separate", *seps, "--shared", str(tmp_path / "shr")])
        assert words in str(e.value)
    (tmp_path / "sep_all" / "results.json").write_text(json.dumps(dict(sep_all, teacher=dict(fd_data=44.0))))
    with pytest.raises(ValueError) as e:  # the separate calls themselves must share their teacher
        sq.load(*seps)
    assert "different teachers" in str(e.value)


def test_the_quality_table_in_the_docs_is_the_scripts():
    spec = importlib.util.spec_from_file_location("stack_quality", os.path.join(ROOT, "bench", "stack_quality.py"))
    sq = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sq)
    table, verdicts = sq.compare(sq.load(*sq.SEPARATE), sq.load(sq.SHARED))  # the committed results folders
    assert set(verdicts) == {(reg, K) for reg in ("own", "all") for K in (5, 10)}
    assert open(os.path.join(ROOT, "bench", "results", "stack", "quality", "table.md")).read() == table
    assert sq.BEGIN + "\n" + table + "\n" + sq.END in open(os.path.join(ROOT, "docs", "stack.md")).read()
    # the re-run with K x B draws, against separate cells read from their tables (runs older than results.json)
    table, verdicts = sq.compare(sq.load(*sq.DRAWS_SEPARATE), sq.load(sq.DRAWS_SHARED), stacked=False)
    assert set(verdicts) == {("own", 5), ("own", 10)}
    assert open(os.path.join(ROOT, "bench", "results", "stack", "draws", "table.md")).read() == table
    begin, end = sq.TABLES["draws"]
    assert begin + "\n" + table + "\n" + end in open(os.path.join(ROOT, "docs", "stack.md")).read()


def test_same_teacher_reads_the_input_digests_where_both_recorded_them():
    cap = load()
    a = dict(teacher=45.45, inputs=dict(teacher="t1", pairs="p", classifier="c"))
    cap.same_teacher(a, dict(a, teacher=45.4503))  # one teacher, its FD recomputed on another CPU
    cap.same_teacher(dict(a, inputs=None), dict(a, teacher=45.4503))  # no digests on one side: FD within 0.001
    with pytest.raises(ValueError, match=r"\['classifier'\] differ"):
        cap.same_teacher(a, dict(a, inputs=dict(a["inputs"], classifier="c2")))
    with pytest.raises(ValueError, match="different teachers"):
        cap.same_teacher(dict(a, inputs=None), dict(a, teacher=45.71))
    assert cap.digest(__file__) == cap.digest(__file__) and len(cap.digest(__file__)) == 64
