"""One command that checks and measures everything that needs a GPU, within one 600-s call.

    bash bench/gpu_run.sh OUT                          # on the GPU machine: carried wheels, then this script
    python bench/gpu_check.py                          # CUDA: the checks, then the speed table
    python bench/gpu_check.py --device cpu --quick     # the same checks at toy size on a CPU (CI, about two minutes)

Every group of items runs in its own process with a timeout of the budget left: a group killed at
its timeout is recorded as such (the item it was in, by name), results.json and table.md are
rewritten after every group, and a killed call keeps every finished row.

Correctness, on the device, each against the fp32 eager run on the same device:
  * attention: what reaches scaled_dot_product_attention is contiguous; on CUDA, which fused kernel
    (flash, memory-efficient, cuDNN) takes a UNet forward at bf16 and fp16.
  * the digits pipeline at toy size (scikit-learn's digits, no download): an EDM teacher trained here,
    a half-trained copy as the fake score's start (so the DM term of Eq. 6 is not zero at step 1), the
    paired set, then at fp32, bf16 and fp16, eager and (CUDA) compiled with channels-last: DM as K = 2
    separate runs and as one --all-students run, ADM, TSM, routed sampling and its FD. Pass: losses
    finite, step 1's losses and G's gradient norm within RTOL of fp32 eager's, routed samples within
    PIXEL_TOL; the fp32 reference fails when its DM term is zero (a comparison that could not fail).
  * resume: 2 steps, kill, --resume to 4 against 4 straight steps: bit for bit under --deterministic,
    within RESUME_TOL of the update without it.
  * torchrun --nproc_per_node=N against one process (N = the GPUs; 2 gloo processes on a CPU); "not
    run: one GPU" on a one-GPU machine.
  * EDM's per-seed Heun images in float32 (TF32 off, then restored): the GPU's against the CPU's; on
    a CPU, one batching against another.
Speed, memory and outputs: bench/unet.py's timing of B, S, XS, XXS at batch 1, 32 and 64 in fp32 eager
and bf16 + channels-last, and compiled (bf16, channels-last) for the rows with a target, each output
against fp32 eager's (OUT_TOL); bench/dm_step.py's DM step of B at batch 32 (LPIPS on a random VGG),
eager and compiled; peak memory of each, and of bench/memory.py's stages against its CPU estimate.

Writes OUT (--out, default bench/results/gpu/<device name>/): table.md, results.json, run.json
(command, commit, device, Python and package versions) and log.txt (every group's output).
Exit status 1 when a check fails.
"""
import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
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
import edm_unet  # noqa: E402
import evaluate  # noqa: E402
import msd  # noqa: E402
import sample  # noqa: E402
import unet  # noqa: E402

RTOL, ATOL = 5e-2, 1e-6       # step 1's losses and G's gradient norm against fp32 eager (TF32 counts as fp32)
PIXEL_TOL = 0.05              # mean |routed sample - fp32 eager's| after training, images in [-1, 1]
HEUN_TOL = 1.0                # mean |uint8 difference| of a Heun image, GPU against CPU (levels of 255)
OUT_TOL = 5e-2                # |out - fp32 eager's| / |fp32 eager's| (L2) of a network's output: bf16, compiled, channels-last
RESUME_TOL = 1e-2             # without --deterministic: |resumed - straight| / |straight - start| of the weights after 4 steps
UPDATE_TOL = 1e-2             # torchrun: the same relative update difference against one process
TARGETS = {  # docs/performance.md, one H100: (measurement, target, unit, higher is better)
    ("B", 1, "forward"): (5.0, "ms", False), ("XXS", 1, "forward"): (3.0, "ms", False),
    ("B", 64, "forward"): (1370.0, "img/s", True), ("B", 32, "fwd+bwd"): (376.0, "img/s", True),
    ("dm_step", 32, "step"): (92.0, "img/s", True)}
FULL = dict(teacher_iters=300, pairs=200, heun_steps=16, iters=20, batch=16, samples=200, clf_epochs=10,
            arch=digits.ARCH, tsm_arch="model_channels=16,img_resolution=8,attn_resolutions=(4,)",
            presets=("B", "S", "XS", "XXS"), batches=(1, 32, 64), dm_preset="B", dm_batch=32, lpips_size=224,
            dm_precision="bf16", attn_preset="B", memory=(("dm", "B", 8), ("tsm", "S", 16)))
