"""Multi-student distillation (MSD, Song et al. 2025): train student k of K on its slice of the classes.

    torchrun --nproc_per_node=8 msd.py --partition 0 --num-students 4 --teacher edm.pt --pairs pairs.npz
    python msd.py --stage tsm --preset S --teacher edm.pt --data imagenet.zip ...  # Stage 0 (Eq. 3, tsm.py)
    python msd.py --stage adm --init out/p0/student.pt --data imagenet.zip ...     # Stage 2 (adm.py)
    python msd.py --plot out/p0 out/p1 ...        # training curves of finished or running runs (curves.py)

The method, in the order of this file (MSD Fig. 2, Eq. 4): student k owns the classes Y_k of a
partition (Sec. 3.2, `make_partition`) and trains on them alone, stage by stage: `tsm` (Stage 0,
Eq. 3, tsm.py) pretrains a smaller denoiser; `dm` (Stage 1, DMD Alg. 1) steps G on Eq. 6 +
lambda_reg Eq. 9 (`update_generator`), then the fake score on Eq. 8 (`update_fake_score`; dmd.py
holds the losses; `--loss sid | f` puts SiD's or f-distill's loss in Eq. 6's place: MSD App. J.1,
`one_step_loss`, `LOSS_DEFAULTS`); `adm` (Stage 2) adds a GAN on the fake score's middle block (adm.py). Then `train`, the set-up and the
checks; the plumbing (ranks, random streams, optimiser steps, logs, resume files, the command line)
is runtime.py's.

Every student is an independent run, on its own machines or one after another (`--all-students`:
all K in one run, stack.py). A run writes to --out: resume-XXXXXXXX.pt (the last two), student.pt
(G or the denoiser with its `partition`, for sample.py), samples_XXXXXXXX.png, log.jsonl, run.json
and curves.png. The defaults are the paper's ImageNet-64 recipe (App. D.2; LPIPS-VGG's weights
download on first use): hours on GPUs; for minutes on a CPU, `python bench/digits.py`.
"""
import copy
import dataclasses
import os
import sys
import time
import types
import typing

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import adm
import curves
import dmd
import edm_unet
import fdistill
import runtime
import sample
import sid
import stack
import tsm


