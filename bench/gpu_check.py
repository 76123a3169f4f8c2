"""One command that checks and measures everything that needs a GPU, in about 8 minutes on one GPU.

    python bench/gpu_check.py                          # CUDA: the checks, then the speed table
    python bench/gpu_check.py --device cpu --quick     # the same checks at toy size on a CPU (CI, under a minute)

Correctness, on the device, each against the fp32 eager run on the same device:
  * the digits pipeline at toy size (scikit-learn's digits, no download): an EDM teacher trained
    here (`msd.py --stage tsm --target data`), the paired set (`sample.py pairs`), then for each
    precision (fp32, bf16, fp16) and each code path (eager; --compile --channels-last) the DM stage
    as K = 2 separate runs and as one `--all-students` run, the ADM and TSM stages, routed sampling
    (`sample.py students`) and the FD of the routed samples. Pass: every logged loss finite, the
    first step's losses (same weights at every precision) within RTOL of fp32 eager (+ ATOL), and
    the routed samples of the trained students within PIXEL_TOL (mean |x - x_fp32| in [-1, 1]).
  * kill and resume: 2 steps, then --resume to 4, against 4 straight steps, bit for bit (or, where
    the device is not deterministic, no further apart than two straight runs are from each other).
  * torchrun with N = all GPUs present against one process (relative update difference < 1%).
  * EDM's per-seed Heun images (`sample.py teacher`) on the device against the CPU's.
Speed and memory (against docs/performance.md's GPU targets): `bench/unet.py`'s timing of
B, S, XS, XXS at batch 1, 32 and 64 in fp32 eager and bf16 + channels-last, and compiled (bf16,
channels-last) for the rows that have a target; `bench/dm_step.py`'s DM step of B at batch 32
(LPIPS on a random VGG), eager and compiled; each with its peak memory. Items run in order of
importance (checks, eager speed, compiled speed, the compiled pipeline) while --budget seconds
last; one that does not fit is recorded as not run, never silently dropped.

Writes --out (default bench/results/gpu/<device name>/): table.md, results.json (rewritten after
every item, so a killed run keeps what it measured) and run.json (command, commit, device, torch).
Exit status 1 when a check fails.
"""
import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digits  # noqa: E402  (data, classifier, FD, run.json)
import dm_step  # noqa: E402
import edm_unet  # noqa: E402
import evaluate  # noqa: E402
import msd  # noqa: E402
import sample  # noqa: E402
import unet  # noqa: E402

RTOL, ATOL = 5e-2, 1e-3       # first-step losses against fp32 eager (TF32 matmuls count as fp32 on CUDA)
PIXEL_TOL = 0.05              # mean |routed sample - fp32 eager's| after training, images in [-1, 1]
HEUN_TOL = 1.0                # mean |uint8 difference| of a Heun image, device against CPU (levels of 255)
TARGETS = {  # docs/performance.md, one H100: (measurement, target, unit, higher is better)
    ("B", 1, "forward"): (5.0, "ms", False), ("XXS", 1, "forward"): (3.0, "ms", False),
    ("B", 64, "forward"): (1370.0, "img/s", True), ("B", 32, "fwd+bwd"): (376.0, "img/s", True),
    ("dm_step", 32, "step"): (92.0, "img/s", True)}
FULL = dict(teacher_iters=300, pairs=200, heun_steps=16, iters=20, batch=16, samples=200, clf_epochs=10,
            arch=digits.ARCH, tsm_arch="model_channels=16,img_resolution=8,attn_resolutions=(4,)",
            paths=(("eager", []), ("compile+channels-last", ["--compile", "--channels-last"])),
            presets=("B", "S", "XS", "XXS"), batches=(1, 32, 64), dm_preset="B", dm_batch=32, lpips_size=224)
QUICK = dict(teacher_iters=10, pairs=32, heun_steps=2, iters=1, batch=4, samples=40, clf_epochs=1,  # seconds each
             arch="model_channels=8,img_resolution=8,attn_resolutions=(4,)",
             tsm_arch="model_channels=8,img_resolution=8,attn_resolutions=(4,)",
             paths=(("eager", []),),  # no compile (minutes on a CPU); channels-last on the CPU: tests/test_edm_unet.py
             presets=("tiny",), batches=(1,), dm_preset="tiny", dm_batch=2, lpips_size=0)  # 0: MSE regression
PRECISIONS = ("fp32", "bf16", "fp16")
LOSSES = ("dm", "reg", "fake", "gan_g", "gan_d", "tsm")


