"""The training plumbing under msd.py: ranks, random streams, micro-batches, optimiser steps, logs,
resume files and the command line. Nothing here is MSD; msd.py holds the method.

Loop conventions (all stages). `--precision bf16|fp16|fp32`: autocast around the forwards (CUDA
or CPU), one GradScaler per optimiser for fp16 only (losses scaled before every backward, gradients
unscaled before clipping); the preconditioning, EDM's float32 layers (edm_unet.py), the GAN head,
the DM gradient's normaliser and the loss sums stay float32. `--compile`; TF32 on; DDP under
torchrun (NCCL on GPU, gloo on CPU); `--micro-batch` accumulates gradients (the global `--batch`
is split over ranks first). Every random draw of a step is a function of (seed, step, stream)
(`step_seed`) and every rank draws the global batch and takes its slice, so a resumed run
continues bit for bit where the kernels are deterministic (the CPU; CUDA with `--deterministic`;
CUDA without it only within rounding, which bench/gpu_check.py measures), and the world size
changes a result only through float summation order
(TSM's dropout is seeded per global micro-batch, so it too is the same for any world size at the
same --micro-batch). Rank 0 logs every `--log-every` steps (each loss term, both gradient norms,
lr, ms/iter, img/s, skipped steps, peak GPU memory) to stdout and log.jsonl, and every
`--grad-probe-every` steps each weighted loss term's gradient norm on G (for balancing
--lambda-reg). A non-finite gradient skips the step; `--max-bad-steps` in a row stop the run.

Resume contract. Every `--ckpt-every` steps rank 0 writes resume-XXXXXXXX.pt atomically (temp
file, then rename; the last two are kept) and student.pt. `--resume` loads the newest file that
loads: a corrupt or truncated newer one is renamed `.corrupt` once an older one loads; when files
exist but none loads, the run stops with an error naming them and overwrites nothing; when --out
holds none, it says so in one line and starts fresh. A resume file of another stage or partition
is refused.
"""
import argparse
import contextlib
import dataclasses
import glob
import inspect
import json
import os
import re
import time
import typing

import torch
import torch.distributed as dist

import curves
import edm_unet
import sample
import stack


# ----------------------------------------------------------------------------- ranks and micro-batches

