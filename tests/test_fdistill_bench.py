"""bench/fdistill_vs_dm.py: its whole pipeline runs at --quick size without touching the committed results, and
docs/fdistill.md's table is what its report() writes from the committed results.json."""
import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import fdistill_vs_dm  # noqa: E402


def test_quick_pipeline_runs_both_losses_and_writes_no_results(tmp_path):
    committed = {f: os.path.getmtime(os.path.join(fdistill_vs_dm.RESULTS, f)) for f in os.listdir(fdistill_vs_dm.RESULTS)}
    r = fdistill_vs_dm.main(["--quick", "--out", str(tmp_path / "out"), "--digits", str(tmp_path / "digits")])
    hp = r["hp"]
    assert {(x["loss"], x["seed"], x["K"]) for x in r["rows"]} == {
        (loss, s, K) for loss, _ in fdistill_vs_dm.LOSSES for s in hp["seeds"] for K in hp["ks"]}
    assert all(math.isfinite(x["fd_data"]) and 0 <= x["acc"] <= 1 for x in r["rows"])
    assert [t["K"] for t in r["tests"]] == list(hp["ks"])
    assert committed == {f: os.path.getmtime(os.path.join(fdistill_vs_dm.RESULTS, f)) for f in os.listdir(fdistill_vs_dm.RESULTS)}


def test_the_reports_table_is_the_scripts_output():
    with open(os.path.join(fdistill_vs_dm.RESULTS, "results.json")) as f:
        table = fdistill_vs_dm.report(json.load(f))
    begin, end = fdistill_vs_dm.marks()
    text = open(os.path.join(ROOT, "docs", "fdistill.md")).read()
    assert text.split(begin, 1)[1].split(end, 1)[0].strip() == table.strip()
