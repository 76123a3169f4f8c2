"""Sampling: EDM's Heun sampler for the teacher, the shared paired set, routed one-step students.

    python sample.py pairs --teacher teacher.pt --num 10000 --out pairs.npz     # MSD Sec. 3.2 / DMD
    python sample.py teacher --teacher teacher.pt --seeds 0-49999 --out teacher_imgs.zip
    python sample.py students --ckpt student_0.pt student_1.pt ... --seeds 0-49999 --out imgs.zip
    torchrun --nproc_per_node=8 sample.py pairs --count 10000 ...              # same output, any world size

All modes run under torchrun and resume: finished chunks wait in `<out>.parts/` (each holding its
seeds, the folder a `meta.json` of the model and sampler settings) until the output is written, then
that folder is removed. A resumed run reuses the seeds already done, whatever the batch size, and
refuses a folder made with another model or other settings.

Every image depends only on its seed, drawn in the order of EDM's `generate.py`: a CPU generator
seeded with it gives the initial noise z (C, H, W), then the label, then one float64 noise of x's
shape at every sampler step (multiplied by zero where churn is off). On a CPU, `--seeds` therefore
gives EDM's images seed for seed; batch size, GPU count and device never change a result (EDM seeds
CUDA generators on a GPU, so its GPU images differ from its CPU ones; ours are the same everywhere).

Paired-set file (`.npz`): `seeds` (N,) int64, `labels` (N,) int64, `noise` (N, C, H, W) float32
(the unit-variance z; the teacher starts from z * sigma_max), `images` (N, C, H, W) uint8
(teacher output x in [-1, 1] stored as floor(127.5 x + 128) clipped to [0, 255], EDM's PNG mapping).

A student checkpoint is an edm_unet checkpoint with a `partition` entry: the classes it owns.
"""
import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import zipfile

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import dmd
import edm_unet


# ----------------------------------------------------------------------------- per-seed randomness

class SeededRandom:
    """One CPU torch.Generator per image, seeded as EDM's StackedRandomGenerator (seed mod 2^32);
    draws are stacked along the batch, then moved to `device`."""

    def __init__(self, seeds, device="cpu"):
        self.device = device
        self.gens = [torch.Generator(device="cpu").manual_seed(int(s) % (1 << 32)) for s in seeds]

    def randn(self, shape, dtype=torch.float32):
        return torch.stack([torch.randn(shape, generator=g, dtype=dtype) for g in self.gens]).to(self.device)

    def randint(self, high):
        return torch.stack([torch.randint(high, (), generator=g) for g in self.gens]).to(self.device)


def draw_inputs(seeds, cfg, device, cls=None):
    """Per-seed generators, unit noise z, then labels: EDM generate.py's order. `cls` fixes the
    labels (the draw still happens, as in EDM, so the sampler's later draws do not move)."""
    rnd = SeededRandom(seeds, device)
    z = rnd.randn((cfg.img_channels, cfg.img_resolution, cfg.img_resolution))  # (B, C, H, W)
    y = rnd.randint(cfg.label_dim)
    if cls is not None:
        y = torch.full_like(y, cls)
    return rnd, y, z


AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # --precision -> autocast dtype


def amp(device_type, dtype):
    """The caller's autocast context, or none for fp32."""
    return torch.autocast(device_type, dtype=dtype) if dtype else contextlib.nullcontext()


def parse_seeds(text):
    """'0-49999' or '1,5,7-9' -> list of ints, each once, ranges ascending."""
    seeds = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        if not a.isdigit() or (b and not b.isdigit()):
            raise ValueError(f"bad seed range {part!r}: expected e.g. '0-49999' or '1,5,7-9'")
        if b and int(b) < int(a):
            raise ValueError(f"bad seed range {part!r}: empty (the end is below the start)")
        seeds.extend(range(int(a), int(b or a) + 1))
    if len(set(seeds)) != len(seeds):
        dup = next(s for i, s in enumerate(seeds) if s in seeds[:i])
        raise ValueError(f"seed {dup} is listed twice in {text!r}")
    return seeds


# ----------------------------------------------------------------------------- EDM sampler

