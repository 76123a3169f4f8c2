"""One shared fake score against K separate ones: the quality study of docs/stack.md, read off
bench/capacity.py results folders of the same teacher (the separate cells, the shared cells).

    python bench/capacity.py --sizes 8 --ks 1 5 10 --pairs own --stacked   # K fake scores (each cell one stacked run)
    python bench/capacity.py --sizes 8 --ks 1 5 10 --pairs all --stacked   # (the separate cells: two calls)
    python bench/capacity.py --sizes 8 --ks 1 5 10 --shared-fake   # one fake score per cell
    python bench/stack_quality.py --results bench/results/stack/quality --reports docs/stack.md

Those shared cells drew B distinct Eq. 8 (t, noise) per step; the shared fake score now draws K x B. The
re-run of its own-pairs cells, against the separate single runs of the capacity study's teacher (the
teacher that machine rebuilt here; their tables are read where the runs predate results.json):

    python bench/capacity.py --sizes 8 --ks 1 5 10 --pairs own --shared-fake
    python bench/stack_quality.py --table draws --results bench/results/stack/draws --reports docs/stack.md

The rule was fixed before the runs (docs/stack.md): in a cell (filter, K), "shared differs from
separate" where the gap of the mean FDs to data exceeds twice the pooled std of the two cells
(n = 3 seeds each); the sign says which is better. The table goes between the markers of
--reports, so no number in the report is typed by hand.
"""
import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import capacity  # noqa: E402  (the rule)
import capacity_ladder  # noqa: E402  (the table between markers)

RESULTS = os.path.join(HERE, "results", "capacity")
SEPARATE = [os.path.join(RESULTS, f"curve1800_sizes8_ks1-5-10_pairs{reg}_stacked") for reg in ("own", "all")]
SHARED = os.path.join(RESULTS, "curve1800_sizes8_ks1-5-10_pairsall-own_shared")
BEGIN, END = "<!-- quality table: written by bench/stack_quality.py -->", "<!-- end of the quality table -->"
DRAWS_SEPARATE = [os.path.join(RESULTS, f) for f in ("curve1800_sizes8_ks1-2-5_pairsall-own", "curve1800_sizes8_ks1-10_pairsown")]
DRAWS_SHARED = os.path.join(RESULTS, "curve1800_sizes8_ks1-5-10_pairsown_shared")
TABLES = {"quality": (BEGIN, END),  # the shared fake score's first draws (B distinct per step), on the Xeon's teacher
          "draws": ("<!-- draws table: written by bench/stack_quality.py -->", "<!-- end of the draws table -->")}


def load(*folders):
    """One study's cell statistics (capacity.summarize), from one results folder or several calls of it
    (their cells joined; they must share teacher and budget; a cell in two folders: the first's)."""
    studies = [capacity.summarize(folder) for folder in folders]
    for other in studies[1:]:
        same(studies[0], other)
    cells = {}
    for s in studies:
        for key, c in s["cells"].items():
            cells.setdefault(key, c)
    return dict(studies[0], cells=cells)


def same(a, b):
    """Raises unless two studies distil the same teacher with the same budget."""
    if a["budget"] != b["budget"]:
        raise ValueError(f"the two studies differ in their budgets: {a['budget']} against {b['budget']}")
    capacity.same_teacher(a, b)