@dataclasses.dataclass
class Config:  # every comment below is also the flag's --help line
    stage: str = "dm"                   # tsm (Stage 0, Eq. 3) | dm (Stage 1, Eq. 6 + 9) | adm (Stage 2, + GAN); MSD Eq. 4
    partition: int = 0                  # k: which student this run trains, 0..K-1
    num_students: int = 4               # K (MSD Table 1: 4)
    split: str = "consecutive"          # consecutive (the paper's, Sec. 3.2) | kmeans (label embeddings) | random (App. B.1)
    split_seed: int = 0                 # seed of the random / kmeans split
    teacher: str = ""                   # mu_real: an edm_unet checkpoint (edm_unet.py --import-edm)
    init: str = ""                      # start of G (dm/adm) or of the student (tsm); default: the teacher (dm, DMD Alg. 1)
    fake_init: str = ""                 # start of mu_fake; default: --init (dm, App. D.2.2), the teacher (adm, App. D.2.1)
    preset: str = ""                    # tsm: a fresh student of this size (S, XS, XXS, tiny; MSD Table 7)
    arch: str = ""                      # tsm: preset overrides, e.g. "model_channels=32,img_resolution=8"
    pairs: str = ""                     # dm: the paired set from `sample.py pairs` (Eq. 9)
    data: str = ""                      # adm/tsm: real images in EDM's layout (zip or folder + dataset.json)
    target: str = "teacher"             # tsm: teacher (Eq. 3) | data (EDM's denoising score matching)
    reg_pairs: str = "all"              # all: every pair, the paper's F_DM (Sec. 3.2) | own: the partition's pairs (App. B.4)
    out: str = "out/student"            # folder for checkpoints, samples and log.jsonl
    # optimisation (App. D.2.1); None = the stage's paper default from STAGE_DEFAULTS
    lr: typing.Optional[float] = None   # AdamW learning rate; paper: dm 2e-6, adm 5e-7, tsm 1e-4 (App. D.2)
    batch: typing.Optional[int] = None  # global batch, split over ranks; paper: dm 128, adm 192, tsm 576
    iters: typing.Optional[int] = None  # optimiser steps; paper: dm 200k, adm 150k, tsm 400k
    lambda_reg: typing.Optional[float] = None  # weight of the regression loss (Eq. 9); paper: dm 0.25, adm/tsm 0
    micro_batch: int = 0                # per-rank micro-batch for gradient accumulation; 0 = none
    weight_decay: float = 0.01          # AdamW weight decay (App. D.2.1)
    beta1: typing.Optional[float] = None  # AdamW beta1: 0.9 (App. D.2.1); the loss's (LOSS_DEFAULTS): 0 with --loss sid
    beta2: float = 0.999                # AdamW beta2 (App. D.2.1)
    grad_clip: float = 10.0             # gradient-norm clipping (App. D.2.1)
    fake_steps_per_gen: typing.Optional[int] = None  # mu_fake updates per G update; dm 1 (DMD Alg. 1), adm 5 (DMD2's TTUR, dfake_gen_update_ratio)
    warmup: typing.Optional[int] = None  # steps of linear lr warm-up from 0 (DMD2's constant_with_warmup); dm 0 (DMD), adm 100 (DMD2's 500 fake updates at 5:1), tsm 0
    t_min: int = 20                     # DM noise levels t >= t_min of the 1000 Karras levels (DMD2: 0.02T)
    t_max: int = 981                    # DM: t < t_max (DMD2: 0.98T, 980 included); mu_fake (Eq. 8) draws all 1000
    gan_t_max: int = 1000               # adm: each GAN input is noised at its own t in [0, gan_t_max) (DMD2's --diffusion_gan_max_timestep)
    P_mean: float = -1.2                # tsm, and mu_fake under --loss sid: EDM's log-normal sigma, mean of ln sigma (App. D.2.2; SiD)
    P_std: float = 1.2                  # tsm, --loss sid's mu_fake: std of ln sigma (App. D.2.2; SiD)
    loss: str = "dm"                    # G's one-step loss (LOSS_DEFAULTS; MSD App. J.1): dm (DMD Eq. 6) | sid (SiD, sid.py) | f (f-distill, fdistill.py; adm only)
    f_div: str = "js"                   # --loss f: the f-divergence, h(r) of fdistill.H (FastGen's default: js)
    sid_alpha: float = 1.2              # --loss sid: SiD's alpha (their default 1.2; alpha does nothing without the backward pass through both denoisers)
    lambda_gan_g: float = 3e-3          # adm: generator GAN weight (App. D.2.1)
    lambda_gan_d: float = 1e-2          # adm: discriminator GAN weight (App. D.2.1)
    head_width: int = adm.WIDTH          # adm: channels of the GAN head, a multiple of 32 (DMD2: 768; the paper is silent)
    ema_halflife_kimg: float = 0.0      # EMA of the trained net, half-life in kimg; 0 = off (the paper)
    reg_loss: str = "lpips"             # lpips (App. D.2.1) | mse (the 2-D toy; offline CPU runs)
    lpips_size: int = 224               # LPIPS input size: bilinear upsampling to 224 px (App. D.2.1)
    lpips_random: bool = False          # tests only: LPIPS on a random VGG (no download)
    precision: str = "bf16"             # bf16 | fp16 (a GradScaler per optimiser) | fp32: autocast on CUDA or CPU ("mixed precision", App. D.2.1)
    compile: bool = False               # torch.compile the networks
    channels_last: bool = False         # NHWC weights/activations (pays off with --compile on GPUs)
    deterministic: bool = False         # CUDA: deterministic kernels (a resumed run equal bit for bit; slower); the CPU's are already
    device: str = ""                    # cuda | cpu; "" = cuda if available
    seed: int = 0                       # every random draw is a function of (seed, step); 0 <= seed < 2^19
    log_every: int = 100                # steps between log lines (and log.jsonl rows)
    grad_probe_every: int = 1000        # steps between per-term gradient norms on G; 0 = off (and off with --all-students)
    sample_every: int = 5000            # steps between sample grids
    ckpt_every: int = 5000              # steps between resume files, student.pt and curves.png (a draw: 2.1 s for a 200k-step log on a 2-core CPU, under 1% of a run while 5,000 steps take over 210 s)
    max_bad_steps: int = 20             # consecutive non-finite steps before the run stops
    resume: bool = False                # continue from the newest loadable resume-*.pt in --out (fresh if none)
    all_students: bool = False          # dm: all K students in one run, stepping together as one stack (stack.py); one process; student k's --init/--fake-init may hold {k}; writes --out/p{k}/student.pt; fp16: one loss scale for all K, so an overflow in one student skips the step of all K and lowers the scale of all
    shared_fake: bool = False           # with --all-students: one fake score for all K students, trained on the union of their samples (stack.py); from --fake-init, else the teacher


STAGE_DEFAULTS = {  # MSD App. D.2 where it speaks; its sources where it is silent (fake steps: DMD / DMD2; warm-up: DMD2)
    "tsm": dict(lr=1e-4, batch=576, iters=400_000, lambda_reg=0.0, fake_steps_per_gen=1, warmup=0),   # App. D.2.2 (S)
    "dm": dict(lr=2e-6, batch=128, iters=200_000, lambda_reg=0.25, fake_steps_per_gen=1, warmup=0),   # App. D.2.1; DMD Alg. 1
    "adm": dict(lr=5e-7, batch=192, iters=150_000, lambda_reg=0.0, fake_steps_per_gen=5, warmup=100),  # App. D.2.1; DMD2
}
LOSS_DEFAULTS = {  # what G's one-step loss brings: Adam's beta1, G's (gen) and mu_fake's (fake) noise levels, its stages
    "dm": dict(beta1=0.9, gen="dmd", fake="all", stages=("dm", "adm")),      # App. D.2.1; DMD Alg. 1 (t in [t_min, t_max); Eq. 8: all)
    "sid": dict(beta1=0.0, gen="sid", fake="lognormal", stages=("dm", "adm")),  # SiD's code: its Adam, t <= 0.8, EDM's log-normal
    "f": dict(beta1=0.9, gen="dmd", fake="all", stages=("adm",)),            # f-distill: DM's, with r from the ADM stage's critic
}
NUM_LEVELS = 1000  # App. D.2.1: 1000 Karras levels in [0.002, 80]
CHOICES = {"stage": tuple(STAGE_DEFAULTS), "split": ("consecutive", "kmeans", "random"), "target": ("teacher", "data"), "reg_pairs": ("all", "own"),
           "loss": tuple(LOSS_DEFAULTS), "f_div": tuple(fdistill.H), "reg_loss": ("lpips", "mse"), "precision": ("bf16", "fp16", "fp32")}


# ----------------------------------------------------------------------------- partitions (Sec. 3.2, App. B.1)

