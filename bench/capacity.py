"""When do more students help? Student size against K on real digits, on a CPU (MSD Sec. 3.3, Tables 1 and 5).

    python bench/capacity.py            # the protocol of docs/capacity.md's final table (below)
    python bench/capacity.py --sizes 8 --ks 1 10 --pairs own   # a part of it: one filter, one K, one size
    python bench/capacity.py --quick    # the same pipeline in seconds (used by a test); its numbers mean nothing
    python bench/capacity.py --sizes 8 --ks 1 5 10 --stacked       # each cell's K students as one stacked run
    python bench/capacity.py --sizes 8 --ks 1 5 10 --shared-fake   # ... with one fake score for the K students
    python bench/capacity.py --sizes 8 --ks 1 5 --pairs own --loss sid --budget 1500   # a cell at an imposed budget
    python bench/capacity.py --sizes 8 --ks 1 5 --pairs own --seeds 20 21 22   # more seeds of a cell (3-19: left unused)
    python bench/capacity_ladder.py     # the final table and figure, from the results folders

Each call writes bench/results/capacity/<name>/ (table.md, results.json, figure.png, run.json with the
command, commit, CPU, torch version and seconds), <name> spelling every axis it ran, e.g.
curve1800_sizes8_ks1-2-5_pairsall-own (+ _stacked or _shared: below); finished runs in --out are reused,
so parts of the study can run in separate calls. The whole default protocol has not run as one call: its
parts took 5,437 s (size 8, three calls), 2,718 s (size 32) and about 1,850 s (size 16, estimated from its step cost) on a 2-core AMD EPYC,
so about 2.8 hours with the teacher.

The protocol is fixed here, before any run, and the README reads the results against it:
  * teacher: bench/digits.py's (0.83M parameters: the tiny preset at 8x8 with 32 channels), EDM's loss;
  * student sizes: model_channels 8, 16, 32 with the teacher's layout. Size 32 is the teacher's and starts
    from it (DMD Alg. 1); smaller students first match the teacher on their own classes (TSM, Eq. 3,
    MSD Sec. 3.3 / App. D.2.2; one TSM run per (size, partition), seed 0, shared by the DM seeds), then DM;
  * K = 1, 2, 5 consecutive class blocks, equal per-student iterations and batch (as the paper compares);
    K = 10 (one class per student) at the smallest size (added after the first runs; docs/capacity.md);
  * data filtering: F_DM (every student regresses onto the whole paired set, Sec. 3.2) for every size, and
    `--reg-pairs own` for the smallest size (a K = 1 student owns every pair, so both filters share it);
  * budget: per size, one K = 1 run (seed 0) is evaluated every `every` steps up to `curve_iters` (first
    fixed at 450; 1,800 after the shorter curves proved too short: docs/capacity.md); the budget is the first
    checkpoint whose FD to data is within 5% of the best FD at it or any later one, and every K of that
    size trains for it;
  * hyperparameters: bench/digits.py's (lr 2e-4, batch 32, EMA half-life 1 kimg, MSE regression weight 1),
    the same for every K and size: nothing is tuned per K;
  * metrics: FD to the 297 held-out digits (primary; the teacher's own FD to them is the target), FD to
    teacher samples and the classifier's label accuracy, all on `samples` routed samples; per-partition FD
    (the 5 blocks of 2 classes, to teacher samples of those classes); floors at the same sample count;
  * seeds 0, 1, 2 for the DM stage; mean +- std; "K beats 1" for a size only where the mean FD gap exceeds
    twice the pooled std of the two cells.

--stacked trains each K > 1 cell's students as one run (msd.py --all-students, stack.py): the same runs up
to float rounding, faster. --shared-fake adds msd.py --shared-fake: one fake score per cell, started from
the size's K = 1 TSM student (the teacher at the teacher's size), a design beyond the paper (docs/stack.md).
K = 1 cells are the plain runs in every mode (one student: nothing to stack or share).
"""
import argparse
import concurrent.futures as cf
import json
import multiprocessing
import os
import re
import shutil
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digits  # noqa: E402  (data, classifier, metric and teacher of the digits benchmark)
from inputs import sha256 as digest  # noqa: E402  (which teacher, paired set and classifier a results folder used)
import edm_unet  # noqa: E402
import evaluate  # noqa: E402
import msd  # noqa: E402
import sample  # noqa: E402

FULL = dict(sizes=(8, 16, 32), ks=(1, 2, 5, 10), seeds=(0, 1, 2), own_sizes=(8,), one_class_sizes=(8,), samples=5000,
            tsm_iters=300, tsm_batch=128, tsm_lr=2e-3, curve_iters=1800, every=150, batch=32, lr=2e-4, ema=1.0,
            lambda_reg=1.0, workers=2)
