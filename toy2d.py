"""The 2-D multi-student toy (MSD App. A.2 and D.1, Fig. 4 and Fig. 5).

8 classes; class c is a mixture of 8 Gaussians (std 0.005) on a circle of radius 0.1 whose
centre sits at angle 2*pi*c/8 on a circle of radius 0.5. An MLP teacher with EDM
preconditioning learns it; K one-step students, student k owning classes {c : c*K//8 == k},
are distilled by DM (--method dmd, MSD Sec. 3.2) or consistency distillation (--method cd).
More students -> lower l1 between student and teacher histograms.

    python toy2d.py --students 8            # K=8 vs the K=1 baseline, under 5 min on 2 CPU cores
    python toy2d.py --students 1 2 4 8      # the whole l1-vs-K curve
    python toy2d.py --students 1 2 4 8 --method cd
    python toy2d.py --students 1 8 --loss sid   # SiD's loss in DM's place (sid.py, MSD App. J.1)

All students of all K in one run are trained *together* as one stack of MLPs (batched
matmuls), each on its own classes and with its own batch, exactly as independent runs would be.
"""
import argparse
import copy
import inspect
import math
import os
import re
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

import dmd
import sid
from edm_unet import precond

NUM_CLASSES = 8


@dataclass
class ToyConfig:
    # data (MSD App. D.1)
    outer_radius: float = 0.5     # radius of the circle the 8 class centres sit on (App. D.1)
    inner_radius: float = 0.1     # radius of each class's ring of 8 modes (App. D.1)
    mode_std: float = 0.005       # std of each Gaussian mode (App. D.1)
    sigma_data: float = 0.36      # per-coordinate std of the data: sqrt((0.5^2 + 0.1^2)/2) = 0.36
    # schedule (App. D.1): (sigma_min, sigma_max) = (0.002, 80), 1000 Karras steps, rho = 7
    sigma_min: float = 0.002      # lowest noise level (App. D.1)
    sigma_max: float = 80.0       # highest noise level; the students map z * sigma_max in one step (App. D.1)
    num_levels: int = 1000        # Karras levels t indexes (App. D.1)
    # teacher MLP and its training (App. D.1: AdamW lr 1e-4, wd 0.01, betas (0.9, 0.999))
    width: int = 128              # MLP width (teacher and students)
    depth: int = 4                # MLP hidden layers
    act: str = "relu"             # MLP activation relu | silu; the command line's auto = relu for dmd, silu for cd (README)
    x_freqs: int = 0              # Fourier features sin/cos(2^k pi c_in x), k < x_freqs, of the input
    teacher_iters: int = 8000     # paper: 100k; 8k at lr 1e-3 gives a mode-resolving teacher on a CPU
    teacher_lr: float = 1e-3      # paper: 1e-4 (100k iters); raised to fit the CPU budget
    teacher_batch: int = 1024     # teacher's batch
    # EDM's log-normal sigma sampling, re-centred for this data: EDM's (-1.2, 1.2) targets images
    # (sigma_data = 0.5) and almost never draws the sigma ~ 0.005-0.05 at which the 0.005-wide modes
    # separate, so its teacher blurs each ring; (-3, 2) covers sigma in [0.001, 2.7] at +-2 std.
    P_mean: float = -3.0          # teacher's log-normal sigma: mean of ln sigma (EDM: -1.2, see above)
    P_std: float = 2.0            # std of ln sigma (EDM: 1.2)
    # Heun steps for teacher sampling. The schedule has 1000 levels; 32 steps already give the same
    # histograms (measured: noise floor 0.158 at 32 steps vs 0.160 at 128) at 1/30 of the CPU time.
    teacher_steps: int = 32       # Heun steps of teacher sampling (references and pairs), >= 2
    seed: int = 0                 # seed of the teacher, its samples and the students


