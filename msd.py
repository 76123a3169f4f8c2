"""Multi-student distillation (MSD Sec. 2-3, Eq. 4): train student k of K on its slice of the classes.

    torchrun --nproc_per_node=8 msd.py --partition 0 --num-students 4 --teacher edm.pt --pairs pairs.npz
    python msd.py --stage tsm --preset S --teacher edm.pt --data imagenet.zip ...  # Stage 0 (tsm.py)
    python msd.py --stage adm --init out/p0/student.pt --data imagenet.zip ...     # Stage 2 (adm.py)

Every student is an independent run: K students train in parallel on K machines or one after
another. Stages (MSD Fig. 2): `tsm` (Eq. 3) pretrains a smaller denoiser; `dm` (Eq. 6 + Eq. 9)
distils a one-step generator G from it or from the teacher; `adm` adds the GAN of adm.py.
A run writes to --out: resume-XXXXXXXX.pt (full state, the last two kept), student.pt (the
generator/denoiser alone, with its `partition`, for sample.py), samples_XXXXXXXX.png, log.jsonl.
"""
import argparse
import contextlib
import copy
import dataclasses
import glob
import json
import os
import time
import typing

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import adm
import dmd
import edm_unet
import sample
import tsm


@dataclasses.dataclass
class Config:
    stage: str = "dm"                   # tsm | dm | adm (MSD Eq. 4)
    partition: int = 0                  # k: which student this run trains
    num_students: int = 4               # K (MSD Table 1: 4)
    split: str = "consecutive"          # consecutive (paper) | kmeans (label embeddings) | random (App. B.1)
    split_seed: int = 0
    teacher: str = ""                   # edm_unet checkpoint of mu_real (edm_unet.py --import-edm)
    init: str = ""                      # G (dm/adm) or student (tsm) init; default teacher (dm), preset (tsm)
    fake_init: str = ""                 # mu_fake init; default: --init (dm, App. D.2.2), teacher (adm, App. D.2.1)
    preset: str = ""                    # tsm: fresh student architecture (S, XS, XXS, tiny)
    arch: str = ""                      # tsm: preset overrides, e.g. "model_channels=32,img_resolution=8"
    pairs: str = ""                     # dm: paired set from `sample.py pairs`
    data: str = ""                      # adm/tsm: real images, EDM layout
    target: str = "teacher"             # tsm: teacher (Eq. 3) | data (EDM denoising score matching)
    reg_pairs: str = "all"              # all: the paper's F_DM (Sec. 3.2) | own: pairs of own classes (App. B.4)
    out: str = "out/student"
    # optimisation (App. D.2.1); None = the stage's paper default, see STAGE_DEFAULTS
    lr: typing.Optional[float] = None
    batch: typing.Optional[int] = None  # global batch, split over ranks
    iters: typing.Optional[int] = None
    lambda_reg: typing.Optional[float] = None  # LPIPS regression weight (Eq. 9)
    micro_batch: int = 0                # per-rank micro-batch for gradient accumulation; 0 = no accumulation
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 10.0
    fake_steps_per_gen: int = 1         # 1: the paper's alternating update; DMD2's TTUR uses 5
    t_min: int = 20                     # DM/GAN t range over 1000 Karras levels: DMD2's [0.02T, 0.98T]
    t_max: int = 980
    P_mean: float = -1.2                # tsm: EDM log-normal sigma (App. D.2.2)
    P_std: float = 1.2
    lambda_gan_g: float = 3e-3          # adm: GAN weights (App. D.2.1)
    lambda_gan_d: float = 1e-2
    head_width: int = 256
    ema_halflife_kimg: float = 0.0      # EMA of the trained net; 0 = off (the paper)
    reg_loss: str = "lpips"             # lpips (App. D.2.1) | mse (the 2-D toy; offline CPU benchmarks)
    lpips_size: int = 224               # LPIPS input size: bilinear upsampling to 224 (App. D.2.1)
    lpips_random: bool = False          # tests only: LPIPS with random VGG (no download)
    precision: str = "bf16"             # bf16 | fp16 (GradScaler) | fp32; "mixed precision" (App. D.2.1)
    compile: bool = False
    channels_last: bool = False         # NHWC weights/activations (pays off with --compile on GPUs)
    device: str = ""                    # "" = cuda if available, else cpu
    seed: int = 0
    log_every: int = 100
    grad_probe_every: int = 1000        # per-term gradient norms on G; 0 = off
    sample_every: int = 5000
    ckpt_every: int = 5000
    max_bad_steps: int = 20             # consecutive non-finite steps before the run stops
    resume: bool = False