QUICK = dict(sizes=(8, 32), ks=(1, 2, 5), seeds=(0,), own_sizes=(8,), one_class_sizes=(8,), samples=100, tsm_iters=2,
             tsm_batch=8, tsm_lr=2e-3, curve_iters=4, every=2, batch=8, lr=2e-4, ema=1.0, lambda_reg=1.0, workers=1)
ALL_KS = (1, 2, 5, 10)  # K = 10 (one class per student) runs at the one_class_sizes only
TEACHER_SIZE = 32
RESULTS = os.path.join(ROOT, "bench", "results", "capacity")
COMMON = ["--precision", "fp32", "--device", "cpu", "--sample-every", "1000000", "--grad-probe-every", "0",
          "--log-every", "1000000"]


def arch(channels):
    return f"model_channels={channels},img_resolution=8,attn_resolutions=(4,)"


def params(channels):
    return edm_unet.count_params(edm_unet.build("tiny", **edm_unet.parse_overrides(arch(channels))).cfg)


# ----------------------------------------------------------------------------- training jobs (one process each)

def job(argv, copy_to=None, threads=1, done=None):
    """One msd.py run in a worker process; returns its CPU seconds (one thread: its wall time on an idle
    core; unlike wall time, not inflated by other jobs), kept beside the checkpoint for a later study that
    reuses the run (nan if that record is missing). copy_to: keep a copy of student.pt. done: the file a
    finished run leaves (default: --out's student.pt; a stacked run's last student)."""
    torch.set_num_threads(threads)
    t0 = time.process_time()
    out = argv[argv.index("--out") + 1]
    ckpt = copy_to or done or os.path.join(out, "student.pt")
    if os.path.exists(ckpt):
        return float(open(ckpt + ".cpu_s").read()) if os.path.exists(ckpt + ".cpu_s") else float("nan")
    digits.run(msd, argv)
    if copy_to:
        shutil.copy(os.path.join(out, "student.pt"), copy_to)
    t = time.process_time() - t0
    with open(ckpt + ".cpu_s", "w") as f:
        f.write(f"{t:.1f}")
    return t


def curve_job(argv, every, total):
    """A K = 1 run to `total` steps in resumed segments of `every`, keeping student.pt at each."""
    torch.set_num_threads(1)
    out, times = argv[argv.index("--out") + 1], []
    for s in range(every, total + 1, every):
        times.append(job([*argv, "--iters", str(s), "--resume", "--ckpt-every", str(every)], curve_ckpt(out, s)))
    return sum(times)


def pool(jobs, workers):
    """Run (fn, args) jobs on `workers` processes (in-process for 1). -> list of results in order."""
    if workers == 1:
        return [fn(*a) for fn, a in jobs]
    with cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as ex:
        return [f.result() for f in [ex.submit(fn, *a) for fn, a in jobs]]


