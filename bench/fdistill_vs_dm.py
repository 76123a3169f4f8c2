"""f-distill against DM in the ADM stage, one and five students on the digits (docs/fdistill.md).

    python bench/fdistill_vs_dm.py            # the protocol of docs/fdistill.md (fixed there before any run)
    python bench/fdistill_vs_dm.py --quick    # the same pipeline in seconds (a test); its numbers mean nothing
    python bench/fdistill_vs_dm.py --critic out/fdistill/adm_f/seed0/K1/p0   # a finished run's critic: logits, r and h

The starting students are the capacity study's 8-channel DM students with own pairs (bench/capacity.py's
recipe: TSM on each partition, then DM for the size's budget, 1,500 steps; seed 0), made here again in
--out. From each, the ADM stage (msd.py --stage adm: the fake score reset to the teacher, the GAN head
on its middle block) runs for the same number of steps with `--loss dm` and with `--loss f --f-div js`,
seeds 0, 1, 2. The K students of a cell are routed (sample.py students) and scored by FD to the 297
held-out digits (the primary metric) and label accuracy. Per K, f against DM: Welch's t-test on FD,
Holm's correction over the two K. Writes bench/results/fdistill/ (table.md, results.json, run.json) and
the table between the markers of docs/fdistill.md.
"""
import argparse
import os
import shutil
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
import capacity  # noqa: E402  (worker pool, TSM folders, routing, the recipe's flags)
import capacity_ladder  # noqa: E402  (the table between markers)
import digits  # noqa: E402  (teacher, data, classifier, results.json, run.json)
import evaluate  # noqa: E402
import significance  # noqa: E402  (Welch's test, Holm's correction)

RESULTS = os.path.join(HERE, "results", "fdistill")
REPORT = os.path.join(ROOT, "docs", "fdistill.md")
FULL = dict(size=8, ks=(1, 5), seeds=(0, 1, 2), tsm_iters=300, tsm_batch=128, tsm_lr=2e-3, dm_iters=1500, batch=32,
            lr=2e-4, lambda_reg=1.0, ema=1.0, adm_iters=100, adm_lr=5e-5, fake_steps=5, head_width=32, f_div="js",
            samples=5000, workers=2, alpha=0.05)