def kmeans_equal(X, K, seed=0, iters=50):
    """Equal-size k-means: Lloyd steps where assignment fills clusters greedily by distance with
    capacity ceil(N/K)...floor(N/K). Deterministic for a seed. X: (N, D) -> (N,) cluster ids."""
    X = np.asarray(X, dtype=np.float64)
    N = len(X)
    caps = np.full(K, N // K) + (np.arange(K) < N % K)
    centers = X[np.random.default_rng(seed).choice(N, K, replace=False)]
    assign = np.full(N, -1)
    for _ in range(iters):
        d = ((X[:, None] - centers[None]) ** 2).sum(-1)  # (N, K)
        new, left = np.full(N, -1), caps.copy()
        for flat in np.argsort(d, axis=None, kind="stable"):
            i, k = divmod(int(flat), K)
            if new[i] < 0 and left[k] > 0:
                new[i], left[k] = k, left[k] - 1
        if (new == assign).all():
            break
        assign = new
        centers = np.stack([X[assign == k].mean(0) for k in range(K)])
    order = np.argsort([np.flatnonzero(assign == k)[0] for k in range(K)])  # name clusters by their first class
    return np.argsort(order)[assign]


def make_partition(num_classes, K, split="consecutive", seed=0, embeddings=None):
    """Y_1..Y_K: disjoint class lists covering [0, num_classes), sizes differing by at most one."""
    if split == "consecutive":  # student k owns [k*C/K, (k+1)*C/K)
        return [list(map(int, a)) for a in np.array_split(np.arange(num_classes), K)]
    if split == "random":
        perm = np.random.default_rng(seed).permutation(num_classes)
        return [sorted(map(int, a)) for a in np.array_split(perm, K)]
    if split == "kmeans":
        ids = kmeans_equal(embeddings, K, seed)
        return [[int(c) for c in np.flatnonzero(ids == k)] for k in range(K)]
    raise ValueError(f"--split {split!r}: expected consecutive, kmeans or random")


# ------------------------------------------------------------ one step of DMD Alg. 1: batch, losses, updates

def draw_batch(r, step, stream, with_pairs=True):
    """The global batch of one update; --all-students: each student's batch as its own run draws it, the
    K batches one after another (K*B rows; pair indices offset to its own pairs). One shared fake score
    draws its Eq. 8 t and noise for all K*B rows from a stream of its own (K*B distinct draws)."""
    parts = [draw_student_batch(r, step, stream, with_pairs, classes, n_pairs) for classes, n_pairs, _ in r.parts]
    for b, (_, _, offset) in zip(parts, r.parts):
        if "pair_idx" in b and offset:
            b["pair_idx"] = b["pair_idx"] + offset
    if len(parts) == 1:
        return parts[0]
    b = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    if r.cfg.shared_fake:
        g = runtime.rng(r.cfg, step, runtime.SHARED_FAKE_STREAM + stream, r.device)
        b["sigma_fake"] = fake_sigma(r, len(b["z"]), g)
        b["noise_fake"] = torch.randn(b["z"].shape, generator=g, device=r.device)
    return b


def draw_student_batch(r, step, stream, with_pairs, classes, n_pairs):
    """One student's global batch: z, y, t and noise for G (Eq. 6), the fake score's own t and noise
    (Eq. 8, all levels as in DMD Alg. 1), pair and real-image indices; adm: a t and a noise for each
    GAN input (G's term, D's fake and real), t < --gan-t-max, as DMD2's compute_cls_logits."""
    cfg, B, shape, dev = r.cfg, r.cfg.batch, r.shape, r.device
    g = runtime.rng(cfg, step, stream, dev)
    b = {"z": torch.randn((B, *shape), generator=g, device=dev),                          # (B, C, H, W)
         "y": classes[torch.randint(len(classes), (B,), generator=g, device=dev)],        # labels of Y_k
         "sigma": tsm.sample_sigma_lognormal(B, cfg.P_mean, cfg.P_std, g, dev) if cfg.stage == "tsm" else gen_sigma(r, B, g)}
    b["noise"] = torch.randn((B, *shape), generator=g, device=dev)
    if cfg.stage != "tsm":
        b["sigma_fake"] = fake_sigma(r, B, g)
        b["noise_fake"] = torch.randn((B, *shape), generator=g, device=dev)
    if n_pairs and with_pairs:
        b["pair_idx"] = torch.randint(n_pairs, (B,), generator=g, device=dev)
    if r.n_real:
        b["real_idx"] = torch.randint(r.n_real, (B,), generator=g, device=dev)
    if cfg.stage == "adm":
        for k in ("gan", "gan_fake", "gan_real"):
            b["sigma_" + k] = dmd.sample_sigma(B, r.sigmas, 0, cfg.gan_t_max, g)
            b["noise_" + k] = torch.randn((B, *shape), generator=g, device=dev)
    return b


def gen_sigma(r, n, g):
    """G's noise levels for its one-step loss: t ~ U{t_min..t_max-1} of the 1000 (DMD2); sid: t <= 0.8 of EDM's curve."""
    if LOSS_DEFAULTS[r.cfg.loss]["gen"] == "sid":
        return sid.sample_sigma(n, generator=g, device=r.device)
    return dmd.sample_sigma(n, r.sigmas, r.cfg.t_min, r.cfg.t_max, g)


def fake_sigma(r, n, g):
    """mu_fake's Eq. 8 noise levels: t ~ U over all 1000 levels (DMD Alg. 1); sid: EDM's log-normal."""
    if LOSS_DEFAULTS[r.cfg.loss]["fake"] == "lognormal":
        return tsm.sample_sigma_lognormal(n, r.cfg.P_mean, r.cfg.P_std, g, r.device)
    return dmd.sample_sigma(n, r.sigmas, 0, NUM_LEVELS, g)


def one_step_loss(cfg, x, b, teacher, fake, critic, sigmas):
    """G's one-step loss on its samples x (--loss): DM (Eq. 6, dmd.py), SiD (sid.py) or f-distill (fdistill.py)."""
    if cfg.loss == "sid":  # the gradient goes through both denoisers (their weights frozen here)
        return {"sid": sid.sid_loss(x, b["sigma"], b["y"], teacher, fake, b["noise"], cfg.sid_alpha)}
    if cfg.loss == "f":  # DM's per-sample gradient weighted by h(r), r from the ADM critic at the same x_t
        return {"f": fdistill.f_loss(x, b["sigma"], b["y"], teacher, critic, b["noise"], sigmas, cfg.f_div)[0]}
    return {"dm": dmd.dm_step_loss(x, b["sigma"], b["y"], teacher, fake, b["noise"])}


def generator_losses(cfg, G, teacher, fake, critic, lpips_fn, b, pairs, sigmas, K=1):
    """G's loss terms on micro-batch b: the one-step loss, regression (Eq. 9), GAN (adm). Returns (terms, x).
    K > 1: b holds K students' blocks of rows, one after another (--all-students)."""
    terms = {}
    if cfg.lambda_reg:
        z_pair, y_pair, img_pair = (t[b["pair_idx"]] for t in pairs)
        # one forward for both terms: each student's block holds its DM rows, then its pair rows
        both = lambda u, v: torch.cat([u.unflatten(0, (K, -1)), v.unflatten(0, (K, -1))], 1).flatten(0, 1)  # noqa: E731
        x_all = G(both(b["z"], z_pair), both(b["y"], y_pair)).unflatten(0, (K, -1))
        n = len(b["z"]) // K
        x, x_pair = x_all[:, :n].flatten(0, 1), x_all[:, n:].flatten(0, 1)
        terms["reg"] = dmd.regression_loss(x_pair, img_pair, lpips_fn, cfg.lpips_size)
    else:
        x = G(b["z"], b["y"])
    terms.update(one_step_loss(cfg, x, b, teacher, fake, critic, sigmas))
    if cfg.stage == "adm":  # non-saturating GAN loss through the (frozen here) critic, at its own sigma
        x_t = x + dmd._bcast(b["sigma_gan"], x) * b["noise_gan"]
        terms["gan_g"] = adm.gan_g_loss(critic(x_t, b["sigma_gan"], b["y"])[1])
    return terms, x


def critic_losses(cfg, critic, x, b, sigma_data, real=None):
    """mu_fake's denoising loss on detached G samples (Eq. 8) [+ the GAN discriminator loss (adm)].

    adm: one critic forward over three blocks, each noised at its own sigma as in DMD2: G's samples
    for Eq. 8 (all levels), G's samples and real images for D (t < --gan-t-max).
    """
    sigma, noise = b["sigma_fake"], b["noise_fake"]
    if cfg.stage == "dm":
        return {"fake": dmd.denoise_loss(critic, x, sigma, b["y"], sigma_data, noise)}
    n = len(x)
    x0 = torch.cat([x, x, real[0]])                                                    # (3B, C, H, W)
    sigmas = torch.cat([sigma, b["sigma_gan_fake"], b["sigma_gan_real"]])
    x_t = x0 + dmd._bcast(sigmas, x0) * torch.cat([noise, b["noise_gan_fake"], b["noise_gan_real"]])
    denoised, logits = critic(x_t, sigmas, torch.cat([b["y"], b["y"], real[1]]))
    return {"fake": dmd.weighted_error(denoised[:n], x, sigma, sigma_data),
            "gan_d": adm.gan_d_loss(logits[n:2 * n], logits[2 * n:])}


def loss_weights(cfg):
    """The weight of every loss term, by the name the loss functions give it."""
    return {cfg.loss: 1.0, "reg": cfg.lambda_reg, "gan_g": cfg.lambda_gan_g, "fake": 1.0, "gan_d": cfg.lambda_gan_d, "tsm": 1.0}


def weighted(cfg, terms):
    return sum(loss_weights(cfg)[k] * v for k, v in terms.items())


def update_generator(r, b_gen):
    """DMD Alg. 1 l.5-9: G's one-step loss (Eq. 6) + lambda_reg * Eq. 9 [+ GAN] (MSD Eq. 4), one AdamW
    step. -> (terms, G's samples per micro-batch, ok)."""
    cfg, terms_sum, xs = r.cfg, {}, []
    r.critic.requires_grad_(False)  # the GAN's (and SiD's) gradient goes through the critic into G only
    for i, b in runtime.micro_batches(r, b_gen):
        with runtime.no_sync(r, r.net_train, i):
            with runtime.amp(cfg, r.device):  # the forward under autocast, the backward outside (PyTorch's AMP recipe)
                terms, x = generator_losses(cfg, r.G, r.teacher_f, r.fake_f, r.critic_f, r.lpips_fn, b, r.pairs, r.sigmas,
                                            r.students_g)
            runtime.backward(weighted(cfg, terms) * r.students_g / r.accum, r.scalers[0])
        xs.append(x.detach())
        runtime.add_terms(terms_sum, terms, r.accum)
    r.critic.requires_grad_(True)
    norm, ok = runtime.optimizer_step(cfg, r.net, r.opt_net, r.scalers[0])
    update_ema(r, ok)
    return {**terms_sum, "gnorm_net": norm.float()}, xs, ok


def update_denoiser(r, b_gen):
    """Stage 0 (Eq. 3, tsm.py): the student denoiser's teacher score matching, one AdamW step. -> (terms, ok)."""
    cfg, terms_sum = r.cfg, {}
    target = r.teacher_f if cfg.target == "teacher" else None  # Eq. 3; data: EDM's own loss
    for i, b in runtime.micro_batches(r, b_gen):
        with runtime.no_sync(r, r.net_train, i):
            # dropout: a function of (seed, step, global micro-batch), not of the rank count
            torch.manual_seed(runtime.step_seed(cfg.seed, r.step, runtime.DROPOUT_STREAM + r.rank * r.accum + i))
            x, y = runtime.real_batch(r.real, b["real_idx"], r.device)
            with runtime.amp(cfg, r.device):
                terms = {"tsm": tsm.tsm_loss(r.net_train, target, x, b["sigma"], y, r.sigma_data, b["noise"])}
            runtime.backward(terms["tsm"] / r.accum, r.scalers[0])
        runtime.add_terms(terms_sum, terms, r.accum)
    norm, ok = runtime.optimizer_step(cfg, r.net, r.opt_net, r.scalers[0])
    update_ema(r, ok)
    return {**terms_sum, "gnorm_net": norm.float()}, ok


def update_ema(r, ok):  # the EMA of the trained net (half-life --ema-halflife-kimg; off by default, as in the paper)
    if r.ema is not None and ok:
        beta = 0.5 ** (r.cfg.batch / (r.cfg.ema_halflife_kimg * 1000))
        with torch.no_grad():
            for pe, p in zip(r.ema.parameters(), r.net.parameters()):
                pe.lerp_(p, 1 - beta)


def update_fake_score(r, b_gen, xs, step):
    """DMD Alg. 1 l.10-12: mu_fake's denoising loss (Eq. 8) on detached G samples [+ the GAN
    discriminator (adm)], one AdamW step; DMD2's TTUR repeats it on fresh batches. -> (terms, ok)."""
    cfg, n, terms_sum, ok = r.cfg, r.cfg.fake_steps_per_gen, {}, True
    for j in range(n):
        b_fake = b_gen if j == 0 else draw_batch(r, step, 1 + j, with_pairs=False)
        for i, b in runtime.micro_batches(r, b_fake):
            if j > 0:
                with torch.no_grad(), runtime.amp(cfg, r.device):
                    xs[i] = r.G(b["z"], b["y"]).detach()
            real = runtime.real_batch(r.real, b["real_idx"], r.device) if cfg.stage == "adm" else None
            with runtime.no_sync(r, r.critic_train, i):
                with runtime.amp(cfg, r.device):
                    terms = critic_losses(cfg, r.critic_train, xs[i], b, r.sigma_data, real)
                runtime.backward(weighted(cfg, terms) * r.students_fake / r.accum, r.scalers[1])
            runtime.add_terms(terms_sum, terms, r.accum * n)
        norm, ok_j = runtime.optimizer_step(cfg, r.critic, r.opt_critic, r.scalers[1])
        terms_sum["gnorm_fake"] = terms_sum.get("gnorm_fake", 0) + norm.float() / n
        ok = ok and ok_j
    return terms_sum, ok


def train(cfg):
    r = setup(cfg)
    for step in range(r.step, cfg.iters):
        r.lr = runtime.warmup_lr(r, step)
        b = draw_batch(r, step, 0)                        # z, y, t, noise: a function of (seed, step)
        if cfg.stage == "tsm":                            # Stage 0: the student denoiser on Eq. 3
            terms, ok = update_denoiser(r, b)
        else:
            g_terms, xs, ok = update_generator(r, b)      # Alg. 1 l.5-9: Eq. 6 + lambda_reg Eq. 9 [+ GAN]
            f_terms, ok_f = update_fake_score(r, b, xs, step)  # l.10-12: Eq. 8 [+ D]
            terms, ok = {**g_terms, **f_terms}, ok and ok_f
        log_and_checkpoint(r, step + 1, b, terms, ok)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return {"step": r.step, "log": r.log, "owned": r.owned, "skipped": r.skipped, "scalers": r.scalers,
            "net": r.net, "ema": r.ema, "fake": r.fake, "head": r.head, "teacher": r.teacher}


# ------------------------------------------------------------ maintenance: logs, probe, samples, checkpoints

def log_and_checkpoint(r, step, b_gen, terms, ok):
    """Count skipped steps; every few steps: log line, gradient probe, sample grid, resume file (rank 0)."""
    cfg, out = r.cfg, r.cfg.out
    r.step, r.skipped, r.bad = step, r.skipped + (not ok), 0 if ok else r.bad + 1
    if r.bad > cfg.max_bad_steps:
        raise RuntimeError(f"{r.bad} non-finite steps in a row at step {step}: lower --lr, or check the data/precision")
    runtime.add_terms(r.terms_acc, terms, 1)
    if step % cfg.log_every == 0 or step == cfg.iters:
        runtime.log_terms(r, step)
    if not r.master:
        return
    if cfg.grad_probe_every and step % cfg.grad_probe_every == 0 and cfg.stage != "tsm" and not cfg.all_students:
        probe = grad_probe(r, {k: v[:r.micro] for k, v in b_gen.items()})  # G's batch (it has the pairs)
        print("grad probe (weighted |grad| on G): " + " ".join(f"{k} {v:.4g}" for k, v in probe.items()), flush=True)
        runtime.append_log(out, {"step": step, "grad_probe": probe})
    students = None  # unstacked once per step, for the sample grids and the snapshots both
    if step % cfg.sample_every == 0 or step == cfg.iters:
        students = runtime.per_student(r, r.ema or r.net)
        for folder, part, net in students:
            sample.class_grid(os.path.join(folder, f"samples_{step:08d}.png"), net, part, r.shape, cfg.seed, r.device,
                              heun=cfg.stage == "tsm", dtype=sample.AUTOCAST[cfg.precision])
    if step % cfg.ckpt_every == 0 or step == cfg.iters:
        runtime.save_resume(cfg, step, runtime.train_state(r))
        for folder, part, net in students or runtime.per_student(r, r.ema or r.net):  # what sample.py students routes
            edm_unet.save_model(net, os.path.join(folder, "student.pt"), partition=part,
                                stage=cfg.stage, step=step, sigma_max=80.0)
        runtime.draw_curves(out)


# ------------------------------------------------------------ set-up: networks, partitions, data, optimisers

def build_nets(cfg, device, teacher=None, with_fake=True):
    """The stage's networks: frozen teacher, the trained net (G's denoiser or the TSM student), fake score, head."""
    if teacher is None:
        teacher = edm_unet.load_model(cfg.teacher)[0] if cfg.teacher else None
    if cfg.stage == "tsm":
        net = edm_unet.load_model(cfg.init)[0] if cfg.init else edm_unet.build(cfg.preset, **edm_unet.parse_overrides(cfg.arch))
        fake = head = None
    else:
        net = edm_unet.load_model(cfg.init)[0] if cfg.init else copy.deepcopy(teacher)  # DMD Alg. 1: G <- teacher
        fake_src = cfg.fake_init or (cfg.teacher if cfg.stage == "adm" else cfg.init or cfg.teacher)
        fake = edm_unet.load_model(fake_src)[0] if with_fake else None
        head = adm.init_head(fake, cfg.seed, cfg.head_width) if cfg.stage == "adm" else None
    if teacher is not None:
        teacher.requires_grad_(False).eval().to(device)
        for name, other in (("student", net), ("fake score", fake)):
            if other is not None and (other.cfg.img_resolution, other.cfg.img_channels, other.cfg.label_dim) != \
                    (teacher.cfg.img_resolution, teacher.cfg.img_channels, teacher.cfg.label_dim):
                raise ValueError(f"{name} shape/classes {other.cfg} do not match the teacher's {teacher.cfg}")
    # Dropout: on for TSM (score matching, as EDM trains); off while distilling, so that G trains
    # exactly as it samples (our reading; the paper does not say).
    net.to(device).train(cfg.stage == "tsm")
    if fake is not None:
        fake.to(device).eval().requires_grad_(True)
        head = head.to(device) if head is not None else None
    return teacher, net, fake, head


def build_students(cfg, device):
    """--all-students: the K students (and K fake scores, or one shared) as stacks (stack.py); student
    k's --init / --fake-init may hold {k}. -> (teacher, G's stack, fake score(s), no head)."""
    teacher = edm_unet.load_model(cfg.teacher)[0]
    per_k = [build_nets(dataclasses.replace(cfg, init=cfg.init.replace("{k}", str(k)),
                                            fake_init=cfg.fake_init.replace("{k}", str(k))), device, teacher,
                        with_fake=not cfg.shared_fake) for k in range(cfg.num_students)]
    fake = (edm_unet.load_model(cfg.fake_init or cfg.teacher)[0].to(device).eval().requires_grad_(True)
            if cfg.shared_fake else stack.Stack([n[2] for n in per_k]))
    return per_k[0][0], stack.Stack([n[1] for n in per_k]), fake, None


def load_pairs(cfg, partition, model_cfg, device, k=None):
    """Paired set (Eq. 9) on the device; F_DM keeps all pairs (Sec. 3.2), `own` keeps the partition's."""
    try:
        p = sample.load_pairs(cfg.pairs)
    except ValueError as e:
        raise ValueError(f"--pairs: {e}") from None
    want = (model_cfg.img_channels, model_cfg.img_resolution, model_cfg.img_resolution)
    if tuple(p["images"].shape[1:]) != want or p["labels"].max() >= model_cfg.label_dim:
        raise ValueError(f"{cfg.pairs}: images {p['images'].shape[1:]} / labels < {p['labels'].max() + 1} do not fit "
                         f"the model ({want}, {model_cfg.label_dim} classes)")
    keep = np.isin(p["labels"], partition) if cfg.reg_pairs == "own" else np.ones(len(p["labels"]), bool)
    if not keep.any():
        raise ValueError(f"--reg-pairs own: {cfg.pairs} holds no pair of partition {cfg.partition if k is None else k} (classes "
                         f"{partition if len(partition) <= 20 else partition[:10] + ['...']}); use --reg-pairs all "
                         f"or a paired set with more seeds")
    return (torch.from_numpy(p["noise"][keep]).to(device), torch.from_numpy(p["labels"][keep]).to(device),
            sample.from_uint8(torch.from_numpy(p["images"][keep]).to(device)))


def setup(cfg):
    """Everything before the loop: ranks, nets, partition, data, optimisers, resume. -> namespace r."""
    cfg.device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    for k, v in STAGE_DEFAULTS.get(cfg.stage, {}).items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    cfg.beta1 = LOSS_DEFAULTS.get(cfg.loss, LOSS_DEFAULTS["dm"])["beta1"] if cfg.beta1 is None else cfg.beta1
    check_config(cfg)
    rank, world, device, per_rank, micro = runtime.setup_dist(cfg)
    if cfg.all_students:  # one process, no accumulation: a step's rows are the K students' batches
        per_rank = micro = cfg.batch * cfg.num_students
    torch.manual_seed(cfg.seed)  # a fresh --preset student is the same on every rank
    teacher, net, fake, head = (build_students if cfg.all_students else build_nets)(cfg, device)
    mcfg = net.cfg
    if cfg.num_students > mcfg.label_dim:
        raise ValueError(f"--num-students {cfg.num_students} exceeds the {mcfg.label_dim} classes")
    emb = (teacher or net).model.map_label.weight.detach().T.cpu().numpy() if cfg.split == "kmeans" else None  # (C, E): label vectors
    partitions = make_partition(mcfg.label_dim, cfg.num_students, cfg.split, cfg.split_seed, emb)
    owned = partitions if cfg.all_students else [partitions[cfg.partition]]  # the classes of each student it trains
    shape = (mcfg.img_channels, mcfg.img_resolution, mcfg.img_resolution)
    pairs, parts, real, lpips_fn = load_data(cfg, owned, mcfg, device)
    if cfg.channels_last:
        for m in (teacher, net, fake):
            if m is not None:
                m.to(memory_format=torch.channels_last)
    critic = adm.FakeWithHead(fake, head) if head is not None else fake  # what the second optimiser trains
    r = types.SimpleNamespace(
        cfg=cfg, rank=rank, world=world, master=rank == 0, device=device, per_rank=per_rank, micro=micro,
        accum=per_rank // micro, teacher=teacher, net=net, fake=fake, head=head, critic=critic,
        opt_net=adamw(cfg, net.parameters()), opt_critic=adamw(cfg, critic.parameters()) if critic is not None else None,
        scalers=[torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None for _ in range(2)],
        ema=copy.deepcopy(net).eval().requires_grad_(False) if cfg.ema_halflife_kimg else None,
        partitions=partitions, owned=owned, shape=shape, sigma_data=mcfg.sigma_data, pairs=pairs,
        real=real, lpips_fn=lpips_fn, parts=parts, sigmas=dmd.karras_sigmas(NUM_LEVELS).to(device),
        n_real=len(real) if real is not None else 0, step=0, skipped=0, bad=0, log=None, terms_acc={},
        t_last=time.time(), n_last=0, lr=cfg.lr,
        # a stack's losses are means over the blocks of this many students: times it, each student
        # gets its own run's gradient (one shared fake score: one network, its mean as it is)
        students_g=len(owned), students_fake=1 if cfg.shared_fake else len(owned))
    if cfg.resume:
        runtime.resume(r)
    # DDP for the nets that train (after resume: DDP broadcasts rank 0's weights), then torch.compile
    frozen = lambda m: torch.compile(m) if cfg.compile and m is not None else m
    wrap = lambda m: frozen(DDP(m, device_ids=[device.index] if device.type == "cuda" else None,
                                broadcast_buffers=False) if world > 1 else m)
    r.net_train, r.teacher_f, r.fake_f, r.critic_f = wrap(net), frozen(teacher), frozen(fake), frozen(critic)
    r.critic_train = wrap(critic) if critic is not None else None
    r.G = edm_unet.OneStep(r.net_train)  # G(z, y) = D(80 z, 80, y)
    runtime.write_run_info(r)
    return r


def adamw(cfg, params):
    """The run's AdamW (App. D.2.1)."""
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)