@torch.no_grad()
def heun_sampler(D, z, labels, rnd=None, num_steps=256, sigma_min=0.002, sigma_max=80.0, rho=7.0,
                 S_churn=0.0, S_min=0.0, S_max=float("inf"), S_noise=1.0, autocast=None):
    """EDM Alg. 2: Karras steps (EDM Eq. 5), optional churn, Heun with an Euler last step.

    z: (B, ...) unit noise; returns x_0 (float32). EDM's ImageNet-64 preset: 256 steps,
    S_churn=40, S_min=0.05, S_max=50, S_noise=1.003; MSD's paired set uses S_churn=0 (App. D.2.1).
    """
    if num_steps < 2:
        raise ValueError(f"num_steps {num_steps}: the Karras schedule needs at least 2 steps")
    t = dmd.karras_sigmas(num_steps, sigma_min, sigma_max, rho, dtype=torch.float64).flip(0).tolist() + [0.0]

    def denoise(x, s):
        with amp(z.device.type, autocast):
            return D(x, torch.full((x.shape[0],), s, device=x.device), labels).double()

    x = z.double() * t[0]  # (B, ...) float64 state, as EDM keeps it
    for n, (t_cur, t_next) in enumerate(zip(t[:-1], t[1:])):
        gamma = min(S_churn / num_steps, 2 ** 0.5 - 1) if S_min <= t_cur <= S_max else 0.0
        t_hat = t_cur + gamma * t_cur
        # churn: raise the noise level from t_cur to t_hat. The noise is drawn at every step, even
        # where gamma = 0 (then it is multiplied by 0), so each seed's draws follow EDM's.
        eps = rnd.randn(x.shape[1:], dtype=torch.float64) if rnd is not None else torch.randn_like(x)
        x = x + (t_hat ** 2 - t_cur ** 2) ** 0.5 * S_noise * eps
        d = (x - denoise(x.float(), t_hat)) / t_hat
        x_next = x + (t_next - t_hat) * d
        if n < num_steps - 1:  # second-order correction
            d2 = (x_next - denoise(x_next.float(), t_next)) / t_next
            x_next = x + (t_next - t_hat) * 0.5 * (d + d2)
        x = x_next
    return x.float()


def to_uint8(x):
    """[-1, 1] float -> uint8 as EDM writes PNGs."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)


def from_uint8(u8):
    """uint8 -> [-1, 1] float32 as EDM's training loop and DMD2 read images: u / 127.5 - 1, the centre
    of the bin that to_uint8's floor(127.5 x + 128) maps x into (round-trip bias ~0)."""
    return u8.float() / 127.5 - 1


def atomic_savez(path, **arrays):
    """np.savez to a temp file, then rename: a reader never sees half a file."""
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- routing

def load_students(paths, device="cpu"):
    """Load student generators and build the label -> student routing table from their partitions."""
    students, owner = [], {}
    for k, path in enumerate(paths):
        model, ckpt = edm_unet.load_model(path)
        if "partition" not in ckpt:
            raise ValueError(f"{path}: no 'partition' in the checkpoint; is it a student snapshot of msd.py?")
        for c in ckpt["partition"]:
            if c in owner:
                raise ValueError(f"class {c} is owned by two students: {paths[owner[c]]} and {path}")
            owner[c] = k
        students.append(edm_unet.OneStep(model.to(device).eval(), ckpt.get("sigma_max", 80.0)))
    return students, owner


@torch.no_grad()
def route(students, owner, z, labels, autocast=None):
    """One-step samples where each label is generated by the student that owns it. -> (B, C, H, W)."""
    missing = sorted(set(labels.tolist()) - set(owner))
    if missing:
        raise ValueError(f"labels {missing[:10]} are owned by no student (owned: {len(owner)} classes)")
    k_of = torch.tensor([owner[c] for c in labels.tolist()], device=labels.device)
    out = torch.empty_like(z)
    for k, G in enumerate(students):
        idx = (k_of == k).nonzero().squeeze(1)
        if len(idx):
            with amp(z.device.type, autocast):
                out[idx] = G(z[idx], labels[idx]).float()
    return out


# ----------------------------------------------------------------------------- output