# ----------------------------------------------------------------------------- the study

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny settings (seconds): checks the pipeline; its numbers mean nothing")
    p.add_argument("--out", default=os.path.join(ROOT, "out", "capacity"), help="working folder (finished runs are reused)")
    p.add_argument("--digits", default=os.path.join(ROOT, "out", "digits"),
                   help="bench/digits.py's folder: its teacher and paired set are reused, or made there")
    p.add_argument("--curve-iters", type=int, default=None,
                   help=f"length of the K = 1 curves that set the budgets (default {FULL['curve_iters']}); reuses every "
                        "run it shares")
    p.add_argument("--sizes", type=int, nargs="+", default=None,
                   help=f"run only these sizes of the ladder {list(FULL['sizes'])} (a study split over calls)")
    p.add_argument("--ks", type=int, nargs="+", default=None,
                   help=f"run only these K of {list(ALL_KS)} (1, the baseline of the rule, always among them; K = 10, one "
                        f"class per student, at sizes {list(FULL['one_class_sizes'])} only)")
    p.add_argument("--pairs", nargs="+", choices=("all", "own"), default=None,
                   help=f"run only these regression filters (all: F_DM; own: --reg-pairs own, for the sizes "
                        f"{list(FULL['own_sizes'])} only)")
    p.add_argument("--stacked", action="store_true",
                   help="train each K > 1 cell's K students as one stacked run (msd.py --all-students): the same runs "
                        "up to float rounding; results in <name>_stacked")
    p.add_argument("--loss", choices=("dm", "sid"), default="dm",
                   help="the students' loss (msd.py --loss): dm, or sid (SiD in DM's place; its own K = 1 curve and budget, "
                        "the same TSM starts); results in <name>_sid")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help=f"the seeds of every cell (default {list(FULL['seeds'])}; results in <name>_seeds...; seeds 3-19 "
                        "are left unused by our studies, for replications by others)")
    p.add_argument("--budget", type=int, default=None,
                   help="an imposed budget: every student trains this many steps and no K = 1 curve runs (default: the "
                        "curve rule); results in <name>_budget<steps>")
    p.add_argument("--shared-fake", action="store_true",
                   help="--stacked with one fake score per cell (msd.py --shared-fake), from the size's K = 1 TSM "
                        "student; results in <name>_shared")
    args = p.parse_args(argv)
    hp = dict(QUICK if args.quick else FULL, pairs=("all", "own"), loss=args.loss,
              mode="shared" if args.shared_fake else "stacked" if args.stacked else "separate")
    if args.curve_iters is not None:
        if args.curve_iters < hp["every"] or args.curve_iters % hp["every"]:
            p.error(f"--curve-iters must be a positive multiple of {hp['every']}, got {args.curve_iters}")
        hp["curve_iters"] = args.curve_iters
    if args.seeds is not None:
        if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
            p.error(f"--seeds must be distinct non-negative seeds, got {args.seeds}")
        hp["seeds"] = tuple(args.seeds)
    if args.budget is not None:
        if args.budget < 1:
            p.error(f"--budget must be a positive number of steps, got {args.budget}")
        hp["budget"] = args.budget
    for flag in ("sizes", "ks", "pairs"):  # a part of the study
        if getattr(args, flag) is not None:
            hp[flag] = subset(p, flag, getattr(args, flag), ALL_KS if flag == "ks" else hp[flag])
    if 1 not in hp["ks"]:
        p.error(f"--ks must include 1 (the baseline of the rule), got {args.ks}")
    if hp["pairs"] == ("own",) and not set(hp["sizes"]) & set(hp["own_sizes"]):
        p.error(f"--pairs own runs for sizes {list(hp['own_sizes'])} only, got --sizes {list(hp['sizes'])}")
    if args.ks is not None and 10 in hp["ks"] and not set(hp["sizes"]) & set(hp["one_class_sizes"]):
        p.error(f"--ks 10 runs for sizes {list(hp['one_class_sizes'])} only, got --sizes {list(hp['sizes'])}")
    name = results_name(hp)
    t_start = time.time()
    j = lambda *a: os.path.join(args.out, *a)
    os.makedirs(args.out, exist_ok=True)
    scratch = j(f"tmp_samples_{os.getpid()}")  # this call's own, so calls sharing no run (other --sizes) may run at once

    # teacher, paired set, data, classifier: bench/digits.py's (run it if they are missing)
    teacher, pairs = os.path.join(args.digits, "teacher", "student.pt"), os.path.join(args.digits, "pairs.npz")
    if not (os.path.exists(teacher) and os.path.exists(pairs)):
        digits.main((["--quick"] if args.quick else []) + ["--out", args.digits, "--teacher-only"])
    hd = digits.QUICK if args.quick else digits.FULL
    train, test = digits.make_data(os.path.join(args.digits, "train"))
    clf, clf_acc = digits.classifier(args.digits, train, test, hd["clf_epochs"])
    n = hp["samples"]
    seeds_eval, seeds_floor = f"100000-{100000 + n - 1}", f"200000-{200000 + n - 1}"
    heun = ["--steps", str(hd["heun_steps"]), "--device", "cpu", "--batch", "500"]
    for folder, seeds in (("teacher_samples", seeds_eval), ("teacher_floor", seeds_floor)):
        if not os.path.exists(j(folder, "dataset.json")):
            digits.run(sample, ["teacher", "--teacher", teacher, "--seeds", seeds, "--out", j(folder), *heun])
    tx, ty = digits.read(j("teacher_samples"))
    feats = lambda x, y: evaluate.features([(x, y)], clf, rgb=False)[0]
    refs = [evaluate.stats(feats(*test)), evaluate.stats(feats(tx, ty))]
    blocks = msd.make_partition(10, 5)  # per-partition FD: 5 blocks of 2 classes, to teacher samples of the block
    block_refs = [evaluate.stats(feats(tx[np.isin(ty, b)], ty[np.isin(ty, b)])) for b in blocks]

    def measure(x, y):
        f, logits = evaluate.features([(x, y)], clf, rgb=False)
        fd = [evaluate.frechet_distance(*evaluate.stats(f), *r) for r in refs]
        per = [evaluate.frechet_distance(*evaluate.stats(f[np.isin(y, b)]), *r) for b, r in zip(blocks, block_refs)]
        spread = [float(x[y == c].float().std(0).mean()) for c in range(10)]  # within-class pixel std (0-255): mode coverage
        return dict(fd_data=fd[0], fd_teacher=fd[1], acc=float((logits.argmax(1) == y.numpy()).mean()), fd_blocks=per,
                    class_std=spread)

    inputs = {name: digest(path) for name, path in (("teacher", teacher), ("pairs", pairs),
                                                     ("classifier", digits.classifier_path(args.digits, hd["clf_epochs"])))}
    teacher_m = measure(tx, ty)
    floor = measure(*digits.read(j("teacher_floor")))
    floor_data = evaluate.frechet_distance(*evaluate.stats(feats(train[0][:len(test[0])], train[1][:len(test[0])])), *refs[0])
    print(f"teacher: FD to data {teacher_m['fd_data']:.2f}; floors at {n} samples: teacher vs teacher "
          f"{floor['fd_teacher']:.2f} (per block {np.mean(floor['fd_blocks']):.2f}), real vs held-out {floor_data:.2f}", flush=True)

    def dm_args(size, K, k, seed, reg, out, init):
        a = ["--teacher", teacher, "--pairs", pairs, "--partition", str(k), "--num-students", str(K), "--batch", str(hp["batch"]),
             "--lr", str(hp["lr"]), "--reg-loss", "mse", "--lambda-reg", str(hp["lambda_reg"]), "--reg-pairs", reg,
             "--ema-halflife-kimg", str(hp["ema"]), "--seed", str(seed), "--out", out, "--loss", hp["loss"], *COMMON]
        return a + (["--init", init] if init else [])

    # Stage 0 for the smaller sizes: TSM on each partition (seed 0), in parallel
    tsm_jobs, tsm_keys, init = [], [], {}
    for size in hp["sizes"]:
        for K in ks_at(hp, size):  # K = 1 among them: its student starts a --shared-fake cell's fake score
            for k in range(K):
                if size == TEACHER_SIZE:
                    init[size, K, k] = None
                    continue
                out = tsm_dir(args.out, size, K, k)
                init[size, K, k] = os.path.join(out, "student.pt")
                tsm_keys.append(f"{size} ch, K={K}")
                tsm_jobs.append((job, (["--stage", "tsm", "--teacher", teacher, "--preset", "tiny", "--arch", arch(size),
                                        "--data", os.path.join(args.digits, "train"), "--num-students", str(K),
                                        "--partition", str(k), "--iters", str(hp["tsm_iters"]), "--batch", str(hp["tsm_batch"]),
                                        "--lr", str(hp["tsm_lr"]), "--out", out, *COMMON],)))
    tsm_cost = {}
    for key, t in zip(tsm_keys, pool(tsm_jobs, hp["workers"])):
        tsm_cost[key] = tsm_cost.get(key, 0) + t
    tsm_cost = {k: round(v) if v == v else v for k, v in tsm_cost.items()}  # nan: a reused run without a record

    # the budget: K = 1, seed 0, FD to data every `every` steps (or --budget: imposed, no curve)
    curve_dirs = {size: curve_dir(args.out, size, hp["loss"]) for size in hp["sizes"]}
    imposed = hp.get("budget")
    pool([(curve_job, (dm_args(size, 1, 0, 0, "all", curve_dirs[size], init[size, 1, 0]), hp["every"], hp["curve_iters"]))
          for size in hp["sizes"] if not imposed], hp["workers"])
    steps, curves, budget = [] if imposed else list(range(hp["every"], hp["curve_iters"] + 1, hp["every"])), {}, {}
    for size in hp["sizes"] if imposed else []:
        budget[size] = imposed
    for size in [] if imposed else hp["sizes"]:
        curves[size] = []
        for s in steps:
            x, y = route([curve_ckpt(curve_dirs[size], s)], seeds_eval, scratch)
            curves[size].append(measure(x, y)["fd_data"])
        budget[size] = pick_budget(steps, curves[size])
        print(f"size {size}: FD to data along K=1 training {dict(zip(steps, np.round(curves[size], 2).tolist()))} "
              f"-> budget {budget[size]} steps", flush=True)

    # the grid, one size at a time (smallest first), each (filter, seed, K) with the size's budget; the table,
    # results.json and the figure are rewritten after every size, so a stopped study keeps its finished sizes
    rows, where, wall = [], {}, {}
    for size in hp["sizes"]:
        regs = [reg for reg in hp["pairs"] if reg == "all" or size in hp["own_sizes"]]
        cells = [(size, reg, seed, K) for reg in regs for seed in hp["seeds"] for K in ks_at(hp, size)]
        grid_jobs, queued = [], set()
        for _, reg, seed, K in cells:
            reg_k = run_reg(reg, K)
            for k in range(K):
                where[size, reg, seed, K, k] = student_ckpt(args.out, size, reg, seed, K, budget[size], k, hp["mode"], hp["loss"],
                                                            curve=not imposed)
            if K > 1 and hp["mode"] != "separate":  # one stacked run writes the K students' folders p0 .. p{K-1}
                out = os.path.dirname(os.path.dirname(where[size, reg, seed, K, 0]))
                if out in queued:
                    continue
                queued.add(out)
                each = init[size, K, 0] and os.path.join(tsm_dir(args.out, size, K, "{k}"), "student.pt")  # msd.py fills {k}
                args_k = dm_args(size, K, 0, seed, reg_k, out, each) + ["--iters", str(budget[size]), "--all-students"]
                if hp["mode"] == "shared":
                    args_k += ["--shared-fake"] + (["--fake-init", init[size, 1, 0]] if init[size, 1, 0] else [])
                grid_jobs.append(((size, reg_k, seed, K), (job, (args_k, None, 1, where[size, reg, seed, K, K - 1]))))
                continue
            for k in range(K):
                out = os.path.dirname(where[size, reg, seed, K, k])
                if (K == 1 and seed == 0 and not imposed) or out in queued:  # the curve's run, or one another cell queued
                    continue
                queued.add(out)
                args_k = dm_args(size, K, k, seed, reg_k, out, init[size, K, k]) + ["--iters", str(budget[size])]
                grid_jobs.append(((size, reg_k, seed, K), (job, (args_k,))))
        for (cell, _), t in zip(grid_jobs, pool([jb for _, jb in grid_jobs], hp["workers"])):
            wall[cell] = wall.get(cell, 0) + t
        for _, reg, seed, K in cells:
            x, y = route([where[size, reg, seed, K, k] for k in range(K)], seeds_eval, scratch)
            m = measure(x, y)
            rows.append(dict(size=size, params=params(size), reg=reg, seed=seed, K=K, steps=budget[size],
                             images=K * budget[size] * hp["batch"], wall=wall.get((size, run_reg(reg, K), seed, K)), **m))
            print(f"size {size} {reg} seed {seed} K {K}: FD data {m['fd_data']:.2f} teacher {m['fd_teacher']:.2f} "
                  f"acc {m['acc']:.3f} within-class std per class {np.round(m['class_std'], 1).tolist()}", flush=True)
        result = dict(hp=hp, rows=rows, curves={str(k): v for k, v in curves.items()}, steps=steps, budget=budget,
                      teacher=teacher_m, floor=floor, floor_data=floor_data, tsm_cost=tsm_cost, inputs=inputs,
                      clf_acc=clf_acc, total_s=time.time() - t_start)
        table = report(result)
        print(table, flush=True)
        if not args.quick:
            folder = os.path.join(RESULTS, name)
            digits.save_results(folder, table, result)
            figure(result, os.path.join(folder, "figure.png"), args.out, scratch)
            digits.save_run(folder, "bench/capacity.py", argv if argv is not None else sys.argv[1:], time.time() - t_start)
    print(f"results: {os.path.join(RESULTS, name)}" + (" (not written: --quick)" if args.quick else ""))
    shutil.rmtree(scratch, ignore_errors=True)
    if args.quick:
        print("--quick: a smoke test of the pipeline; the numbers above mean nothing at this size.")
    return result