class Check:
    """Collects results, rewrites results.json after each, and keeps the time budget."""

    def __init__(self, out, budget, info):
        self.out, self.deadline, self.info, self.items = out, time.time() + budget, info, []
        os.makedirs(out, exist_ok=True)

    def left(self):
        return self.deadline - time.time()

    def add(self, section, name, ok=None, **values):
        """ok: True/False for a check, None for a measurement."""
        self.items.append(dict(section=section, name=name, ok=ok, **values))
        status = {True: "PASS", False: "FAIL", None: "    "}[ok]
        print(f"[{status}] {section}: {name} " + " ".join(f"{k}={v}" for k, v in values.items()), flush=True)
        with open(os.path.join(self.out, "results.json"), "w") as f:
            json.dump(dict(info=self.info, items=self.items), f, indent=1, default=str)

    def run(self, section, name, fn, need=0.0):
        """fn() -> (ok, values); not run when fewer than `need` seconds are left; an exception is a FAIL."""
        if self.left() < need:
            return self.add(section, name, None, status=f"not run: {self.left():.0f} s of the budget left, needs {need:.0f}")
        t = time.time()
        torch._dynamo.reset()  # each item compiles afresh: no item runs into dynamo's recompile limit (and eager)
        try:
            ok, values = fn()
        except Exception as e:  # one broken path must not hide the others
            ok, values = False, dict(error=f"{type(e).__name__}: {e}"[:400])
        self.add(section, name, ok, seconds=round(time.time() - t, 1), **values)


def close(a, b, rtol=RTOL, atol=ATOL):
    return abs(a - b) <= rtol * abs(b) + atol


# ----------------------------------------------------------------------------- correctness

def setup(hp, dev, tmp):
    """Digits, their classifier, an EDM teacher trained on them (fp32) and its paired set, on the device."""
    j = lambda *a: os.path.join(tmp, *a)  # noqa: E731
    train, test = digits.make_data(j("train"))
    clf, acc = digits.train_classifier(train, test, hp["clf_epochs"])
    msd.main(["--stage", "tsm", "--target", "data", "--preset", "tiny", "--arch", hp["arch"], "--data", j("train"),
              "--num-students", "1", "--iters", str(hp["teacher_iters"]), "--batch", "64", "--lr", "2e-3",
              "--precision", "fp32", "--log-every", "100", "--out", j("teacher"), "--device", dev,
              "--sample-every", "1000000", "--grad-probe-every", "0"])
    sample.main(["pairs", "--teacher", j("teacher", "student.pt"), "--num", str(hp["pairs"]), "--out", j("pairs.npz"),
                 "--steps", str(hp["heun_steps"]), "--device", dev, "--batch", "256"])
    made = dict(clf=clf, ref_stats=[evaluate.stats(evaluate.features([test], clf, rgb=False)[0])],
                teacher=j("teacher", "student.pt"), pairs=j("pairs.npz"), data=j("train"))
    return made, dict(classifier_accuracy=round(acc, 3))


