"""Sampling: EDM's Heun sampler for the teacher, the shared paired set, routed one-step students.

    python sample.py pairs --teacher teacher.pt --num 10000 --out pairs.npz     # MSD Sec. 3.2 / DMD
    python sample.py teacher --teacher teacher.pt --seeds 0-49999 --out teacher_imgs.zip
    python sample.py students --ckpt student_0.pt student_1.pt ... --seeds 0-49999 --out imgs.zip
    torchrun --nproc_per_node=8 sample.py pairs --count 10000 ...              # same output, any world size

All modes run under torchrun and resume: finished chunks wait in `<out>.parts/` until the output is
written, then that folder is removed (delete it yourself if you change the model mid-run).

Every image depends only on its seed: its label, initial noise and churn noise come from a
generator seeded with it (EDM's convention), so batch size and GPU count never change a result.

Paired-set file (`.npz`): `seeds` (N,) int64, `labels` (N,) int64, `noise` (N, C, H, W) float32
(the unit-variance z; the teacher starts from z * sigma_max), `images` (N, C, H, W) uint8
(teacher output x in [-1, 1] stored as round(127.5 x + 128) clipped to [0, 255], EDM's PNG mapping).

A student checkpoint is an edm_unet checkpoint with a `partition` entry: the classes it owns.
"""
import argparse
import contextlib
import io
import json
import os
import shutil
import zipfile

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import dmd
import edm_unet


# ----------------------------------------------------------------------------- per-seed randomness

class SeededRandom:
    """One torch.Generator per image; draws are stacked along the batch (EDM's StackedRandomGenerator)."""

    def __init__(self, seeds, device="cpu"):
        self.device = device
        self.gens = [torch.Generator(device="cpu").manual_seed(int(s) % (1 << 63)) for s in seeds]

    def randn(self, shape):
        return torch.stack([torch.randn(shape, generator=g) for g in self.gens]).to(self.device)

    def randint(self, high):
        return torch.stack([torch.randint(high, (), generator=g) for g in self.gens]).to(self.device)


def draw_inputs(seeds, cfg, device, cls=None):
    """Per-seed generators, labels (from the seed unless `cls` fixes them) and unit noise z."""
    rnd = SeededRandom(seeds, device)
    y = rnd.randint(cfg.label_dim) if cls is None else torch.full((len(seeds),), cls, device=device)
    z = rnd.randn((cfg.img_channels, cfg.img_resolution, cfg.img_resolution))  # (B, C, H, W)
    return rnd, y, z


AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # --precision -> autocast dtype


def amp(device_type, dtype):
    """The caller's autocast context, or none for fp32."""
    return torch.autocast(device_type, dtype=dtype) if dtype else contextlib.nullcontext()


def parse_seeds(text):
    """'0-49999' or '1,5,7-9' -> list of ints."""
    seeds = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        if not a.isdigit() or (b and not b.isdigit()):
            raise ValueError(f"bad seed range {part!r}: expected e.g. '0-49999' or '1,5,7-9'")
        seeds.extend(range(int(a), int(b or a) + 1))
    return seeds


# ----------------------------------------------------------------------------- EDM sampler

@torch.no_grad()
def heun_sampler(D, z, labels, rnd=None, num_steps=256, sigma_min=0.002, sigma_max=80.0, rho=7.0,
                 S_churn=0.0, S_min=0.0, S_max=float("inf"), S_noise=1.0, autocast=None):
    """EDM Alg. 2: Karras steps (EDM Eq. 5), optional churn, Heun with an Euler last step.

    z: (B, ...) unit noise; returns x_0 (float32). EDM's ImageNet-64 preset: 256 steps,
    S_churn=40, S_min=0.05, S_max=50, S_noise=1.003; MSD's paired set uses S_churn=0 (App. D.2.1).
    """
    t = dmd.karras_sigmas(num_steps, sigma_min, sigma_max, rho, dtype=torch.float64).flip(0).tolist() + [0.0]

    def denoise(x, s):
        with amp(z.device.type, autocast):
            return D(x, torch.full((x.shape[0],), s, device=x.device), labels).double()

    x = z.double() * t[0]
    for n, (t_cur, t_next) in enumerate(zip(t[:-1], t[1:])):
        gamma = min(S_churn / num_steps, 2 ** 0.5 - 1) if S_min <= t_cur <= S_max else 0.0
        t_hat = t_cur + gamma * t_cur
        if gamma > 0:  # churn: raise the noise level from t_cur to t_hat
            eps = (rnd.randn(z.shape[1:]) if rnd is not None else torch.randn_like(z)).double()
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
    """The inverse of to_uint8: (u - 128) / 127.5, float32 in [-1.004, 0.996]."""
    return u8.float() / 127.5 - 1 - 1 / 255


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


# ----------------------------------------------------------------------------- paired set