def load_data(cfg, owned, mcfg, device):
    """Paired set (dm: Eq. 9), real images of the owned classes (adm: F_ADM, tsm), LPIPS. Each student
    draws its batch from its own classes and its own pairs (all of them under F_DM: one copy serves
    all). -> (pairs, per student (classes, pairs, offset), real images, LPIPS)."""
    pairs = None
    if cfg.stage == "dm" and cfg.lambda_reg:
        own = [load_pairs(cfg, part, mcfg, device, k if cfg.all_students else None)
               for k, part in enumerate(owned if cfg.reg_pairs == "own" else owned[:1])]
        pairs = tuple(torch.cat(t) for t in zip(*own))
        sizes = [len(p[0]) for p in own] if cfg.reg_pairs == "own" else [len(pairs[0])] * len(owned)
        offsets = np.cumsum([0] + sizes[:-1]) if cfg.reg_pairs == "own" else [0] * len(owned)
    else:
        sizes, offsets = [0] * len(owned), [0] * len(owned)
    parts = [(torch.tensor(part, device=device), n, int(o)) for part, n, o in zip(owned, sizes, offsets)]
    shape = (mcfg.img_channels, mcfg.img_resolution, mcfg.img_resolution)
    real = sample.ImageFolder(cfg.data, classes=sum(owned, []), resolution=mcfg.img_resolution,
                              channels=mcfg.img_channels, need_labels=True) if cfg.stage in ("adm", "tsm") else None
    if real is not None and real.shape != shape:
        raise ValueError(f"--data {cfg.data}: images {real.shape} do not fit the model {shape}")
    lpips_fn = runtime.load_lpips(cfg.lpips_random, cfg.seed, device) if pairs is not None and cfg.reg_loss == "lpips" else None
    return pairs, parts, real, lpips_fn