STAGE_DEFAULTS = {  # lr, global batch, iterations, lambda_reg
    "tsm": dict(lr=1e-4, batch=576, iters=400_000, lambda_reg=0.0),   # App. D.2.2 (S students)
    "dm": dict(lr=2e-6, batch=128, iters=200_000, lambda_reg=0.25),   # App. D.2.1
    "adm": dict(lr=5e-7, batch=192, iters=150_000, lambda_reg=0.0),   # App. D.2.1; regression dropped as in DMD2
}


# ----------------------------------------------------------------------------- partitions (Sec. 3.2, App. B.1)

def kmeans_equal(X, K, seed=0, iters=50):
    """Equal-size k-means: Lloyd steps where assignment fills clusters greedily by distance with
    capacity ceil(N/K)...floor(N/K). Deterministic for a seed. X: (N, D) -> (N,) cluster ids."""
    X = np.asarray(X, dtype=np.float64)
    N = len(X)
    caps = np.full(K, N // K) + (np.arange(K) < N % K)
    rng = np.random.default_rng(seed)
    centers = X[rng.choice(N, K, replace=False)]
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


def label_embeddings(denoiser):
    """The teacher's label-embedding vectors, one per class: columns of map_label's weight. -> (C, E)."""
    return denoiser.model.map_label.weight.detach().T.cpu().numpy()


# ----------------------------------------------------------------------------- set-up

def check_config(cfg):
    """Fail on bad input before anything loads."""
    if cfg.stage not in STAGE_DEFAULTS:
        raise ValueError(f"--stage {cfg.stage!r}: expected one of {list(STAGE_DEFAULTS)}")
    if cfg.num_students < 1:
        raise ValueError(f"--num-students {cfg.num_students}: expected >= 1")
    if not 0 <= cfg.partition < cfg.num_students:
        raise ValueError(f"--partition {cfg.partition}: expected 0..{cfg.num_students - 1} for --num-students {cfg.num_students}")
    if cfg.precision not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"--precision {cfg.precision!r}: expected bf16, fp16 or fp32")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but CUDA is not available (use --device cpu)")
    if cfg.precision == "fp16" and not cfg.device.startswith("cuda"):
        raise ValueError("--precision fp16 needs CUDA (GradScaler); use bf16 or fp32 on the CPU")
    for name, allowed in (("reg_pairs", ("all", "own")), ("target", ("teacher", "data")), ("reg_loss", ("lpips", "mse"))):
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(cfg, name)!r}: expected one of {allowed}")
    needs = {"dm": ["teacher", "pairs"] if cfg.lambda_reg else ["teacher"], "adm": ["teacher", "data"],
             "tsm": ["data"] + (["teacher"] if cfg.target == "teacher" else [])}[cfg.stage]
    for name in needs:
        if not getattr(cfg, name):
            raise ValueError(f"--stage {cfg.stage} needs --{name}")
        if not os.path.exists(getattr(cfg, name)):
            raise FileNotFoundError(f"--{name} {getattr(cfg, name)!r} does not exist")
    if cfg.stage == "tsm" and not (cfg.preset or cfg.init):
        raise ValueError("--stage tsm needs --preset (a fresh student) or --init (a checkpoint)")
    try:
        edm_unet.parse_overrides(cfg.arch)
    except ValueError as e:
        raise ValueError(f"--arch {e}") from None
    if cfg.preset and cfg.preset not in edm_unet.PRESETS:
        raise ValueError(f"--preset {cfg.preset!r}: expected one of {list(edm_unet.PRESETS)}")