@dataclass
class DistillConfig:
    method: str = "dmd"           # 'dmd' (MSD DM stage) or 'cd' (consistency distillation)
    loss: str = "dm"              # dmd's G loss: dm (Eq. 6) | sid (SiD, sid.py: its t <= 0.8 on the Karras curve, Adam beta1 0, mu_fake at the teacher's log-normal sigma; MSD App. J.1)
    sid_alpha: float = 1.2        # --loss sid: SiD's alpha (SiD's default)
    iters: int = 6000             # paper: 200k at lr 1e-7; a CPU budget needs far fewer, larger steps
    lr: float = 1e-4              # paper: 1e-7 (see iters)
    batch: int = 256              # per student (equal per-student batch, as in the paper)
    num_pairs: int = 1000         # App. D.1: 1000 (noise, teacher sample) pairs shared by all students
    lambda_reg: float = 10.0      # regression weight (MSE in 2-D in place of LPIPS); measured on the toy, see README
    reg_pairs: str = "own"        # 'own': pairs of the student's classes; 'all': whole paired set (MSD F_DM)
    # App. D.1: "only sample the first 750 of the 1000 steps". We read "first" in DMD's
    # t-indexing, where t = 0 is the *lowest* noise: t in [0, 750) -> sigma in [0.002, 17.50] (sigma[749]).
    t_min: int = 0                # DM noise levels t in [t_min, t_max) of num_levels (App. D.1: the first 750)
    t_max: int = 750              # DM noise levels: t < t_max (App. D.1: 750 of 1000)
    fake_lr: float = 0.0          # mu_fake's learning rate; 0 = --lr (the paper uses one lr)
    fake_steps_per_gen: int = 1   # mu_fake updates per G update (1: DMD Alg. 1; DMD2's TTUR: 5)
    ema: float = 0.0              # per-step EMA decay of the students' weights; 0 = off (the paper)
    lr_decay: str = "auto"        # cosine | none: lr schedule over --iters; auto = cosine for dmd, none for cd (see README)
    cd_steps: int = 40            # CD discretisation N (Song et al. 2023 use N = 40 on ImageNet-64)
    cd_ema: float = 0.95          # CD target-network EMA mu (Song et al. 2023, ImageNet-64 CD)
    eval_samples: int = 100_000   # samples per histogram (App. D.1: 100k)


# ----------------------------------------------------------------------------- data

def mode_centres(labels, cfg):
    """The 8 mode centres of each label's ring. labels: (N,) -> (N, 8, 2)."""
    a_c = 2 * math.pi * labels.float() / NUM_CLASSES
    a_m = 2 * math.pi * torch.arange(8).float() / 8
    centre = cfg.outer_radius * torch.stack([a_c.cos(), a_c.sin()], 1)
    return centre[:, None] + cfg.inner_radius * torch.stack([a_m.cos(), a_m.sin()], 1)[None]


def sample_data(labels, cfg, generator=None):
    """Draw one point per label from the class mixtures. labels: (N,) long -> (N, 2)."""
    n = labels.shape[0]
    mode = torch.randint(0, 8, (n,), generator=generator)
    centre = mode_centres(labels, cfg)[torch.arange(n), mode]
    return centre + cfg.mode_std * torch.randn(n, 2, generator=generator)