QUICK = dict(teacher_iters=10, pairs=32, heun_steps=2, iters=1, batch=4, samples=40, clf_epochs=1,  # seconds each
             arch="model_channels=8,img_resolution=8,attn_resolutions=(4,)",
             tsm_arch="model_channels=8,img_resolution=8,attn_resolutions=(4,)",
             presets=("tiny",), batches=(1,), dm_preset="tiny", dm_batch=2, lpips_size=0,  # 0: MSE regression
             dm_precision="fp32",  # bf16 convolutions are emulated, slowly, on CPUs without bf16 instructions
             attn_preset="tiny", memory=(("tsm", "tiny", 16),))  # tsm: no LPIPS (slow on a CPU too)
PRECISIONS = ("fp32", "bf16", "fp16")
COMPARED = ("dm", "reg", "fake", "gan_g", "gan_d", "tsm", "gnorm_net")  # step 1's log entries held against fp32 eager
PATHS = {"eager": [], "compiled": ["--compile", "--channels-last"]}


# ----------------------------------------------------------------------------- the parent: groups in processes

def groups(hp, dev, quick):
    """(group, section, seconds it needs at least, needs the set-up) in order of importance."""
    g = [("setup", "pipeline", 0, False), ("attention", "kernels", 0, False)]
    g += [(f"pipeline eager {p}", "pipeline", 0, True) for p in PRECISIONS]
    g += [("resume", "resume", 0, True), ("torchrun", "torchrun", 0, True), ("heun", "heun", 0, True),
          ("speed eager", "speed", 10, False), ("dm step eager", "speed", 30, False), ("memory", "memory", 60, False)]
    if not quick and dev == "cuda":  # compiled runs start slowest: last, so the eager checks always fit
        g += [("speed compiled", "speed", 90, False), ("dm step compiled", "speed", 150, False)]
        g += [(f"pipeline compiled {p}", "pipeline", 60, True) for p in PRECISIONS]
    return g