def pipeline(ck, hp, dev, tmp, s, paths):
    """The DM (separate and stacked), ADM and TSM stages and routed sampling at every precision on
    the given code paths, each against fp32 eager (the first path)."""
    j = lambda *a: os.path.join(tmp, *a)  # noqa: E731
    teacher, clf, ref_stats = s["teacher"], s["clf"], s["ref_stats"]
    common = ["--device", dev, "--sample-every", "1000000", "--grad-probe-every", "0", "--log-every", "1"]
    base = ["--teacher", teacher, "--pairs", s["pairs"], "--data", s["data"], "--num-students", "2",
            "--iters", str(hp["iters"]), "--batch", str(hp["batch"]), "--lr", "2e-4", "--reg-loss", "mse", *common]
    runs = {  # name -> (argv, folders with a student.pt)
        "dm, K = 2 separate": (lambda out: [["--partition", str(k), "--out", os.path.join(out, f"p{k}")] for k in (0, 1)],
                               lambda out: [os.path.join(out, f"p{k}") for k in (0, 1)]),
        "dm, --all-students": (lambda out: [["--all-students", "--out", out]],
                               lambda out: [os.path.join(out, f"p{k}") for k in (0, 1)]),
        "adm": (lambda out: [["--stage", "adm", "--init", teacher, "--head-width", "32", "--out", out]], lambda out: [out]),
        "tsm": (lambda out: [["--stage", "tsm", "--preset", "tiny", "--arch", hp["tsm_arch"], "--out", out]],
                lambda out: [out]),
    }
    ref = s.setdefault("ref", {})  # fp32 eager: first-step losses per run, routed samples of the DM students
    seeds = f"100000-{100000 + hp['samples'] - 1}"
    for path, flags in paths:
        for precision in PRECISIONS:
            for name, (argvs, folders) in runs.items():
                extra = [f for f in flags if not (name == "dm, --all-students" and f == "--channels-last")]
                out = j(f"{path}_{precision}_{re.sub(r'[^a-z0-9]+', '_', name)}")

                def one():
                    first, worst = {}, []
                    for i, argv in enumerate(argvs(out)):
                        msd.main(base + ["--precision", precision] + extra + argv)
                        rows = [json.loads(line) for line in open(os.path.join(argv[argv.index("--out") + 1], "log.jsonl"))]
                        for k in LOSSES:
                            if k in rows[0]:
                                first[f"{k}{i or ''}"] = rows[0][k]  # student 1 of the separate runs: "dm1", ...
                                worst += [row[k] for row in rows]
                    ok = bool(np.isfinite(worst).all())
                    if path == "eager" and precision == "fp32":
                        ref[name] = first
                    bad = [k for k, v in first.items() if not close(v, ref[name][k])]
                    values = dict(first_losses=first, off_tolerance=bad)
                    if name.startswith("dm"):  # routed sampling and FD of the two students
                        imgs = os.path.join(out, "samples")
                        sample.main(["students", "--ckpt", *[os.path.join(f, "student.pt") for f in folders(out)],
                                     "--seeds", seeds, "--out", imgs, "--device", dev, "--precision", precision])
                        x, y = digits.read(imgs)
                        values["fd_to_data"] = round(digits.measure(clf, x, y, ref_stats)[0][0], 3)
                        xf = x.float() / 127.5 - 1
                        ref.setdefault(name + " samples", xf)
                        values["pixel_diff"] = round(float((xf - ref[name + " samples"]).abs().mean()), 4)
                        ok = ok and values["pixel_diff"] <= PIXEL_TOL
                    return ok and not bad, values
                ck.run("pipeline", f"{name}, {precision}, {path}", one, need=20 if "compile" in path else 0)


def resume_check(ck, hp, dev, tmp, teacher, pairs):
    """2 steps, --resume to 4, against 4 straight steps (twice: the device's own run-to-run spread)."""
    base = ["--teacher", teacher, "--pairs", pairs, "--device", dev, "--batch", str(hp["batch"]), "--reg-loss", "mse",
            "--lr", "2e-4", "--log-every", "1", "--sample-every", "1000000", "--grad-probe-every", "0", "--num-students", "2"]

    def one(precision):
        def f():
            run = lambda name, iters, *x: msd.main(base + ["--precision", precision, "--iters", str(iters),  # noqa: E731
                                                         "--out", os.path.join(tmp, f"resume_{precision}_{name}"), *x])
            a, b = run("a", 4), run("b", 4)
            run("c", 2)
            c = run("c", 4, "--resume")
            flat = lambda r: torch.cat([v.flatten().float() for m in ("net", "fake") for v in r[m].state_dict().values()])  # noqa: E731
            spread, diff = float((flat(a) - flat(b)).abs().max()), float((flat(a) - flat(c)).abs().max())
            return diff <= spread, dict(straight_vs_straight=spread, straight_vs_resumed=diff, bit_exact=diff == 0)
        return f
    for precision in PRECISIONS if hp is FULL else ("fp16",):  # --quick: the scaler's path only
        ck.run("resume", f"kill at step 2, resume to 4, {precision}", one(precision))


def torchrun_check(ck, hp, dev, tmp, teacher, pairs):
    """torchrun --nproc_per_node=N (all GPUs; 1 process on a CPU) against one process."""
    n = torch.cuda.device_count() if dev == "cuda" else 1

    def f():
        argv = ["--teacher", teacher, "--pairs", pairs, "--device", dev, "--batch", str(4 * n), "--reg-loss", "mse",
                "--iters", "2", "--lr", "2e-4", "--precision", "fp32", "--sample-every", "1000000", "--grad-probe-every", "0",
                "--num-students", "2"]
        one = msd.main(argv + ["--out", os.path.join(tmp, "tr_one")])
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", f"--master_port={port}",
                        os.path.join(ROOT, "msd.py"), *argv, "--out", os.path.join(tmp, "tr_n")],
                       check=True, cwd=ROOT, capture_output=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        start = edm_unet.load_model(teacher)[0].state_dict()
        many = edm_unet.load_model(os.path.join(tmp, "tr_n", "student.pt"))[0].state_dict()
        flat = lambda sd: torch.cat([(v.float().cpu() - start[k]).flatten() for k, v in sd.items()])  # noqa: E731
        d1, dn = flat(one["net"].state_dict()), flat(many)
        rel = float((d1 - dn).norm() / d1.norm())
        return rel < 1e-2, dict(processes=n, relative_update_difference=f"{rel:.2e}")
    ck.run("torchrun", f"torchrun --nproc_per_node={n} against one process", f)


