"""SiD against DM as the students' loss (MSD App. J.1): the study of docs/sid.md.

    python bench/sid_vs_dm.py toy       # toy2d.py --students 1 8, --loss dm and sid, seeds 0, 1, 2
    python bench/capacity.py --sizes 8 --ks 1 5 --stacked --loss sid   # the digits cells with SiD
    python bench/sid_vs_dm.py digits    # the digits table: SiD's cells against DM's, and one step's cost
    python bench/sid_vs_dm.py toy --quick   # the toy pipeline in seconds (a test); its numbers mean nothing
    python bench/sid_vs_dm.py first-step --teacher T.pt --init TSM.pt --pairs pairs.npz   # SiD's first gradient

The protocol was fixed in docs/sid.md before any run: the baseline's hyperparameters for both losses,
SiD's own defaults for alpha, its noise levels, its fake score's and Adam's beta1; seeds 0, 1, 2; with
n = 3 per cell, "A beats B" where B's mean (toy: l1 to the teacher, digits: FD to held-out digits) exceeds
A's by more than twice the pooled std. Each part writes bench/results/sid/<part>/ (table.md,
results.json, run.json; the toy also its seed-0 figures) and its table between the markers of
docs/sid.md. Finished toy runs in --out are reused, so a stopped call continues.
"""
import argparse
import json
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
import capacity  # noqa: E402  (the rule, the digits cells)
import capacity_ladder  # noqa: E402  (the table between markers)
import digits  # noqa: E402  (results.json, run.json)
import dm_step  # noqa: E402  (one step's cost)
import toy2d  # noqa: E402

RESULTS = os.path.join(HERE, "results", "sid")
REPORT = os.path.join(ROOT, "docs", "sid.md")
DIGITS_DM = os.path.join(capacity.RESULTS, "curve1800_sizes8_ks1-2-5_pairsall-own")  # the capacity study's 8-ch cells
DIGITS_SID = os.path.join(capacity.RESULTS, "curve1800_sizes8_ks1-5_pairsall-own_stacked_sid")
QUICK_TOY = ["--teacher-iters", "30", "--iters", "20", "--width", "16", "--depth", "2", "--batch", "16",
             "--eval-samples", "2000", "--teacher-steps", "4", "--num-pairs", "64"]
ROUNDS = 7  # alternating timing rounds of one step per loss (median and range reported)
ARCH = "model_channels={},img_resolution=8,attn_resolutions=(4,)"


def marks(name):
    return f"<!-- {name} table: written by bench/sid_vs_dm.py -->", f"<!-- end of the {name} table -->"


def verdict(a, b, words=("yes", "no")):
    """The rule on two cells (mean, std, n): does b beat a? -> 'yes (gap / 2 x pooled)'."""
    gap, pooled, wins = capacity.decide_stats(a, b)
    return f"{words[0] if wins else words[1]} ({gap:.2f} / {2 * pooled:.2f})"


def differs(dm, sid):
    """SiD against DM, either way: 'yes, better / yes, worse / no (SiD - DM / 2 x pooled)'."""
    gap, pooled, _ = capacity.decide_stats(sid, dm)
    word = ("yes, worse" if gap > 0 else "yes, better") if abs(gap) > 2 * pooled else "no"
    return f"{word} ({gap:+.2f} / {2 * pooled:.2f})"


def ms(v, f=".3f"):
    return f"{v[0]:{f}} ± {v[1]:{f}}"


# ----------------------------------------------------------------------------- the toy