class Check:
    """The parent: runs each group in a child process with the budget left as its timeout, and
    rewrites results.json, table.md and run.json after each."""

    def __init__(self, out, budget, info, script=os.path.abspath(__file__)):
        self.out, self.deadline, self.info, self.items, self.script = out, time.time() + budget, info, [], script
        os.makedirs(out, exist_ok=True)

    def left(self):
        return self.deadline - time.time()

    def add(self, item):
        self.items.append(item)
        status = {True: "PASS", False: "FAIL", None: "    "}[item["ok"]]
        print(f"[{status}] {item['section']}: {item['name']} "
              + " ".join(f"{k}={v}" for k, v in item.items() if k not in ("section", "name", "ok")), flush=True)

    def save(self, t0):
        self.info["seconds"] = round(time.time() - t0)
        for name, text in (("run.json", json.dumps(self.info, indent=1)), ("table.md", table(self)),
                           ("results.json", json.dumps(dict(info=self.info, items=self.items), indent=1, default=str))):
            tmp = os.path.join(self.out, name + ".tmp")
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, os.path.join(self.out, name))

    def run_group(self, group, section, need, argv, state):
        """One child process; its rows arrive through state/rows.jsonl ("started" lines name the item in flight)."""
        left = self.left()
        if left < need:
            return self.add(dict(section=section, name=group, ok=None,
                                 status=f"not run: {max(left, 0):.0f} s of the budget left, needs {need}"))
        rows_file = os.path.join(state, "rows.jsonl")
        pos = os.path.getsize(rows_file) if os.path.exists(rows_file) else 0
        try:
            with open(os.path.join(self.out, "log.txt"), "a") as log:
                log.write(f"\n===== {group} =====\n")
                log.flush()
                proc = subprocess.Popen([sys.executable, self.script, "--child", group, "--state", state, *argv],
                                        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
                try:
                    rc, killed = proc.wait(timeout=left), False
                except subprocess.TimeoutExpired:
                    rc, killed = None, True
                finally:  # at its timeout, or when this process is stopped (SIGTERM, Ctrl-C): no child outlives it
                    if proc.poll() is None:
                        os.killpg(proc.pid, signal.SIGKILL)  # the child and what it started (torchrun's workers)
                        proc.wait()
        finally:  # the rows the child finished, also when this process is being stopped
            started = self.read_rows(rows_file, pos)
        name = started or f"{group} (before its first item)"
        if killed:
            self.add(dict(section=section, name=name, ok=None, status=f"killed at its timeout ({left:.0f} s were left)"))
        elif rc != 0:
            self.add(dict(section=section, name=name, ok=False, error=f"the process exited with {rc}: see log.txt"))

    def read_rows(self, rows_file, pos):
        """Add the finished rows written after byte `pos`. -> the item started and not finished, if any."""
        started = None
        if os.path.exists(rows_file):
            with open(rows_file) as f:
                f.seek(pos)
                for line in f:
                    rec = json.loads(line)
                    if "started" in rec:
                        started = rec["started"]
                    else:
                        self.add(rec)
                        started = None
        return started


# ----------------------------------------------------------------------------- the child: rows

class Rows:
    """A child's rows, one JSON line each, written as soon as each finishes."""

    def __init__(self, state, section):
        self.path, self.section = os.path.join(state, "rows.jsonl"), section

    def _write(self, rec):
        with open(self.path, "a") as f:
            f.write(json.dumps(rec, default=str) + "\n")

    def run(self, name, fn, section=None):
        """fn() -> (ok, values); ok True/False for a check, None for a measurement; an exception is a FAIL."""
        section = section or self.section
        self._write({"started": name})
        t = time.time()
        try:
            ok, values = fn()
        except Exception as e:  # one broken path must not hide the others
            ok, values = False, dict(error=f"{type(e).__name__}: {e}"[:400])
        self._write(dict(section=section, name=name, ok=None if ok is None else bool(ok), seconds=round(time.time() - t, 1),
                         **values))


def close(a, b, rtol=RTOL, atol=ATOL):
    return abs(a - b) <= rtol * abs(b) + atol


def rel(a, b):
    """|a - b| / |b| in L2, float64."""
    a, b = a.double().flatten().cpu(), b.double().flatten().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@contextlib.contextmanager
def tf32(on):
    """TF32 for matmuls and convolutions set for a block, then restored to what it was."""
    was = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = was


def flat_update(sd, start):
    return torch.cat([(v.float().cpu() - start[k].float().cpu()).flatten() for k, v in sd.items()])


def setup(rows, hp, dev, st):
    """Digits, their classifier, an EDM teacher trained on them (fp32), its half-trained copy (the
    fake score's start) and its paired set, into the state folder."""
    j = lambda *a: os.path.join(st, *a)  # noqa: E731

    def f():
        train, test = digits.make_data(j("train"))
        clf, acc = digits.train_classifier(train, test, hp["clf_epochs"])
        torch.save(clf.state_dict(), j("clf.pt"))
        mu, sigma = evaluate.stats(evaluate.features([test], clf, rgb=False)[0])
        np.savez(j("ref_stats.npz"), mu=mu, sigma=sigma)
        teacher = ["--stage", "tsm", "--target", "data", "--preset", "tiny", "--arch", hp["arch"], "--data", j("train"),
                   "--num-students", "1", "--batch", "64", "--lr", "2e-3", "--precision", "fp32", "--log-every", "100",
                   "--out", j("teacher"), "--device", dev, "--sample-every", "1000000", "--grad-probe-every", "0"]
        msd.main(teacher + ["--iters", str(hp["teacher_iters"] // 2)])
        shutil.copy(j("teacher", "student.pt"), j("fake_init.pt"))
        msd.main(teacher + ["--iters", str(hp["teacher_iters"]), "--resume"])
        sample.main(["pairs", "--teacher", j("teacher", "student.pt"), "--num", str(hp["pairs"]), "--out", j("pairs.npz"),
                     "--steps", str(hp["heun_steps"]), "--device", dev, "--batch", "256"])
        return True, dict(classifier_accuracy=round(acc, 3))
    rows.run("digits, classifier, teacher (fp32), its half-trained copy and the paired set", f)


def load_setup(st):
    clf = digits.DigitsClassifier()
    clf.load_state_dict(torch.load(os.path.join(st, "clf.pt"), weights_only=True))
    ref = np.load(os.path.join(st, "ref_stats.npz"))
    return dict(clf=clf.eval(), ref_stats=[(ref["mu"], ref["sigma"])], teacher=os.path.join(st, "teacher", "student.pt"),
                fake=os.path.join(st, "fake_init.pt"), pairs=os.path.join(st, "pairs.npz"), data=os.path.join(st, "train"))


def attention(rows, hp, dev, st):
    """Contiguous q, k, v reach SDPA; on CUDA, which fused kernel takes a UNet forward."""
    def strides():
        seen, sdpa = [], edm_unet.F.scaled_dot_product_attention
        edm_unet.F.scaled_dot_product_attention = lambda q, k, v: seen.append([t.stride(-1) for t in (q, k, v)]
                                                                                ) or sdpa(q, k, v)
        try:
            net_forward(hp["attn_preset"], dev, "bf16")
        finally:
            edm_unet.F.scaled_dot_product_attention = sdpa
        return bool(seen) and all(s == [1, 1, 1] for s in seen), dict(calls=len(seen), last_dim_strides=seen[0] if seen else None)
    rows.run(f"q, k, v reaching scaled_dot_product_attention have a last dimension of stride 1 ({hp['attn_preset']})", strides)
    if dev != "cuda":
        return rows.run("fused attention kernels", lambda: (None, dict(status="not run: CUDA only")))
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError as e:
        return rows.run("fused attention kernels", lambda: (None, dict(status=f"not run: torch {torch.__version__}: {e}")))

    def kernels(precision):
        def f():
            took = {}
            for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
                if not hasattr(SDPBackend, name):
                    took[name] = f"not in torch {torch.__version__}"
                    continue
                try:
                    with sdpa_kernel([getattr(SDPBackend, name)]):
                        net_forward(hp["attn_preset"], dev, precision)
                    took[name] = "runs"
                except RuntimeError as e:
                    took[name] = f"refused: {str(e).splitlines()[0][:120]}"
            return any(v == "runs" for v in took.values()), took
        return f
    for precision in ("bf16", "fp16"):
        rows.run(f"a fused kernel takes the {hp['attn_preset']} UNet's attention at {precision}", kernels(precision))


def net_forward(preset, dev, precision, batch=2):
    torch.manual_seed(0)
    D = edm_unet.EDMPrecond(edm_unet.PRESETS[preset]).to(dev).eval()
    cfg = D.cfg
    x = torch.randn(batch, cfg.img_channels, cfg.img_resolution, cfg.img_resolution, device=dev)
    with torch.no_grad(), sample.amp(dev, sample.AUTOCAST[precision]):
        return D(x, torch.ones(batch, device=dev), torch.zeros(batch, dtype=torch.long, device=dev))


def pipeline(rows, hp, dev, st, path, precision):
    """DM (separate and stacked), ADM and TSM at one precision on one code path, against fp32 eager
    (whose first-step losses and routed samples the fp32 eager group saves in the state folder)."""
    s = load_setup(st)
    j = lambda *a: os.path.join(st, *a)  # noqa: E731
    common = ["--device", dev, "--sample-every", "1000000", "--grad-probe-every", "0", "--log-every", "1"]
    base = ["--teacher", s["teacher"], "--pairs", s["pairs"], "--data", s["data"], "--num-students", "2",
            "--iters", str(hp["iters"]), "--batch", str(hp["batch"]), "--lr", "2e-4", "--reg-loss", "mse", *common]
    fake = ["--fake-init", s["fake"]]  # the fake score apart from G = teacher: Eq. 6's term is not zero at step 1
    runs = {  # name -> (argv per process, folders with a student.pt)
        "dm, K = 2 separate": ([[*fake, "--partition", str(k)] for k in (0, 1)], ["p0", "p1"]),
        "dm, --all-students": ([[*fake, "--all-students"]], ["p0", "p1"]),
        "adm": ([[*fake, "--stage", "adm", "--init", s["teacher"], "--head-width", "32"]], ["."]),
        "tsm": ([["--stage", "tsm", "--preset", "tiny", "--arch", hp["tsm_arch"]]], ["."]),
    }  # each process writes into --out: the run's folder, or its p{k} among separate runs
    ref_file = j("reference.json")
    ref = json.load(open(ref_file)) if os.path.exists(ref_file) else {}
    seeds = f"100000-{100000 + hp['samples'] - 1}"
    for name, (argvs, folders) in runs.items():
        flags = [f for f in PATHS[path] if not (name == "dm, --all-students" and f == "--channels-last")]
        out = j(f"{path}_{precision}_{re.sub(r'[^a-z0-9]+', '_', name)}")

        def one():
            first, every = {}, []
            for i, argv in enumerate(argvs):
                folder = os.path.join(out, f"p{i}") if len(argvs) > 1 else out
                msd.main(base + ["--precision", precision] + flags + argv + ["--out", folder])
                log = [json.loads(line) for line in open(os.path.join(folder, "log.jsonl"))]
                for k in COMPARED:
                    if k in log[0]:
                        first[f"{k}{i or ''}"] = log[0][k]  # student 1 of the separate runs: "dm1", ...
                        every += [row[k] for row in log]
            ok, values = bool(np.isfinite(every).all()), dict(first_step=first)
            if path == "eager" and precision == "fp32":
                ref[name] = first
                zero = [k for k, v in first.items() if k.startswith("dm") and v == 0]
                if zero:  # a reference that holds 0 cannot tell a right low-precision run from a wrong one
                    ok, values["error"] = False, f"Eq. 6's term is exactly 0 at step 1 ({zero}): nothing to compare"
            elif name not in ref:
                return False, dict(values, error="no fp32 eager reference (its group did not finish)")
            values["off_tolerance"] = bad = [k for k, v in first.items() if not close(v, ref[name][k])]
            if name.startswith("dm"):  # routed sampling and FD of the two students
                imgs = os.path.join(out, "samples")
                sample.main(["students", "--ckpt", *[os.path.join(out, f, "student.pt") for f in folders],
                             "--seeds", seeds, "--out", imgs, "--device", dev, "--precision", precision])
                x, y = digits.read(imgs)
                values["fd_to_data"] = round(digits.measure(s["clf"], x, y, s["ref_stats"])[0][0], 3)
                xf, ref_x = x.float() / 127.5 - 1, j(f"samples_{re.sub(r'[^a-z0-9]+', '_', name)}.pt")
                if path == "eager" and precision == "fp32":
                    torch.save(xf, ref_x)
                values["pixel_diff"] = round(float((xf - torch.load(ref_x, weights_only=True)).abs().mean()), 4)
                ok = ok and values["pixel_diff"] <= PIXEL_TOL
            return ok and not bad, values
        rows.run(f"{name}, {precision}, {path}", one)
        with open(ref_file, "w") as f:
            json.dump(ref, f)


def resume_check(rows, hp, dev, st):
    """2 steps, --resume to 4, against 4 straight steps: bit for bit under --deterministic, within
    RESUME_TOL of the update without it."""
    s = load_setup(st)
    base = ["--teacher", s["teacher"], "--fake-init", s["fake"], "--pairs", s["pairs"], "--device", dev,
            "--batch", str(hp["batch"]), "--reg-loss", "mse", "--lr", "2e-4", "--log-every", "1", "--sample-every",
            "1000000", "--grad-probe-every", "0", "--num-students", "2"]
    starts = {f"{m}.{k}": v for m, path in (("net", s["teacher"]), ("fake", s["fake"]))  # G starts as the teacher
              for k, v in edm_unet.load_model(path)[0].state_dict().items()}

    def one(precision, deterministic):
        def f():
            extra = ["--precision", precision] + (["--deterministic"] if deterministic else [])
            run = lambda name, iters, *x: msd.main(base + extra + ["--iters", str(iters), "--out",  # noqa: E731
                                                                   os.path.join(st, f"resume_{precision}_{deterministic}_{name}"), *x])
            a = run("straight", 4)
            run("resumed", 2)
            c = run("resumed", 4, "--resume")
            nets = lambda r: {f"{m}.{k}": v for m in ("net", "fake") for k, v in r[m].state_dict().items()}  # noqa: E731
            diff = float((flat_update(nets(a), starts) - flat_update(nets(c), starts)).abs().max())
            rel_diff = rel(flat_update(nets(c), starts), flat_update(nets(a), starts))
            ok = diff == 0 if deterministic else rel_diff <= RESUME_TOL
            return ok, dict(max_abs_weight_diff=diff, relative_update_diff=f"{rel_diff:.2e}", bit_exact=diff == 0)
        return f
    for precision in PRECISIONS if hp is FULL else ("fp16",):  # --quick: the scalers' path only
        for det in (True, False):
            rows.run(f"kill at step 2, resume to 4, {precision}, "
                     + ("--deterministic: bit for bit" if det else f"default kernels: within {RESUME_TOL:g}"), one(precision, det))


def torchrun_check(rows, hp, dev, st):
    """torchrun --nproc_per_node=N (all GPUs; 2 gloo processes on a CPU) against one process."""
    n = torch.cuda.device_count() if dev == "cuda" else 2
    if n < 2:
        return rows.run("torchrun against one process", lambda: (None, dict(status="not run: one GPU")))
    s = load_setup(st)

    def f():
        argv = ["--teacher", s["teacher"], "--fake-init", s["fake"], "--pairs", s["pairs"], "--device", dev,
                "--batch", str(4 * n), "--reg-loss", "mse", "--iters", "2", "--lr", "2e-4", "--precision", "fp32",
                "--sample-every", "1000000", "--grad-probe-every", "0", "--num-students", "2"]
        one = msd.main(argv + ["--out", os.path.join(st, "tr_one")])
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", f"--master_port={port}",
                        os.path.join(ROOT, "msd.py"), *argv, "--out", os.path.join(st, "tr_n")],
                       check=True, cwd=ROOT, capture_output=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        start = edm_unet.load_model(s["teacher"])[0].state_dict()
        many = edm_unet.load_model(os.path.join(st, "tr_n", "student.pt"))[0].state_dict()
        d1, dn = flat_update(one["net"].state_dict(), start), flat_update(many, start)
        r = rel(dn, d1)
        return r < UPDATE_TOL and bool(d1.norm() > 0), dict(processes=n, relative_update_difference=f"{r:.2e}")
    rows.run(f"torchrun --nproc_per_node={n} against one process", f)


def heun_check(rows, hp, dev, st):
    """EDM's per-seed Heun images in float32: on CUDA the GPU's against the CPU's (TF32 off for the
    comparison, then restored); on a CPU, batches of 32 against batches of 5 (seeds, not batches,
    decide an image)."""
    s = load_setup(st)

    def f():
        runs = [("cpu", 32), (dev, 32)] if dev == "cuda" else [("cpu", 32), ("cpu", 5)]
        imgs, msd_tf32 = [], (True, True)  # msd.py turns TF32 on: the state the comparison must give back
        with tf32(msd_tf32[0]):
            with tf32(False):
                for i, (d, batch) in enumerate(runs):
                    out = os.path.join(st, f"heun_{i}")
                    sample.main(["teacher", "--teacher", s["teacher"], "--seeds", "0-31", "--out", out, "--device", d,
                                 "--steps", str(hp["heun_steps"]), "--batch", str(batch)])
                    imgs.append(digits.read(out))
            restored = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == msd_tf32
        diff = (imgs[1][0].int() - imgs[0][0].int()).abs().float()
        same_labels = torch.equal(imgs[0][1], imgs[1][1])
        return same_labels and restored and float(diff.mean()) <= HEUN_TOL, dict(
            mean_abs_uint8=round(float(diff.mean()), 3), max_abs_uint8=int(diff.max()), same_labels=same_labels,
            tf32_restored=restored)
    rows.run("sample.py teacher, seeds 0-31, " + ("cuda against cpu" if dev == "cuda" else "batch 5 against 32, cpu"), f)


# ----------------------------------------------------------------------------- speed, memory, outputs

def peak(dev):
    return round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if dev == "cuda" else None


def speed(rows, hp, dev, compiled):
    """bench/unet.py's timing per preset and batch, each output against fp32 eager's on the same input:
    eager (fp32, and bf16 with channels-last) or the optimised path (bf16, channels-last, compiled)."""
    device = torch.device(dev)
    for preset in hp["presets"]:
        for batch in hp["batches"]:
            if compiled and not any((preset, batch) == key[:2] for key in TARGETS):
                continue  # compiled: the targets' rows only
            paths = [("bf16", True, True)] if compiled else [("fp32", False, False), ("bf16", False, True)]
            ref = None
            for precision, comp, cl in paths:
                def f():
                    nonlocal ref
                    if dev == "cuda":
                        torch.cuda.empty_cache(), torch.cuda.reset_peak_memory_stats()
                    if ref is None and precision != "fp32":  # compiled rows: one fp32 eager forward as the reference
                        ref = unet.bench(preset, batch, device, "fp32", False, 0, 1, False)[2]
                    t_f, t_fb, out = unet.bench(preset, batch, device, precision, comp, 2 if comp else 1, 5, cl)
                    row = dict(forward_ms=round(t_f * 1e3, 2), forward_img_s=round(batch / t_f, 1),
                               fwd_bwd_ms=round(t_fb * 1e3, 2), fwd_bwd_img_s=round(batch / t_fb, 1), peak_gib=peak(dev))
                    if precision == "fp32" and not comp:
                        ref = out
                        return None, row
                    row["out_vs_fp32_eager"] = f"{rel(out, ref):.2e}"
                    return rel(out, ref) <= OUT_TOL, row
                path = f"{precision}{', compiled' if comp else ''}{', channels-last' if cl else ''}"
                rows.run(f"{preset}, batch {batch}, {path}", f)


def dm_step_row(rows, hp, dev, compiled):
    import dm_step  # imports lpips when the regression loss is LPIPS

    def g():
        if dev == "cuda":
            torch.cuda.empty_cache(), torch.cuda.reset_peak_memory_stats()
        reg = ["--lpips-size", str(hp["lpips_size"])] if hp["lpips_size"] else ["--reg-loss", "mse"]
        log = dm_step.main(["--device", dev, "--preset", hp["dm_preset"], "--batch", str(hp["dm_batch"]),
                            "--precision", hp["dm_precision"], *reg, "--steps", "3" if hp is FULL else "1",
                            *(["--compile", "--channels-last"] if compiled else [])])
        return None, dict(ms_per_iter=log["ms_per_iter"], img_per_s=log["img_per_s"], peak_gib=log.get("peak_gib"))
    rows.run(f"DM step {hp['dm_preset']}, batch {hp['dm_batch']}, {hp['dm_precision']}"
             f"{', compiled, channels-last' if compiled else ''}", g)


def memory_check(rows, hp, dev, st):
    """bench/memory.py's count on fake tensors against the CUDA allocator's peak; on a CPU, against the
    same count over a real CPU step (the CPU's autocast policy for both)."""
    import memory
    for stage, preset, batch in hp["memory"]:
        def f():
            est = memory.estimate(stage, preset, batch, "bf16", cuda_groupnorm=dev == "cuda")
            if dev == "cuda":
                got = memory.measure(stage, preset, batch, "bf16")
            else:
                with tempfile.TemporaryDirectory() as t:
                    got = memory.one_step(memory.files(t, stage, preset), batch, "bf16", "cpu", True, False).max()
            return abs(got - est["peak"]) <= memory.TOL * got, dict(estimate_gib=round(est["peak"] / 2 ** 30, 3),
                                                                    measured_gib=round(float(got) / 2 ** 30, 3))
        against = "the allocator" if dev == "cuda" else "a real CPU step"
        rows.run(f"{stage} stage, {preset}, {batch} rows per GPU, bf16: bench/memory.py against {against}", f)


def child(group, hp, dev, st):
    rows = Rows(st, {g: section for g, section, *_ in groups(hp, dev, hp is QUICK)}[group])
    if dev == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as msd.py runs
    if group == "setup":
        return setup(rows, hp, dev, st)
    if group == "attention":
        return attention(rows, hp, dev, st)
    if group.startswith("pipeline"):
        _, path, precision = group.split()
        return pipeline(rows, hp, dev, st, path, precision)
    if group in ("speed eager", "speed compiled"):
        return speed(rows, hp, dev, group.endswith("compiled"))
    if group.startswith("dm step"):
        return dm_step_row(rows, hp, dev, group.endswith("compiled"))
    {"resume": resume_check, "torchrun": torchrun_check, "heun": heun_check, "memory": memory_check}[group](rows, hp, dev, st)


# ----------------------------------------------------------------------------- report

def versions():
    """Python and the versions of the packages the check uses ("not installed" where absent)."""
    from importlib import metadata
    out = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "numpy", "scipy", "scikit-learn", "matplotlib", "pillow", "einops", "tqdm",
                 "lpips", "torch-fidelity"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def table(ck):
    lines = [f"# GPU check: {ck.info['device']}", "", f"`{ck.info['command']}`, commit {ck.info['commit']}, "
             + ", ".join(f"{k} {v}" for k, v in ck.info["versions"].items()) + f", {ck.info['seconds']} s. "
             f"Tolerances: step 1's losses and G's gradient norm within {RTOL:.0%} (+ {ATOL:g}) of fp32 eager; routed "
             f"samples within {PIXEL_TOL} mean absolute difference ([-1, 1]); network outputs within {OUT_TOL:g} (relative "
             f"L2) of fp32 eager; resume without --deterministic within {RESUME_TOL:g}; Heun images within {HEUN_TOL} "
             "uint8 levels on average.", "", "## Correctness", "", "| section | check | result | details |",
             "| --- | --- | --- | --- |"]
    result = lambda it: {True: "pass", False: "**FAIL**", None: "-"}[it["ok"]]  # noqa: E731
    for it in ck.items:
        if it["section"] != "speed":
            details = {k: v for k, v in it.items() if k not in ("section", "name", "ok", "first_step")}
            lines.append(f"| {it['section']} | {it['name']} | {result(it)} | {json.dumps(details, default=str)} |")
    lines += ["", "## Speed, memory and outputs", "", "| network | forward ms | forward img/s | fwd+bwd ms | fwd+bwd img/s | "
              "peak GiB | output vs fp32 eager | target (docs/performance.md) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for it in ck.items:
        if it["section"] != "speed":
            continue
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
            lines.append(f"| {it['name']} | {it.get('status') or it.get('error')} | | | | | {result(it)} | |")
        elif "ms_per_iter" in it:
            lines.append(f"| {it['name']} | {it['ms_per_iter']} ms/step | {it['img_per_s']} img/s | | | {it['peak_gib']} | | "
                         f"{target.strip()} |")
        else:
            vs = f"{it['out_vs_fp32_eager']} ({result(it)})" if "out_vs_fp32_eager" in it else "reference"
            lines.append(f"| {it['name']} | {it['forward_ms']} | {it['forward_img_s']} | {it['fwd_bwd_ms']} | "
                         f"{it['fwd_bwd_img_s']} | {it['peak_gib']} | {vs} | {target.strip()} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cuda (default; one GPU or more) or cpu")
    p.add_argument("--quick", action="store_true", help="toy sizes, no compile: checks that every check runs (CI, CPU)")
    p.add_argument("--budget", type=float, default=520, help="seconds for all groups (default 520: a 600-s call with "
                   "start-up and wheels); a group still running then is killed and recorded, later ones as not run")
    p.add_argument("--out", default="", help="results folder (default bench/results/gpu/<device name>)")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)  # internal: run one group in this process
    p.add_argument("--state", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    t0 = time.time()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda asked for, but CUDA is not available (run --device cpu --quick for the CPU version)")
    if args.budget <= 0:
        p.error(f"--budget {args.budget}: expected seconds > 0")
    hp = QUICK if args.quick else FULL
    if args.child:
        child(args.child, hp, args.device, args.state)
        return 0
    if args.device == "cuda":
        name = torch.cuda.get_device_name(0)
    else:
        cpu = digits.cpu_info()
        name = "cpu-" + cpu.get("model name", "unknown") if cpu else "cpu"
    out = args.out or os.path.join(ROOT, "bench", "results", "gpu", re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-"))
    info = digits.save_run(out, "bench/gpu_check.py", argv if argv is not None else sys.argv[1:], 0)  # command, commit, CPU
    info.update(device=name, gpus=torch.cuda.device_count() if args.device == "cuda" else 0,
                cuda=torch.version.cuda if args.device == "cuda" else None, quick=args.quick, budget=args.budget,
                versions=versions(), wheels=os.environ.get("GPU_RUN_WHEELS", "none (not run by bench/gpu_run.sh)"))
    ck = Check(out, args.budget - (time.time() - t0), info)
    if os.path.exists(os.path.join(out, "log.txt")):
        os.remove(os.path.join(out, "log.txt"))
    state = tempfile.mkdtemp(prefix="gpu_check_")
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(f"stopped by signal {signum}"))  # runs the finally below
    flags = ["--device", args.device] + (["--quick"] if args.quick else [])
    try:
        ck.save(t0)
        for group, section, need, needs_setup in groups(hp, args.device, args.quick):
            if needs_setup and not os.path.exists(os.path.join(state, "pairs.npz")):
                ck.add(dict(section=section, name=group, ok=None, status="not run: the set-up did not finish"))
            else:
                ck.run_group(group, section, need, flags, state)
            ck.save(t0)
    finally:
        shutil.rmtree(state, ignore_errors=True)
        ck.save(t0)
    failed = [it["name"] for it in ck.items if it["ok"] is False]
    print(f"\n{len(ck.items)} items, {len(failed)} failed" + (f": {failed}" if failed else "") + f"; results in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