def compare(sep, shr, stacked=True):
    """-> (markdown table, verdicts {(reg, K): (gap shared - separate, 2 x pooled std, differs)}); a shared
    cell without its separate cell gets a row and no verdict. Raises unless both studies distil the same
    teacher with the same budget. stacked: the separate cells ran as stacked runs (else as K single runs)."""
    same(sep, shr)
    ms = lambda v, f: f"{v[0]:{f}} ± {v[1]:{f}}"  # noqa: E731
    lines = ["| size | pairs | K | fake scores | FD to data | FD to teacher | per-partition FD | within-class std "
             "(mean / lowest) | CPU s per run | against K single runs | shared differs? (shared - separate / 2 x pooled std) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    single = [c["wall"][0] for (_, _, K), c in shr["cells"].items() if K == 1 and c["wall"][2]]
    single = np.mean(single) if single else float("nan")  # CPU s of one single-student run (the shared call's K = 1)
    verdicts = {}
    for size, reg, K in sorted(key for key in shr["cells"] if key[2] > 1):
        a, b = sep["cells"].get((size, reg, K)), shr["cells"][size, reg, K]
        if a:
            gap, pooled, _ = capacity.decide_stats(b["fd_data"], a["fd_data"])  # shared - separate
            verdicts[reg, K] = (gap, 2 * pooled, bool(abs(gap) > 2 * pooled))
        for name, c in (("K separate", a), ("one shared", b)):
            verdict = "" if a else "not compared: the separate cell was not run"
            if not c:
                continue
            if name == "one shared" and a:
                word = ("yes, worse" if gap > 0 else "yes, better") if verdicts[reg, K][2] else "no"
                verdict = f"{word} ({gap:+.2f} / {2 * pooled:.2f})"
            wall = c["wall"][0] if c["wall"][2] else float("nan")
            against = f"{K * single / wall:.2f}x" if name == "one shared" else "— (another call)"  # CPU s compare in one call
            lines.append(f"| {size} ch | {reg} | {K} | {name} | {ms(c['fd_data'], '.2f')} | {ms(c['fd_teacher'], '.2f')} | "
                         f"{ms(c['fd_blocks'], '.2f')} | {c['class_std'][0]:.1f} / {c['class_std_low'][0]:.1f} | "
                         f"{wall:.0f} | {against} | {verdict} |")
    base = next(c["fd_data"] for (_, _, K), c in sorted(sep["cells"].items()) if K == 1)  # both filters' K = 1: one run
    lines += ["", f"mean ± std (ddof 1) over seeds {shr['seeds']}, {shr['samples']} routed samples per run, "
              f"{shr['budget']} steps per student. Teacher: FD to data "
              f"{shr['teacher']:.2f}; K = 1 (the same runs in both studies): FD to data {ms(base, '.2f')}. "
              "CPU s per run: " + ("one stacked msd.py run of all K students" if stacked else "one stacked msd.py run of all "
                                   "K students (shared), the sum of K single runs (separate)") + " (DM stage, one thread); "
              "against K single runs: "
              f"K x {single:.0f} s (the mean CPU s of the timed K = 1 runs of the shared cells' call, one student each) "
              "over it; none for the separate cells, which ran in other calls (CPU s compare within one call only)."
              + ("" if stacked else " The separate cells' single runs are an earlier call's, timed beside other jobs "
                 "than the shared cells: read CPU s within one study only."), ""]
    return "\n".join(lines), verdicts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--separate", nargs="+", default=None, help="results folders of the K-fake-score cells (default: the "
                   "--table's)")
    p.add_argument("--shared", default=None, help="results folder of the shared-fake-score cells (default: the --table's)")
    p.add_argument("--results", default="", help="also write table.md and run.json into this folder")
    p.add_argument("--reports", nargs="*", default=[], help="files whose table is rewritten between its markers")
    p.add_argument("--table", choices=tuple(TABLES), default="quality",
                   help="which table of the reports: quality (the first shared draws), draws (K x B distinct draws)")
    args = p.parse_args(argv)
    args.separate = args.separate or (SEPARATE if args.table == "quality" else DRAWS_SEPARATE)
    args.shared = args.shared or (SHARED if args.table == "quality" else DRAWS_SHARED)
    for folder in (*args.separate, args.shared):
        if not capacity.has_results(folder):
            p.error(f"{folder!r} holds no results (run bench/capacity.py first: see --help)")
    table, verdicts = compare(load(*args.separate), load(args.shared), all(f.endswith("_stacked") for f in args.separate))
    print(table)
    if args.results:
        import digits  # noqa: E402  (the benches' run.json writer)
        os.makedirs(args.results, exist_ok=True)
        with open(os.path.join(args.results, "table.md"), "w") as f:
            f.write(table)
        digits.save_run(args.results, "bench/stack_quality.py", argv if argv is not None else sys.argv[1:], 0)
    for path in args.reports:
        capacity_ladder.write_between_markers(path, table, *TABLES[args.table])
        print(f"wrote the {args.table} table into {path}")
    return verdicts


if __name__ == "__main__":
    main()