def toy(args):
    seeds, extra = ((0,), QUICK_TOY) if args.quick else ((0, 1, 2), [])
    timing, distill = {}, toy2d.distill_dmd

    def timed(*a, **k):  # the students' steps alone (a seed's first run also trains its teacher), in CPU s
        t = time.process_time()  # (all threads; unlike wall time, not inflated by other jobs on the cores)
        out = distill(*a, **k)
        timing["distill_cpu_s"] = time.process_time() - t
        return out
    toy2d.distill_dmd = timed
    runs = []
    for seed in seeds:
        for loss in ("dm", "sid"):
            out = os.path.join(args.out, f"s{seed}")
            done = os.path.join(out, f"{loss}.json")
            if not os.path.exists(done):
                t = time.time()
                r = toy2d.main(["--students", "1", "8", "--seed", str(seed), "--loss", loss, "--out", out, *extra])
                row = dict(seed=seed, loss=loss, ks=r["ks"], l1=r["l1"], on_mode=r["on_mode"], floor=r["floor"],
                           seconds=time.time() - t, distill_cpu_s=timing["distill_cpu_s"])
                with open(done + ".tmp", "w") as f:
                    json.dump(row, f)
                os.replace(done + ".tmp", done)
            runs.append(json.load(open(done)))
    toy2d.distill_dmd = distill
    cell = lambda loss, K, m: capacity.stat([r[m][r["ks"].index(K)] for r in runs if r["loss"] == loss])  # noqa: E731
    lines = ["| loss | K | l1 to the teacher | on-mode | K = 8 beats K = 1? (gap / 2 x pooled std) | SiD differs from DM? "
             "(SiD - DM / 2 x pooled std) | students' steps, CPU s |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for loss in ("dm", "sid"):
        secs = capacity.stat([r["distill_cpu_s"] for r in runs if r["loss"] == loss])
        for K in (1, 8):
            lines.append(f"| {'DM' if loss == 'dm' else 'SiD'} | {K} | {ms(cell(loss, K, 'l1'))} | {ms(cell(loss, K, 'on_mode'))} | "
                         f"{verdict(cell(loss, 1, 'l1'), cell(loss, 8, 'l1')) if K == 8 else ''} | "
                         f"{differs(cell('dm', K, 'l1'), cell('sid', K, 'l1')) if loss == 'sid' else ''} | "
                         f"{ms(secs, '.0f') if K == 1 else '(one run)'} |")
    floor = capacity.stat([r["floor"] for r in runs if r["loss"] == "dm"])
    lines += ["", f"mean ± std (ddof 1) over seeds {list(seeds)} (each: its teacher, references, pairs and students); "
              f"`python toy2d.py --students 1 8 --seed s --loss dm|sid`{' ' + ' '.join(extra) if extra else ''}. "
              f"Noise floor (teacher vs teacher): l1 {ms(floor)}. Students' steps: the CPU seconds (both threads) of the "
              f"K = 1 and K = 8 students' training, one stacked run of 9 students.", ""]
    return finish(args, "toy", "\n".join(lines), dict(runs=runs), figures=[
        os.path.join(args.out, "s0", f"toy2d_{tag}.png") for tag in ("dmd", "sid")])


# ----------------------------------------------------------------------------- SiD's gradient at the first step

def first_step(args):
    """|grad| on G of each weighted term (msd.grad_probe) before any update, at the digits' DM settings, with the
    fake score started from G's start (msd.py's default in the dm stage) and from the teacher. -> {fake: [probes]}."""
    import msd
    out = {}
    for name, fake in (("G's start", args.init), ("the teacher", args.teacher)):
        argv = ["--teacher", args.teacher, "--init", args.init, "--fake-init", fake, "--pairs", args.pairs, "--batch", "32",
                "--num-students", "1", "--lr", "2e-4", "--reg-loss", "mse", "--lambda-reg", "1", "--loss", "sid",
                "--precision", "fp32", "--device", "cpu", "--out", os.path.join(args.out, "first_step"), "--iters", "1"]
        r = msd.setup(msd.parse_args(argv))
        out[name] = [msd.grad_probe(r, msd.draw_batch(r, step, 0)) for step in range(3)]  # the batches of steps 0, 1, 2
        print(f"fake score from {name}: " + "; ".join(" ".join(f"{k} {v:.3g}" for k, v in p.items()) for p in out[name]))
    return out


# ----------------------------------------------------------------------------- the digits

def digits_part(args):
    dm, sid = capacity.summarize(args.dm), capacity.summarize(args.sid)
    capacity.same_teacher(dm, sid)  # budgets may differ: each loss's own curve sets its own
    cost = step_costs(2 if args.quick else ROUNDS, 3 if args.quick else 20)
    lines = ["| pairs | K | loss | FD to data | FD to teacher | per-partition FD | within-class std (mean / lowest) | "
             "steps/student | K = 5 beats K = 1? (gap / 2 x pooled std) | SiD differs from DM? (SiD - DM / 2 x pooled std) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for reg in ("all", "own"):
        for K in (1, 5):
            for name, r in (("DM", dm), ("SiD", sid)):
                c = r["cells"].get((8, reg, K))
                if c is None:
                    continue
                base = r["cells"][8, reg, 1]["fd_data"]
                other = dm["cells"].get((8, reg, K))
                lines.append(f"| {reg} | {K} | {name} | {ms(c['fd_data'], '.2f')} | {ms(c['fd_teacher'], '.2f')} | "
                             f"{ms(c['fd_blocks'], '.2f')} | {c['class_std'][0]:.1f} / {c['class_std_low'][0]:.1f} | "
                             f"{r['budget']['8']} | {verdict(base, c['fd_data']) if K > 1 else ''} | "
                             f"{differs(other['fd_data'], c['fd_data']) if name == 'SiD' and other else ''} |")
    lines += ["", f"8-channel students (53k parameters) of the capacity study's teacher (FD to data {sid['teacher']:.2f}); "
              f"mean ± std (ddof 1) over seeds {sid['seeds']}, {sid['samples']} routed samples per run. Steps per student: "
              f"each loss's own K = 1 curve and the 5% rule. DM: [its cells](../{os.path.relpath(args.dm, ROOT)}/table.md)"
              + (" (runs older than results.json: the rule on its table's 2-decimal means and stds); " if dm.get("rounded") else "; ") +
              f"SiD: [its cells](../{os.path.relpath(args.sid, ROOT)}/table.md). One training step of one student "
              f"(batch 32, MSE regression, one thread, bench/dm_step.py), median [min, max] of {len(cost['ratio'])} alternating "
              f"rounds in this call, each the mean of {cost['steps']} steps after as many of warm-up: DM "
              f"{digits.spread(cost['dm'])} ms, SiD {digits.spread(cost['sid'])} ms, SiD / DM within a round "
              f"{digits.spread(cost['ratio'], '.2f')}x "
              f"({cost['cpu']}).", ""]
    return finish(args, "digits", "\n".join(lines), dict(dm=args.dm, sid=args.sid, step_ms=cost))


def step_costs(rounds, steps):
    """One training step of an 8-channel student (batch 32, MSE regression, one thread) with each loss, timed in
    alternating rounds (DM then SiD, then SiD then DM, ...), so drift in the machine's speed falls on both.
    -> {dm: [ms per round], sid: [...], ratio: [SiD / DM per round], steps, cpu}."""
    cost = dict(dm=[], sid=[])
    for r in range(rounds):
        for loss in ("dm", "sid") if r % 2 == 0 else ("sid", "dm"):
            cost[loss].append(dm_step.main(["--arch", ARCH.format(32), "--student-arch", ARCH.format(8), "--reg-loss", "mse",
                                            "--batch", "32", "--threads", "1", "--steps", str(steps),
                                            "--loss", loss])["ms_per_iter"])
    return dict(cost, ratio=[s / d for s, d in zip(cost["sid"], cost["dm"])], steps=steps, cpu=digits.cpu_model() or "CPU")


def finish(args, part, table, data, figures=()):
    print(table)
    if args.quick:
        print("--quick: a smoke test of the pipeline; the numbers above mean nothing at this size.")
        return table, data
    folder = os.path.join(RESULTS, part)
    digits.save_results(folder, table, data)
    for path in figures:
        shutil.copy(path, os.path.join(folder, os.path.basename(path)))
    digits.save_run(folder, "bench/sid_vs_dm.py", sys.argv[1:] if args.argv is None else args.argv, time.time() - args.t0)
    capacity_ladder.write_between_markers(args.report, table, *marks(part))
    print(f"wrote {folder} and the {part} table of {args.report}")
    return table, data


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=("toy", "digits", "first-step"))
    p.add_argument("--quick", action="store_true", help="tiny settings (seconds): checks the pipeline; writes nothing")
    p.add_argument("--out", default=os.path.join(ROOT, "out", "sid_toy"), help="toy: working folder (finished runs reused)")
    p.add_argument("--dm", default=DIGITS_DM, help="digits: the DM cells' results folder (bench/capacity.py)")
    p.add_argument("--sid", default=DIGITS_SID, help="digits: the SiD cells' results folder (bench/capacity.py --loss sid)")
    p.add_argument("--teacher", help="first-step: the teacher (bench/digits.py's teacher/student.pt)")
    p.add_argument("--init", help="first-step: G's start (an 8-channel TSM student of bench/capacity.py)")
    p.add_argument("--pairs", help="first-step: the paired set (bench/digits.py's pairs.npz)")
    p.add_argument("--report", default=REPORT, help="the report whose tables are rewritten between their markers")
    args = p.parse_args(argv)
    args.argv, args.t0 = argv, time.time()
    if args.part == "first-step":
        if not (args.teacher and args.init and args.pairs):
            p.error("first-step needs --teacher, --init and --pairs")
        return first_step(args)
    if args.part == "digits":
        for folder in (args.dm, args.sid):
            if not capacity.has_results(folder):
                p.error(f"{folder!r} holds no results (run bench/capacity.py first: see --help)")
        return digits_part(args)
    return toy(args)


if __name__ == "__main__":
    main()