def setup_dist(cfg):
    """(rank, world, device, per-rank batch, micro-batch) from torchrun's environment; NCCL on GPU, gloo on CPU."""
    if cfg.deterministic:  # before the first cuBLAS call; ops with no deterministic CUDA kernel warn (warn_only)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(cfg.deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = cfg.deterministic
    rank, world, device = sample.dist_info(cfg.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if cfg.batch % world:
        raise ValueError(f"--batch {cfg.batch} does not split over {world} ranks")
    per_rank = cfg.batch // world
    micro = cfg.micro_batch or per_rank
    if per_rank % micro:
        raise ValueError(f"--micro-batch {micro} does not divide the per-rank batch {per_rank}")
    if cfg.all_students and (world > 1 or micro != per_rank):
        raise ValueError("--all-students runs in one process without --micro-batch (so far)")
    if cfg.batch // micro > SHARED_FAKE_STREAM - DROPOUT_STREAM:
        raise ValueError(f"--batch {cfg.batch} in micro-batches of {micro}: expected at most "
                         f"{SHARED_FAKE_STREAM - DROPOUT_STREAM} micro-batches per step (a bit field of step_seed)")
    return rank, world, device, per_rank, micro


def no_sync(r, model, i):
    """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulated step."""
    return model.no_sync() if r.world > 1 and i < r.accum - 1 else contextlib.nullcontext()


def micro_batches(r, b):
    """This rank's slice of the global batch, in `accum` micro-batches: yields (i, dict)."""
    lo = r.rank * r.per_rank
    for i in range(r.accum):
        yield i, {k: v[lo + i * r.micro: lo + (i + 1) * r.micro] for k, v in b.items()}


def amp(cfg, device):
    """The run's autocast context (none for fp32)."""
    return sample.amp(device.type, sample.AUTOCAST[cfg.precision])


def real_batch(real, idx, device):
    """Real images (B, C, H, W) in [-1, 1] and their labels, from an ImageFolder."""
    items = [real[i] for i in idx.tolist()]
    return (sample.from_uint8(torch.stack([x for x, _ in items]).to(device)),
            torch.tensor([y for _, y in items], device=device))


def load_lpips(random_vgg, seed, device):
    """LPIPS-VGG for Eq. 9, frozen. Its VGG16 weights are torchvision's, downloaded on first use:
    local rank 0 of each machine fetches them while the other ranks wait, then those load from the
    cache. A failed load (offline, no cached file) stops every rank with one line before any step."""
    try:
        import lpips
    except ImportError:
        raise ValueError("--reg-loss lpips needs the lpips package (pip install lpips); or use --reg-loss mse") from None

    def build():
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # the random VGG (--lpips-random) and LPIPS's own layers: the same on every rank
            return lpips.LPIPS(net="vgg", pnet_rand=random_vgg, verbose=False).to(device).eval().requires_grad_(False)
    first, fn, err = int(os.environ.get("LOCAL_RANK", 0)) == 0, None, None
    if first:
        try:
            fn = build()
        except Exception as e:  # a download error's type depends on where it failed (URLError, OSError, ...)
            err = (f"LPIPS could not load torchvision's VGG16 weights ({type(e).__name__}: {e}). They download once "
                   f"into {torch.hub.get_dir()}/checkpoints; offline, copy vgg16-397923af.pth there, or use "
                   f"--reg-loss mse (or --lpips-random, LPIPS on a random VGG, for tests and timing only)")
    if dist.is_initialized():  # also the barrier: no other rank reads the cache before rank 0 has filled it
        errs = [None] * dist.get_world_size()
        dist.all_gather_object(errs, err)
        err = next((e for e in errs if e), None)
    if err:
        raise ValueError(err)
    return fn if first else build()


# ----------------------------------------------------------------------------- one step's randomness

MAX_FAKE_STEPS = 255    # streams 1..255: the fake score's extra batches (DMD2's TTUR)
DROPOUT_STREAM = 256    # streams 256 + i: dropout of global micro-batch i (tsm)
SHARED_FAKE_STREAM = 2048  # streams 2048 + s: the shared fake score's Eq. 8 draws of stream s (--shared-fake)
MAX_STREAM = 4096       # streams are a 12-bit field


def step_seed(seed, step, stream):
    """One 64-bit seed per (seed, step, stream), never the same for two triples.

    Stream 0 is G's batch, 1 + j the fake score's j-th extra batch, DROPOUT_STREAM + i the dropout
    of micro-batch i, SHARED_FAKE_STREAM + s the shared fake score's draws for stream s. The compact form seed * 1_000_003 + 16 step + stream is one-to-one while
    stream < 16 and step < 62,500 (every measured result in the docs drew from it); outside that
    range the seed is 2^63 + bit fields (seed: 19 bits, step: 32, stream: 12), above every compact
    value. check_seed_fields bounds --seed, --iters and --fake-steps-per-gen to fit.
    """
    if stream < 16 and step < 62_500:
        return seed * 1_000_003 + 16 * step + stream
    return (1 << 63) | (seed << 44) | (step << 12) | stream


def rng(cfg, step, stream, device):
    """All randomness of a step comes from (seed, step, stream): a resumed run draws what an
    uninterrupted one would, and every rank draws the same *global* batch, then takes its slice."""
    return torch.Generator(device).manual_seed(step_seed(cfg.seed, step, stream))


# ----------------------------------------------------------------------------- updates and their logs

def backward(loss, scaler):
    """loss.backward(), through the optimiser's GradScaler under fp16 (gradients scaled up so the
    half-precision backward does not underflow; optimizer_step unscales them before clipping)."""
    (scaler.scale(loss) if scaler is not None else loss).backward()


def optimizer_step(cfg, module, opt, scaler):
    """Unscale (fp16), clip to cfg.grad_clip, step unless the gradient is not finite. -> (norm, ok).
    A stack clips each student's norm on its own and skips the step of all K when any is not finite."""
    if scaler is not None:
        scaler.unscale_(opt)
    norm = stack.clip_grad_norm_(module, cfg.grad_clip)
    ok = bool(torch.isfinite(norm))  # the one host sync per update
    if scaler is not None:
        scaler.step(opt)  # skips by itself on inf
        scaler.update()
    elif ok:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return norm.detach(), ok


def warmup_lr(r, step):
    """DMD2's constant_with_warmup: lr * min(1, step / warmup) for both optimisers (a function of step)."""
    lr = r.cfg.lr * min(1.0, step / r.cfg.warmup) if r.cfg.warmup else r.cfg.lr
    for opt in (r.opt_net, r.opt_critic):
        for group in opt.param_groups if opt is not None else ():
            group["lr"] = lr
    return lr


def add_terms(acc, terms, scale):
    for k, v in terms.items():
        acc[k] = acc.get(k, 0) + v.detach().float() / scale


def log_terms(r, step):
    """Rank 0: one log line (mean of each term since the last line, lr, speed, skipped steps, peak
    GPU memory) to stdout and log.jsonl; every rank then restarts its sums."""
    cfg = r.cfg
    if r.master:
        dt, n = time.time() - r.t_last, step - r.n_last
        r.log = {"step": step, **{k: float(f"{float(v) / n:.4g}") for k, v in r.terms_acc.items()},
                 "lr": float(f"{r.lr:.4g}"), "ms_per_iter": round(1000 * dt / n, 1),
                 "images": cfg.batch * n, "img_per_s": float(f"{cfg.batch * n / dt:.4g}"),  # one student's batches
                 "skipped": r.skipped}
        if cfg.all_students:  # the K x B images of a stacked step
            r.log["images_all"] = cfg.num_students * cfg.batch * n
            r.log["img_per_s_all"] = float(f"{cfg.num_students * cfg.batch * n / dt:.4g}")
        if r.device.type == "cuda":
            r.log["peak_gib"] = round(torch.cuda.max_memory_allocated(r.device) / 2 ** 30, 2)
        print(" ".join(f"{k} {v}" for k, v in r.log.items()), flush=True)
        append_log(cfg.out, r.log)
    r.t_last, r.n_last, r.terms_acc = time.time(), step, {}


def append_log(out, row):
    with open(os.path.join(out, "log.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


def draw_curves(out):
    """curves.png of the run so far (curves.py), once the log holds two rows (a curve needs two points)."""
    log_path = os.path.join(out, "log.jsonl")
    if os.path.exists(log_path) and sum(1 for _ in open(log_path)) >= 2:
        curves.plot([out], os.path.join(out, "curves.png"))


# ----------------------------------------------------------------------------- resume files

def save_resume(cfg, step, state, keep=2):
    """Atomic resume file, then prune old ones: a crash at any point leaves a loadable checkpoint."""
    path = os.path.join(cfg.out, f"resume-{step:08d}.pt")
    edm_unet.atomic_save({"config": dataclasses.asdict(cfg), "step": step, **state}, path)
    for old in sorted(glob.glob(os.path.join(cfg.out, "resume-*.pt")))[:-keep]:
        os.remove(old)


def load_resume(cfg, master=True):
    """Newest loadable resume file -> (checkpoint, path); (None, None) when --out holds none.

    A corrupt newer file is renamed `.corrupt` once an older one loads. When files exist but none
    loads, stop with an error: starting over would overwrite student.pt and the evidence.
    """
    paths = sorted(glob.glob(os.path.join(cfg.out, "resume-*.pt")), reverse=True)
    corrupt = []
    for path in paths:
        try:
            ckpt = edm_unet.load_file(path)
        except FileNotFoundError:
            continue  # renamed by rank 0 meanwhile
        except ValueError as e:
            print(f"warning: {e}; trying the previous checkpoint")
            corrupt.append(path)
            continue
        for bad in corrupt if master else []:
            os.replace(bad, bad + ".corrupt")  # out of the rotation, kept for inspection
        return ckpt, path
    if corrupt:
        raise ValueError(f"--resume: none of the resume files in {cfg.out!r} loads ({', '.join(map(os.path.basename, corrupt))} "
                         f"are corrupt or truncated); nothing was overwritten. Move them away to start afresh")
    return None, None


def train_state(r):
    """What a resume file holds besides the config and step: nets, optimisers, scalers, EMA, counters."""
    return {"owned": r.owned, "partitions": r.partitions, "skipped": r.skipped,
            "net": r.net.state_dict(), "opt_net": r.opt_net.state_dict(),
            "critic": r.critic.state_dict() if r.critic is not None else None,
            "opt_critic": r.opt_critic.state_dict() if r.critic is not None else None,
            "scalers": [s.state_dict() if s is not None else None for s in r.scalers],
            "ema": r.ema.state_dict() if r.ema is not None else None}


def resume(r):
    """Restore nets, optimisers, scalers, EMA, step and counters from the newest loadable resume file."""
    cfg = r.cfg
    ckpt, path = load_resume(cfg, r.master)
    if ckpt is None:
        if r.master:
            print(f"--resume: no resume-*.pt in {cfg.out!r}; starting fresh")
        return
    owned = ckpt["owned"] if "owned" in ckpt else (  # files written before "owned": one run's flat "partition"
        ckpt["partition"] if ckpt["config"].get("all_students") else [ckpt["partition"]])
    if owned != r.owned or ckpt["config"]["stage"] != cfg.stage:
        raise ValueError(f"{path} is stage {ckpt['config']['stage']} with classes {owned[:5]}...; "
                         f"this run is stage {cfg.stage} with {r.owned[:5]}...")
    r.net.load_state_dict(ckpt["net"]), r.opt_net.load_state_dict(ckpt["opt_net"])
    if r.critic is not None:
        r.critic.load_state_dict(ckpt["critic"]), r.opt_critic.load_state_dict(ckpt["opt_critic"])
    for sc, st in zip(r.scalers, ckpt["scalers"]):
        if sc is not None and st is not None:
            sc.load_state_dict(st)
    if r.ema is not None and ckpt.get("ema") is not None:
        r.ema.load_state_dict(ckpt["ema"])
    r.step, r.n_last, r.skipped = ckpt["step"], ckpt["step"], ckpt["skipped"]
    if r.master:
        print(f"resumed from {path} at step {r.step}")


def write_run_info(r):
    """Which classes each student owns (stdout) and run.json: what curves.py needs to label and scale the run."""
    cfg = r.cfg
    os.makedirs(cfg.out, exist_ok=True)
    if r.master:
        for k, part in zip(range(cfg.num_students) if cfg.all_students else [cfg.partition], r.owned):
            print(f"stage {cfg.stage}: student {k} of {cfg.num_students} ({cfg.split}) owns "
                  f"{len(part)} classes: {part if len(part) <= 20 else part[:10] + ['...']}")
        with open(os.path.join(cfg.out, "run.json"), "w") as f:
            json.dump({"stage": cfg.stage, "partition": "all" if cfg.all_students else cfg.partition,
                       "num_students": cfg.num_students, "classes": r.owned, "batch": cfg.batch,
                       "loss": cfg.loss}, f)


def per_student(r, net):
    """(folder, classes, single network) of each student the run trains: a stack is unstacked,
    student k into --out/p{k}/, in a single run's format."""
    if not isinstance(net, stack.Stack):
        return [(r.cfg.out, r.owned[0], net)]
    folders = [os.path.join(r.cfg.out, f"p{k}") for k in range(net.K)]
    for folder in folders:
        os.makedirs(folder, exist_ok=True)
    return list(zip(folders, r.owned, stack.unstack(net)))


# ----------------------------------------------------------------------------- the command line

def check_numbers(cfg, positive=(), nonnegative=(), unit=()):
    """Each named field > 0, >= 0, or in [0, 1), else one error naming the flag and the value."""
    for names, test, expected in ((positive, lambda v: v > 0, "> 0"), (nonnegative, lambda v: v >= 0, ">= 0"),
                                  (unit, lambda v: 0 <= v < 1, "in [0, 1)")):
        for name in names:
            if not test(getattr(cfg, name)):
                raise ValueError(f"{flag(name)} {getattr(cfg, name)}: expected {expected}")


def check_seed_fields(cfg):
    """--seed, --iters and --fake-steps-per-gen must fit their bit fields of step_seed."""
    if not 0 <= cfg.seed < 2 ** 19:
        raise ValueError(f"--seed {cfg.seed}: expected 0 <= seed < {2 ** 19} (the seed is a bit field of step_seed)")
    if cfg.iters >= 2 ** 32 or cfg.fake_steps_per_gen > MAX_FAKE_STEPS:
        raise ValueError(f"--iters {cfg.iters} / --fake-steps-per-gen {cfg.fake_steps_per_gen}: expected "
                         f"< 2^32 / <= {MAX_FAKE_STEPS} (each has a bit field of step_seed)")


def check_files(cfg, names):
    """Every file flag in `names` that is set names a file that exists (--all-students: each {k} of it)."""
    for name in names:
        ks = range(cfg.num_students) if cfg.all_students and "{k}" in getattr(cfg, name) else [None]
        for path in (getattr(cfg, name).replace("{k}", str(k)) for k in ks):
            if path and not os.path.exists(path):
                raise FileNotFoundError(f"--{name.replace('_', '-')} {path!r} does not exist")


def check_choices(cfg, choices):
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"{flag(name)} {getattr(cfg, name)!r}: expected one of {allowed}")


def flag(name):
    return "--" + name.replace("_", "-")


def config_help(config_class):
    """Each field's trailing comment in the dataclass's source: the dataclass documents the flags."""
    return dict(re.findall(r"^\s+(\w+): [^#\n]*#\s*(.*)$", inspect.getsource(config_class), re.M))


def parse_config(config_class, argv, description, choices):
    """A flag per dataclass field (--field-name), typed by its annotation, its comment as the help."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    doc = config_help(config_class)
    for f in dataclasses.fields(config_class):
        kind = [a for a in typing.get_args(f.type) if a is not type(None)] or [f.type]
        name, text = flag(f.name), doc.get(f.name, "")
        if kind[0] is bool:
            p.add_argument(name, action=argparse.BooleanOptionalAction, default=f.default, help=text)
        else:
            shown = "by stage, as listed" if f.default is None else repr(f.default) if f.default == "" else f.default
            p.add_argument(name, type=kind[0], default=f.default, choices=choices.get(f.name),
                           help=f"{text} (default: {shown})".replace("%", "%%"))
    return config_class(**vars(p.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit("runtime.py holds msd.py's training plumbing; train with python msd.py ... (python msd.py --help)")
