"""MSD end to end on real images, on a CPU: do K students beat one? (scikit-learn's digits, no download)

    python bench/digits.py            # 3 seeds x K in (1, 2, 5): table, figure and run.json in bench/results/digits/
    python bench/digits.py --quick    # a smoke run of the same pipeline in seconds (used by a test)

The pipeline is the project's own scripts, called through their `main(argv)` (the command each
call equals is printed): `msd.py --stage tsm --target data` trains a small EDM teacher on the digits, `sample.py
pairs` makes the shared paired set, `msd.py` distils K = 1, 2, 5 students on consecutive class
blocks with equal per-student iterations and batch (the paper's setting), `sample.py students`
routes labels to students, and `evaluate.py` computes Frechet distances in the feature space of a
small digits classifier trained here (its test accuracy is printed).

Data: `sklearn.datasets.load_digits` (1,797 8x8 images, 10 classes), kept at 8x8, 1 channel,
scaled 0..16 -> 0..255; 297 images are held out for the metric, 1,500 train the teacher and the
classifier. The teacher is trained once and shared by all seeds; the seeds vary the students.
"""
import argparse
import json
import os
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import edm_unet  # noqa: E402
import evaluate  # noqa: E402
import msd  # noqa: E402
import sample  # noqa: E402

ARCH = "model_channels=32,img_resolution=8,attn_resolutions=(4,)"  # the tiny preset at 8x8, 0.83M params
FULL = dict(teacher_iters=2500, teacher_batch=128, teacher_lr=2e-3, pairs=1000, heun_steps=32,
            student_iters=350, student_batch=32, student_lr=2e-4, lambda_reg=1.0, student_ema=1.0, samples=1000,
            seeds=(0, 1, 2), ks=(1, 2, 5), clf_epochs=40)
QUICK = dict(teacher_iters=20, teacher_batch=32, teacher_lr=2e-3, pairs=100, heun_steps=4,
             student_iters=3, student_batch=8, student_lr=2e-4, lambda_reg=1.0, student_ema=1.0, samples=100,
             seeds=(0,), ks=(1, 2, 5), clf_epochs=2)


def run(module, argv):
    """Call a project script's main(argv), printing the command line it equals."""
    print(f"$ python {module.__name__}.py {' '.join(argv)}", flush=True)
    return module.main(argv)


# ----------------------------------------------------------------------------- data and metric

def make_data(out):
    """Digits as uint8 (N, 1, 8, 8); train split written in EDM's layout. -> (train, held-out) arrays."""
    from sklearn.datasets import load_digits
    d = load_digits()
    images = torch.from_numpy(np.round(d.images * 255 / 16).astype(np.uint8))[:, None]  # (1797, 1, 8, 8)
    labels = torch.from_numpy(d.target).long()
    perm = torch.from_numpy(np.random.default_rng(0).permutation(len(images)))
    test, train = perm[:297], perm[297:]
    if not os.path.exists(os.path.join(out, "dataset.json")):
        sample.write_images(out, images[train], labels[train].tolist(), train.tolist())
    return (images[train], labels[train]), (images[test], labels[test])