def heun_check(ck, hp, dev, tmp, teacher):
    """EDM's per-seed Heun images on the device against the CPU's, in float32 (TF32 off: msd.py turns it on)."""
    def f():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        imgs = {}
        for d in dict.fromkeys(["cpu", dev]):
            out = os.path.join(tmp, f"heun_{d}")
            sample.main(["teacher", "--teacher", teacher, "--seeds", "0-31", "--out", out, "--device", d,
                         "--steps", str(hp["heun_steps"]), "--batch", "32"])
            imgs[d] = digits.read(out)
        diff = (imgs[dev][0].int() - imgs["cpu"][0].int()).abs().float()
        same_labels = torch.equal(imgs[dev][1], imgs["cpu"][1])
        return same_labels and float(diff.mean()) <= HEUN_TOL, dict(
            mean_abs_uint8=round(float(diff.mean()), 3), max_abs_uint8=int(diff.max()), same_labels=same_labels)
    ck.run("heun", f"sample.py teacher, seeds 0-31, {dev} against cpu", f)


# ----------------------------------------------------------------------------- speed and memory

def peak(dev):
    return round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if dev == "cuda" else None


def speed(ck, hp, dev, compiled):
    """bench/unet.py's timing per preset and batch, then bench/dm_step.py's DM step: eager (fp32, and
    bf16 with channels-last) or the optimised path (bf16, channels-last, compiled)."""
    device = torch.device(dev)
    paths = [("bf16", True, True)] if compiled else [("fp32", False, False), ("bf16", False, True)]
    items = [(p, b, path) for p in hp["presets"] for b in hp["batches"] for path in paths
             if not compiled or any((p, b) == key[:2] for key in TARGETS)]  # compiled: the targets' rows only
    for preset, batch, (precision, comp, cl) in items:
        def f():
            if dev == "cuda":
                torch.cuda.empty_cache(), torch.cuda.reset_peak_memory_stats()
            t_f, t_fb, _ = unet.bench(preset, batch, device, precision, comp, 2 if comp else 1, 5, cl)
            row = dict(forward_ms=round(t_f * 1e3, 2), forward_img_s=round(batch / t_f, 1),
                       fwd_bwd_ms=round(t_fb * 1e3, 2), fwd_bwd_img_s=round(batch / t_fb, 1), peak_gib=peak(dev))
            return None, row
        path = f"{precision}{', compiled' if comp else ''}{', channels-last' if cl else ''}"
        ck.run("speed", f"{preset}, batch {batch}, {path}", f, need=90 if comp else 10)

    def g():
        if dev == "cuda":
            torch.cuda.empty_cache(), torch.cuda.reset_peak_memory_stats()
        reg = ["--lpips-size", str(hp["lpips_size"])] if hp["lpips_size"] else ["--reg-loss", "mse"]
        log = dm_step.main(["--device", dev, "--preset", hp["dm_preset"], "--batch", str(hp["dm_batch"]),
                            "--precision", "bf16", *reg, "--steps", "3" if hp is FULL else "1",
                            *(["--compile", "--channels-last"] if compiled else [])])
        return None, dict(ms_per_iter=log["ms_per_iter"], img_per_s=log["img_per_s"], peak_gib=log.get("peak_gib"))
    ck.run("speed", f"DM step {hp['dm_preset']}, batch {hp['dm_batch']}, bf16{', compiled, channels-last' if compiled else ''}",
           g, need=150 if compiled else 30)


# ----------------------------------------------------------------------------- report