def subset(p, flag, given, allowed):
    """A flag that picks part of the study: distinct values of `allowed`. -> sorted tuple."""
    if any(v not in allowed for v in given) or len(set(given)) != len(given):
        p.error(f"--{flag} must be distinct values of {list(allowed)}, got {given}")
    return tuple(sorted(given))


def ks_at(hp, size):
    """The K a size runs: K = 10 (one class per student) at the one_class_sizes only."""
    return [K for K in hp["ks"] if K != 10 or size in hp["one_class_sizes"]]


def results_name(hp):
    """The results folder's name, spelling every axis the call runs (the values it really runs at some size)."""
    ks = sorted({K for s in hp["sizes"] for K in ks_at(hp, s)})
    pairs = [reg for reg in hp["pairs"] if reg == "all" or set(hp["sizes"]) & set(hp["own_sizes"])]
    join = lambda v: "-".join(map(str, v))
    mode = "" if hp.get("mode", "separate") == "separate" else f"_{hp['mode']}"
    loss = "" if hp.get("loss", "dm") == "dm" else f"_{hp['loss']}"
    seeds = "" if tuple(hp.get("seeds", FULL["seeds"])) in (FULL["seeds"], QUICK["seeds"]) else f"_seeds{join(hp['seeds'])}"
    budget = f"_budget{hp['budget']}" if hp.get("budget") else ""
    return f"curve{hp['curve_iters']}_sizes{join(hp['sizes'])}_ks{join(ks)}_pairs{join(pairs)}{mode}{loss}{seeds}{budget}"