def partition(K):
    """Student k owns classes {c : c*K//8 == k} (consecutive blocks, MSD Sec. 3.2)."""
    if K not in (1, 2, 4, 8):
        raise ValueError(f"--students must be from {{1, 2, 4, 8}} (equal blocks of 8 classes), got {K}")
    return [[c for c in range(NUM_CLASSES) if c * K // NUM_CLASSES == k] for k in range(K)]


# ----------------------------------------------------------------------------- model

class StackedMLP(nn.Module):
    """S independent MLPs evaluated together with batched matmuls. x: (S, N, d_in) -> (S, N, d_out)."""

    def __init__(self, S, d_in, width, depth, d_out, act):
        super().__init__()
        self.act = getattr(torch.nn.functional, act)
        dims = [d_in] + [width] * depth + [d_out]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for a, b in zip(dims[:-1], dims[1:]):
            w = torch.empty(S, a, b)
            for s in range(S):
                nn.init.kaiming_uniform_(w[s].T, a=math.sqrt(5))  # nn.Linear's default
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(torch.zeros(S, 1, b)))

    def forward(self, x):
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(b, x, w)
            if i < len(self.weights) - 1:
                x = self.act(x)
        return x


class ToyDenoiser(nn.Module):
    """S stacked class-conditional denoisers D(x, sigma, y) with EDM preconditioning (EDM Table 1).

    Inputs are flat (S*N, ...) so that dmd.py's shape-agnostic losses apply; row block s
    belongs to network s. boundary=True switches to the consistency-model parametrisation
    c_skip = sd^2/((sigma - sigma_min)^2 + sd^2), c_out = (sigma - sigma_min) sd / sqrt(sigma^2 + sd^2)
    (Song et al. 2023, App. C) so that f(x, sigma_min) = x.
    """

    def __init__(self, S, cfg, boundary=False, num_freqs=16):
        super().__init__()
        self.S, self.cfg, self.boundary = S, cfg, boundary
        self.register_buffer("freqs", 2.0 ** torch.arange(num_freqs).float() / 4, persistent=False)
        self.register_buffer("x_freqs", math.pi * 2.0 ** torch.arange(cfg.x_freqs).float(), persistent=False)
        d_in = 2 + 4 * cfg.x_freqs + 2 * num_freqs + NUM_CLASSES
        self.net = StackedMLP(S, d_in, cfg.width, cfg.depth, 2, cfg.act)

    def forward(self, x, sigma, labels):  # x: (S*N, 2), sigma: (S*N,), labels: (S*N,)
        sd = self.cfg.sigma_data
        c_skip, c_out, c_in, c_noise = precond(sigma, sd)
        if self.boundary:
            c_skip = sd ** 2 / ((sigma - self.cfg.sigma_min) ** 2 + sd ** 2)
            c_out = (sigma - self.cfg.sigma_min) * sd / (sigma ** 2 + sd ** 2).sqrt()
        ang = c_noise[:, None] * self.freqs  # (S*N, F)
        x_in = c_in[:, None] * x
        x_ang = (x_in[:, :, None] * self.x_freqs).flatten(1)  # (S*N, 2 * x_freqs)
        h = torch.cat([x_in, x_ang.cos(), x_ang.sin(), ang.cos(), ang.sin(),
                       nn.functional.one_hot(labels, NUM_CLASSES).float()], 1)
        F_x = self.net(h.view(self.S, -1, h.shape[1])).reshape(-1, 2)
        return c_skip[:, None] * x + c_out[:, None] * F_x

    def generate(self, z, labels):
        """One-step generator G(z, y) = D(z * sigma_max, sigma_max, y) (DMD / MSD convention)."""
        sigma = torch.full((z.shape[0],), self.cfg.sigma_max)
        return self(z * self.cfg.sigma_max, sigma, labels)


def stack_copies(teacher, S, boundary=False):
    """S students initialised from the teacher's weights (DMD Alg. 1 line 2)."""
    student = ToyDenoiser(S, teacher.cfg, boundary)
    with torch.no_grad():
        for p, q in zip(student.parameters(), teacher.parameters()):
            p.copy_(q.expand_as(p))
    return student


# ----------------------------------------------------------------------------- teacher

@torch.no_grad()
def heun_sample(D, z, labels, num_steps, cfg):
    """Deterministic EDM Heun sampler (EDM Alg. 1, S_churn = 0), last step Euler to sigma = 0."""
    sig = dmd.karras_sigmas(num_steps, cfg.sigma_min, cfg.sigma_max).flip(0).tolist() + [0.0]
    x = z * sig[0]
    for s, s_next in zip(sig[:-1], sig[1:]):
        d = (x - D(x, torch.full((x.shape[0],), s), labels)) / s
        x_next = x + (s_next - s) * d
        if s_next > 0:
            d2 = (x_next - D(x_next, torch.full((x.shape[0],), s_next), labels)) / s_next
            x_next = x + (s_next - s) * 0.5 * (d + d2)
        x = x_next
    return x


def train_teacher(cfg):
    torch.manual_seed(cfg.seed)
    teacher = ToyDenoiser(1, cfg)
    opt = torch.optim.AdamW(teacher.parameters(), lr=cfg.teacher_lr, weight_decay=0.01, betas=(0.9, 0.999))
    for it in (bar := tqdm(range(cfg.teacher_iters), desc="teacher", mininterval=1)):
        y = torch.randint(0, NUM_CLASSES, (cfg.teacher_batch,))
        x = sample_data(y, cfg)
        sigma = (torch.randn(cfg.teacher_batch) * cfg.P_std + cfg.P_mean).exp()  # EDM log-normal
        loss = dmd.denoise_loss(teacher, x, sigma, y, cfg.sigma_data)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if it % 200 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return teacher.eval().requires_grad_(False)


def load_or_train_teacher(cfg, path):
    """Reuse a cached teacher whose stored config matches; otherwise train and save (atomically)."""
    if os.path.exists(path):
        ckpt = torch.load(path, weights_only=True)
        if ckpt.get("config") == asdict(cfg):
            teacher = ToyDenoiser(1, ToyConfig(**ckpt["config"]))
            teacher.load_state_dict(ckpt["state_dict"])
            print(f"teacher: loaded {path}")
            return teacher.eval().requires_grad_(False)
        print(f"teacher: {path} was trained with another config; retraining")
    teacher = train_teacher(cfg)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({"config": asdict(cfg), "state_dict": teacher.state_dict()}, path + ".tmp")
    os.replace(path + ".tmp", path)
    return teacher


# ----------------------------------------------------------------------------- students

class Ownership:
    """Which classes each of S stacked students owns, with per-student uniform label sampling."""

    def __init__(self, groups):  # groups: list of lists of classes, one per student
        self.groups = groups
        width = max(len(g) for g in groups)
        self.table = torch.tensor([g + g[:1] * (width - len(g)) for g in groups])  # (S, width)
        self.count = torch.tensor([len(g) for g in groups])

    def labels(self, n, balanced=False):
        """(S, n) labels from each student's own classes: uniform draws, or cycled (balanced)."""
        if balanced:
            u = torch.arange(n)[None, :] % self.count[:, None]
        else:
            u = (torch.rand(len(self.groups), n) * self.count[:, None]).long()
        return self.table.gather(1, u)


def pair_index(pair_labels, own, mode):
    """Per-student pools of pair indices: its own classes' pairs ('own') or all of them ('all', MSD F_DM)."""
    pools = []
    for g in own.groups:
        mask = torch.isin(pair_labels, torch.tensor(g)) if mode == "own" else torch.ones_like(pair_labels, dtype=torch.bool)
        pools.append(mask.nonzero().squeeze(1))
    width = max(len(p) for p in pools)
    table = torch.stack([p[torch.arange(width) % len(p)] for p in pools])  # (S, width)
    return table, torch.tensor([len(p) for p in pools])


class RunningMean:
    """Mean of each logged loss since the last report (a progress bar that shows the step-0 value
    for hundreds of steps says nothing)."""

    def __init__(self):
        self.sums, self.n = {}, 0

    def add(self, **terms):
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.n += 1

    def report(self):
        out, self.sums, self.n = {k: v / max(1, self.n) for k, v in self.sums.items()}, {}, 0
        return out


def schedule(opts, dc):
    """Cosine decay of every optimiser's lr to 0 over --iters (--lr-decay cosine), else constant.
    auto: cosine for DM (it lowered l1 for every K), constant for CD (cosine broke its K trend)."""
    if dc.lr_decay == "none" or (dc.lr_decay == "auto" and dc.method == "cd"):
        return None
    return [torch.optim.lr_scheduler.CosineAnnealingLR(o, dc.iters) for o in opts]


def ema_update(ema, model, decay):
    with torch.no_grad():
        for p, q in zip(ema.parameters(), model.parameters()):
            p.lerp_(q, 1 - decay)


def per_student(values, S):
    """Per-row values (S*N, ...) -> the mean of each student's rows, (S,) as a list."""
    return values.reshape(S, -1).mean(1).tolist()


@torch.no_grad()
def g_curve(teacher, mu_fake, x, sigma, y, noise, x_reg, x_target, S):
    """G's curve point, per student: 0.5 grad^2 of Eq. 6 (dm_loss's value) and Eq. 9's squared error."""
    x_t = x + sigma[:, None] * noise
    grad = dmd.dm_grad(x, teacher(x_t, sigma, y), mu_fake(x_t, sigma, y))
    return dict(dm=per_student(0.5 * grad ** 2, S), reg=per_student((x_reg - x_target) ** 2, S))


@torch.no_grad()
def fake_curve(mu_fake, x, sigma, y, noise, sigma_data, S):
    """The fake score's curve point, per student: Eq. 8's weighted squared error, before its step."""
    err = (mu_fake(x + sigma[:, None] * noise, sigma, y) - x) ** 2
    return per_student(dmd.edm_weight(sigma, sigma_data)[:, None] * err, S)


def distill_dmd(teacher, own, pairs, dc, log_every=500, curve_every=100):
    """MSD DM stage for S stacked students at once (DMD Alg. 1): Eq. 6 + lambda_reg * Eq. 9, and Eq. 8;
    --loss sid: SiD's loss in Eq. 6's place, at SiD's noise levels and Adam beta1 (sid.py).
    -> (G, last logged means, curve: every `curve_every` steps each student's DM, regression and
    fake-score loss, measured on that step's batch without touching the training's random draws)."""
    cfg, S, B, use_sid = teacher.cfg, len(own.groups), dc.batch, dc.loss == "sid"
    G = stack_copies(teacher, S)
    G_ema = copy.deepcopy(G).requires_grad_(False) if dc.ema else G
    mu_fake = stack_copies(teacher, S)
    betas = (0.0, 0.999) if use_sid else (0.9, 0.999)  # SiD's Adam: beta1 = 0
    opt_G = torch.optim.AdamW(G.parameters(), lr=dc.lr, weight_decay=0.01, betas=betas)
    opt_fake = torch.optim.AdamW(mu_fake.parameters(), lr=dc.fake_lr or dc.lr, weight_decay=0.01, betas=betas)
    lr_sched = schedule([opt_G, opt_fake], dc)
    sigmas = dmd.karras_sigmas(cfg.num_levels, cfg.sigma_min, cfg.sigma_max)  # ascending, (1000,)
    z_pair, y_pair, x_pair = pairs
    table, count = pair_index(y_pair, own, dc.reg_pairs)
    mean, curve = RunningMean(), []
    for it in (bar := tqdm(range(dc.iters), desc=f"dmd x{S}", mininterval=1)):
        record = (it + 1) % curve_every == 0 or it == dc.iters - 1
        # generator update: DM gradient (Eq. 6) + regression on the paired set (Eq. 9)
        y = own.labels(B)  # (S, B)
        z = torch.randn(S, B, 2)
        sigma = (sid.sample_sigma(S * B, sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max) if use_sid
                 else dmd.sample_sigma(S * B, sigmas, dc.t_min, dc.t_max))
        idx = table.gather(1, (torch.rand(S, B) * count[:, None]).long())  # (S, B) pair indices
        # one forward of each student for its DM batch and its pair batch: rows [z; z_pair] per student
        out = G.generate(torch.cat([z, z_pair[idx]], 1).reshape(-1, 2), torch.cat([y, y_pair[idx]], 1).reshape(-1))
        x, x_reg = out.view(S, 2 * B, 2).split(B, 1)  # (S, B, 2) each
        x, y = x.reshape(-1, 2), y.reshape(-1)  # (S*B, 2), (S*B,)
        noise = torch.randn_like(x)  # the draw dm_step_loss makes itself; kept for the curve
        if use_sid:  # G's gradient goes through both denoisers; mu_fake's weights get none of it
            loss_dm = sid.sid_loss(x, sigma, y, teacher, mu_fake.requires_grad_(False), noise, dc.sid_alpha)
            mu_fake.requires_grad_(True)
        else:
            loss_dm = dmd.dm_step_loss(x, sigma, y, teacher, mu_fake, noise)
        loss_reg = dmd.regression_loss(x_reg.reshape(-1, 2), x_pair[idx].reshape(-1, 2))
        row = dict(step=it + 1, **g_curve(teacher, mu_fake, x, sigma, y, noise, x_reg, x_pair[idx], S)) if record else None
        loss_G = S * (loss_dm + dc.lambda_reg * loss_reg)  # sum over students of per-student means
        opt_G.zero_grad(set_to_none=True)
        loss_G.backward()
        opt_G.step()
        # fake score update: denoising loss on detached samples, t ~ U over all levels (Eq. 8, DMD Alg. 1);
        # DMD2's two-time-scale rule repeats it on fresh samples of the updated G
        for j in range(dc.fake_steps_per_gen):
            if j > 0:
                y = own.labels(B).reshape(-1)
                with torch.no_grad():
                    x = G.generate(torch.randn(S * B, 2), y)
            sigma_f = ((torch.randn(S * B) * cfg.P_std + cfg.P_mean).exp() if use_sid  # the teacher's log-normal (SiD)
                       else dmd.sample_sigma(S * B, sigmas, 0, cfg.num_levels))
            noise_f = torch.randn_like(x)  # the draw denoise_loss makes itself
            loss_fake = S * dmd.denoise_loss(mu_fake, x.detach(), sigma_f, y, cfg.sigma_data, noise_f)
            if record and j == 0:
                curve.append(dict(row, fake=fake_curve(mu_fake, x.detach(), sigma_f, y, noise_f, cfg.sigma_data, S)))
            opt_fake.zero_grad(set_to_none=True)
            loss_fake.backward()
            opt_fake.step()
        for sch in lr_sched or []:
            sch.step()
        if dc.ema:
            ema_update(G_ema, G, dc.ema)
        mean.add(**{dc.loss: loss_dm.detach()}, reg=loss_reg.detach(), fake=loss_fake.detach() / S)
        if (it + 1) % log_every == 0 or it == dc.iters - 1:
            last = mean.report()
            bar.set_postfix({k: f"{v:.2e}" for k, v in last.items()})
    return G_ema.eval().requires_grad_(False), last, curve


def distill_cd(teacher, own, dc, log_every=500, curve_every=100):
    """Consistency distillation (Song et al. 2023, Alg. 2) of S stacked students on their own classes.

    One teacher Heun step from sigma_{n+1} to sigma_n; loss ||f(x_{n+1}) - f_ema(x_hat_n)||^2;
    the target f_ema is an EMA of the student; boundary parametrisation f(x, sigma_min) = x.
    -> (f_ema, last logged means, curve: every `curve_every` steps each student's CD loss).
    """
    cfg, S, B = teacher.cfg, len(own.groups), dc.batch
    f = stack_copies(teacher, S, boundary=True)
    f_ema = copy.deepcopy(f).requires_grad_(False)
    opt = torch.optim.AdamW(f.parameters(), lr=dc.lr, weight_decay=0.01, betas=(0.9, 0.999))
    lr_sched = schedule([opt], dc)
    sigmas = dmd.karras_sigmas(dc.cd_steps, cfg.sigma_min, cfg.sigma_max)  # ascending, (N,)
    mean, curve = RunningMean(), []
    for it in (bar := tqdm(range(dc.iters), desc=f"cd x{S}", mininterval=1)):
        y = own.labels(B).reshape(-1)
        x0 = sample_data(y, cfg)
        n = torch.randint(0, dc.cd_steps - 1, (S * B,))
        s_lo, s_hi = sigmas[n], sigmas[n + 1]  # sigma_n < sigma_{n+1}
        x_hi = x0 + s_hi[:, None] * torch.randn_like(x0)
        with torch.no_grad():  # one Heun step of the teacher's probability-flow ODE
            d = (x_hi - teacher(x_hi, s_hi, y)) / s_hi[:, None]
            x_eul = x_hi + (s_lo - s_hi)[:, None] * d
            d2 = (x_eul - teacher(x_eul, s_lo, y)) / s_lo[:, None]
            x_lo = x_hi + (s_lo - s_hi)[:, None] * 0.5 * (d + d2)
            target = f_ema(x_lo, s_lo, y)
        per_row = ((f(x_hi, s_hi, y) - target) ** 2).sum(1)  # (S*B,)
        loss = S * per_row.mean()
        if (it + 1) % curve_every == 0 or it == dc.iters - 1:
            curve.append(dict(step=it + 1, cd=per_student(per_row.detach(), S)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for sch in lr_sched or []:
            sch.step()
        ema_update(f_ema, f, dc.cd_ema)
        mean.add(cd=loss.detach() / S)
        if (it + 1) % log_every == 0 or it == dc.iters - 1:
            last = mean.report()
            bar.set_postfix(cd=f"{last['cd']:.2e}")
    return f_ema.eval(), last, curve


@torch.no_grad()
def sample_students(G, own, n_per_student, generator):
    """One-step samples; each class comes from the student that owns it. Returns (S, n, 2) samples, (S, n) labels."""
    y = own.labels(n_per_student, balanced=True)
    z = torch.randn(y.numel(), 2, generator=generator)
    return G.generate(z, y.reshape(-1)).view(len(own.groups), n_per_student, 2), y


# ----------------------------------------------------------------------------- metric and figure

HIST_RANGE = (-0.75, 0.75)


def histogram(x, bins=200):
    """Normalised 200x200 histogram over a fixed square (App. D.1). x: (N, 2) -> (bins, bins)."""
    h, _, _ = np.histogram2d(x[:, 0].numpy(), x[:, 1].numpy(), bins=bins, range=[HIST_RANGE, HIST_RANGE])
    return h / len(x)


def hist_l1(a, b):
    """App. D.1 metric, as a sum: sum over bins of |difference| of normalised histograms, in [0, 2]
    (0: equal, 2: disjoint). The paper's mean over the 200x200 bins is this / 40,000."""
    ha, hb = histogram(a), histogram(b)
    return float(np.abs(ha - hb).mean() * ha.size)


def on_mode(x, labels, cfg, width=3.0):
    """Share of samples within `width` mode stds of a mode centre of their own class: the data give
    1 - exp(-width^2 / 2) = 0.989; points spread evenly along the rings' circles give at most 0.38
    (2 x 3 std = 0.03 of each mode's 0.079 arc)."""
    d = (x[:, None] - mode_centres(labels, cfg)).norm(dim=2).min(1).values
    return float((d < width * cfg.mode_std).float().mean())


def plot(path, teacher_x, panels, ks, l1, floor, method):
    """One row: the teacher, one panel per K, and the l1-vs-K curve (the paper's Fig. 4/5 in one image)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = 2 + len(panels)
    fig, ax = plt.subplots(1, n, figsize=(3.2 * n, 3.6), layout="constrained")
    for a, (title, x) in zip(ax, [("teacher (Heun)", teacher_x)] + panels):
        a.imshow(np.log1p(histogram(x).T * 1e4), origin="lower", extent=[*HIST_RANGE, *HIST_RANGE], cmap="magma")
        a.set_title(title, fontsize=10)
        a.set_xticks([]), a.set_yticks([])
    ax[-1].plot(ks, l1, "o-", label=f"students ({method})")
    ax[-1].axhline(floor, color="gray", ls="--", label="teacher vs teacher")
    ax[-1].set_xscale("log", base=2)
    ax[-1].set_xticks(ks, [str(k) for k in ks])
    ax[-1].set_ylim(0, max(l1 + [floor]) * 1.1)
    ax[-1].set_xlabel("number of students K")
    ax[-1].set_ylabel("histogram l1 to teacher (sum |diff|)")
    ax[-1].set_title("l1 vs K (lower is better)", fontsize=10)
    ax[-1].legend(fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def loss_curves_per_k(curve, ks):
    """Each K's students averaged: {term: {K: (steps, values)}} from the per-student curve."""
    terms = [t for t in curve[0] if t != "step"] if curve else []
    out, start = {t: {} for t in terms}, 0
    for k in ks:
        for t in terms:
            out[t][k] = ([r["step"] for r in curve], [float(np.mean(r[t][start:start + k])) for r in curve])
        start += k
    return out


def plot_losses(path, per_k):
    """The students' training losses per K (one panel per term, one line per K): is it still falling?"""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = {"dm": "DM loss (Eq. 6)", "reg": "regression loss (Eq. 9)", "fake": "fake-score loss (Eq. 8)",
             "cd": "consistency loss"}
    fig, ax = plt.subplots(1, len(per_k), figsize=(3.6 * len(per_k), 3.0), layout="constrained", squeeze=False)
    for a, (term, lines) in zip(ax[0], per_k.items()):
        for k, (steps, values) in lines.items():
            a.plot(steps, values, label=f"K = {k} (mean over its students)")
        a.set_yscale("log"), a.set_xlabel("step"), a.set_title(names.get(term, term), fontsize=10)
    ax[0][0].legend(fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [a.get_title() for a in ax[0]]


# ----------------------------------------------------------------------------- main

CLI_DEFAULTS = dict(act="auto")  # defaults of the command line that depend on --method (resolved in parse_args)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--students", type=int, nargs="+", default=[8], help="K values from 1, 2, 4, 8; K=1 is always added (default: 8)")
    p.add_argument("--out", default="toy_out", help="folder for the teacher checkpoint and the figure (default: toy_out)")
    p.add_argument("--long", action="store_true", help="3x the students' iterations (--iters): the longer run of the README")
    for dc_cls in (ToyConfig, DistillConfig):  # every field's comment is its help line
        doc = dict(re.findall(r"^\s+(\w+): [^#\n]*#\s*(.*)$", inspect.getsource(dc_cls), re.M))
        for f in fields(dc_cls):
            default = CLI_DEFAULTS.get(f.name, f.default)
            p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=default,
                           help=f"{doc.get(f.name, '')} (default: {default})".replace("%", "%%"))
    args = p.parse_args(argv)
    for k in args.students:
        try:
            partition(k)  # a clear error for --students 3 or 0 before any work
        except ValueError as e:
            p.error(str(e))
    checks = [("iters", 1), ("teacher_iters", 1), ("batch", 1), ("teacher_batch", 1), ("num_pairs", 1),
              ("eval_samples", 8), ("teacher_steps", 2), ("cd_steps", 2), ("fake_steps_per_gen", 1), ("width", 1), ("depth", 1)]
    for name, low in checks:
        if getattr(args, name) < low:
            p.error(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(args, name)}")
    for name in ("lr", "teacher_lr", "mode_std", "sigma_min", "P_std"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for name in ("fake_lr", "lambda_reg"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("ema", "cd_ema"):
        if not 0 <= getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(args, name)}")
    if not 0 <= args.t_min < args.t_max <= args.num_levels:
        p.error(f"--t-min {args.t_min} / --t-max {args.t_max}: expected 0 <= t_min < t_max <= {args.num_levels}")
    for name, allowed in (("method", ("dmd", "cd")), ("loss", ("dm", "sid")), ("reg_pairs", ("own", "all")), ("act", ("auto", "silu", "relu")), ("lr_decay", ("auto", "none", "cosine"))):
        if getattr(args, name) not in allowed:
            p.error(f"--{name.replace('_', '-')} must be one of {allowed}, got {getattr(args, name)!r}")
    if args.loss == "sid" and args.method != "dmd":
        p.error(f"--loss sid replaces DM's Eq. 6 in --method dmd, got --method {args.method}")
    if args.long:
        args.iters *= 3
    if args.act == "auto":  # the one-step DM map is piecewise constant: relu draws the spots; CD is worse with it
        args.act = "relu" if args.method == "dmd" else "silu"
    cfg = ToyConfig(**{f.name: getattr(args, f.name) for f in fields(ToyConfig)})
    dc = DistillConfig(**{f.name: getattr(args, f.name) for f in fields(DistillConfig)})
    return args, cfg, dc


def main(argv=None):
    args, cfg, dc = parse_args(argv)
    t0 = time.time()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    ks = sorted(set([1] + args.students))
    teacher = load_or_train_teacher(cfg, os.path.join(args.out, f"teacher_{cfg.act}.pt"))

    # teacher reference sets (two, for the metric's noise floor) and the shared paired set
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    n = dc.eval_samples
    y_ref = torch.arange(n) % NUM_CLASSES
    ref_a = heun_sample(teacher, torch.randn(n, 2, generator=gen), y_ref, cfg.teacher_steps, cfg)
    ref_b = heun_sample(teacher, torch.randn(n, 2, generator=gen), y_ref, cfg.teacher_steps, cfg)
    y_pair = torch.randint(0, NUM_CLASSES, (dc.num_pairs,), generator=gen)
    z_pair = torch.randn(dc.num_pairs, 2, generator=gen)
    x_pair = heun_sample(teacher, z_pair, y_pair, cfg.teacher_steps, cfg)
    floor = hist_l1(ref_a, ref_b)

    # all students of all K in one stack; a class is always generated by its own student
    groups = [g for k in ks for g in partition(k)]
    own = Ownership(groups)
    torch.manual_seed(cfg.seed + 2)
    if dc.method == "dmd":
        G, losses, curve = distill_dmd(teacher, own, (z_pair, y_pair, x_pair), dc)
    else:
        G, losses, curve = distill_cd(teacher, own, dc)
    x_all, y_all = sample_students(G, own, n, torch.Generator().manual_seed(cfg.seed + 3))  # (S, n, 2), (S, n)

    l1, spots, panels, start = [], [], [], 0
    for k in ks:  # each K's students together cover all classes with n samples
        x_k = x_all[start:start + k, : n // k].reshape(-1, 2)
        y_k = y_all[start:start + k, : n // k].reshape(-1)
        start += k
        l1.append(hist_l1(x_k, ref_a))
        spots.append(on_mode(x_k, y_k, cfg))
        panels.append((f"{k} student{'s' * (k > 1)} (one step)", x_k))
    tag = dc.method if dc.loss == "dm" else dc.loss  # the figures' names: toy2d_dmd.png, toy2d_cd.png, toy2d_sid.png
    print(f"\nmethod={dc.method}  loss={dc.loss}  iters={dc.iters}  lr={dc.lr}  batch/student={dc.batch}")
    print("l1 = sum over the 200x200 bins of |p_a - p_b| of normalised histograms, in [0, 2]; "
          "the paper's App. D.1 mean over bins is l1 / 40000")
    print("on-mode: share of samples within 3 std of a mode of their class (data 0.989, an even ring <= 0.38)")
    print(f"noise floor (teacher vs teacher, {n} samples each): l1 = {floor:.3f}; teacher on-mode {on_mode(ref_a, y_ref, cfg):.3f}")
    for k, v, m in zip(ks, l1, spots):
        print(f"K={k:<2d} students: l1 to teacher = {v:.3f}  on-mode {m:.3f}")
    fig_path = os.path.join(args.out, f"toy2d_{tag}.png")
    plot(fig_path, ref_a, panels, ks, l1, floor, tag)
    per_k = loss_curves_per_k(curve, ks)
    loss_path = os.path.join(args.out, f"toy2d_{tag}_losses.png")
    plot_losses(loss_path, per_k)
    print(f"figures: {fig_path}, {loss_path} (training losses per K)\nwall time: {time.time() - t0:.1f} s")
    return dict(ks=ks, l1=l1, on_mode=spots, floor=floor, figure=fig_path, losses=losses, loss_curves=per_k,
                loss_figure=loss_path)


if __name__ == "__main__":
    main()
