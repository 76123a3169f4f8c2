"""Every verdict of docs/sid.md and docs/stack.md as a test, beside the rule each study fixed beforehand.

    python bench/verdicts.py      # the tests tables of docs/sid.md and docs/stack.md, from the committed results

The studies decided "A beats B" by a rule fixed before their runs: the gap of the means above twice the
pooled std of the single runs. That rule cannot gain power with seeds (it compares the gap with the
spread of single runs, not with the standard error of the means). Here each comparison is also a test:
the difference of the means with its 95% interval and Welch's two-sided p (bench/significance.py), and
Holm's correction within each report (the family: every comparison of that report listed here). The
per-seed values are shown where the results kept them (results.json); cells of runs older than
results.json are read from their tables' 2-decimal mean +- std. Nothing is re-run: the inputs are the
committed results folders, and the rule's word is recomputed from the same numbers.
"""
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import capacity  # noqa: E402  (summarize: a results folder's cells)
import capacity_ladder  # noqa: E402  (the table between markers)
import significance  # noqa: E402
import stack_quality  # noqa: E402  (the stack report's folders)

SID_TOY = os.path.join(HERE, "results", "sid", "toy", "results.json")
SID_DM = os.path.join(capacity.RESULTS, "curve1800_sizes8_ks1-2-5_pairsall-own")
SID_SID = os.path.join(capacity.RESULTS, "curve1800_sizes8_ks1-5_pairsall-own_stacked_sid")
MARKS = ("<!-- tests table: written by bench/verdicts.py -->", "<!-- end of the tests table -->")


def seeds_of(folder, key):
    """The per-seed FD to data of a cell, from results.json (None for a table-only folder)."""
    path = os.path.join(folder, "results.json")
    if not os.path.exists(path):
        return None
    rows = json.load(open(path))["rows"]
    return [x["fd_data"] for x in sorted(rows, key=lambda x: x["seed"]) if (x["size"], x["reg"], x["K"]) == key]


def digits_cell(folder, key):
    """(mean, std, n) of FD to data and the per-seed values (or None) of a capacity-style cell."""
    return capacity.summarize(folder)["cells"][key]["fd_data"], seeds_of(folder, key)


def toy_cell(loss, K):
    runs = json.load(open(SID_TOY))["runs"]
    v = [r["l1"][r["ks"].index(K)] for r in sorted(runs, key=lambda r: r["seed"]) if r["loss"] == loss]
    return capacity.stat(v), v


def sid_comparisons():
    """docs/sid.md: (name, A, B) where the question is whether B is below (better than) A or differs from it."""
    c = [("toy, DM: K = 8 against K = 1 (l1)", toy_cell("dm", 1), toy_cell("dm", 8)),
         ("toy, SiD: K = 8 against K = 1 (l1)", toy_cell("sid", 1), toy_cell("sid", 8)),
         ("toy, K = 1: SiD against DM (l1)", toy_cell("dm", 1), toy_cell("sid", 1)),
         ("toy, K = 8: SiD against DM (l1)", toy_cell("dm", 8), toy_cell("sid", 8))]
    for reg in ("all", "own"):
        c.append((f"digits, SiD, {reg} pairs: K = 5 against K = 1", digits_cell(SID_SID, (8, reg, 1)),
                  digits_cell(SID_SID, (8, reg, 5))))
    c.append(("digits, K = 1: SiD (1,050 steps) against DM (1,500)", digits_cell(SID_DM, (8, "all", 1)),
              digits_cell(SID_SID, (8, "all", 1))))
    for reg in ("all", "own"):
        c.append((f"digits, K = 5, {reg} pairs: SiD (1,050 steps) against DM (1,500)", digits_cell(SID_DM, (8, reg, 5)),
                  digits_cell(SID_SID, (8, reg, 5))))
    return c


def stack_comparisons():
    """docs/stack.md: one shared fake score (B) against K separate ones (A); then K against 1 with a shared one."""
    c = []
    for (sep, shr), name in ((([*stack_quality.SEPARATE], stack_quality.SHARED), "first draws"),
                             ((stack_quality.DRAWS_SEPARATE, stack_quality.DRAWS_SHARED), "K x B draws")):
        for reg, K in ((r, k) for r in ("all", "own") for k in (5, 10)):
            a = next((digits_cell(f, (8, reg, K)) for f in sep if (8, reg, K) in capacity.summarize(f)["cells"]), None)
            if a is None or (8, reg, K) not in capacity.summarize(shr)["cells"]:
                continue
            c.append((f"{name}, {reg} pairs, K = {K}: shared against separate", a, digits_cell(shr, (8, reg, K))))
    for K in (5, 10):
        shr = stack_quality.DRAWS_SHARED
        c.append((f"K x B draws, own pairs, shared: K = {K} against K = 1", digits_cell(shr, (8, "own", 1)),
                  digits_cell(shr, (8, "own", K))))
    return c


def table(comparisons, family):
    """The tests table of one report: B minus A, its interval, Welch's p, Holm's p over the family, the rule."""
    tests = [significance.welch_from_stats(b[0], a[0]) for _, a, b in comparisons]  # B - A
    holm = significance.holm([t[2] for t in tests])
    seeds = lambda cell: ", ".join(f"{v:.3g}" for v in cell[1]) if cell[1] else "not kept"  # noqa: E731
    lines = ["| comparison (A, then B) | A per seed | B per seed | B - A | 95% interval | p (Welch) | p (Holm) | test at 0.05 | "
             "pre-registered rule |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (name, a, b), (diff, (lo, hi), p), ph in zip(comparisons, tests, holm):
        gap, pooled, _ = capacity.decide_stats(a[0], b[0])  # A - B, as the rule reads it
        rule = "yes" if abs(gap) > 2 * pooled else "no"
        test = ("B lower" if diff < 0 else "B higher") if ph < 0.05 else "no difference found"
        note = "" if (rule == "yes") == (ph < 0.05) else " (differs)"
        lines.append(f"| {name} | {seeds(a)} | {seeds(b)} | {diff:+.2f} | [{lo:+.2f}, {hi:+.2f}] | {p:.3f} | {ph:.3f} | "
                     f"{test} | {rule} ({abs(gap):.2f} / {2 * pooled:.2f}){note} |")
    lines += ["", f"Lower is better (FD to held-out digits; toy: l1 to the teacher). Welch's t-test, two-sided, on B - A, "
              f"3 seeds a side; \"not kept\": runs older than results.json, tested from their tables' 2-decimal mean ± "
              f"std. p (Holm): Holm's correction over the {len(comparisons)} comparisons of {family}. The rule (fixed "
              "before the runs): |gap| above twice the pooled std; \"differs\" marks where the test and the rule disagree."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    out = {}
    for doc, comparisons, family in (("sid.md", sid_comparisons(), "this report"),
                                     ("stack.md", stack_comparisons(), "this report")):
        text = table(comparisons, family)
        print(f"{doc}:\n{text}")
        if argv != ["--print"]:
            capacity_ladder.write_between_markers(os.path.join(ROOT, "docs", doc), text, *MARKS)
        out[doc] = text
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
