"""Speed of msd.py's DM training step: ms/iter, img/s, peak memory, and where the time goes.

    python bench/dm_step.py                                   # CPU: tiny preset, batch 8, fp32
    python bench/dm_step.py --device cuda --preset B --batch 32 --precision bf16 [--compile] [--lpips-size 224]
    python bench/dm_step.py --arch "model_channels=32,img_resolution=8,attn_resolutions=(4,)" \
        --student-arch "model_channels=8,img_resolution=8,attn_resolutions=(4,)" --reg-loss mse --batch 32 --threads 1
                                                              # one step of bench/capacity.py's smallest students
    python bench/dm_step.py ... --stack 1 2 5 10             # K students: K single steps vs one stacked step
    python bench/dm_step.py ... --loss sid                    # the same step with SiD's loss (msd.py --loss sid)

Runs the real loop (`msd.main`) on a random-weight teacher of the preset and a small random paired
set (no download: LPIPS uses a random VGG of the real architecture, same cost as the pretrained
one). --arch / --student-arch override the teacher's and the student's (G and the fake score start
from it, as after TSM) architecture. The first --steps iterations are warm-up (and compilation);
the figures are from the next --steps. --parts also times each part of the step on its own
(synchronised), for a profile table. --stack K ... times, for each K, K students stepped one after
another (K x one student's step), all K as one stack with K fake scores (msd.py --all-students) and
with one shared fake score (--shared-fake), and prints the ratios: --rounds rounds, the three timed one after
another in each round (so a slow spell of the machine falls on all three), the median of each and the min-max of
the per-round ratios.
"""
import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dmd  # noqa: E402
import edm_unet  # noqa: E402
import msd  # noqa: E402
import sample  # noqa: E402


def fake_pairs(cfg, path, n=256):
    """A paired-set file of the right shapes (random images: speed does not depend on them)."""
    import numpy as np
    g = torch.Generator().manual_seed(0)
    shape = (n, cfg.img_channels, cfg.img_resolution, cfg.img_resolution)
    np.savez(path, seeds=np.arange(n), labels=torch.randint(cfg.label_dim, (n,), generator=g).numpy(),
             noise=torch.randn(shape, generator=g).numpy(), images=torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).numpy())


def timed(fn, device, reps=5):
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t) / reps