def run_reg(reg, K):
    """The filter a cell's runs train with: a single student owns every pair, so both filters are one run."""
    return "all" if K == 1 else reg


def tsm_dir(root, size, K, k):
    """Folder of the TSM run of student k of K (k may be msd.py's "{k}" pattern)."""
    return os.path.join(root, f"c{size}", "tsm", f"K{K}p{k}")


def curve_dir(root, size, loss="dm"):
    """Folder of one size's K = 1 curve run (seed 0); curve_sid for --loss sid."""
    return os.path.join(root, f"c{size}", "curve" if loss == "dm" else f"curve_{loss}")


def curve_ckpt(curve, steps):
    """The curve run's student.pt, kept after `steps` steps."""
    return os.path.join(curve, f"student_{steps:06d}.pt")


def student_ckpt(root, size, reg, seed, K, steps, k, mode="separate", loss="dm", curve=True):
    """Checkpoint of student k of a grid cell; seed 0's single student is the K = 1 curve's run, stopped at `steps`
    (curve=False, an imposed --budget: a run of its own).
    A K > 1 cell of --stacked or --shared-fake lives beside the separate runs' (reg_stacked, reg_shared); --loss
    sid's cells beside DM's (reg_sid, reg_stacked_sid)."""
    if K == 1 and seed == 0 and curve:
        return curve_ckpt(curve_dir(root, size, loss), steps)
    reg = run_reg(reg, K) + ("" if K == 1 or mode == "separate" else f"_{mode}") + ("" if loss == "dm" else f"_{loss}")
    return os.path.join(root, f"c{size}", reg, f"seed{seed}", f"K{K}", f"s{steps}", f"p{k}", "student.pt")


