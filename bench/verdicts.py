"""Every verdict of docs/capacity.md, docs/sid.md and docs/stack.md as a test, beside the rule each study fixed
beforehand.

    python bench/verdicts.py           # the tests tables of the three reports, from the committed results
    python bench/verdicts.py --print   # the same tables, printed only

The studies decided "A beats B" by a rule fixed before their runs: the gap of the means above twice the
pooled std of the single runs. That rule cannot gain power with seeds (it compares the gap with the
spread of single runs, not with the standard error of the means). Here each comparison is also a test:
the difference of the means with its 95% interval and Welch's two-sided p (bench/significance.py), and
Holm's correction within each report (the family: every comparison of that report listed here). The
per-seed values come from results.json, or for runs older than it from the folder's seeds.json (the 2-decimal
values their logs printed, checked against their tables' mean +- std); a cell with neither would be read from its
table's mean +- std. Nothing is re-run: the inputs are the
committed results folders, and the rule's word is recomputed from the same numbers (docs/capacity.md's is
the word its tables recorded: that rule was one-sided, "K beats K = 1").
"""
import argparse
import json
import os
import sys

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
FOLLOW_MARKS = ("<!-- follow-up table: written by bench/verdicts.py -->", "<!-- end of the follow-up table -->")
# the follow-ups fixed in docs/sid.md and docs/stack.md before their runs, every cell run on one teacher
# (bench/capacity.py's results names; docs/sid.md says why seeds 0-2 were re-run)
FOLLOW = lambda name: os.path.join(capacity.RESULTS, f"curve1800_sizes8_ks1-{name}")  # noqa: E731
SID_SEEDS, STACK_SEEDS = (0, 1, 2, 20, 21, 22, 23), (0, 1, 2, *range(20, 28))
DM_1050, DM_1500 = FOLLOW("5_pairsown_stacked_budget1050"), FOLLOW("5_pairsown_stacked_budget1500")
SID_1050 = FOLLOW(f"5_pairsown_stacked_sid_seeds{'-'.join(map(str, SID_SEEDS))}_budget1050")
SID_1500 = FOLLOW("5_pairsown_stacked_sid_budget1500")
# the shared fake score's follow-up, each of its two commands run as calls of at most two seeds (the same runs; a
# finished call's results are kept even when the machine's working folder is lost): its parts, pooled by seed
STACK_PARTS = ((0, 1), (2, 20), (21, 22), (23, 24), (25, 26), (27,))
STACK_SEP, STACK_SHR = ([FOLLOW(f"10_pairsown_{mode}_seeds{'-'.join(map(str, s))}_budget1500") for s in STACK_PARTS]
                        for mode in ("stacked", "shared"))


def seeds_of(folder, key, seeds=None):
    """The per-seed FD to data of a cell (only `seeds`, if given), from results.json; for runs older than results.json,
    from the folder's seeds.json (the values their logs printed, 2 decimals), checked against table.md's mean +- std;
    None where neither is kept."""
    path = os.path.join(folder, "results.json")
    if not os.path.exists(path):
        return kept_seeds(folder, key)
    rows = json.load(open(path))["rows"]
    return [x["fd_data"] for x in sorted(rows, key=lambda x: x["seed"])
            if (x["size"], x["reg"], x["K"]) == key and (seeds is None or x["seed"] in seeds)]


def kept_seeds(folder, key):
    """A table-only cell's per-seed values from seeds.json, or None; raises where they do not give the table's mean
    and std (to its 2 decimals, the values' own rounding allowed for)."""
    path = os.path.join(folder, "seeds.json")
    if not os.path.exists(path):
        return None
    kept = json.load(open(path))
    values = next((c["fd_data"] for c in kept["cells"] if (c["size"], c["reg"], c["K"]) == key), None)
    if values is None:
        return None
    mean, std, n = capacity.summarize(folder)["cells"][key]["fd_data"]
    got = capacity.stat(values)
    if n != len(values) or abs(got[0] - mean) > 0.01 or abs(got[1] - std) > 0.02:
        raise ValueError(f"{path}: cell {key} gives {got[0]:.3f} ± {got[1]:.3f} (n {len(values)}), "
                         f"not table.md's {mean:.2f} ± {std:.2f} (n {n})")
    return values


def digits_cell(folder, key, seeds=None):
    """(mean, std, n) of FD to data and the per-seed values (or None) of a capacity-style cell, over `seeds` if
    given; None where the folder holds no results yet (a follow-up not run)."""
    if not capacity.has_results(folder):
        return None
    if seeds is None:
        values = seeds_of(folder, key)
        return (capacity.stat(values) if values else capacity.summarize(folder)["cells"][key]["fd_data"]), values
    values = seeds_of(folder, key, seeds)
    if len(values) != len(seeds):
        raise ValueError(f"{folder}: cell {key} has {len(values)} of the seeds {list(seeds)}")
    return capacity.stat(values), values