class DigitsClassifier(nn.Module):
    """A small CNN; its 64-d penultimate layer is the feature space of the Frechet distance."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                                  nn.MaxPool2d(2), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Flatten())
        self.fc, self.out = nn.Linear(64 * 16, 64), nn.Linear(64, 10)

    def forward(self, u8):  # (B, 1, 8, 8) uint8 -> (features (B, 64), logits (B, 10))
        h = F.relu(self.fc(self.conv(u8.float() / 127.5 - 1)))
        return h, self.out(h)


def train_classifier(train, test, epochs, seed=0):
    torch.manual_seed(seed)
    clf = DigitsClassifier()
    opt = torch.optim.Adam(clf.parameters(), lr=1e-3)
    x, y = train
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            loss = F.cross_entropy(clf(x[idx])[1], y[idx])
            opt.zero_grad(), loss.backward(), opt.step()
    clf.eval()
    with torch.no_grad():
        acc = (clf(test[0])[1].argmax(1) == test[1]).float().mean().item()
    return clf, acc


def classifier_path(folder, epochs):
    return os.path.join(folder, f"classifier_e{epochs}.pt")


def classifier(folder, train, test, epochs):
    """train_classifier's network, kept in `folder` (classifier_e<epochs>.pt) and reused: FDs of different calls compare
    only under one classifier, and its training, like the teacher's, does not repeat bit for bit on another CPU.
    -> (classifier, held-out accuracy)."""
    path = classifier_path(folder, epochs)
    if os.path.exists(path):
        saved = torch.load(path, weights_only=True)
        clf = DigitsClassifier()
        clf.load_state_dict(saved["state_dict"])
        return clf.eval(), saved["acc"]
    clf, acc = train_classifier(train, test, epochs)
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    torch.save(dict(state_dict=clf.state_dict(), acc=acc), tmp)
    os.replace(tmp, path)  # a killed call leaves no half-written classifier
    return clf, acc


def measure(clf, images, labels, ref_stats):
    """FD to each reference and the classifier's accuracy on the conditioning labels."""
    feats, logits = evaluate.features([(images, labels)], clf, rgb=False)
    mu, sigma = evaluate.stats(feats)
    acc = float((logits.argmax(1) == labels.numpy()).mean())
    return [evaluate.frechet_distance(mu, sigma, *r) for r in ref_stats], acc


def cpu_info():
    """/proc/cpuinfo's fields of the first processor ({} where there is no cpuinfo)."""
    info = {}
    if os.path.exists("/proc/cpuinfo"):
        for line in open("/proc/cpuinfo"):
            if not line.strip():
                break  # the end of the first processor's block
            key, _, value = line.partition(":")
            info[key.strip()] = value.strip()
    return info


def cpu_model():
    """The CPU by model, not only by vendor: its name with its family, model and stepping (a virtual machine may
    give "AMD EPYC" alone; family 25, model 1 is then Zen 3). '' where there is no cpuinfo."""
    info = cpu_info()
    ids = ", ".join(f"{k} {info[k]}" for k in ("cpu family", "model", "stepping") if k in info)
    return (info.get("model name", "unknown") + (f" ({ids})" if ids else "")) if info else ""


def spread(values, f=".1f"):
    """'median [min, max]' of repeated timings (or of their per-round ratios)."""
    return f"{np.median(values):{f}} [{min(values):{f}}, {max(values):{f}}]"


def save_run(folder, script, argv, seconds):
    """run.json beside a study's results: the command, commit, CPU, torch version and seconds that made them."""
    import platform
    import subprocess
    git = lambda *a: subprocess.run(["git", "-C", ROOT, *a], capture_output=True, text=True).stdout.strip()
    cpu = cpu_model() or platform.processor()
    info = dict(command=" ".join(["python", script, *argv]), commit=git("rev-parse", "HEAD") + ("-dirty" if git("status", "--porcelain", "-uno") else ""),
                cpu=f"{cpu}, {os.cpu_count()} cores", torch=torch.__version__, seconds=round(seconds),
                date=time.strftime("%Y-%m-%d"))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "run.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info


def save_results(folder, table, results):
    """A study's table.md and results.json (the numbers behind the table) into its results folder."""
    os.makedirs(folder, exist_ok=True)
    for name, write in (("results.json", lambda f: json.dump(results, f, indent=1, default=float)),
                        ("table.md", lambda f: f.write(table))):  # each whole or not at all, the numbers first
        with open(os.path.join(folder, name + ".tmp"), "w") as f:
            write(f)
        os.replace(os.path.join(folder, name + ".tmp"), os.path.join(folder, name))


def read(path):
    x, y = next(sample.ImageFolder(path).batches(10 ** 6))
    return x, y