def setup_dist(cfg):
    """(rank, world, device) from torchrun's environment; NCCL on GPU, gloo on CPU."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if cfg.device.startswith("cuda") else torch.device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if cfg.batch % world:
        raise ValueError(f"--batch {cfg.batch} does not split over {world} ranks")
    per_rank = cfg.batch // world
    micro = cfg.micro_batch or per_rank
    if per_rank % micro:
        raise ValueError(f"--micro-batch {micro} does not divide the per-rank batch {per_rank}")
    return rank, world, device, per_rank, micro


def build_nets(cfg, device):
    """The stage's networks: frozen teacher, the trained net (G's denoiser or the TSM student), fake score, head."""
    teacher = edm_unet.load_model(cfg.teacher)[0] if cfg.teacher else None
    if cfg.stage == "tsm":
        net = edm_unet.load_model(cfg.init)[0] if cfg.init else edm_unet.build(cfg.preset, **edm_unet.parse_overrides(cfg.arch))
        fake = head = None
    else:
        net = edm_unet.load_model(cfg.init)[0] if cfg.init else copy.deepcopy(teacher)  # DMD Alg. 1: G <- teacher
        fake_src = cfg.fake_init or (cfg.teacher if cfg.stage == "adm" else cfg.init or cfg.teacher)
        fake = edm_unet.load_model(fake_src)[0]
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


def load_pairs(cfg, partition, model_cfg, device):
    """Paired set (Eq. 9) on the device; F_DM keeps all pairs (Sec. 3.2), `own` keeps the partition's."""
    p = sample.load_pairs(cfg.pairs)
    want = (model_cfg.img_channels, model_cfg.img_resolution, model_cfg.img_resolution)
    if tuple(p["images"].shape[1:]) != want or p["labels"].max() >= model_cfg.label_dim:
        raise ValueError(f"{cfg.pairs}: images {p['images'].shape[1:]} / labels < {p['labels'].max() + 1} do not fit "
                         f"the model ({want}, {model_cfg.label_dim} classes)")
    keep = np.isin(p["labels"], partition) if cfg.reg_pairs == "own" else np.ones(len(p["labels"]), bool)
    return (torch.from_numpy(p["noise"][keep]).to(device), torch.from_numpy(p["labels"][keep]).to(device),
            sample.from_uint8(torch.from_numpy(p["images"][keep]).to(device)))


def rng(cfg, step, stream, device):
    """All randomness of a step comes from (seed, step, stream): a resumed run draws what an
    uninterrupted one would, and every rank draws the same *global* batch, then takes its slice."""
    return torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + step * 16 + stream)


def amp(cfg, device):
    return sample.amp(device.type, sample.AUTOCAST[cfg.precision])


# ----------------------------------------------------------------------------- losses of one micro-batch

def generator_losses(cfg, G, teacher, fake, critic, lpips_fn, b, pairs):
    """G's loss terms on micro-batch b: DM (Eq. 6), regression (Eq. 9), GAN (adm). Returns (terms, x)."""
    terms = {}
    if cfg.lambda_reg:
        z_pair, y_pair, img_pair = (t[b["pair_idx"]] for t in pairs)
        x_all = G(torch.cat([b["z"], z_pair]), torch.cat([b["y"], y_pair]))  # one forward for both terms
        x, x_pair = x_all[:len(b["z"])], x_all[len(b["z"]):]
        terms["reg"] = dmd.regression_loss(x_pair, img_pair, lpips_fn, cfg.lpips_size)
    else:
        x = G(b["z"], b["y"])
    terms["dm"] = dmd.dm_step_loss(x, b["sigma"], b["y"], teacher, fake, b["noise"])
    if cfg.stage == "adm":  # non-saturating GAN loss through the (frozen here) critic
        x_t = x + dmd._bcast(b["sigma"], x) * b["noise"]
        terms["gan_g"] = adm.gan_g_loss(critic(x_t, b["sigma"], b["y"])[1])
    return terms, x


def loss_weights(cfg):
    """The weight of every loss term, by the name the loss functions give it."""
    return {"dm": 1.0, "reg": cfg.lambda_reg, "gan_g": cfg.lambda_gan_g, "fake": 1.0, "gan_d": cfg.lambda_gan_d, "tsm": 1.0}


def weighted(cfg, terms):
    w = loss_weights(cfg)
    return sum(w[k] * v for k, v in terms.items())