def parts(args, teacher_path, device):
    """Each part of one DM step alone, in ms (same shapes and precision as the loop)."""
    import lpips
    G_net = edm_unet.load_model(teacher_path)[0].to(device).eval()
    T, fake = copy.deepcopy(G_net).requires_grad_(False), copy.deepcopy(G_net)
    B, cfg = args.batch, G_net.cfg
    maybe_compile = torch.compile if args.compile else (lambda m: m)
    T, fake_c, G = maybe_compile(T), maybe_compile(fake), edm_unet.OneStep(maybe_compile(G_net))
    lp = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).to(device).eval().requires_grad_(False)
    shape = (B, cfg.img_channels, cfg.img_resolution, cfg.img_resolution)
    z, y, s = torch.randn(shape, device=device), torch.randint(cfg.label_dim, (B,), device=device), torch.full((B,), 2.0, device=device)
    ctx = lambda: sample.amp(device.type, sample.AUTOCAST[args.precision])
    opt = torch.optim.AdamW(G_net.parameters(), lr=1e-9)

    def g_fwd_bwd():
        with ctx():
            G(torch.cat([z, z]), torch.cat([y, y])).float().mean().backward()

    def no_grad(m):
        def f():
            with torch.no_grad(), ctx():
                m(z, s, y)
        return f

    def fake_fwd_bwd():
        with ctx():
            dmd.denoise_loss(fake_c, z, s, y, 0.5).backward()

    def lpips_fwd_bwd():
        x = z.clone().requires_grad_(True)
        with ctx():
            dmd.regression_loss(x, z, lp, args.lpips_size).backward()

    def adamw():
        for p in G_net.parameters():
            p.grad = torch.zeros_like(p) if p.grad is None else p.grad
        torch.nn.utils.clip_grad_norm_(G_net.parameters(), 10.0)
        opt.step()

    rows = [("G forward+backward (DM + regression, 2B images)", timed(g_fwd_bwd, device)),
            ("teacher forward (Eq. 6)", timed(no_grad(T), device)),
            ("fake-score forward (Eq. 6)", timed(no_grad(fake_c), device)),
            ("fake-score forward+backward (Eq. 8)", timed(fake_fwd_bwd, device)),
            (f"LPIPS-VGG forward+backward at {args.lpips_size} px", timed(lpips_fwd_bwd, device)),
            ("clip + AdamW step (one net)", timed(adamw, device))]
    total = sum(ms for _, ms in rows) + rows[-1][1]  # two optimiser steps per iteration
    print(f"\n| part (batch {B}, {args.precision}{', compiled' if args.compile else ''}) | ms | share |\n| --- | --- | --- |")
    for name, ms in rows:
        print(f"| {name} | {ms:.1f} | {100 * ms / total:.0f}% |")
    print(f"| sum of parts (AdamW counted twice) | {total:.1f} | |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=8, help="global batch (one process)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--lpips-size", type=int, default=224)
    p.add_argument("--arch", default="", help="overrides of the teacher's preset, e.g. model_channels=32,img_resolution=8")
    p.add_argument("--student-arch", default="", help="a smaller student (G and fake score): overrides of the preset")
    p.add_argument("--reg-loss", default="lpips", choices=["lpips", "mse"], help="regression loss (Eq. 9): LPIPS-VGG or MSE")
    p.add_argument("--loss", default="dm", choices=["dm", "sid"], help="G's loss: DM's Eq. 6 or SiD's (msd.py --loss)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--steps", type=int, default=5, help="warm-up steps, then the same number measured")
    p.add_argument("--parts", action="store_true", help="also time each part of the step alone")
    p.add_argument("--stack", type=int, nargs="+", default=None,
                   help="K values: K sequential single-student steps vs one stacked step (separate / shared fake)")
    p.add_argument("--rounds", type=int, default=5, help="with --stack: rounds, the three timings alternating in each; "
                                                         "median and min-max over them")
    p.add_argument("--results", default="", help="with --stack: also write the table and run.json into this folder")
    args = p.parse_args(argv)
    if args.parts and args.student_arch:
        p.error("--parts times teacher-shaped networks only; drop --student-arch to use it")
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        if args.threads:
            torch.set_num_threads(args.threads)
        D = edm_unet.build(args.preset, **edm_unet.parse_overrides(args.arch))
        teacher = os.path.join(tmp, "teacher.pt")
        edm_unet.save_model(D, teacher)
        fake_pairs(D.cfg, os.path.join(tmp, "pairs.npz"))
        init = []
        if args.student_arch:
            init = ["--init", os.path.join(tmp, "student.pt")]
            edm_unet.save_model(edm_unet.build(args.preset, **edm_unet.parse_overrides(args.student_arch)), init[1])
        label_dim = D.cfg.label_dim
        del D

        def step(out, *extra):
            return msd.main(["--teacher", teacher, "--pairs", os.path.join(tmp, "pairs.npz"), "--out", os.path.join(tmp, out),
                             "--batch", str(args.batch), "--precision", args.precision, "--device", args.device,
                             "--lpips-random", "--lpips-size", str(args.lpips_size), "--iters", str(2 * args.steps),
                             "--log-every", str(args.steps), "--grad-probe-every", "0", "--sample-every", "1000000",
                             "--ckpt-every", "1000000", "--reg-loss", args.reg_loss, "--loss", args.loss, *init,
                             *(["--compile"] if args.compile else []),
                             *(["--channels-last"] if args.channels_last else []), *extra])["log"]
        log = step("out", "--num-students", "1")
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        nets = args.preset + (f" {args.arch}" if args.arch else "") + (f", student {args.student_arch}" if args.student_arch else "")
        reg = f"LPIPS at {args.lpips_size} px" if args.reg_loss == "lpips" else "MSE regression"
        print(f"\n{'SiD' if args.loss == 'sid' else 'DM'} step, {nets}, batch {args.batch}, {args.precision}{', compiled' if args.compile else ''}, {reg}, "
              f"{name}, torch {torch.__version__}: {log['ms_per_iter']} ms/iter, {log['img_per_s']} img/s"
              + (f", peak {log['peak_gib']} GiB" if "peak_gib" in log else ""))
        if args.parts:
            parts(args, teacher, device)
        if args.stack:
            if max(args.stack) > label_dim or min(args.stack) < 1:
                p.error(f"--stack: K must be 1..{label_dim} (the preset's classes), got {args.stack}")
            if args.rounds < 1:
                p.error(f"--rounds: at least 1, got {args.rounds}")
            t0, lines = time.time(), [f"| K students (batch {args.batch} each) | K sequential steps, ms | stacked, K fake "
                                      f"scores, ms | speed-up | stacked, one shared fake score, ms | speed-up |",
                                      "| --- | --- | --- | --- | --- | --- |"]
            print("\n" + "\n".join(lines))
            import digits  # noqa: E402  (the benches' timing spread and run.json writer)
            rows = []
            for K in args.stack:
                t = dict(sequential=[], stacked=[], shared=[])
                for _ in range(args.rounds):  # the three in turn, so a slow spell falls on all of them
                    t["sequential"].append(K * step(f"seq{K}", "--num-students", str(K))["ms_per_iter"])  # one student, K times
                    t["stacked"].append(step(f"sep{K}", "--num-students", str(K), "--all-students")["ms_per_iter"])
                    t["shared"].append(step(f"shr{K}", "--num-students", str(K), "--all-students", "--shared-fake",  # student-
                                            *(["--fake-init", init[1]] if init else []))["ms_per_iter"])  # sized, as the K fakes start
                up = {k: [a / b for a, b in zip(t["sequential"], t[k])] for k in ("stacked", "shared")}  # per round
                rows.append(dict(K=K, rounds=t, **{k: statistics.median(v) for k, v in t.items()}))
                lines.append(f"| {K} | {digits.spread(t['sequential'])} | {digits.spread(t['stacked'])} | "
                             f"{digits.spread(up['stacked'], '.2f')}x | {digits.spread(t['shared'])} | {digits.spread(up['shared'], '.2f')}x |")
                print(lines[-1], flush=True)
            log = dict(log, stack=rows)
            if args.results:
                os.makedirs(args.results, exist_ok=True)
                with open(os.path.join(args.results, "table.md"), "w") as f:
                    f.write(f"DM step of {nets}, {reg}, {args.precision}, {name}, {torch.get_num_threads()} thread(s), "
                            f"ms per step of all K students: median [min, max] of {args.rounds} rounds, each the mean over {args.steps} "
                            f"steps after {args.steps} of warm-up, the three columns timed in turn within each round; a "
                            f"speed-up is the median [min, max] of the rounds' ratios. Machine: {digits.cpu_model()}.\n\n"
                            + "\n".join(lines) + "\n")
                digits.save_run(args.results, "bench/dm_step.py", argv if argv is not None else sys.argv[1:], time.time() - t0)
        return log


if __name__ == "__main__":
    main()