# ----------------------------------------------------------------------------- pipeline

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny settings (seconds): checks that the pipeline runs; its numbers mean nothing")
    p.add_argument("--out", default=os.path.join(ROOT, "out", "digits"))
    p.add_argument("--fresh", action="store_true", help="delete --out first (otherwise finished parts are reused)")
    p.add_argument("--teacher-only", action="store_true", help="stop once the teacher and the paired set exist (bench/capacity.py)")
    args = p.parse_args(argv)
    hp = QUICK if args.quick else FULL
    if args.fresh and os.path.exists(args.out):
        shutil.rmtree(args.out)
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()
    j = lambda *a: os.path.join(args.out, *a)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    common = ["--precision", "fp32", "--device", "cpu", "--sample-every", "1000000", "--grad-probe-every", "0"]

    train, test = make_data(j("train"))
    clf, clf_acc = classifier(args.out, train, test, hp["clf_epochs"])
    print(f"digits classifier: test accuracy {clf_acc:.3f} on {len(test[0])} held-out digits", flush=True)

    t0 = time.time()
    if not os.path.exists(j("teacher", "student.pt")):  # EDM denoising score matching on the digits
        run(msd, ["--stage", "tsm", "--target", "data", "--preset", "tiny", "--arch", ARCH, "--data", j("train"), "--num-students", "1",
                  "--iters", str(hp["teacher_iters"]), "--batch", str(hp["teacher_batch"]), "--lr", str(hp["teacher_lr"]),
                  "--ema-halflife-kimg", "20", "--log-every", "500", "--out", j("teacher"), *common])
    teacher = j("teacher", "student.pt")
    heun = ["--steps", str(hp["heun_steps"]), "--device", "cpu", "--batch", "500"]
    if not os.path.exists(j("pairs.npz")):
        run(sample, ["pairs", "--teacher", teacher, "--num", str(hp["pairs"]), "--out", j("pairs.npz"), *heun])
    if args.teacher_only:
        return None
    n = hp["samples"]
    sample_seeds = f"100000-{100000 + n - 1}"  # disjoint from the pairs' seeds 0..pairs-1
    if not os.path.exists(j("teacher_samples", "dataset.json")):
        run(sample, ["teacher", "--teacher", teacher, "--seeds", sample_seeds, "--out", j("teacher_samples"), *heun])
    t_teacher = time.time() - t0

    refs = [evaluate.stats(evaluate.features([test], clf, rgb=False)[0])]  # held-out real digits
    tx, ty = read(j("teacher_samples"))
    refs.append(evaluate.stats(evaluate.features([(tx, ty)], clf, rgb=False)[0]))  # teacher samples
    (fd_teacher_data, _), teacher_acc = measure(clf, tx, ty, refs)
    print(f"teacher: FD to held-out data {fd_teacher_data:.2f}, label accuracy {teacher_acc:.3f}", flush=True)
    # noise floors of the metric: real vs real (train digits vs held-out), teacher vs teacher (other seeds)
    floor_data = measure(clf, train[0][:len(test[0])], train[1][:len(test[0])], refs)[0][0]
    other = f"200000-{200000 + n - 1}"
    if not os.path.exists(j("teacher_samples2", "dataset.json")):
        run(sample, ["teacher", "--teacher", teacher, "--seeds", other, "--out", j("teacher_samples2"), *heun])
    floor_teacher = measure(clf, *read(j("teacher_samples2")), refs)[0][1]
    floors = (floor_data, floor_teacher)
    print(f"metric floors: real vs held-out {floor_data:.2f}, teacher vs teacher {floor_teacher:.2f}", flush=True)

    rows = []
    for seed in hp["seeds"]:
        for K in hp["ks"]:
            run_dir = j(f"seed{seed}", f"K{K}")
            t0 = time.time()
            for k in range(K):
                if not os.path.exists(os.path.join(run_dir, f"p{k}", "student.pt")):
                    run(msd, ["--teacher", teacher, "--pairs", j("pairs.npz"), "--partition", str(k), "--num-students", str(K),
                              "--iters", str(hp["student_iters"]), "--batch", str(hp["student_batch"]),
                              "--lr", str(hp["student_lr"]), "--reg-loss", "mse", "--lambda-reg", str(hp["lambda_reg"]),
                              "--ema-halflife-kimg", str(hp["student_ema"]), "--seed", str(seed), "--log-every", "100", "--ckpt-every", "1000000",
                              "--out", os.path.join(run_dir, f"p{k}"), *common])
            wall = time.time() - t0
            if not os.path.exists(os.path.join(run_dir, "samples", "dataset.json")):
                run(sample, ["students", "--ckpt", *[os.path.join(run_dir, f"p{k}", "student.pt") for k in range(K)],
                             "--seeds", sample_seeds, "--out", os.path.join(run_dir, "samples"), "--device", "cpu"])
            x, y = read(os.path.join(run_dir, "samples"))
            (fd_data, fd_teacher), acc = measure(clf, x, y, refs)
            rows.append(dict(seed=seed, K=K, fd_data=fd_data, fd_teacher=fd_teacher, acc=acc, wall=wall))
            print(f"seed {seed} K {K}: FD data {fd_data:.2f} FD teacher {fd_teacher:.2f} label acc {acc:.3f} "
                  f"({wall:.0f} s training)", flush=True)

    table = report(rows, hp, clf_acc, fd_teacher_data, teacher_acc, t_teacher, floors, time.time() - t_start)
    print(table)
    if args.quick:
        print("--quick: a smoke test of the pipeline (20 teacher steps, 3 student steps, 100 samples). The FDs and "
              "the label accuracy above are meaningless at this size; run without --quick for the study.")
    if not args.quick:
        folder = os.path.join(ROOT, "bench", "results", "digits")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "table.md"), "w") as f:
            f.write(table)
        figure(rows, hp, args.out, os.path.join(folder, "figure.png"), floors)
        save_run(folder, "bench/digits.py", argv if argv is not None else sys.argv[1:], time.time() - t_start)
    return rows


