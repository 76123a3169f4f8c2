"""The capacity study's ladder at converged budgets in one figure, read off bench/capacity.py's results tables.

    python bench/capacity_ladder.py     # docs/capacity_ladder.png from the 1,800-step-curve tables (sizes 8, 16, 32)
    python bench/capacity_ladder.py --pairs all   # F_DM rows only

Each size of the ladder ran as its own `bench/capacity.py --curve-iters 1800 --sizes N` call (one session could not
hold the whole study), so each wrote its own table; this draws them together as the study asks: FD to held-out digits
against parameters per student, one line per K (error bars: std over seeds, as the tables give it), the teacher's own
FD to data and the real-vs-held-out floor dashed. Both filters by default: F_DM (the filter every size ran) as solid
lines, own pairs (the smallest size only) as dotted ones; a K run at one size only (K = 10) is a single point. A cell
found in two tables must agree in both (they are the same runs).
"""
import argparse
import os
import re
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import capacity  # noqa: E402  (the study: its student sizes)

TABLES = [os.path.join(HERE, f"capacity_results_curve1800_{name}.md")
          for name in ("sizes8", "sizes8_ks1-10_pairsall", "sizes8_ks1-10_pairsown", "sizes16", "sizes32")]
ROW = re.compile(r"^\| (\d+) ch \([^)]*\) \| (\w+) \| (\d+) \| ([\d.]+) ± ([\d.]+) \|", re.M)


def read(path):
    """One results table. -> ({(size, pairs, K): (mean, std) of FD to data}, teacher's FD to data, real-vs-held-out floor)"""
    text = open(path).read()
    cells = {(int(m[1]), m[2], int(m[3])): (float(m[4]), float(m[5])) for m in ROW.finditer(text)}
    teacher, floor = re.search(r"Teacher: FD to data (\d+\.\d+)", text), re.search(r"vs held-out (\d+\.\d+)", text)
    if not cells or not teacher or not floor:
        raise ValueError(f"{path}: expected a bench/capacity.py results table (rows, teacher and floor line)")
    return cells, float(teacher[1]), float(floor[1])


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
    return cells


if __name__ == "__main__":
    main()