def write_images(out, images, labels, seeds):
    """EDM's dataset layout: img{seed:08d}.png files + dataset.json {'labels': [[name, label], ...]},
    in a folder or a .zip. images: (N, C, H, W) uint8."""
    from PIL import Image
    names = [f"img{s:08d}.png" for s in seeds]
    meta = json.dumps({"labels": [[n, int(y)] for n, y in zip(names, labels)]})
    pngs = []
    for img in images:
        arr = img.permute(1, 2, 0).cpu().numpy()
        buf = io.BytesIO()
        Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(buf, format="png")
        pngs.append(buf.getvalue())
    if out.endswith(".zip"):
        tmp = out + ".tmp"
        with zipfile.ZipFile(tmp, "w") as zf:
            for n, b in zip(names, pngs):
                zf.writestr(n, b)
            zf.writestr("dataset.json", meta)
        os.replace(tmp, out)
    else:
        os.makedirs(out, exist_ok=True)
        for n, b in zip(names, pngs):
            with open(os.path.join(out, n), "wb") as f:
                f.write(b)
        with open(os.path.join(out, "dataset.json"), "w") as f:
            f.write(meta)


class ImageFolder:
    """Reader for EDM's dataset layout (what `write_images` writes, and EDM's `dataset_tool.py`):
    a folder or .zip of PNGs, labels in dataset.json. Images load lazily (ImageNet-64 is 1.28M files).

    classes: keep only these labels (MSD's per-partition data and per-partition FID).
    resolution/channels: expected image shape; any other is an error naming the file.
    Item i -> ((C, H, W) uint8 tensor, label int; -1 when the dataset has no labels).
    """

    def __init__(self, path, classes=None, resolution=None, channels=None, need_labels=False):
        if not os.path.exists(path):
            raise FileNotFoundError(f"dataset {path!r} does not exist")
        self.path, self._zip = path, None
        files = self._listdir()
        names = sorted(n for n in files if n.lower().endswith((".png", ".jpg", ".jpeg")))
        if not names:
            raise ValueError(f"dataset {path!r} holds no .png/.jpg images")
        meta = self._read("dataset.json") if "dataset.json" in files else None
        table = dict(json.loads(meta)["labels"] or []) if meta else {}
        if (need_labels or classes is not None) and not table:
            raise ValueError(f"dataset {path!r} has no labels (dataset.json with 'labels' expected)")
        for n in names if table else []:
            if n not in table:
                raise ValueError(f"dataset {path!r}: image {n!r} has no label in dataset.json")
        labels = [int(table[n]) if table else -1 for n in names]
        if classes is not None:
            keep = {int(c) for c in classes}
            pairs = [(n, y) for n, y in zip(names, labels) if y in keep]
            if not pairs:
                raise ValueError(f"dataset {path!r} has no images of classes {sorted(keep)[:10]}")
            names, labels = map(list, zip(*pairs))
        self.names, self.labels = names, torch.tensor(labels, dtype=torch.long)
        c, h, w = self[0][0].shape  # check the first image eagerly, the rest as they load
        self.shape = (channels or c, resolution or h, resolution or w)

    def _listdir(self):
        if os.path.isdir(self.path):
            return [os.path.relpath(os.path.join(r, f), self.path).replace(os.sep, "/")
                    for r, _, fs in os.walk(self.path) for f in fs]
        return self._zipfile().namelist()

    def _zipfile(self):
        if self._zip is None or self._zip[0] != os.getpid():  # one handle per (DataLoader worker) process
            self._zip = (os.getpid(), zipfile.ZipFile(self.path))
        return self._zip[1]

    def _read(self, name):
        if os.path.isdir(self.path):
            with open(os.path.join(self.path, name), "rb") as f:
                return f.read()
        return self._zipfile().read(name)

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        from PIL import Image
        name = self.names[i]
        try:
            arr = np.array(Image.open(io.BytesIO(self._read(name))))
        except Exception as e:
            raise ValueError(f"dataset {self.path!r}: image {name!r} is corrupt or unreadable ({e})") from None
        img = torch.from_numpy(arr[:, :, None] if arr.ndim == 2 else arr).permute(2, 0, 1)  # (C, H, W)
        if hasattr(self, "shape") and tuple(img.shape) != self.shape:
            raise ValueError(f"dataset {self.path!r}: image {name!r} has shape {tuple(img.shape)}, "
                             f"expected {self.shape} (C, H, W)")
        return img.contiguous(), int(self.labels[i])

    def batches(self, batch):
        """Yield ((B, C, H, W) uint8, (B,) labels) in order."""
        for i in range(0, len(self), batch):
            items = [self[j] for j in range(i, min(i + batch, len(self)))]
            yield torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def save_grid(path, images, ncol=10):
    """A quick-look grid of uint8 images (N, C, H, W) as one PNG."""
    from PIL import Image
    n, c, h, w = images.shape
    nrow = -(-n // ncol)
    grid = torch.zeros(c, nrow * h, ncol * w, dtype=torch.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, ncol)
        grid[:, r * h:(r + 1) * h, q * w:(q + 1) * w] = img
    arr = grid.permute(1, 2, 0).numpy()
    Image.fromarray(arr[:, :, 0] if c == 1 else arr).save(path)


@torch.no_grad()
def class_grid(path, net, classes, shape, seed, device, heun=False, dtype=None, per_class=8):
    """A training run's quick look, one row per class (up to 10 of `classes`): one-step G(z) = D(80 z, 80),
    or 32 Heun steps of a denoiser (heun). dtype: the run's autocast dtype (None: float32)."""
    rows = classes[:: max(1, len(classes) // 10)][:10]
    y = torch.tensor([c for c in rows for _ in range(per_class)], device=device)
    z = torch.randn((len(y), *shape), generator=torch.Generator(device).manual_seed(seed), device=device)
    was = net.training
    net.eval()
    with amp(device.type, dtype):
        x = heun_sampler(net, z, y, num_steps=32) if heun else edm_unet.OneStep(net)(z, y)
    net.train(was)
    save_grid(path, to_uint8(x.float()).cpu(), ncol=per_class)


# ----------------------------------------------------------------------------- paired set

def dist_info(device="cpu"):
    """(rank, world_size, this rank's device) from torchrun's environment, initialising the process
    group once. On CUDA each rank takes GPU LOCAL_RANK before its first collective and names it to
    the process group (else every rank may open a context on GPU 0); NCCL on GPU, gloo on CPU."""
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    dev = torch.device("cuda", local) if str(device).startswith("cuda") else torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return rank, world, dev


def file_digest(path):
    """sha256 of a file (what a parts folder remembers of the model that made it)."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_parts(parts, meta):
    """Refuse a parts folder that another model or other settings made, saying what differs."""
    path = os.path.join(parts, "meta.json")
    if not os.path.isdir(parts):
        return
    if not os.path.exists(path):
        raise ValueError(f"{parts} holds parts without a meta.json (an older or foreign run?); delete it to start over")
    with open(path) as f:
        old = json.load(f)
    diff = [f"{k}: {old.get(k)!r} there, {meta.get(k)!r} now" for k in sorted(set(old) | set(meta)) if old.get(k) != meta.get(k)]
    if diff:
        raise ValueError(f"{parts} was made by another run ({'; '.join(diff)}); delete it to start over, "
                         f"or rerun with the settings it was made with")


def sharded(seeds, batch, parts, make, meta, rank=0, world=1, desc="chunks"):
    """Run `make(chunk) -> dict of arrays` over the seeds not done yet, resumably, on all ranks.

    Every finished chunk is saved atomically to the folder `parts` with the seeds it holds; `meta`
    (model and sampler settings) is written beside them. A rerun reuses every seed already done,
    whatever its chunking, chunks the rest by `batch`, and rank r takes chunks r, r+world, ...: the
    merged result is the same for any world size and batch size. The folder appears only with its
    first part. Returns the merged dict, rows in the order of `seeds` (each exactly once), on rank
    0; None elsewhere.
    """
    check_parts(parts, meta)
    done = {}  # seed -> part file holding it
    for name in sorted(os.listdir(parts)) if os.path.isdir(parts) else []:
        if name.endswith(".npz") and not name.endswith(".tmp.npz"):
            for s in np.load(os.path.join(parts, name))["seeds"].tolist():
                if s in done:
                    raise ValueError(f"{parts}: seed {s} is in both {done[s]} and {name}; delete the folder to start over")
                done[s] = name
    if dist.is_initialized():
        dist.barrier()  # every rank has listed the folder before any rank writes to it
    todo = [s for s in seeds if s not in done]
    chunks = [todo[i:i + batch] for i in range(0, len(todo), batch)]
    for chunk in tqdm(chunks[rank::world], desc=f"{desc} (rank {rank})", disable=rank != 0):
        arrays = make(chunk)
        os.makedirs(parts, exist_ok=True)
        if not os.path.exists(os.path.join(parts, "meta.json")):
            with open(os.path.join(parts, f"meta.json.tmp{os.getpid()}"), "w") as f:
                json.dump(meta, f, indent=1)
            os.replace(f.name, os.path.join(parts, "meta.json"))
        atomic_savez(os.path.join(parts, f"{chunk[0]:09d}-{len(chunk)}.npz"), seeds=np.array(chunk, dtype=np.int64), **arrays)
    if dist.is_initialized():
        dist.barrier()
    if rank != 0:
        return None
    rows = {}  # seed -> (part data, row)
    for name in sorted(os.listdir(parts)):
        if name.endswith(".npz") and not name.endswith(".tmp.npz"):
            d = dict(np.load(os.path.join(parts, name)))
            for i, s in enumerate(d["seeds"].tolist()):
                if s in rows:
                    raise ValueError(f"{parts}: seed {s} is held twice; delete the folder to start over")
                rows[s] = (d, i)
    missing = [s for s in seeds if s not in rows]
    if missing:
        raise RuntimeError(f"{parts}: seeds {missing[:10]} were not generated")
    return {k: np.stack([rows[s][0][k][rows[s][1]] for s in seeds]) for k in rows[seeds[0]][0]}


def run_meta(mode, ckpts, sample_kw, precision, cls=None):
    """What a parts folder must agree on to be reused: the mode, the model files, the sampler settings."""
    meta = {"mode": mode, "models": [file_digest(p) for p in ckpts], "precision": precision, "class": cls}
    if mode != "students":
        meta["sampler"] = dict(sample_kw)
    return meta


def generate_pairs(D, seeds, out, batch, sample_kw, rank=0, world=1, device="cpu", autocast=None, meta=None):
    """Teacher (noise, label, image) triples for `seeds` (MSD Sec. 3.2), written resumably to `out`.

    Returns True on the process that wrote the file.
    """
    def make(chunk):
        rnd, labels, z = draw_inputs(chunk, D.cfg, device)
        x = heun_sampler(D, z, labels, rnd, autocast=autocast, **sample_kw)
        return dict(labels=labels.cpu().numpy(), noise=z.cpu().numpy(), images=to_uint8(x).cpu().numpy())

    meta = meta or {"mode": "pairs", "sampler": dict(sample_kw)}
    merged = sharded(seeds, batch, out + ".parts", make, meta, rank, world, "pairs")
    if merged is None:
        return False
    if merged["seeds"].tolist() != list(seeds):
        raise RuntimeError(f"{out}: the merged seeds do not match the requested ones")
    atomic_savez(out, **merged)
    shutil.rmtree(out + ".parts")
    return True


PAIRS_LAYOUT = ("an .npz of plain arrays seeds (N,) int64, labels (N,) int64, noise (N, C, H, W) float32, "
                "images (N, C, H, W) uint8")


def load_pairs(path):
    """Read a paired-set file (no pickles); a clear error naming the file when it is not one.

    The error says what the file should be and never passes on numpy's own hint, which suggests
    loading the file with allow_pickle: an untrusted pickle runs code."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"paired set {path!r} does not exist")

    def refuse(why):
        return ValueError(f"{path!r} is not a paired-set file from `sample.py pairs` ({why}); expected {PAIRS_LAYOUT}")
    try:
        data = np.load(path, allow_pickle=False)
        files = data.files
    except Exception as e:
        raise refuse("it holds pickled objects" if "pickle" in str(e) else f"not an .npz archive: {type(e).__name__}") from None
    for k in ("seeds", "labels", "noise", "images"):
        if k not in files:
            raise refuse(f"no {k!r} array")
    try:
        return {k: data[k] for k in files}
    except Exception as e:
        raise refuse("it holds pickled objects" if "pickle" in str(e) else f"an unreadable array: {type(e).__name__}") from None


# ----------------------------------------------------------------------------- CLI

def positive(kind=int):
    """argparse type: a number > 0."""
    def parse(text):
        v = kind(text)
        if not v > 0:
            raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
        return v
    parse.__name__ = kind.__name__
    return parse


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["pairs", "teacher", "students"],
                   help="pairs: the paired set for msd.py; teacher: Heun images; students: routed one-step images")
    p.add_argument("--teacher", help="teacher checkpoint (edm_unet.py format; modes pairs and teacher)")
    p.add_argument("--ckpt", nargs="+", help="student checkpoints, one per student (mode students)")
    p.add_argument("--num", "--count", dest="num", type=positive(), default=10_000,
                   help="pairs: seeds 0..num-1 (default 10000, MSD App. D.2.1); under torchrun spell it --count")
    p.add_argument("--seeds", default="0-49999", help="teacher/students: seeds, e.g. 0-49999 or 1,5,7-9 (default 0-49999)")
    p.add_argument("--class", dest="cls", type=int, default=None, help="fixed class label (default: drawn from the seed)")
    p.add_argument("--out", required=True, help="pairs: .npz; images: a .zip or a folder (EDM's layout)")
    p.add_argument("--batch", type=positive(), default=64, help="images per chunk and per forward (default 64)")
    p.add_argument("--steps", type=int, default=256, help="Heun steps, >= 2 (default 256, MSD App. D.2.1)")
    p.add_argument("--S-churn", type=float, default=0.0, help="EDM churn; 40 = EDM's ImageNet-64 preset (default 0: deterministic, as MSD's pairs)")
    p.add_argument("--S-min", type=float, default=0.05, help="churn only for sigma >= S_min (default 0.05)")
    p.add_argument("--S-max", type=float, default=50.0, help="churn only for sigma <= S_max (default 50)")
    p.add_argument("--S-noise", type=float, default=1.003, help="churn noise scale (default 1.003)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast of the network (default fp32)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: cuda if available")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda asked for, but CUDA is not available")
    if args.steps < 2:
        p.error(f"--steps {args.steps}: expected >= 2 (Heun steps of the Karras schedule)")
    if args.S_churn < 0 or args.S_noise <= 0:
        p.error(f"--S-churn {args.S_churn} / --S-noise {args.S_noise}: expected >= 0 / > 0")
    if args.mode in ("pairs", "teacher") and not args.teacher:
        p.error(f"mode {args.mode} needs --teacher")
    if args.mode == "students" and not args.ckpt:
        p.error("mode students needs --ckpt student_0.pt ...")
    ckpts = [args.teacher] if args.mode != "students" else args.ckpt
    for path in ckpts:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    seeds = list(range(args.num)) if args.mode == "pairs" else parse_seeds(args.seeds)
    autocast = AUTOCAST[args.precision]
    sample_kw = dict(num_steps=args.steps, S_churn=args.S_churn, S_min=args.S_min, S_max=args.S_max, S_noise=args.S_noise)
    rank, world, device = dist_info(args.device)
    if args.mode == "students":
        students, owner = load_students(args.ckpt, device)
        cfg = students[0].denoiser.cfg
    else:
        D = edm_unet.load_model(args.teacher)[0].to(device).eval()
        cfg, owner = D.cfg, None
    if args.cls is not None and not 0 <= args.cls < cfg.label_dim:
        p.error(f"--class {args.cls} is outside [0, {cfg.label_dim})")
    meta = run_meta(args.mode, ckpts, sample_kw, args.precision, args.cls)
    if args.mode == "pairs":
        generate_pairs(D, seeds, args.out, args.batch, sample_kw, rank, world, device, autocast, meta)
        if rank == 0:
            print(f"wrote {len(seeds)} pairs to {args.out}")
        return

    def make(chunk):
        rnd, y, z = draw_inputs(chunk, cfg, device, args.cls)
        x = heun_sampler(D, z, y, rnd, autocast=autocast, **sample_kw) if owner is None else route(students, owner, z, y, autocast)
        return dict(images=to_uint8(x).cpu().numpy(), labels=y.cpu().numpy())

    parts = args.out.rstrip("/") + ".parts"
    merged = sharded(seeds, args.batch, parts, make, meta, rank, world, args.mode)
    if rank == 0:
        if merged["seeds"].tolist() != seeds:  # every requested seed exactly once, in order
            raise RuntimeError(f"{parts}: the merged seeds do not match the requested ones")
        images = torch.from_numpy(merged["images"])
        write_images(args.out, images, merged["labels"].tolist(), seeds)
        save_grid(os.path.splitext(args.out.rstrip("/"))[0] + "_grid.png", images[:100])
        shutil.rmtree(parts)
        print(f"wrote {len(seeds)} images to {args.out}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # the user's input: one line and argparse's exit status 2
        sys.exit(print(f"error: {e}", file=sys.stderr) or 2)