def critic_losses(cfg, critic, x, b, sigma_data, real=None):
    """mu_fake's denoising loss on detached G samples (Eq. 8) [+ the GAN discriminator loss (adm)].

    adm: real images and G samples are noised at the same sigma and go through one critic forward.
    """
    sigma, noise = b["sigma_fake"], b["noise_fake"]
    if cfg.stage == "dm":
        return {"fake": dmd.denoise_loss(critic, x, sigma, b["y"], sigma_data, noise)}
    n, sigma2 = len(x), torch.cat([sigma, sigma])
    x_t = torch.cat([x, real[0]]) + dmd._bcast(sigma2, x) * torch.cat([noise, b["noise_real"]])
    denoised, logits = critic(x_t, sigma2, torch.cat([b["y"], real[1]]))
    return {"fake": dmd.weighted_error(denoised[:n], x, sigma, sigma_data),
            "gan_d": adm.gan_d_loss(logits[:n], logits[n:])}


# ----------------------------------------------------------------------------- checkpoints

def save_resume(cfg, step, state, keep=2):
    """Atomic resume file, then prune old ones: a crash at any point leaves a loadable checkpoint."""
    path = os.path.join(cfg.out, f"resume-{step:08d}.pt")
    edm_unet.atomic_save({"config": dataclasses.asdict(cfg), "step": step, **state}, path)
    for old in sorted(glob.glob(os.path.join(cfg.out, "resume-*.pt")))[:-keep]:
        os.remove(old)


def load_resume(cfg, master=True):
    """Newest loadable resume file; a corrupt or truncated one is reported and skipped. None if none."""
    for path in sorted(glob.glob(os.path.join(cfg.out, "resume-*.pt")), reverse=True):
        try:
            return edm_unet.load_file(path), path
        except FileNotFoundError:
            continue  # renamed by rank 0 meanwhile
        except ValueError as e:
            print(f"warning: {e}; trying the previous checkpoint")
            if master:
                os.replace(path, path + ".corrupt")  # out of the rotation, kept for inspection
    return None, None


def optimizer_step(cfg, params, opt, scaler):
    """Unscale (fp16), clip to cfg.grad_clip, step unless the gradient is not finite. -> (norm, ok)."""
    if scaler is not None:
        scaler.unscale_(opt)
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    ok = bool(torch.isfinite(norm))  # the one host sync per update
    if scaler is not None:
        scaler.step(opt)  # skips by itself on inf
        scaler.update()
    elif ok:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return norm.detach(), ok


# ----------------------------------------------------------------------------- training

def draw_batch(cfg, step, stream, shape, classes, sigmas, device, n_pairs=0, n_real=0):
    """The whole global batch of one update (every rank draws it and slices its own part)."""
    g, B = rng(cfg, step, stream, device), cfg.batch
    b = {"z": torch.randn((B, *shape), generator=g, device=device),
         "y": classes[torch.randint(len(classes), (B,), generator=g, device=device)],
         "sigma": tsm.sample_sigma_lognormal(B, cfg.P_mean, cfg.P_std, g, device) if cfg.stage == "tsm"
         else dmd.sample_sigma(B, sigmas, cfg.t_min, cfg.t_max, g)}
    b["noise"] = torch.randn((B, *shape), generator=g, device=device)
    if cfg.stage != "tsm":  # the fake score's own t and noise (DMD Alg. 1 draws them afresh)
        b["sigma_fake"] = dmd.sample_sigma(B, sigmas, cfg.t_min, cfg.t_max, g)
        b["noise_fake"] = torch.randn((B, *shape), generator=g, device=device)
    if n_pairs:
        b["pair_idx"] = torch.randint(n_pairs, (B,), generator=g, device=device)
    if n_real:
        b["real_idx"] = torch.randint(n_real, (B,), generator=g, device=device)
        b["noise_real"] = torch.randn((B, *shape), generator=g, device=device)
    return b


def real_batch(real, idx, device):
    """Real images (B, C, H, W) in [-1, 1] and their labels, from an ImageFolder."""
    items = [real[i] for i in idx.tolist()]
    return (sample.from_uint8(torch.stack([x for x, _ in items]).to(device)),
            torch.tensor([y for _, y in items], device=device))