# ----------------------------------------------------------------------------- the gradient probe

def grad_probe(r, b):
    """|grad_G| of each weighted loss term on its own (DMD users balance lambda_reg by these)."""
    params = [p for p in r.net.parameters() if p.requires_grad]
    r.critic.requires_grad_(False)  # dm and adm: the probe does not run in tsm
    with runtime.amp(r.cfg, r.device):
        terms, _ = generator_losses(r.cfg, edm_unet.OneStep(r.net), r.teacher_f, r.fake, r.critic, r.lpips_fn, b, r.pairs, r.sigmas)
    w, out = loss_weights(r.cfg), {}
    scale = r.scalers[0].get_scale() if r.scalers[0] is not None else 1.0  # fp16: as the update's backward
    for k, v in terms.items():
        grads = torch.autograd.grad(w[k] * v * scale, params, retain_graph=True, allow_unused=True)
        out[k] = float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None))) / scale
    r.critic.requires_grad_(True)
    return out


# ----------------------------------------------------------------------------- the command line

def check_config(cfg):
    """Fail on bad input before anything loads."""
    if cfg.stage not in STAGE_DEFAULTS:
        raise ValueError(f"--stage {cfg.stage!r}: expected one of {list(STAGE_DEFAULTS)}")
    if cfg.num_students < 1:
        raise ValueError(f"--num-students {cfg.num_students}: expected >= 1")
    if not 0 <= cfg.partition < cfg.num_students:
        raise ValueError(f"--partition {cfg.partition}: expected 0..{cfg.num_students - 1} for --num-students {cfg.num_students}")
    runtime.check_numbers(cfg, positive=("lr", "batch", "grad_clip", "fake_steps_per_gen", "log_every", "sample_every",
                                          "ckpt_every", "lpips_size", "P_std"),
                          nonnegative=("iters", "lambda_reg", "micro_batch", "weight_decay", "ema_halflife_kimg",
                                       "grad_probe_every", "max_bad_steps", "lambda_gan_g", "lambda_gan_d", "warmup"),
                          unit=("beta1", "beta2"))
    if not 0 <= cfg.t_min < cfg.t_max <= NUM_LEVELS:
        raise ValueError(f"--t-min {cfg.t_min} / --t-max {cfg.t_max}: expected 0 <= t_min < t_max <= {NUM_LEVELS}")
    if not 0 < cfg.gan_t_max <= NUM_LEVELS:
        raise ValueError(f"--gan-t-max {cfg.gan_t_max}: expected 1..{NUM_LEVELS}")
    runtime.check_seed_fields(cfg)
    adm.check_width(cfg.head_width)
    if cfg.stage == "adm" and cfg.lambda_reg:
        raise ValueError(f"--lambda-reg {cfg.lambda_reg} with --stage adm: the ADM stage has no regression term "
                         f"(MSD Sec. 3.2 and DMD2 drop it); use --lambda-reg 0, or add the GAN to a DM run yourself")
    runtime.check_choices(cfg, CHOICES)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but CUDA is not available (use --device cpu)")
    if cfg.loss != "dm" and cfg.stage not in LOSS_DEFAULTS[cfg.loss]["stages"]:  # tsm ignores the default
        raise ValueError(f"--loss {cfg.loss} with --stage {cfg.stage}: it trains G in the {' and '.join(LOSS_DEFAULTS[cfg.loss]['stages'])} "
                         f"stage only ({'its density ratio r comes from the ADM critic' if cfg.loss == 'f' else 'tsm trains a denoiser, Eq. 3'})")
    if cfg.all_students and cfg.stage != "dm":
        raise ValueError(f"--all-students with --stage {cfg.stage}: the stack trains the dm stage only (so far)")
    if cfg.all_students and cfg.channels_last:
        raise ValueError("--channels-last with --all-students: a stack's weights have 5 dimensions (so far NCHW only)")
    if cfg.shared_fake and not cfg.all_students:
        raise ValueError("--shared-fake needs --all-students (one fake score serves the K students of one run)")
    if cfg.shared_fake and "{k}" in cfg.fake_init:
        raise ValueError(f"--fake-init {cfg.fake_init!r} with --shared-fake: one fake score has one start, not one per student")
    needs = {"dm": ["teacher", "pairs"] if cfg.lambda_reg else ["teacher"], "adm": ["teacher", "data"],
             "tsm": ["data"] + (["teacher"] if cfg.target == "teacher" else [])}[cfg.stage]
    for name in needs:
        if not getattr(cfg, name):
            raise ValueError(f"--stage {cfg.stage} needs --{name}")
    runtime.check_files(cfg, ("teacher", "init", "fake_init", "pairs", "data"))
    if cfg.stage == "tsm" and not (cfg.preset or cfg.init):
        raise ValueError("--stage tsm needs --preset (a fresh student) or --init (a checkpoint)")
    try:
        edm_unet.parse_overrides(cfg.arch)
    except ValueError as e:
        raise ValueError(f"--arch {e}") from None
    if cfg.preset and cfg.preset not in edm_unet.PRESETS:
        raise ValueError(f"--preset {cfg.preset!r}: expected one of {list(edm_unet.PRESETS)}")


def parse_args(argv=None):
    return runtime.parse_config(Config, argv, __doc__, CHOICES)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--plot"]:  # python msd.py --plot FOLDER [FOLDER ...] [--out FILE]
        return curves.main(argv[1:])
    return train(parse_args(argv))


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # the user's input: one line and argparse's exit status 2
        sys.exit(print(f"error: {e}", file=sys.stderr) or 2)
