"""The capacity study's final table and figure, read off bench/capacity.py's results folders.

    python bench/capacity_ladder.py     # docs/capacity_ladder.png; the final table inside docs/capacity.md and README.md
    python bench/capacity_ladder.py --pairs all   # F_DM rows only

The study ran in parts (bench/capacity.py --sizes/--ks/--pairs), each writing its own results folder
bench/results/capacity/curve1800_*/; this reads their tables together: FD to held-out digits against
parameters per student, one line per K (error bars: std over seeds, as the tables give it), the teacher's
own FD to data and the real-vs-held-out floor dashed. F_DM (the filter every size ran) is drawn solid, own
pairs (the smallest size only) dotted; K = 10 (the smallest size only) is a single point. A cell found in two
tables must agree in both (they are the same runs). The table is written between the markers of
docs/capacity.md and README.md, so no number in it is typed by hand.
"""
import argparse
import glob
import os
import re
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import capacity  # noqa: E402  (the study: its student sizes)

TABLES = sorted(t for t in glob.glob(os.path.join(HERE, "results", "capacity", "curve1800_*", "table.md"))  # the study's own:
                if not any(m in os.path.basename(os.path.dirname(t))  # not docs/stack.md's, docs/sid.md's, nor the follow-ups'
                           for m in ("_stacked", "_shared", "_sid", "_seeds", "_budget")))
REPORTS = [os.path.join(os.path.dirname(HERE), *p) for p in (("docs", "capacity.md"), ("README.md",))]
BEGIN, END = "<!-- final table: written by bench/capacity_ladder.py -->", "<!-- end of the final table -->"