QUICK = dict(FULL, seeds=(0, 1), tsm_iters=2, tsm_batch=8, dm_iters=2, batch=8, adm_iters=2, samples=100, workers=1)
LOSSES = (("dm", []), ("f", ["--f-div"]))  # the f-divergence is filled in from hp


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny settings (seconds): checks the pipeline; its numbers mean nothing")
    p.add_argument("--out", default=os.path.join(ROOT, "out", "fdistill"), help="working folder (finished runs are reused)")
    p.add_argument("--digits", default=os.path.join(ROOT, "out", "digits"), help="bench/digits.py's folder (teacher, pairs, data)")
    p.add_argument("--critic", default=None, help="a finished --loss f run's folder: print its critic's logits, r and h "
                                                  "on the batches of its next 3 steps, and stop")
    args = p.parse_args(argv)
    if args.critic:
        return critic_spread(args.critic)
    hp = QUICK if args.quick else FULL
    t_start = time.time()
    j = lambda *a: os.path.join(args.out, *a)  # noqa: E731
    teacher, pairs, data = (os.path.join(args.digits, *f) for f in (("teacher", "student.pt"), ("pairs.npz",), ("train",)))
    if not (os.path.exists(teacher) and os.path.exists(pairs)):
        digits.main((["--quick"] if args.quick else []) + ["--out", args.digits, "--teacher-only"])
    hd = digits.QUICK if args.quick else digits.FULL
    train, test = digits.make_data(data)
    clf, clf_acc = digits.classifier(args.digits, train, test, hd["clf_epochs"])
    ref = evaluate.stats(evaluate.features([test], clf, rgb=False)[0])
    size, seeds_eval = hp["size"], f"100000-{100000 + hp['samples'] - 1}"
    arch = ["--preset", "tiny", "--arch", capacity.arch(size)]

    # the starting students: TSM on each partition, then DM (own pairs; a stack of the K students), seed 0
    tsm = [(capacity.job, (["--stage", "tsm", "--teacher", teacher, *arch, "--data", data, "--num-students", str(K),
                            "--partition", str(k), "--iters", str(hp["tsm_iters"]), "--batch", str(hp["tsm_batch"]),
                            "--lr", str(hp["tsm_lr"]), "--out", capacity.tsm_dir(args.out, size, K, k), *capacity.COMMON],))
           for K in hp["ks"] for k in range(K)]
    capacity.pool(tsm, hp["workers"])
    dm_start = {K: [j(f"dm_K{K}", *([f"p{k}"] if K > 1 else []), "student.pt") for k in range(K)] for K in hp["ks"]}
    dm = [(capacity.job, (["--teacher", teacher, "--pairs", pairs, "--num-students", str(K), "--batch", str(hp["batch"]),
                           "--lr", str(hp["lr"]), "--reg-loss", "mse", "--lambda-reg", str(hp["lambda_reg"]), "--reg-pairs", "own",
                           "--ema-halflife-kimg", str(hp["ema"]), "--seed", "0", "--out", j(f"dm_K{K}"), "--iters", str(hp["dm_iters"]),
                           "--init", os.path.join(capacity.tsm_dir(args.out, size, K, "{k}" if K > 1 else 0), "student.pt"),
                           *(["--all-students"] if K > 1 else []), *capacity.COMMON], None, 1, dm_start[K][-1]))
          for K in hp["ks"]]
    capacity.pool(dm, hp["workers"])

    # the ADM stage from each starting student: both losses, every seed, the same steps
    def adm_out(loss, seed, K, k):
        return j(f"adm_{loss}", f"seed{seed}", f"K{K}", f"p{k}")
    adm = []
    for loss, extra in LOSSES:
        for seed in hp["seeds"]:
            for K in hp["ks"]:
                for k in range(K):
                    adm.append((capacity.job, (
                        ["--stage", "adm", "--teacher", teacher, "--init", dm_start[K][k], "--data", data, "--num-students", str(K),
                         "--partition", str(k), "--batch", str(hp["batch"]), "--lr", str(hp["adm_lr"]), "--lambda-reg", "0",
                         "--iters", str(hp["adm_iters"]), "--warmup", "0", "--fake-steps-per-gen", str(hp["fake_steps"]),
                         "--head-width", str(hp["head_width"]), "--ema-halflife-kimg", str(hp["ema"]), "--seed", str(seed),
                         "--loss", loss, *(extra and [*extra, hp["f_div"]]), "--out", adm_out(loss, seed, K, k),
                         *capacity.COMMON],)))
    cpu_s = capacity.pool(adm, hp["workers"])

    scratch = j(f"tmp_samples_{os.getpid()}")

    def measure(ckpts):  # FD to the held-out digits and label accuracy of the routed students (digits.measure)
        (fd,), acc = digits.measure(clf, *capacity.route(ckpts, seeds_eval, scratch), [ref])
        return dict(fd_data=fd, acc=acc)
    start = {K: measure(dm_start[K]) for K in hp["ks"]}
    rows, i = [], 0
    for loss, _ in LOSSES:
        for seed in hp["seeds"]:
            for K in hp["ks"]:
                m = measure([os.path.join(adm_out(loss, seed, K, k), "student.pt") for k in range(K)])
                rows.append(dict(loss=loss, seed=seed, K=K, cpu_s=float(np.sum(cpu_s[i:i + K])), **m))
                i += K
                print(f"{loss} seed {seed} K {K}: FD to data {m['fd_data']:.2f}, accuracy {m['acc']:.3f}", flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    tests = []
    for K in hp["ks"]:
        fd = {loss: [r["fd_data"] for r in rows if r["loss"] == loss and r["K"] == K] for loss, _ in LOSSES}
        tests.append(dict(K=K, **dict(zip(("diff", "ci", "p"), significance.welch(fd["f"], fd["dm"]))),
                          rule=capacity.decide(fd["dm"], fd["f"])))  # the digits studies' earlier rule, for comparison
    for t, ph in zip(tests, significance.holm([t["p"] for t in tests])):
        t["p_holm"] = ph
    result = dict(hp=hp, rows=rows, start={str(K): v for K, v in start.items()}, tests=tests, clf_acc=clf_acc,
                  total_s=time.time() - t_start)
    table = report(result)
    print(table, flush=True)
    if not args.quick:
        digits.save_results(RESULTS, table, result)
        digits.save_run(RESULTS, "bench/fdistill_vs_dm.py", argv if argv is not None else sys.argv[1:], time.time() - t_start)
        capacity_ladder.write_between_markers(REPORT, table, *marks())
    else:
        print("--quick: a smoke test of the pipeline; the numbers above mean nothing at this size.")
    return result


def critic_spread(folder, steps=3):
    """The spread of a finished f-distill run's weights: its critic's logits, r and h(r) (fdistill.py) at G's
    noised samples, on the batches of the steps after its last. -> [(logits, r, h) ranges]."""
    import torch
    import edm_unet
    import fdistill
    import msd
    resume = sorted(f for f in os.listdir(folder) if f.startswith("resume-"))[-1]
    cfg = msd.Config(**{**torch.load(os.path.join(folder, resume), weights_only=True)["config"], "resume": True})
    r, out = msd.setup(cfg), []
    for step in range(r.step, r.step + steps):
        b = msd.draw_batch(r, step, 0)
        with torch.no_grad():
            x = edm_unet.OneStep(r.net)(b["z"], b["y"])
            logits = r.critic(x + b["sigma"].view(-1, 1, 1, 1) * b["noise"], b["sigma"], b["y"])[1]
            ratio = fdistill.density_ratio(logits)
            h = fdistill.weights(ratio, fdistill.level_bin(b["sigma"], r.sigmas), cfg.f_div)
        out.append([(float(v.min()), float(v.max())) for v in (logits, ratio, h)])
        print(f"step {step}: logits {logits.min():.4f} .. {logits.max():.4f}, r {ratio.min():.4f} .. {ratio.max():.4f}, "
              f"h ({cfg.f_div}) {h.min():.6f} .. {h.max():.6f}")
    return out


def marks():
    return "<!-- fdistill table: written by bench/fdistill_vs_dm.py -->", "<!-- end of the fdistill table -->"


def report(r):
    hp, rows = r["hp"], r["rows"]
    out = [f"FD to the 297 held-out digits ({hp['samples']} routed samples; lower is better) and label accuracy, after "
           f"{hp['adm_iters']} ADM steps per student from the DM students (8 channels, own pairs, seed 0). f-distill: "
           f"`--f-div {hp['f_div']}`. Test: Welch's t, two-sided, f - DM; Holm over the {len(hp['ks'])} values of K.", "",
           "| K | loss | FD per seed | FD mean +- std | accuracy mean | students' CPU s |", "| --- | --- | --- | --- | --- | --- |"]
    for K in hp["ks"]:
        s = r["start"][str(K)]
        out.append(f"| {K} | DM start (no ADM) | {s['fd_data']:.2f} | | {s['acc']:.3f} | |")
        for loss, _ in LOSSES:
            c = [x for x in rows if x["K"] == K and x["loss"] == loss]
            fd = [x["fd_data"] for x in c]
            out.append(f"| {K} | {loss} | {', '.join(f'{v:.2f}' for v in fd)} | {np.mean(fd):.2f} +- {np.std(fd, ddof=1):.2f} | "
                       f"{np.mean([x['acc'] for x in c]):.3f} | {np.mean([x['cpu_s'] for x in c]):.0f} |")
    out += ["", "| K | f - DM (FD) | 95% interval | p (Welch) | p (Holm) | verdict at 0.05 | earlier rule (gap > 2 pooled std) |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for t in r["tests"]:
        word = "no difference found" if t["p_holm"] >= hp["alpha"] else ("f better" if t["diff"] < 0 else "DM better")
        out.append(f"| {t['K']} | {t['diff']:+.2f} | [{t['ci'][0]:+.2f}, {t['ci'][1]:+.2f}] | {t['p']:.3f} | {t['p_holm']:.3f} | "
                   f"{word} | {'f better' if t['rule'][2] else 'no'} ({t['rule'][0]:.2f} / {2 * t['rule'][1]:.2f}) |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