def route(ckpts, seeds, out):
    """Routed one-step samples of these students for `seeds` (sample.py students). -> (uint8 images, labels)."""
    if os.path.exists(out):
        shutil.rmtree(out)
    sample.main(["students", "--ckpt", *ckpts, "--seeds", seeds, "--out", out, "--device", "cpu", "--batch", "1000"])
    return digits.read(out)


def pick_budget(steps, fd, tol=0.05):
    """The first step whose FD is within `tol` of the best FD at it or any later step (the curve has flattened)."""
    return next(s for i, s in enumerate(steps) if fd[i] <= (1 + tol) * min(fd[i:]))


def decide(a, b):
    """The rule fixed beforehand: b beats a where mean(a) - mean(b) > 2 * pooled std."""
    return decide_stats(stat(a), stat(b))


def stat(values):
    """-> (mean, std with ddof 1 (0 for one value), n)."""
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0, len(values)


def decide_stats(a, b):
    """decide() on two cells given as (mean, std, n): -> (mean(a) - mean(b), pooled std, b beats a)."""
    pooled = float(np.sqrt((a[1] ** 2 + b[1] ** 2) / 2)) if min(a[2], b[2]) > 1 else float("nan")
    return a[0] - b[0], pooled, bool(a[0] - b[0] > 2 * pooled)


def summarize(folder):
    """A results folder as cell statistics: dict(teacher, budget, samples, seeds, cells), cells
    {(size, reg, K): {metric: (mean, std, n)}} for fd_data, fd_teacher, fd_blocks (a run's mean over
    the blocks), class_std and class_std_low (a run's mean and lowest class), wall (CPU s, timed runs).
    From results.json (the seeds' rows), else from table.md: the cells of runs older than
    results.json, with the table's 2-decimal means and stds."""
    path = os.path.join(folder, "results.json")
    if os.path.exists(path):
        with open(path) as f:
            r = json.load(f)
        cells = {}
        for key in sorted({(x["size"], x["reg"], x["K"]) for x in r["rows"]}):
            c = [x for x in r["rows"] if (x["size"], x["reg"], x["K"]) == key]
            walls = [x["wall"] for x in c if x["wall"] is not None]
            cells[key] = dict(fd_data=stat([x["fd_data"] for x in c]), fd_teacher=stat([x["fd_teacher"] for x in c]),
                              fd_blocks=stat([np.mean(x["fd_blocks"]) for x in c]),
                              class_std=stat([np.mean(x["class_std"]) for x in c]),
                              class_std_low=stat([min(x["class_std"]) for x in c]),
                              wall=stat(walls) if walls else (float("nan"), 0.0, 0))
        return dict(teacher=r["teacher"]["fd_data"], inputs=r.get("inputs"), budget={str(k): v for k, v in r["budget"].items()},
                    samples=r["hp"]["samples"], seeds=sorted({x["seed"] for x in r["rows"]}), cells=cells)
    text = open(os.path.join(folder, "table.md")).read()
    seeds = json.loads(re.search(r"over seeds (\[[\d, ]+\])", text).group(1))
    pm = lambda v: (float(v.split(" ± ")[0]), float(v.split(" ± ")[1]), len(seeds))  # noqa: E731
    head = [c.strip() for c in next(ln for ln in text.splitlines() if ln.startswith("| size")).strip("|").split("|")]
    col = lambda v, name: v[next(i for i, h in enumerate(head) if h.startswith(name))]  # noqa: E731
    has_std = any(h.startswith("within-class") for h in head)  # the oldest tables have no std column
    cells = {}
    for line in re.findall(r"^\| \d+ ch \(\d+k\) \|.*$", text, re.M):
        v = [c.strip() for c in line.strip("|").split("|")]
        size, reg, K = int(v[0].split()[0]), v[1], int(v[2])
        mean, low = (float(u) for u in col(v, "within-class").split(" / ")) if has_std else (float("nan"),) * 2
        cells[size, reg, K] = dict(
            fd_data=pm(col(v, "FD to data")), fd_teacher=pm(col(v, "FD to teacher")), fd_blocks=pm(col(v, "per-partition")),
            class_std=(mean, 0.0, len(seeds)), class_std_low=(low, 0.0, len(seeds)),
            wall=(float(col(v, "CPU s")), 0.0, len(seeds) - (K == 1)))  # K = 1: seed 0 untimed
    budget = {k: int(n) for k, n in re.findall(r"(\d+): (\d+)", re.search(r"Budgets[^{]*(\{[^}]*\})", text).group(1))}
    return dict(teacher=float(re.search(r"Teacher: FD to data ([\d.]+)", text).group(1)), budget=budget,
                samples=int(re.search(r"; (\d+) routed samples", text).group(1)), seeds=seeds, cells=cells, rounded=True)


