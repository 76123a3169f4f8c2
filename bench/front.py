"""The quality-latency front (MSD App. J.1 (1)): quality of every student size x K beside one student's latency.

    python bench/front.py            # docs/capacity.md's front table and docs/front.png
    python bench/front.py --quick    # 2 repeats, batch 1 only, no ImageNet sizes, nothing written (a test)

MSD routes each sample to one student, so a sample's latency is one student's forward, whatever K is:
more students buy quality at a fixed latency, smaller students buy latency. Here the capacity study's
cells (FD to held-out digits, mean over 3 seeds, read from its results tables through
bench/capacity_ladder.py) stand beside the one-step latency of a student of each size, G(z, y) =
D(80 z, 80, y), measured in this call on the CPU in float32 (one thread, batch 1 and 64; the sizes'
timings alternate round by round, median of the repeats and its min-max spread). A cell is on the
Pareto front where no other cell (any size, filter or K) is both as fast and better, one of them
strictly; the front is marked at batch 1 and at batch 64. Beside them: the same latency for MSD's ImageNet-64 sizes B, S, XS and XXS (Table 7)
next to the paper's FIDs for them (Table 1); GPU columns stay "not measured" until a GPU runs this.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
import capacity  # noqa: E402  (the study's student sizes)
import capacity_ladder  # noqa: E402  (its cells; the table between markers)
import digits  # noqa: E402  (run.json)
import edm_unet  # noqa: E402

REPORT = os.path.join(ROOT, "docs", "capacity.md")
FIGURE = os.path.join(ROOT, "docs", "front.png")
RESULTS = os.path.join(HERE, "results", "front")
MARKS = ("<!-- front table: written by bench/front.py -->", "<!-- end of the front table -->")
PAPER = {  # MSD Table 7 (parameters, RTX 4090 latency) and Table 1 (ImageNet-64 FID of 4 students of that size)
    "B": ("296M", 0.0271, "1.20 (4 students, ADM); 2.37 (DM only)"),
    "S": ("173M", 0.0253, "2.88 (4 students, ADM)"),
    "XS": ("86M", 0.0209, "Fig. 8 only (one student; no number in the text)"),
    "XXS": ("26M", 0.0192, "Fig. 8 only (one student; no number in the text)"),
}


def latency(nets, batches, repeats):
    """{(name, batch): [seconds per one-step forward]}: round r times every (net, batch) once, so that a
    slow spell of the machine hits all of them alike."""
    out = {}
    for r in range(repeats + 1):  # round 0 warms up and is dropped
        for name, (net, shape, labels) in nets.items():
            for b in batches:
                z = torch.randn(b, *shape)
                y = torch.nn.functional.one_hot(torch.randint(labels, (b,)), labels).float()
                with torch.no_grad():
                    t = time.perf_counter()
                    edm_unet.OneStep(net)(z, y)
                    dt = time.perf_counter() - t
                if r:
                    out.setdefault((name, b), []).append(dt)
    return out


def pareto(points):
    """Indices of the points (latency, fd) that no other point beats on both, one strictly."""
    return [i for i, (t, f) in enumerate(points)
            if not any(t2 <= t and f2 <= f and (t2 < t or f2 < f) for j, (t2, f2) in enumerate(points) if j != i)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 repeats, batch 1, digits sizes only; writes nothing")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds (the median is reported; default 7)")
    args = p.parse_args(argv)
    t0 = time.time()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    repeats, batches = (2, (1,)) if args.quick else (args.repeats, (1, 64))
    cells, _, _ = capacity_ladder.merge(capacity_ladder.TABLES)
    sizes = sorted({s for s, _, _ in cells})
    nets = {f"{s} ch": (edm_unet.build("tiny", **edm_unet.parse_overrides(capacity.arch(s))).eval(), (1, 8, 8), 10)
            for s in sizes}
    t_digits = latency(nets, batches, repeats)
    t_imagenet = {} if args.quick else latency(
        {name: (edm_unet.build(name).eval(), (3, 64, 64), 1000) for name in PAPER}, batches, max(3, repeats // 2))
    med = lambda v: (float(np.median(v)), float(min(v)), float(max(v)))  # noqa: E731
    rows = []
    for (size, reg, K), (m, sd) in sorted(cells.items()):
        if K == 1 and reg == "own" and (size, "all", 1) in cells:  # one K = 1 run serves both filters
            continue
        rows.append(dict(size=size, reg=reg, K=K, fd=m, std=sd, params=capacity.params(size),
                         **{f"ms{b}": [1000 * x for x in med(t_digits[f"{size} ch", b])] for b in batches}))
    for b in batches:  # one front over every cell (any size, filter and K), at each batch size
        for i in pareto([(r[f"ms{b}"][0], r["fd"]) for r in rows]):
            rows[i].setdefault("front", []).append(b)
    imagenet = {name: {f"ms{b}": [1000 * x for x in med(t_imagenet[name, b])] for b in batches} for name in PAPER
                if t_imagenet}
    text = table(rows, imagenet, batches, repeats)
    print(text)
    if args.quick:
        print("--quick: a smoke test; the timings above mean nothing at 2 repeats.")
        return rows, imagenet
    figure(rows, FIGURE)
    digits.save_results(RESULTS, text, dict(rows=rows, imagenet=imagenet, repeats=repeats))
    digits.save_run(RESULTS, "bench/front.py", argv if argv is not None else sys.argv[1:], time.time() - t0)
    capacity_ladder.write_between_markers(REPORT, text, *MARKS)
    return rows, imagenet


def table(rows, imagenet, batches, repeats):
    ms = lambda v: f"{v[0]:.2f} ({v[1]:.2f}-{v[2]:.2f})"  # noqa: E731
    out = ["| size (params) | filter | K | FD to data | " + " | ".join(f"ms, batch {b}" for b in batches) + " | on the front |",
           "| --- | --- | --- | --- | " + " | ".join("---" for _ in batches) + " | --- |"]
    for r in rows:
        front = ", ".join(f"batch {b}" for b in r.get("front", []))
        out.append(f"| {r['size']} ch ({r['params'] / 1e3:.0f}k) | {'F_DM' if r['reg'] == 'all' else 'own'} | {r['K']} | "
                   f"{r['fd']:.2f} ± {r['std']:.2f} | " + " | ".join(ms(r[f"ms{b}"]) for b in batches) + f" | {front} |")
    out += ["", f"FD: the capacity study's cells (mean ± std over 3 seeds; K = 1 is shared by both filters). Latency: one "
            f"student's one-step forward, float32, one thread of this CPU, median (min-max) of {repeats} alternating "
            "rounds in this call; the same for every K, since each sample goes to one student. On the front: no other "
            "cell is as fast at that batch size and as good, one strictly (medians; the spreads overlap where sizes are "
            "close, so a front between them is not settled)."]
    if imagenet:
        out += ["", "| ImageNet-64 size (params) | CPU ms, batch 1 | CPU ms, batch 64 | GPU ms (ours) | RTX 4090 ms (MSD Table 7) "
                "| FID (MSD Table 1) |", "| --- | --- | --- | --- | --- | --- |"]
        for name, (n, gpu, fid) in PAPER.items():
            t = imagenet[name]
            out.append(f"| {name} ({n}) | {ms(t['ms1'])} | {ms(t['ms64'])} | not measured | {1000 * gpu:.1f} | {fid} |")
        out += ["", "CPU: the same timing as above (float32, one thread) at 64x64x3 with 1,000 classes, median (min-max) of "
                f"{max(3, repeats // 2)} rounds. GPU: not measured here (no GPU was lent); the paper's latencies are its own, "
                "on another machine."]
    return "\n".join(out) + "\n"


def figure(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4.2), layout="constrained")
    for reg, marker in (("all", "o"), ("own", "s")):
        mine = [r for r in rows if r["reg"] == reg]
        for K in sorted({r["K"] for r in mine}):
            c = [r for r in mine if r["K"] == K]
            ax.errorbar([r["ms1"][0] for r in c], [r["fd"] for r in c], yerr=[r["std"] for r in c], marker=marker, ls="",
                        capsize=3, color=f"C{[1, 2, 5, 10].index(K)}",
                        label=f"K = {K}" + (", own pairs" if reg == "own" else ", F_DM" if K > 1 else ""))
    front = sorted((r["ms1"][0], r["fd"]) for r in rows if 1 in r.get("front", []))
    ax.step(*zip(*front), where="post", color="k", lw=1, label="Pareto front (batch 1)")
    for r in rows:
        if r["K"] == 1:
            ax.annotate(f"{r['size']} ch", (r["ms1"][0], r["fd"]), textcoords="offset points", xytext=(5, 5), fontsize=7)
    ax.set_xlabel("one student's one-step latency, ms (batch 1, one CPU thread)"), ax.set_ylabel("FD to held-out digits")
    ax.set_title("quality against latency: more students at the same latency", fontsize=9)
    ax.legend(fontsize=6)
    fig.savefig(path + ".tmp.png", dpi=110)
    os.replace(path + ".tmp.png", path)


if __name__ == "__main__":
    main()