def pooled_cell(folders, key, seeds):
    """A cell run as several calls split by seed (the same runs as one call): (mean, std, n) and the per-seed values
    over `seeds`, pooled from the folders; None before any part has run; while some seeds are missing, a line that
    says how many have run and nothing of their values (a test read before all its seeds would be a look at the
    data the protocol did not fix)."""
    done = [f for f in folders if capacity.has_results(f)]
    if not done:
        return None
    old = [f for f in done if not os.path.exists(os.path.join(f, "results.json"))]
    if old:
        raise ValueError(f"{old}: a part without results.json has no per-seed values to pool")
    first = capacity.summarize(done[0])
    for f in done[1:]:
        r = capacity.summarize(f)
        capacity.same_teacher(first, r)
        if r["budget"] != first["budget"]:
            raise ValueError(f"{f}: budget {r['budget']}, not {first['budget']} as in {done[0]}")
    rows = sorted((x["seed"], x["fd_data"]) for f in done for x in json.load(open(os.path.join(f, "results.json")))["rows"]
                  if (x["size"], x["reg"], x["K"]) == key)
    got = [s for s, _ in rows]
    if len(set(got)) != len(got) or not set(got) <= set(seeds):
        raise ValueError(f"cell {key}: the parts hold seeds {got}, expected each of {list(seeds)} once")
    if len(got) < len(seeds):
        return f"{len(got)} of {len(seeds)} seeds run (values shown when all are)"
    return capacity.stat([v for _, v in rows]), [v for _, v in rows]


def toy_cell(loss, K):
    runs = json.load(open(SID_TOY))["runs"]
    v = [r["l1"][r["ks"].index(K)] for r in sorted(runs, key=lambda r: r["seed"]) if r["loss"] == loss]
    return capacity.stat(v), v


def capacity_comparisons():
    """docs/capacity.md: each K > 1 cell of the final table (B) against K = 1 of its size (A); a K = 1 student owns
    every pair, so both filters share it. Each cell is read from the first results folder that holds it (the final
    table checks that the folders agree); the fourth item is the rule's word as the tables recorded it."""
    cells = capacity_ladder.merge(capacity_ladder.TABLES)[0]
    held = {os.path.dirname(t): capacity.summarize(os.path.dirname(t))["cells"] for t in capacity_ladder.TABLES}
    cell = lambda key: next(digits_cell(f, key) for f, c in held.items() if key in c)  # noqa: E731
    c = []
    for size, reg, K in sorted(key for key in cells if key[2] > 1):
        one = (size, reg, 1) if (size, reg, 1) in cells else (size, "all", 1)
        late = " (K = 10: a cell added after seeing results)" if K == 10 else ""  # docs/capacity.md's protocol
        c.append((f"{size} ch, {'F_DM' if reg == 'all' else 'own pairs'}: K = {K} against K = 1{late}", cell(one),
                  cell((size, reg, K)), capacity_ladder.VERDICTS[size, reg, K]))
    return c


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


def tests(comparisons):
    """Welch's t on B - A for each comparison, and Holm's p over all of them; a comparison not run yet (a cell
    None) gives None and counts at p = 1 in Holm's correction: the others' p can only fall when it runs."""
    ran = lambda cell: isinstance(cell, tuple)  # noqa: E731  (None: not run; a str: partly run, values withheld)
    t = [significance.welch_from_stats(c[2][0], c[1][0]) if ran(c[1]) and ran(c[2]) else None for c in comparisons]
    return t, significance.holm([x[2] if x else 1.0 for x in t])