def has_results(folder):
    """Whether a results folder holds what summarize reads: results.json or, for older runs, table.md."""
    return any(os.path.exists(os.path.join(folder, f)) for f in ("results.json", "table.md"))


def same_teacher(a, b):
    """Raises unless two summaries distil the same teacher under the same classifier: the same files where both
    recorded their digests, else the teacher's FD to data within 0.001 (0.005 where one is read from a 2-decimal
    table; two rebuilds of the teacher measured 45.71 and 45.45, while one teacher's FD computed on another CPU
    moves by float rounding only)."""
    if a.get("inputs") and b.get("inputs"):
        if a["inputs"] != b["inputs"]:
            raise ValueError(f"the two studies distil different teachers or use different classifiers: inputs "
                             f"{sorted(k for k in a['inputs'] if a['inputs'][k] != b['inputs'].get(k))} differ")
        return
    if not np.isclose(a["teacher"], b["teacher"], rtol=0, atol=0.005 if a.get("rounded") or b.get("rounded") else 0.001):
        raise ValueError(f"the two studies distil different teachers: FD to data {a['teacher']:.4f} against {b['teacher']:.4f}")


def report(r):
    hp, rows = r["hp"], r["rows"]
    lines = ["| size (params) | pairs | K | FD to data | FD to teacher | label acc. | per-partition FD | steps/student | "
             "within-class pixel std (mean / lowest class) | images seen (all students) | CPU s (DM, all students) | "
             "K beats 1? (gap / 2 x pooled std) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    ms = lambda v, f: f"{np.mean(v):{f}} ± {np.std(v, ddof=1) if len(v) > 1 else 0:{f}}"
    for size in sorted({x["size"] for x in rows}):
        for reg in sorted({x["reg"] for x in rows if x["size"] == size}):
            base = [x["fd_data"] for x in rows if x["size"] == size and x["reg"] == reg and x["K"] == 1]
            for K in ks_at(hp, size):
                c = [x for x in rows if x["size"] == size and x["reg"] == reg and x["K"] == K]
                if not c:  # a cell not (yet) measured
                    continue
                fd = [x["fd_data"] for x in c]
                gap, pooled, wins = decide(base, fd)
                verdict = "" if K == 1 else f"{'yes' if wins else 'no'} ({gap:.2f} / {2 * pooled:.2f})"
                walls = [x["wall"] for x in c if x["wall"] is not None]
                lines.append(f"| {size} ch ({c[0]['params'] / 1e3:.0f}k) | {reg} | {K} | {ms(fd, '.2f')} | "
                             f"{ms([x['fd_teacher'] for x in c], '.2f')} | {ms([x['acc'] for x in c], '.3f')} | "
                             f"{ms([np.mean(x['fd_blocks']) for x in c], '.2f')} | {c[0]['steps']} | "
                             f"{np.mean([np.mean(x['class_std']) for x in c]):.1f} / {np.mean([min(x['class_std']) for x in c]):.1f} | "
                             f"{c[0]['images']:,d} | "
                             f"{np.mean(walls) if walls else float('nan'):.0f} | {verdict} |")
    fl, missing = r["floor"], [s for s in hp["sizes"] if s not in {x["size"] for x in rows}]
    untimed = "" if hp.get("budget") else " (seed 0's K = 1 run is the curve run, not timed here)"
    lines += ["", f"mean ± std (ddof 1) over seeds {list(hp['seeds'])}; {hp['samples']} routed samples per run. Teacher: FD to "
              f"data {r['teacher']['fd_data']:.2f}, label accuracy {r['teacher']['acc']:.3f}, within-class pixel std "
              f"{np.mean(r['teacher']['class_std']):.1f} / {min(r['teacher']['class_std']):.1f}. Floors at {hp['samples']} "
              f"samples: teacher vs teacher {fl['fd_teacher']:.2f} (per partition {np.mean(fl['fd_blocks']):.2f}); 297 real "
              f"training digits vs held-out {r['floor_data']:.2f}. Budgets (steps/student, "
              f"{'imposed by --budget' if hp.get('budget') else 'from the K = 1 curves'}): "
              f"{r['budget']}. Per-partition FD: mean over the 5 blocks of 2 classes, to teacher samples of the block. "
              f"CPU s: CPU seconds (one thread each) of the DM runs of one cell summed over its students{untimed}; TSM s per (size, K), summed over partitions: {r['tsm_cost']}. "
              f"Classifier test accuracy {r['clf_acc']:.3f}. Total {r['total_s']:.0f} s."
              + ("" if not missing else f" Not finished (no rows): sizes {missing}."), ""]
    return "\n".join(lines)


def figure(r, path, out, scratch):
    """Left: FD to data against student parameters, one line per K (error bars: std over seeds), floor
    and teacher dashed; middle: the K = 1 curves that set the budgets; right: samples per (size, K)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    hp, rows = r["hp"], r["rows"]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2), layout="constrained")
    for reg, style in (("all", "-"), ("own", ":")):
        for K in hp["ks"]:
            sizes = [s for s in hp["sizes"] if any(x["reg"] == reg and x["size"] == s and x["K"] == K for x in rows)]
            if not sizes:
                continue
            c = [[x["fd_data"] for x in rows if x["size"] == s and x["reg"] == reg and x["K"] == K] for s in sizes]
            ax[0].errorbar([params(s) for s in sizes], [np.mean(v) for v in c], yerr=[np.std(v) for v in c], ls=style,
                           marker="o", capsize=3, label=f"K = {K}" + (" (own pairs)" if reg == "own" else ""))
    ax[0].axhline(r["teacher"]["fd_data"], ls="--", color="k", lw=1, label="teacher")
    ax[0].axhline(r["floor_data"], ls="--", color="gray", lw=1, label="real vs held-out")
    ax[0].set_xscale("log"), ax[0].set_xlabel("parameters per student"), ax[0].set_ylabel("FD to held-out digits")
    ax[0].legend(fontsize=7)
    for s in [] if hp.get("budget") else hp["sizes"]:  # an imposed budget has no curve
        ax[1].plot(r["steps"], r["curves"][str(s)] if str(s) in r["curves"] else r["curves"][s], "o-", label=f"{s} ch")
        ax[1].axvline(r["budget"][s], ls=":", lw=1)
    ax[1].set_xlabel(f"{'SiD' if hp.get('loss') == 'sid' else 'DM'} steps (K = 1, seed 0)"), ax[1].set_ylabel("FD to held-out digits"), ax[1].legend(fontsize=7)
    grid, done, names = [], sorted({x["size"] for x in rows}), []
    for s in done:
        row = []
        reg = "all" if any(x["reg"] == "all" and x["size"] == s for x in rows) else "own"
        names += [f"{s} ch K={K}" + (" own" if reg == "own" and K > 1 else "") for K in ks_at(hp, s)]
        for K in ks_at(hp, s):
            ckpts = [student_ckpt(out, s, reg, hp["seeds"][0], K, r["budget"][s], k, hp.get("mode", "separate"),
                                  hp.get("loss", "dm"), curve=not hp.get("budget")) for k in range(K)]
            x, y = route(ckpts, "300000-300499", scratch)
            row.append(torch.cat([torch.cat(list(x[y == c][:3, 0]), 1) for c in range(10)], 1))  # (8, 3 * 8 * 10)
        grid.append(torch.cat(row, 0))
    ax[2].imshow(torch.cat(grid, 0).numpy(), cmap="gray_r", aspect="equal")
    ax[2].set_yticks([(i + 0.5) * 8 for i in range(len(names))], names, fontsize=7)
    ax[2].set_xticks([]), ax[2].set_title("samples (seed 0), 3 per class")
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