def dist_info():
    """(rank, world_size) from torchrun's environment, initialising the process group once."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return int(os.environ.get("RANK", 0)), world


def sharded(seeds, batch, parts, make, rank=0, world=1, desc="chunks"):
    """Run `make(chunk) -> dict of arrays` over fixed chunks of `batch` seeds, resumably, on all ranks.

    Rank r takes chunks r, r+world, ...; each finished chunk is saved atomically to the folder
    `parts`, so a killed run restarts where it stopped and the merged result is identical for any
    world size. Returns the merged dict on rank 0, None elsewhere.
    """
    os.makedirs(parts, exist_ok=True)
    chunks = [seeds[i:i + batch] for i in range(0, len(seeds), batch)]
    for chunk in tqdm(chunks[rank::world], desc=f"{desc} (rank {rank})", disable=rank != 0):
        path = os.path.join(parts, f"{chunk[0]:09d}.npz")
        if os.path.exists(path):
            continue  # resume: done already
        atomic_savez(path, **make(chunk))
    if dist.is_initialized():
        dist.barrier()
    if rank != 0:
        return None
    data = [np.load(os.path.join(parts, f"{c[0]:09d}.npz")) for c in chunks]
    return {k: np.concatenate([d[k] for d in data]) for k in data[0].files}


def generate_pairs(D, seeds, out, batch, sample_kw, rank=0, world=1, device="cpu", autocast=None):
    """Teacher (noise, label, image) triples for `seeds` (MSD Sec. 3.2), written resumably to `out`.

    Returns True on the process that wrote the file.
    """
    def make(chunk):
        rnd, labels, z = draw_inputs(chunk, D.cfg, device)
        x = heun_sampler(D, z, labels, rnd, autocast=autocast, **sample_kw)
        return dict(seeds=np.array(chunk), labels=labels.cpu().numpy(), noise=z.cpu().numpy(),
                    images=to_uint8(x).cpu().numpy())

    merged = sharded(seeds, batch, out + ".parts", make, rank, world, "pairs")
    if merged is None:
        return False
    atomic_savez(out, **merged)
    shutil.rmtree(out + ".parts")
    return True


def load_pairs(path):
    """Read a paired-set file; clear error when it is missing a key."""
    data = np.load(path)
    for k in ("seeds", "labels", "noise", "images"):
        if k not in data:
            raise ValueError(f"{path}: not a paired-set file (missing {k!r})")
    return {k: data[k] for k in data.files}


# ----------------------------------------------------------------------------- CLI

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["pairs", "teacher", "students"])
    p.add_argument("--teacher", help="teacher checkpoint (edm_unet format)")
    p.add_argument("--ckpt", nargs="+", help="student checkpoints (mode students)")
    p.add_argument("--num", "--count", dest="num", type=int, default=10_000,
                   help="pairs: seeds 0..num-1 (MSD App. D.2.1: 10k); under torchrun spell it --count")
    p.add_argument("--seeds", default="0-49999", help="teacher/students: seed ranges, e.g. 0-49999")
    p.add_argument("--class", dest="cls", type=int, default=None, help="fixed class label (default: from seed)")
    p.add_argument("--out", required=True)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--S-churn", type=float, default=0.0, help="EDM ImageNet-64 preset: 40 (0 = deterministic)")
    p.add_argument("--S-min", type=float, default=0.05)
    p.add_argument("--S-max", type=float, default=50.0)
    p.add_argument("--S-noise", type=float, default=1.003)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda asked for, but CUDA is not available")
    if args.mode in ("pairs", "teacher") and not args.teacher:
        p.error(f"mode {args.mode} needs --teacher")
    if args.mode == "students" and not args.ckpt:
        p.error("mode students needs --ckpt student_0.pt ...")
    autocast = AUTOCAST[args.precision]
    sample_kw = dict(num_steps=args.steps, S_churn=args.S_churn, S_min=args.S_min, S_max=args.S_max, S_noise=args.S_noise)
    rank, world = dist_info()
    device = torch.device(args.device, rank % max(1, torch.cuda.device_count())) if args.device == "cuda" else torch.device(args.device)
    if args.mode == "pairs":
        D = edm_unet.load_model(args.teacher)[0].to(device).eval()
        generate_pairs(D, list(range(args.num)), args.out, args.batch, sample_kw, rank, world, device, autocast)
        if rank == 0:
            print(f"wrote {args.num} pairs to {args.out}")
        return
    seeds = parse_seeds(args.seeds)
    if args.mode == "teacher":
        D = edm_unet.load_model(args.teacher)[0].to(device).eval()
        cfg, owner = D.cfg, None
    else:
        students, owner = load_students(args.ckpt, device)
        cfg = students[0].denoiser.cfg
    if args.cls is not None and not 0 <= args.cls < cfg.label_dim:
        p.error(f"--class {args.cls} is outside [0, {cfg.label_dim})")

    def make(chunk):
        rnd, y, z = draw_inputs(chunk, cfg, device, args.cls)
        x = heun_sampler(D, z, y, rnd, autocast=autocast, **sample_kw) if owner is None else route(students, owner, z, y, autocast)
        return dict(images=to_uint8(x).cpu().numpy(), labels=y.cpu().numpy())

    merged = sharded(seeds, args.batch, args.out.rstrip("/") + ".parts", make, rank, world, args.mode)
    if rank == 0:
        images = torch.from_numpy(merged["images"])
        write_images(args.out, images, merged["labels"].tolist(), seeds)
        save_grid(os.path.splitext(args.out.rstrip("/"))[0] + "_grid.png", images[:100])
        shutil.rmtree(args.out.rstrip("/") + ".parts")
        print(f"wrote {len(seeds)} images to {args.out}")


if __name__ == "__main__":
    main()