def micro_batches(b, lo, micro, accum):
    for i in range(accum):
        yield i, {k: v[lo + i * micro: lo + (i + 1) * micro] for k, v in b.items()}


def train(cfg):
    cfg.device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    for k, v in STAGE_DEFAULTS.get(cfg.stage, {}).items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    check_config(cfg)
    rank, world, device, per_rank, micro = setup_dist(cfg)
    master, accum = rank == 0, per_rank // micro
    torch.manual_seed(cfg.seed)  # a fresh --preset student is the same on every rank
    teacher, net, fake, head = build_nets(cfg, device)
    mcfg = net.cfg
    if cfg.num_students > mcfg.label_dim:
        raise ValueError(f"--num-students {cfg.num_students} exceeds the {mcfg.label_dim} classes")
    emb = label_embeddings(teacher or net) if cfg.split == "kmeans" else None
    partitions = make_partition(mcfg.label_dim, cfg.num_students, cfg.split, cfg.split_seed, emb)
    partition = partitions[cfg.partition]
    if master:
        print(f"stage {cfg.stage}: student {cfg.partition} of {cfg.num_students} ({cfg.split}) owns "
              f"{len(partition)} classes: {partition if len(partition) <= 20 else partition[:10] + ['...']}")
    shape = (mcfg.img_channels, mcfg.img_resolution, mcfg.img_resolution)

    # data: paired set (dm), real images of the partition (adm: F_ADM, tsm)
    pairs = load_pairs(cfg, partition, mcfg, device) if cfg.stage == "dm" and cfg.lambda_reg else None
    real = sample.ImageFolder(cfg.data, classes=partition, resolution=mcfg.img_resolution,
                              channels=mcfg.img_channels, need_labels=True) if cfg.stage in ("adm", "tsm") else None
    if real is not None and real.shape != shape:
        raise ValueError(f"--data {cfg.data}: images {real.shape} do not fit the model {shape}")
    lpips_fn = None
    if pairs is not None and cfg.reg_loss == "lpips":
        import lpips
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            lpips_fn = lpips.LPIPS(net="vgg", pnet_rand=cfg.lpips_random, verbose=False).to(device).eval()
        lpips_fn.requires_grad_(False)

    if cfg.channels_last:
        for m in (teacher, net, fake):
            if m is not None:
                m.to(memory_format=torch.channels_last)
    critic = adm.FakeWithHead(fake, head) if head is not None else fake  # what the second optimiser trains
    adamw = lambda params: torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    opt_net = adamw(net.parameters())
    opt_critic = adamw(critic.parameters()) if critic is not None else None
    scalers = [torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None for _ in range(2)]
    ema = copy.deepcopy(net).eval().requires_grad_(False) if cfg.ema_halflife_kimg else None

    step, skipped = 0, 0
    ckpt, path = load_resume(cfg, master) if cfg.resume else (None, None)
    if ckpt is not None:
        if ckpt["partition"] != partition or ckpt["config"]["stage"] != cfg.stage:
            raise ValueError(f"{path} is stage {ckpt['config']['stage']} with partition {ckpt['partition'][:5]}...; "
                             f"this run is stage {cfg.stage} with {partition[:5]}...")
        net.load_state_dict(ckpt["net"]), opt_net.load_state_dict(ckpt["opt_net"])
        if critic is not None:
            critic.load_state_dict(ckpt["critic"]), opt_critic.load_state_dict(ckpt["opt_critic"])
        for sc, st in zip(scalers, ckpt["scalers"]):
            if sc is not None and st is not None:
                sc.load_state_dict(st)
        if ema is not None and ckpt.get("ema") is not None:
            ema.load_state_dict(ckpt["ema"])
        step, skipped = ckpt["step"], ckpt["skipped"]
        if master:
            print(f"resumed from {path} at step {step}")

    def wrap(m):  # DDP for the nets that train, then torch.compile
        if world > 1:
            m = DDP(m, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
        return torch.compile(m) if cfg.compile else m

    frozen = (lambda m: torch.compile(m) if cfg.compile and m is not None else m)
    net_train, teacher_f, fake_f, critic_f = wrap(net), frozen(teacher), frozen(fake), frozen(critic)
    critic_train = wrap(critic) if critic is not None else None
    G = edm_unet.OneStep(net_train)  # G(z, y) = D(80 z, 80, y)
    sigmas = dmd.karras_sigmas(1000).to(device)  # App. D.2.1: 1000 bins in [0.002, 80]
    classes = torch.tensor(partition, device=device)
    n_pairs, n_real = len(pairs[0]) if pairs is not None else 0, len(real) if real is not None else 0
    ctx = lambda: amp(cfg, device)
    no_sync = lambda m, i: m.no_sync() if world > 1 and i < accum - 1 else contextlib.nullcontext()
    os.makedirs(cfg.out, exist_ok=True)
    log, bad, t_last, n_last, terms_acc = None, 0, time.time(), step, {}

    while step < cfg.iters:
        torch.manual_seed(cfg.seed * 7919 + step * 131 + rank)  # dropout (tsm): a pure function of the step
        # --- 1. update the trained net: G (dm/adm, DMD Alg. 1) or the TSM student (Eq. 3)
        b_gen = draw_batch(cfg, step, 0, shape, classes, sigmas, device, n_pairs, n_real)
        xs = []
        if critic is not None:
            critic.requires_grad_(False)  # the GAN term's gradient goes through the critic into G only
        for i, b in micro_batches(b_gen, rank * per_rank, micro, accum):
            with no_sync(net_train, i), ctx():
                if cfg.stage == "tsm":
                    x, y = real_batch(real, b["real_idx"], device)
                    terms = {"tsm": tsm.tsm_loss(net_train, teacher_f if cfg.target == "teacher" else None,
                                                 x, b["sigma"], y, mcfg.sigma_data, b["noise"])}
                else:
                    terms, x = generator_losses(cfg, G, teacher_f, fake_f, critic_f, lpips_fn, b, pairs)
                (weighted(cfg, terms) / accum).backward()
            xs.append(x.detach())
            for k, v in terms.items():
                terms_acc[k] = terms_acc.get(k, 0) + v.detach().float() / accum
        if critic is not None:
            critic.requires_grad_(True)
        norm_net, ok = optimizer_step(cfg, net.parameters(), opt_net, scalers[0])
        if ema is not None and ok:
            beta = 0.5 ** (cfg.batch / (cfg.ema_halflife_kimg * 1000))
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), net.parameters()):
                    pe.lerp_(p, 1 - beta)
        # --- 2. update mu_fake (Eq. 8) [+ GAN head (adm)] on detached G samples; TTUR repeats it
        for j in range(cfg.fake_steps_per_gen if critic is not None else 0):
            b_fake = b_gen if j == 0 else draw_batch(cfg, step, 1 + j, shape, classes, sigmas, device, 0, n_real)
            for i, b in micro_batches(b_fake, rank * per_rank, micro, accum):
                if j > 0:
                    with torch.no_grad(), ctx():
                        xs[i] = G(b["z"], b["y"]).detach()
                r = real_batch(real, b["real_idx"], device) if cfg.stage == "adm" else None
                with no_sync(critic_train, i), ctx():
                    terms = critic_losses(cfg, critic_train, xs[i], b, mcfg.sigma_data, r)
                    (weighted(cfg, terms) / accum).backward()
                for k, v in terms.items():
                    terms_acc[k] = terms_acc.get(k, 0) + v.detach().float() / (accum * cfg.fake_steps_per_gen)
            norm_fake, ok_fake = optimizer_step(cfg, critic.parameters(), opt_critic, scalers[1])
            terms_acc["gnorm_fake"] = terms_acc.get("gnorm_fake", 0) + norm_fake.float() / cfg.fake_steps_per_gen
            ok = ok and ok_fake
        terms_acc["gnorm_net"] = terms_acc.get("gnorm_net", 0) + norm_net.float()
        step += 1
        skipped, bad = skipped + (not ok), 0 if ok else bad + 1
        if bad > cfg.max_bad_steps:
            raise RuntimeError(f"{bad} non-finite steps in a row at step {step}: lower --lr, or check the data/precision")

        # --- logging, probes, samples, checkpoints (rank 0 writes)
        if master and (step % cfg.log_every == 0 or step == cfg.iters):
            dt, n = time.time() - t_last, step - n_last
            log = {"step": step, **{k: float(f"{float(v) / n:.4g}") for k, v in terms_acc.items()},
                   "ms_per_iter": round(1000 * dt / n, 1), "img_per_s": round(cfg.batch * n / dt, 1), "skipped": skipped}
            if device.type == "cuda":
                log["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
            print(" ".join(f"{k} {v}" for k, v in log.items()), flush=True)
            with open(os.path.join(cfg.out, "log.jsonl"), "a") as f:
                f.write(json.dumps(log) + "\n")
        if step % cfg.log_every == 0 or step == cfg.iters:
            t_last, n_last, terms_acc = time.time(), step, {}
        if master and cfg.grad_probe_every and step % cfg.grad_probe_every == 0 and cfg.stage != "tsm":
            b = next(micro_batches(b_gen, 0, micro, 1))[1]  # the generator's batch, which has the pairs
            probe = grad_probe(cfg, net, teacher_f, fake, critic, lpips_fn, b, pairs, ctx)
            print("grad probe (weighted |grad| on G): " + " ".join(f"{k} {v:.4g}" for k, v in probe.items()), flush=True)
            with open(os.path.join(cfg.out, "log.jsonl"), "a") as f:
                f.write(json.dumps({"step": step, "grad_probe": probe}) + "\n")
        if master and (step % cfg.sample_every == 0 or step == cfg.iters):
            save_samples(cfg, ema or net, partition, shape, device, step)
        if master and (step % cfg.ckpt_every == 0 or step == cfg.iters):
            save_resume(cfg, step, {"partition": partition, "partitions": partitions, "skipped": skipped,
                                    "net": net.state_dict(), "opt_net": opt_net.state_dict(),
                                    "critic": critic.state_dict() if critic is not None else None,
                                    "opt_critic": opt_critic.state_dict() if critic is not None else None,
                                    "scalers": [s.state_dict() if s is not None else None for s in scalers],
                                    "ema": ema.state_dict() if ema is not None else None})
            edm_unet.save_model(ema or net, os.path.join(cfg.out, "student.pt"), partition=partition,
                                stage=cfg.stage, step=step, sigma_max=80.0)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return {"step": step, "log": log, "partition": partition, "skipped": skipped,
            "net": net, "fake": fake, "head": head, "teacher": teacher}


def grad_probe(cfg, net, teacher, fake, critic, lpips_fn, b, pairs, ctx):
    """|grad_G| of each weighted loss term on its own (DMD users balance lambda_reg by these)."""
    params = [p for p in net.parameters() if p.requires_grad]
    if critic is not None:
        critic.requires_grad_(False)
    with ctx():
        terms, _ = generator_losses(cfg, edm_unet.OneStep(net), teacher, fake, critic, lpips_fn, b, pairs)
    w, out = loss_weights(cfg), {}
    for k, v in terms.items():
        grads = torch.autograd.grad(w[k] * v, params, retain_graph=True, allow_unused=True)
        out[k] = float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))
    if critic is not None:
        critic.requires_grad_(True)
    return out


@torch.no_grad()
def save_samples(cfg, net, partition, shape, device, step, per_class=8):
    """A grid, one row per class (up to 10 of the partition): one-step G, or 32 Heun steps (tsm)."""
    rows = partition[:: max(1, len(partition) // 10)][:10]
    y = torch.tensor([c for c in rows for _ in range(per_class)], device=device)
    z = torch.randn((len(y), *shape), generator=torch.Generator(device).manual_seed(cfg.seed), device=device)
    was = net.training
    net.eval()
    with amp(cfg, device):
        x = sample.heun_sampler(net, z, y, num_steps=32) if cfg.stage == "tsm" else edm_unet.OneStep(net)(z, y)
    net.train(was)
    sample.save_grid(os.path.join(cfg.out, f"samples_{step:08d}.png"), sample.to_uint8(x.float()).cpu(), ncol=per_class)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        kind = [a for a in typing.get_args(f.type) if a is not type(None)] or [f.type]
        if kind[0] is bool:
            p.add_argument(f"--{f.name.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=f.default)
        else:
            p.add_argument(f"--{f.name.replace('_', '-')}", type=kind[0], default=f.default)
    return Config(**vars(p.parse_args(argv)))


def main(argv=None):
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