def read(path):
    """One results table. -> ({(size, pairs, K): (mean, std) of FD to data}, teacher's FD to data, real-vs-held-out floor)
    Each cell's verdict (the last column) goes to VERDICTS[size, pairs, K], each size's steps to STEPS[size]."""
    text = open(path).read()
    lines = [line for line in text.splitlines() if line.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")] if lines else []
    cells = {}
    for line in lines[2:]:
        row = dict(zip(head, (c.strip() for c in line.strip("|").split("|"))))
        size, fd = re.match(r"(\d+) ch", row.get("size (params)", "")), re.match(r"([\d.]+) ± ([\d.]+)", row.get("FD to data", ""))
        if not (size and fd and row.get("K", "").isdigit()):
            continue
        key = (int(size[1]), row["pairs"], int(row["K"]))
        cells[key] = (float(fd[1]), float(fd[2]))
        VERDICTS[key] = row.get(head[-1], "")
        STEPS[key[0]] = row.get("steps/student", "?")
    teacher, floor = re.search(r"Teacher: FD to data (\d+\.\d+)", text), re.search(r"vs held-out (\d+\.\d+)", text)
    if not cells or not teacher or not floor:
        raise ValueError(f"{path}: expected a bench/capacity.py results table (rows, teacher and floor line)")
    return cells, float(teacher[1]), float(floor[1])


VERDICTS, STEPS = {}, {}


def final_table(cells, paths, base):
    """The final table in markdown: one row per (size, filter), FD to data per K with the rule's verdict (each
    verdict as a test: bench/verdicts.py, under the table in docs/capacity.md)."""
    ks = sorted({k for _, _, k in cells})
    lines = ["| size (params per student), steps | filter | " + " | ".join(f"K = {k}" for k in ks) + " |",
             "| --- | --- | " + " | ".join("---" for _ in ks) + " |"]
    for size in sorted({s for s, _, _ in cells}):
        for reg in ("all", "own"):
            if not any(s == size and r == reg and k > 1 for s, r, k in cells):
                continue
            row = []
            for k in ks:
                key = (size, reg, k) if (size, reg, k) in cells else (size, "all", k) if k == 1 else None
                if key is None or key not in cells:
                    row.append("not run")
                    continue
                v = f"{cells[key][0]:.2f} ± {cells[key][1]:.2f}"
                row.append(v if k == 1 else f"{v}: {VERDICTS.get(key, '?')}")
            name = "F_DM (all pairs)" if reg == "all" else "own pairs"
            lines.append(f"| {size} ch ({capacity.params(size) / 1e3:.0f}k), {STEPS.get(size, '?')} | {name} | " + " | ".join(row) + " |")
    src = ", ".join(f"[{os.path.basename(os.path.dirname(p))}]({base}/{os.path.basename(os.path.dirname(p))}/table.md)"
                    for p in paths)
    lines += ["", "FD to the 297 held-out digits, mean ± std over DM seeds 0, 1, 2, 5,000 routed samples per run; "
              "\"yes/no (gap / 2 x pooled std)\" after a cell is the fixed rule against K = 1 of the same size and filter (a K = 1 "
              f"student owns every pair, so both filters share it). From: {src}."]
    return "\n".join(lines)


def write_between_markers(path, text, begin=BEGIN, end=END):
    """Replace what lies between `begin` and `end` in `path` (atomically); raises if the markers are missing."""
    doc = open(path).read()
    if begin not in doc or end not in doc:
        raise ValueError(f"{path}: expected the markers {begin!r} and {end!r}")
    head, rest = doc.split(begin, 1)
    new = head + begin + "\n" + text + "\n" + end + rest.split(end, 1)[1]
    with open(path + ".tmp", "w") as f:
        f.write(new)
    os.replace(path + ".tmp", path)


def merge(paths):
    """All tables' cells, each cell once; the teacher and floor of each size. Raises if two tables disagree."""
    cells, teacher, floor = {}, {}, {}
    for path in paths:
        c, t, f = read(path)
        for key, v in c.items():
            if key in cells and not np.allclose(cells[key], v):
                raise ValueError(f"{path}: cell {key} is {v}, another table has {cells[key]}")
            cells[key] = v
            teacher[key[0]], floor[key[0]] = t, f
    return cells, teacher, floor


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tables", nargs="+", default=TABLES, help="bench/capacity.py results tables (.md)")
    p.add_argument("--pairs", nargs="+", default=("all", "own"), choices=("all", "own"),
                   help="regression filters to draw (all: F_DM, solid; own: dotted)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "docs", "capacity_ladder.png"))
    p.add_argument("--reports", nargs="*", default=REPORTS, help="files whose final table is rewritten between "
                                                                 "their markers (none: print the table only)")
    args = p.parse_args(argv)
    if len(set(args.pairs)) != len(args.pairs):
        p.error(f"--pairs must be distinct filters, got {args.pairs}")
    missing = [t for t in args.tables if not os.path.exists(t)]
    if missing:
        p.error(f"--tables: no such file {missing}")
    cells, teacher, floor = merge(args.tables)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4.2), layout="constrained")
    # one series per (filter, K); a cell whose runs are the other filter's (own pairs at K = 1) is drawn once, as F_DM
    series = [(reg, K) for reg in args.pairs for K in sorted({k for _, r, k in cells if r == reg})
              if "all" not in args.pairs or capacity.run_reg(reg, K) == reg]
    colours = {K: f"C{i}" for i, K in enumerate(sorted({K for _, K in series}))}
    for i, (reg, K) in enumerate(series):
        sizes = sorted(s for s, r, k in cells if r == reg and k == K)
        m, sd = zip(*[cells[s, reg, K] for s in sizes])
        shift = 1 + 0.03 * (i - (len(series) - 1) / 2)  # side by side at each size, so the error bars stay apart
        name = "F_DM" if reg == "all" else "own pairs"
        ax.errorbar([capacity.params(s) * shift for s in sizes], m, yerr=sd, marker="o" if reg == "all" else "s",
                    ls="-" if reg == "all" else ":", color=colours[K], capsize=3, label=f"K = {K}, {name}")
        print(f"{name} K = {K}: " + ", ".join(f"{s} ch {a:.2f} ± {b:.2f}" for s, a, b in zip(sizes, m, sd)))
    for values, style, name in ((teacher, "--", "teacher"), (floor, ":", "real vs held-out")):
        levels = sorted(set(values.values()))  # one per draw of the pipeline the tables come from
        for v in levels:
            ax.axhline(v, ls=style, color="k", lw=1)
        ax.plot([], [], ls=style, color="k", lw=1, label=f"{name}: " + "; ".join(
            f"{v:.2f} ({', '.join(f'{s} ch' for s in sorted(values) if values[s] == v)})" for v in levels))
    ax.set_xscale("log"), ax.set_xlabel("parameters per student"), ax.set_ylabel("FD to held-out digits")
    ax.set_title("converged budgets; mean ± std over 3 seeds", fontsize=9)
    ax.legend(fontsize=7)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    shown = {key: v for key, v in cells.items() if key[1] in args.pairs}
    for path in args.reports:
        base = os.path.relpath(os.path.join(HERE, "results", "capacity"), os.path.dirname(os.path.abspath(path)))
        write_between_markers(path, final_table(shown, args.tables, base))
        print(f"wrote the final table into {path}")
    print(final_table(shown, args.tables, os.path.join(HERE, "results", "capacity")))
    return cells


if __name__ == "__main__":
    main()