def table(comparisons, family, rule=True, rows=None):
    """The tests table of a family: B minus A, its interval, Welch's p, Holm's p over the family, and the rule
    each study fixed before its runs (rule=False for follow-ups, whose test was fixed instead). rows: the
    indices of the comparisons to show (default all; Holm's p stays over the whole family)."""
    results, holm = tests(comparisons)
    two_sided = "|gap| above twice the pooled std"
    recorded = "\"yes\" where A's mean minus B's is above twice the pooled std (one-sided), the word the tables recorded"
    seeds = lambda c: (", ".join(f"{v:.3g}" for v in c[1]) if c[1] else f"not kept (n = {c[0][2]})")  # noqa: E731
    head = "| comparison (A, then B) | A per seed | B per seed | B - A | 95% interval | p (Welch) | p (Holm) | test at 0.05 |"
    lines = [head + (" pre-registered rule |" if rule else ""), "| --- " * (8 + rule) + "|"]
    for i in range(len(comparisons)) if rows is None else rows:
        (name, a, b), res, ph = comparisons[i][:3], results[i], holm[i]
        if res is None:
            said = [c if isinstance(c, str) else "not run yet" if c is None else f"{c[0][2]} of {c[0][2]} seeds run"
                    for c in (a, b)]  # no values until both sides have run
            lines.append(f"| {name} | {said[0]} | {said[1]} | " + " | ".join(["not run yet"] * (5 + rule)) + " |")
            continue
        diff, (lo, hi), p = res
        test = ("B lower" if diff < 0 else "B higher") if ph < 0.05 else "no difference found"
        row = f"| {name} | {seeds(a)} | {seeds(b)} | {diff:+.2f} | [{lo:+.2f}, {hi:+.2f}] | {pval(p)} | {pval(ph)} | {test} |"
        if rule:
            gap, pooled, _ = capacity.decide_stats(a[0], b[0])  # A - B, as the rule reads it
            said = f"{'yes' if abs(gap) > 2 * pooled else 'no'} ({abs(gap):.2f} / {2 * pooled:.2f})"
            said = comparisons[i][3] if len(comparisons[i]) > 3 else said  # the word the study recorded, if given
            row += f" {said}{'' if said.startswith('yes') == (ph < 0.05) else ' (differs)'} |"
        lines.append(row)
    shown = [c for i in (range(len(comparisons)) if rows is None else rows) for c in comparisons[i][1:3]]
    lines += ["", "Lower is better (FD to held-out digits; toy: l1 to the teacher). Welch's t-test, two-sided, on B - A "
              "(not the exact permutation test: with 3 seeds a side its smallest possible p is 0.1, so it could find "
              "nothing); per seed: the runs' results.json, or for runs older than it their seeds.json (the values their "
              "logs printed, 2 decimals). "
              + ("\"not kept\": tested from the table's 2-decimal mean ± std (n seeds). "
                 if any(isinstance(c, tuple) and not c[1] for c in shown) else "")
              + f"p (Holm): Holm's correction over the {len(comparisons)} comparisons of {family}"
              + ("; a comparison not run yet counts at p = 1 (the others' p can only fall when it runs)"
                 if any(r is None for r in results) else "") + "."
              + (f" The rule (fixed before the runs): {recorded if any(len(c) > 3 for c in comparisons) else two_sided}; "
                 "\"differs\" marks where the test and the rule disagree." if rule else "")]
    return "\n".join(lines) + "\n"


def pval(p):
    """A p-value as printed: 3 decimals, or 2 significant digits below 0.001."""
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def followups():
    """The follow-ups fixed before their runs (docs/sid.md and docs/stack.md), one family of six, each on one teacher:
    SiD against DM at each budget (K = 1 and own-pairs K = 5, 1,500 and 1,050 steps, seeds 0-2); SiD's K = 5
    against K = 1 with own pairs on seeds 0-2 and 20-23; one shared fake score against ten separate ones at
    K = 10, own pairs, seeds 0-2 and 20-27. The first five are in docs/sid.md's table, the last in docs/stack.md's.
    The SiD follow-ups share one teacher, the shared fake score's another (the machine that held the first was lost
    with it, docs/stack.md); each test compares runs of one teacher, and Holm's correction is over the six."""
    for group in ((DM_1050, DM_1500, SID_1050, SID_1500), (*STACK_SEP, *STACK_SHR)):  # each group on one teacher
        done = [capacity.summarize(f) for f in group if capacity.has_results(f)]
        for r in done[1:]:  # FDs of different teachers (or classifiers) do not compare
            capacity.same_teacher(done[0], r)
    c = []
    for steps, dm, sid, sid_seeds in ((1500, DM_1500, SID_1500, None), (1050, DM_1050, SID_1050, SID_SEEDS[:3])):
        for K in (1, 5):
            c.append((f"K = {K}{', own pairs' if K > 1 else ''}, {steps:,} steps: SiD against DM",
                      digits_cell(dm, (8, "own", K)), digits_cell(sid, (8, "own", K), sid_seeds)))
    c.append(("SiD, own pairs, 1,050 steps, seeds 0-2 and 20-23: K = 5 against K = 1", digits_cell(SID_1050, (8, "own", 1)),
              digits_cell(SID_1050, (8, "own", 5))))
    c.append(("own pairs, K = 10, 1,500 steps, seeds 0-2 and 20-27: shared against separate",
              pooled_cell(STACK_SEP, (8, "own", 10), STACK_SEEDS), pooled_cell(STACK_SHR, (8, "own", 10), STACK_SEEDS)))
    return c


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--print", action="store_true", help="print the tables only; leave the reports as they are")
    args = p.parse_args(argv)
    out, follow, family = {}, followups(), "the follow-ups (docs/sid.md's and docs/stack.md's, fixed before their runs)"
    for doc, marks, text in (("capacity.md", MARKS, table(capacity_comparisons(), "this report")),
                             ("sid.md", MARKS, table(sid_comparisons(), "this report")),
                             ("stack.md", MARKS, table(stack_comparisons(), "this report")),
                             ("sid.md", FOLLOW_MARKS, table(follow, family, rule=False, rows=range(5))),
                             ("stack.md", FOLLOW_MARKS, table(follow, family, rule=False, rows=[5]))):
        print(f"{doc}:\n{text}")
        if not args.print:
            capacity_ladder.write_between_markers(os.path.join(ROOT, "docs", doc), text, *marks)
        out[doc, marks[0]] = text
    return out


if __name__ == "__main__":
    main()
