"""Can the toy's one-step student *represent* the teacher's map? Plain regression, no distillation.

    python bench/toy_fit.py                 # SiLU vs ReLU vs a 2x wider SiLU MLP, ~4 min on 2 CPU cores
    python bench/toy_fit.py --quick         # seconds (used by a test); its numbers mean nothing

A one-step student G(z, y) = D(80 z, 80, y) must send each class's Gaussian noise onto eight
0.005-wide spots: a nearly piecewise-constant map whose pieces meet at sharp borders. This script
fits fresh MLPs of the student's kind (toy2d.ToyDenoiser, EDM preconditioning, random init) to the
teacher's own noise -> sample map on `pairs` Heun pairs by mean squared error, and scores the
fitted map on fresh noise: MSE to the teacher's map, the share of samples on a mode (toy2d.on_mode),
and the histogram l1 to teacher samples. If a network cannot fit the map even when shown the
answer, no distillation loss will make it draw the spots. (It found why the students drew rings:
the README's toy section.)
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import toy2d  # noqa: E402


def fit(teacher_cfg, act, width, pairs, test, iters, lr, batch, seed):
    """Regress a fresh student-shaped MLP onto (z, y) -> teacher sample; -> dict of test metrics."""
    torch.manual_seed(seed)
    cfg = toy2d.ToyConfig(**{**teacher_cfg.__dict__, "act": act, "width": width})
    G = toy2d.ToyDenoiser(1, cfg)
    opt = torch.optim.Adam(G.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters)
    (z, y, x), (z_t, y_t, x_t) = pairs, test
    t0 = time.time()
    for _ in range(iters):
        i = torch.randint(0, len(z), (batch,))
        loss = ((G.generate(z[i], y[i]) - x[i]) ** 2).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        g = G.generate(z_t, y_t)
    return dict(mse=float(((g - x_t) ** 2).sum(1).mean()), on_mode=toy2d.on_mode(g, y_t, cfg),
                l1=toy2d.hist_l1(g, x_t), seconds=time.time() - t0, params=sum(p.numel() for p in G.parameters()))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny settings: checks the script; its numbers mean nothing")
    p.add_argument("--variants", nargs="+", default=["silu:128", "relu:128", "silu:256"],
                   help="act:width of each MLP to fit (default: silu:128 relu:128 silu:256)")
    p.add_argument("--teacher-act", default="relu", choices=("relu", "silu"),
                   help="the teacher whose map is fitted; cached as toy2d.py caches it (default: relu, the DM default)")
    p.add_argument("--out", default="toy_out", help="toy2d.py's folder: its cached teacher is reused (default: toy_out)")
    args = p.parse_args(argv)
    variants = []
    for v in args.variants:
        act, _, width = v.partition(":")
        if act not in ("relu", "silu") or not width.isdigit() or int(width) < 1:
            p.error(f"--variants: expected act:width with act relu or silu and width >= 1, got {v!r}")
        variants.append((act, int(width)))
    q = args.quick
    cfg = toy2d.ToyConfig(act=args.teacher_act, **(dict(teacher_iters=30, width=16, depth=2) if q else {}))
    n, iters, steps = (512, 20, 4) if q else (8000, 3000, cfg.teacher_steps)
    teacher = toy2d.load_or_train_teacher(cfg, os.path.join(args.out, f"teacher_{cfg.act}.pt"))
    gen = torch.Generator().manual_seed(7)
    sets = []
    for _ in range(2):  # training pairs and test noise, n of each, classes balanced
        y = torch.arange(n) % toy2d.NUM_CLASSES
        z = torch.randn(n, 2, generator=gen)
        sets.append((z, y, toy2d.heun_sample(teacher, z, y, steps, cfg)))
    print(f"fitting the {args.teacher_act} teacher's one-step map: {n} pairs, {iters} Adam steps (lr 1e-3, cosine), "
          f"batch 512, seed 0; scored on {n} fresh noises")
    print(f"teacher's own samples: on-mode {toy2d.on_mode(sets[1][2], sets[1][1], cfg):.3f}")
    rows = []
    for act, width in variants:
        r = fit(cfg, act, width, sets[0], sets[1], iters, 1e-3, 512, 0)
        rows.append(dict(act=act, width=width, **r))
        print(f"{act} width {width} ({r['params']:,d} params): MSE to the teacher's map {r['mse']:.2e}, on-mode "
              f"{r['on_mode']:.3f}, l1 {r['l1']:.3f}, {r['seconds']:.0f} s", flush=True)
    if q:
        print("--quick: a smoke test; the numbers above mean nothing at this size.")
    return rows


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        sys.exit(f"error: {e}")