def report(rows, hp, clf_acc, fd_teacher_data, teacher_acc, t_teacher, floors, total):
    lines = ["| K | FD to held-out data | FD to teacher | label accuracy | student training (s) |", "| --- | --- | --- | --- | --- |"]
    for K in hp["ks"]:
        r = [x for x in rows if x["K"] == K]
        f = lambda key, fmt: f"{np.mean([x[key] for x in r]):{fmt}} ± {np.std([x[key] for x in r]):{fmt}}"
        lines.append(f"| {K} | {f('fd_data', '.2f')} | {f('fd_teacher', '.2f')} | {f('acc', '.3f')} | {f('wall', '.0f')} |")
    lines += ["", f"mean ± std over seeds {list(hp['seeds'])}; {hp['samples']} routed samples per run. "
              f"Teacher (trained once, {t_teacher:.0f} s with pairs and samples): FD to data {fd_teacher_data:.2f}, "
              f"label accuracy {teacher_acc:.3f}. Metric floors: 297 real training digits vs "
              f"held-out {floors[0]:.2f}; teacher vs teacher (other seeds) {floors[1]:.2f}. "
              f"Classifier test accuracy {clf_acc:.3f}. Total {total:.0f} s.", ""]
    return "\n".join(lines)


def figure(rows, hp, out, path, floors):
    """Left: one sample grid per K (row = class) for the first seed; right: FD vs K."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ks = hp["ks"]
    fig, axes = plt.subplots(1, len(ks) + 1, figsize=(3 * (len(ks) + 1), 3.6))
    for ax, K in zip(axes, ks):
        x, y = read(os.path.join(out, f"seed{hp['seeds'][0]}", f"K{K}", "samples"))
        grid = torch.cat([torch.cat(list(x[y == c][:10, 0]), dim=1) for c in range(10)], dim=0)
        ax.imshow(grid.numpy(), cmap="gray_r"), ax.set_axis_off(), ax.set_title(f"K = {K}")
    ax = axes[-1]
    for key, name in (("fd_data", "to held-out data"), ("fd_teacher", "to teacher")):
        m = [np.mean([r[key] for r in rows if r["K"] == K]) for K in ks]
        s = [np.std([r[key] for r in rows if r["K"] == K]) for K in ks]
        ax.errorbar(ks, m, yerr=s, marker="o", capsize=3, label=name)
    for y_, name in zip(floors, ("floor: real vs held-out", "floor: teacher vs teacher")):
        ax.axhline(y_, ls="--", lw=1, color="gray")
        ax.text(ks[-1], y_, name, ha="right", va="bottom", fontsize=7, color="gray")
    ax.set_xlabel("students K"), ax.set_ylabel("Frechet distance (classifier features)"), ax.set_xticks(ks), ax.legend(fontsize=8)
    fig.tight_layout(pad=1.0)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