def table(ck):
    lines = [f"# GPU check: {ck.info['device']}", "", f"`{ck.info['command']}`, commit {ck.info['commit']}, torch "
             f"{ck.info['torch']}, {ck.info['seconds']} s. Tolerances: first-step losses within {RTOL:.0%} of fp32 eager "
             f"(+ {ATOL}); routed samples within {PIXEL_TOL} mean absolute difference ([-1, 1]); Heun images within "
             f"{HEUN_TOL} uint8 levels on average.", "", "## Correctness", "", "| section | check | result | details |",
             "| --- | --- | --- | --- |"]
    for it in ck.items:
        if it["section"] != "speed":
            details = {k: v for k, v in it.items() if k not in ("section", "name", "ok", "first_losses")}
            result = {True: "pass", False: "**FAIL**", None: "-"}[it["ok"]]
            lines.append(f"| {it['section']} | {it['name']} | {result} | {json.dumps(details, default=str)} |")
    lines += ["", "## Speed and memory", "", "| network | forward ms | forward img/s | fwd+bwd ms | fwd+bwd img/s | "
              "peak GiB | target (docs/performance.md) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for it in ck.items:
        if it["section"] == "speed":
            target = ""
            m = re.match(r"(\w+), batch (\d+), bf16", it["name"]) or re.match(r"DM step (\w+), batch (\d+)", it["name"])
            for (net, b, kind), (goal, unit, higher) in TARGETS.items():
                if m and int(m.group(2)) == b and (net == m.group(1) or (net == "dm_step" and it["name"].startswith("DM"))):
                    key = {"forward": "forward_ms" if unit == "ms" else "forward_img_s", "fwd+bwd": "fwd_bwd_img_s",
                           "step": "img_per_s"}[kind]
                    if key in it:
                        met = it[key] >= goal if higher else it[key] <= goal
                        target += f"{kind} {'>=' if higher else '<='} {goal:g} {unit}: {'met' if met else 'not met'}. "
            if "status" in it or "error" in it:
                lines.append(f"| {it['name']} | {it.get('status') or it.get('error')} | | | | | |")
            elif "ms_per_iter" in it:
                lines.append(f"| {it['name']} | {it['ms_per_iter']} ms/step | {it['img_per_s']} img/s | | | {it['peak_gib']} | "
                             f"{target.strip()} |")
            else:
                lines.append(f"| {it['name']} | {it['forward_ms']} | {it['forward_img_s']} | {it['fwd_bwd_ms']} | "
                             f"{it['fwd_bwd_img_s']} | {it['peak_gib']} | {target.strip()} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cuda (default; one GPU) or cpu")
    p.add_argument("--quick", action="store_true", help="toy sizes, no compile: checks that every check runs (CI, CPU)")
    p.add_argument("--budget", type=float, default=450, help="seconds for the items; later ones are recorded as not run")
    p.add_argument("--out", default="", help="results folder (default bench/results/gpu/<device name>)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda asked for, but CUDA is not available (run --device cpu --quick for the CPU version)")
    hp, t0 = QUICK if args.quick else FULL, time.time()
    if args.device == "cuda":
        name = torch.cuda.get_device_name(0)
    else:
        name = "cpu-" + next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                              if line.startswith("model name")), "unknown") if os.path.exists("/proc/cpuinfo") else "cpu"
    out = args.out or os.path.join(ROOT, "bench", "results", "gpu", re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-"))
    info = digits.save_run(out, "bench/gpu_check.py", argv if argv is not None else sys.argv[1:], 0)  # command, commit, CPU
    info.update(device=name, cuda=torch.version.cuda if args.device == "cuda" else None, quick=args.quick)
    ck = Check(out, args.budget, info)
    tmp, s = tempfile.mkdtemp(prefix="gpu_check_"), {}

    def ready():
        made, values = setup(hp, args.device, tmp)
        s.update(made)
        return True, values
    try:
        ck.run("pipeline", "digits, classifier, teacher (fp32) and paired set", ready)
        if s:  # the checks need the teacher; compiled runs, the slowest to start, come last
            pipeline(ck, hp, args.device, tmp, s, hp["paths"][:1])
            resume_check(ck, hp, args.device, tmp, s["teacher"], s["pairs"])
            torchrun_check(ck, hp, args.device, tmp, s["teacher"], s["pairs"])
            heun_check(ck, hp, args.device, tmp, s["teacher"])
        speed(ck, hp, args.device, compiled=False)
        if not args.quick:
            speed(ck, hp, args.device, compiled=True)
        if s:
            pipeline(ck, hp, args.device, tmp, s, hp["paths"][1:])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        ck.info["seconds"] = round(time.time() - t0)
        with open(os.path.join(out, "run.json"), "w") as f:
            json.dump(ck.info, f, indent=1)
        with open(os.path.join(out, "table.md"), "w") as f:
            f.write(table(ck))
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(dict(info=ck.info, items=ck.items), f, indent=1, default=str)
    failed = [it["name"] for it in ck.items if it["ok"] is False]
    print(f"\n{len(ck.items)} items, {len(failed)} failed" + (f": {failed}" if failed else "") + f"; results in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
