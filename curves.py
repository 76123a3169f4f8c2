"""Training curves: one figure drawn from a run's log.jsonl, or several runs overlaid.

    python curves.py out/dm0                         # out/dm0/curves.png
    python curves.py out/dm0 out/dm1 out/dm2 --out dm.png   # the students of one split, one colour each
    python msd.py --plot out/dm0 out/dm1             # the same from msd.py

msd.py draws `curves.png` beside `log.jsonl` at every checkpoint and at the end of a run. One panel
per logged term: the losses of the stage (DM Eq. 6, regression Eq. 9, fake score Eq. 8, GAN G / D,
TSM Eq. 3), both gradient norms, the learning rate, img/s and skipped steps, and, where
`--grad-probe-every` measured them, each weighted term's gradient norm on G divided by that of G's
one-step loss (DM, SiD or f-distill: run.json's "loss"; how DMD2's users balance the loss weights).
Raw points are drawn faint, a running mean over them solid; the x axis is steps, the top axis images
seen. A folder's `run.json` (written by msd.py) names its stage, loss and partition for the legend.
"""
import argparse
import json
import os
import sys

import numpy as np

# panel title for every key msd.py logs, in drawing order (keys not listed here are not drawn)
PANELS = {"dm": "DM loss (Eq. 6)", "sid": "SiD loss (sid.py)", "f": "f-distill loss (fdistill.py)", "reg": "regression loss (Eq. 9)", "gan_g": "GAN loss, G", "tsm": "TSM loss (Eq. 3)",
          "fake": "fake-score loss (Eq. 8)", "gan_d": "GAN loss, D", "gnorm_net": "|grad| of G (student)",
          "gnorm_fake": "|grad| of the fake score", "lr": "learning rate", "img_per_s": "img/s",
          "skipped": "skipped steps (total)"}
LOG_SCALE = {"dm", "reg", "tsm", "fake", "gnorm_net", "gnorm_fake"}


def read_log(folder):
    """-> (rows of training terms, rows of gradient probes, run.json or {}) of one run folder."""
    path = os.path.join(folder, "log.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder!r} holds no log.jsonl (expected an msd.py --out folder)")
    rows = [json.loads(line) for line in open(path) if line.strip()]
    meta_path = os.path.join(folder, "run.json")
    meta = json.load(open(meta_path)) if os.path.isfile(meta_path) else {}
    return [r for r in rows if "grad_probe" not in r], [r for r in rows if "grad_probe" in r], meta


def smooth(y, window):
    """Running mean over the last `window` points (NaNs and infs ignored; NaN where a window has none)."""
    y = np.asarray(y, dtype=float)
    ok = np.isfinite(y)
    csum = np.concatenate([[0.0], np.cumsum(np.where(ok, y, 0.0))])
    cnt = np.concatenate([[0], np.cumsum(ok)])
    lo = np.maximum(np.arange(1, len(y) + 1) - window, 0)
    n = cnt[1:] - cnt[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (csum[1:] - csum[lo]) / n, np.nan)


def one_step(meta):
    """G's one-step loss of a run (msd.py --loss, in run.json; runs older than the key: DM)."""
    return meta.get("loss", "dm")


def label(folder, meta):
    if not meta:
        return os.path.basename(os.path.normpath(folder))
    loss = "" if one_step(meta) == "dm" else f" ({one_step(meta)})"
    return (f"{os.path.basename(os.path.normpath(folder))}: {meta['stage']}{loss}, student {meta['partition']} of "
            f"{meta['num_students']}")


def plot(folders, out):
    """Draw the runs in `folders` into `out` (atomically). -> the panel titles, in order."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = [(f, *read_log(f)) for f in folders]
    keys = [k for k in PANELS if any(k in r for _, rows, _, _ in runs for r in rows)]
    probe_terms = sorted({t for _, _, probes, meta in runs for p in probes for t in p["grad_probe"] if t != one_step(meta)})
    titles = [PANELS[k] for k in keys] + (["|grad| on G per term / the one-step loss's (probe)"] if probe_terms else [])
    cols = 4
    fig, axes = plt.subplots(-(-len(titles) // cols), cols, figsize=(4 * cols, 2.8 * -(-len(titles) // cols)),
                             layout="constrained", squeeze=False)
    for ax in axes.flat[len(titles):]:
        ax.axis("off")
    for c, (folder, rows, probes, meta) in enumerate(runs):
        colour, name = f"C{c % 10}", label(folder, meta)
        steps = np.array([r["step"] for r in rows])
        for ax, k in zip(axes.flat, keys):
            y = np.array([r.get(k, np.nan) for r in rows], dtype=float)
            if not np.isfinite(y).any():
                continue
            ax.plot(steps, y, ".", color=colour, alpha=0.25, ms=3)
            ax.plot(steps, smooth(y, max(1, len(y) // 20)), "-", color=colour, lw=1.3, label=name)
        if probe_terms:
            ax = axes.flat[len(keys)]
            ps = [p["step"] for p in probes]
            one = one_step(meta)
            for t, style in zip(probe_terms, ("-", "--", ":", "-.")):
                ratio = [p["grad_probe"].get(t, np.nan) / p["grad_probe"][one] if p["grad_probe"].get(one) else np.nan
                         for p in probes]  # a zero DM gradient (G = fake = teacher at the start) has no ratio
                ax.plot(ps, ratio, style, marker=".", color=colour, label=f"{t} / {one}" + (f", {name}" if len(runs) > 1 else ""))
    batch = next((m.get("batch") for _, _, _, m in runs if m.get("batch")), None)
    for ax, k, title in zip(axes.flat, keys + ["probe"], titles):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if k in LOG_SCALE and all(r.get(k, 1) > 0 for _, rows, _, _ in runs for r in rows):
            ax.set_yscale("log")
        else:
            ax.ticklabel_format(axis="y", useOffset=False)  # a constant lr reads as 0.0002, not 1e-16 + 2e-4
        if batch:  # images seen on the top axis (all runs of one figure share the batch as a rule)
            top = ax.secondary_xaxis("top", functions=(lambda s, b=batch: s * b / 1000, lambda i, b=batch: i * 1000 / b))
            top.set_xlabel("kimg", fontsize=7)
            top.tick_params(labelsize=6)
    first = next((ax for ax in axes.flat[:len(keys)] if ax.get_legend_handles_labels()[0]), None)
    if first is not None:  # the runs' names, once (a panel of a term that was NaN throughout has none)
        first.legend(fontsize=7)
    if probe_terms:
        axes.flat[len(keys)].legend(fontsize=6)
    tmp = out + ".tmp"
    fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    os.replace(tmp, out)
    return titles


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", help="msd.py --out folders (each with a log.jsonl)")
    p.add_argument("--out", default=None, help="the figure (default: curves.png in the first folder)")
    args = p.parse_args(argv)
    out = args.out or os.path.join(args.folders[0], "curves.png")
    titles = plot(args.folders, out)
    print(f"wrote {out}: {', '.join(titles)}")
    return titles


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(print(f"error: {e}", file=sys.stderr) or 2)
