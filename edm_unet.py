"""EDM's ADM-style UNet (the ImageNet-64 teacher), EDM preconditioning, student sizes,
our own checkpoints, and a safe importer for official EDM `.pkl` checkpoints.

Written from EDM's description of its network (Karras et al. 2022, Table 1 and App. F; the
network is Dhariwal & Nichol's ADM) and the layout of its checkpoints. Parameter names equal
EDM's, so the `ema` network of `edm-imagenet-64x64-cond-adm.pkl` loads 1:1 (strict).

    python edm_unet.py --preset XS --summary
    python edm_unet.py --import-edm edm-imagenet-64x64-cond-adm.pkl --out teacher.pt

Presets are MSD Table 7's sizes (B: the teacher, 295,899,267 parameters; S, XS, XXS) and `tiny`
(ours, 16x16x1 with 10 classes, for CPU tests and demos). The importer never runs code from the
pickle: a restricted unpickler allows only the globals an EDM snapshot needs (tensor and storage
rebuilders, OrderedDict, EasyDict, ModuleDict, numpy scalars), replaces EDM's persistence hook
(which would exec the embedded source) with one that returns its metadata, and refuses anything
else with an error naming the global. Our own checkpoints are {'config', 'state_dict', ...},
written atomically and read with torch.load(weights_only=True). Mixed precision is the caller's
choice (torch.autocast around the call). What EDM keeps in float32 under mixed precision stays
float32 here too: the preconditioning and c_skip x + c_out F, the noise and label embedding
(mapping) path, and each block's affine(emb) (cast to the activations' dtype after it). The
attention is PyTorch's scaled_dot_product_attention on contiguous q, k, v, so that a fused GPU
kernel can take it (which one does is bench/gpu_check.py's to measure, not assumed here); its
kernels keep the softmax in float32 for half inputs (EDM's AttentionOp: float32 too).
GroupNorm follows autocast: float32 on CUDA, the low-precision dtype on the CPU.
"""
import argparse
import ast
import contextlib
import copy
import io
import math
import os
import pickle
import re
import sys
import zipfile
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


@dataclass
class UNetConfig:
    model_channels: int = 192                      # base width (ADM teacher)
    channel_mult: tuple = (1, 2, 3, 4)             # width multiplier per resolution level
    num_blocks: int = 3                            # residual blocks per level (encoder)
    attn_resolutions: tuple = (32, 16, 8)          # self-attention at these resolutions
    dropout: float = 0.10
    label_dim: int = 1000                          # ImageNet classes (0 = unconditional)
    img_resolution: int = 64
    img_channels: int = 3
    sigma_data: float = 0.5                        # EDM Table 1
    channel_mult_emb: int = 4                      # embedding width = 4 * model_channels


# MSD Table 7 student sizes (B = EDM's teacher); "tiny" is ours, for CPU tests and demos.
PRESETS = {
    "B": UNetConfig(192, (1, 2, 3, 4), 3),    # 295,899,267 parameters
    "S": UNetConfig(160, (1, 2, 2, 4), 3),    # 172,813,603
    "XS": UNetConfig(128, (1, 2, 2, 4), 2),   # 85,943,555
    "XXS": UNetConfig(96, (1, 2, 2, 2), 2),   # 25,990,659
    "tiny": UNetConfig(64, (1, 2), 1, (8,), 0.0, 10, 16, 1),
}


def precond(sigma, sigma_data):
    """EDM Table 1 preconditioning: D(x) = c_skip x + c_out F(c_in x, c_noise). sigma: (B,)."""
    c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
    c_out = sigma * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()
    c_in = 1 / (sigma_data ** 2 + sigma ** 2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


# ----------------------------------------------------------------------------- the UNet F

def float32(like):
    """Autocast off for a region that stays float32 under mixed precision (on `like`'s device)."""
    kind = like.device.type
    return torch.autocast(kind, enabled=False) if kind != "meta" else contextlib.nullcontext()


def group_norm(channels):
    return nn.GroupNorm(min(32, channels // 4), channels, eps=1e-5)


def zero_init(module):
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module


class Skip(nn.Module):
    """The block's shortcut: resample (if up/down), then a 1x1 conv when the width changes."""

    def __init__(self, cin, cout, resample):
        super().__init__()
        self.resample = resample
        if cin != cout:
            self.weight = nn.Parameter(torch.empty(cout, cin, 1, 1))
            self.bias = nn.Parameter(torch.empty(cout))
            conv = nn.Conv2d(cin, cout, 1)  # borrow PyTorch's default init
            self.weight.data.copy_(conv.weight.data), self.bias.data.copy_(conv.bias.data)
        else:
            self.weight = None

    def forward(self, x):
        x = self.resample(x)
        return x if self.weight is None else F.conv2d(x, self.weight, self.bias)


def down(x):
    return F.avg_pool2d(x, 2)  # the 2x2 box filter, stride 2


def up(x):
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


def same(x):
    return x


class UNetBlock(nn.Module):
    """ADM residual block with adaptive GroupNorm (scale, shift) and optional self-attention."""

    def __init__(self, cin, cout, emb_channels, resample=same, attention=False, dropout=0.0):
        super().__init__()
        self.resample = resample
        self.norm0 = group_norm(cin)
        self.conv0 = nn.Conv2d(cin, cout, 3, padding=1)
        self.affine = nn.Linear(emb_channels, 2 * cout)
        self.norm1 = group_norm(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = zero_init(nn.Conv2d(cout, cout, 3, padding=1))
        if cin != cout or resample is not same:
            self.skip = Skip(cin, cout, resample)
        else:
            self.skip = None
        self.num_heads = max(1, cout // 64) if attention else 0
        if attention:
            self.norm2 = group_norm(cout)
            self.qkv = nn.Conv2d(cout, 3 * cout, 1)
            self.proj = zero_init(nn.Conv2d(cout, cout, 1))

    def forward(self, x, emb):  # x: (B, cin, H, W), emb: (B, E)
        h = self.conv0(self.resample(F.silu(self.norm0(x))))
        with float32(emb):  # EDM: affine(emb) in float32, then cast to the activations' dtype
            params = self.affine(emb)
        scale, shift = params.to(h.dtype)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        h = self.conv1(self.dropout(h))
        h = h + (x if self.skip is None else self.skip(x))
        if self.num_heads:
            h = h + self.proj(self.attention(self.qkv(self.norm2(h)), self.num_heads))
        return h

    @staticmethod
    def attention(qkv, heads):
        """qkv: (B, 3C, H, W) with channel index (head * C/heads + c) * 3 + {q, k, v} -> (B, C, H, W)."""
        H, W = qkv.shape[-2:]
        # contiguous: rearrange leaves c with stride 3, and the fused kernels (flash, memory-efficient,
        # cuDNN) take only a last dimension of stride 1; otherwise SDPA falls back to the math path
        q, k, v = (t.contiguous() for t in rearrange(qkv, "b (n c three) h w -> three b n (h w) c", n=heads, three=3))
        a = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(C/heads); (B, heads, HW, c)
        return rearrange(a, "b n (h w) c -> b (n c) h w", h=H, w=W)


class UNet(nn.Module):
    """F of EDM's `DhariwalUNet` (ADM). forward(x, c_noise, labels_onehot) -> (B, C, H, W)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        mc, E = cfg.model_channels, cfg.model_channels * cfg.channel_mult_emb
        kw = dict(emb_channels=E, dropout=cfg.dropout)
        self.map_layer0 = nn.Linear(mc, E)
        self.map_layer1 = nn.Linear(E, E)
        self.map_label = nn.Linear(cfg.label_dim, E, bias=False) if cfg.label_dim else None
        if self.map_label is not None:
            nn.init.normal_(self.map_label.weight, std=1.0)
        self.enc = nn.ModuleDict()
        skips, cout = [], cfg.img_channels
        for level, mult in enumerate(cfg.channel_mult):
            r = cfg.img_resolution >> level
            if level == 0:
                cout = mc * mult
                self.enc[f"{r}x{r}_conv"] = nn.Conv2d(cfg.img_channels, cout, 3, padding=1)
            else:
                self.enc[f"{r}x{r}_down"] = UNetBlock(cout, cout, resample=down, **kw)
            skips.append(cout)
            for i in range(cfg.num_blocks):
                cin, cout = cout, mc * mult
                self.enc[f"{r}x{r}_block{i}"] = UNetBlock(cin, cout, attention=r in cfg.attn_resolutions, **kw)
                skips.append(cout)
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            r = cfg.img_resolution >> level
            if level == len(cfg.channel_mult) - 1:
                self.dec[f"{r}x{r}_in0"] = UNetBlock(cout, cout, attention=True, **kw)
                self.dec[f"{r}x{r}_in1"] = UNetBlock(cout, cout, **kw)
            else:
                self.dec[f"{r}x{r}_up"] = UNetBlock(cout, cout, resample=up, **kw)
            for i in range(cfg.num_blocks + 1):
                cin, cout = cout + skips.pop(), mc * mult
                self.dec[f"{r}x{r}_block{i}"] = UNetBlock(cin, cout, attention=r in cfg.attn_resolutions, **kw)
        self.out_norm = group_norm(cout)
        self.out_conv = zero_init(nn.Conv2d(cout, cfg.img_channels, 3, padding=1))
        self.feature_hook = None  # callable(h (B, C, r, r), emb) run on the middle block's output (adm.py)

    def embed(self, c_noise, labels):
        """Sinusoidal noise embedding (cos first) -> MLP, + label embedding, SiLU. -> (B, E) float32.

        EDM runs this mapping path in float32 under mixed precision (its inputs c_noise and the
        one-hot labels are float32, and its layers compute in their input's dtype); so do we."""
        half = self.cfg.model_channels // 2
        with float32(c_noise):
            freqs = (1 / 10000) ** (torch.arange(half, device=c_noise.device, dtype=torch.float32) / half)
            ang = c_noise.float()[:, None] * freqs  # (B, half)
            emb = torch.cat([ang.cos(), ang.sin()], dim=1)
            emb = self.map_layer1(F.silu(self.map_layer0(emb)))
            if self.map_label is not None:
                emb = emb + self.map_label(labels.float())
            return F.silu(emb)

    def forward(self, x, c_noise, labels):
        emb = self.embed(c_noise, labels)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if name.endswith("_conv") else block(x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if "_block" in name:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
            if name.endswith("_in1") and self.feature_hook is not None:  # the middle block's output
                self.feature_hook(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


class EDMPrecond(nn.Module):
    """The denoiser D(x, sigma, labels) of EDM Table 1 around F = `model` (float32 outside F)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        self.model = UNet(cfg)

    def forward(self, x, sigma, labels):
        """x: (B, C, H, W) float32; sigma: (B,) or scalar; labels: (B,) int or (B, label_dim) one-hot."""
        x = x.float()
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        if labels is not None and labels.ndim == 1:
            labels = F.one_hot(labels.long(), self.cfg.label_dim).float()
        c_skip, c_out, c_in, c_noise = (c.reshape(-1, 1, 1, 1) for c in precond(sigma, self.cfg.sigma_data))
        F_x = self.model(c_in * x, c_noise.flatten(), labels)  # may run under the caller's autocast
        return c_skip * x + c_out * F_x.float()


class OneStep(nn.Module):
    """One-step generator G(z, y) = D(z * sigma_max, sigma_max, y), sigma_max = 80 (DMD / MSD)."""

    def __init__(self, denoiser: EDMPrecond, sigma_max=80.0):
        super().__init__()
        self.denoiser, self.sigma_max = denoiser, sigma_max

    @classmethod
    def from_teacher(cls, teacher: EDMPrecond, sigma_max=80.0):
        """A generator initialised from a teacher's (or a TSM student's) weights (DMD Alg. 1 line 2)."""
        return cls(copy.deepcopy(teacher).requires_grad_(True).train(), sigma_max)

    def forward(self, z, labels):  # z: (B, C, H, W) ~ N(0, I)
        return self.denoiser(z * self.sigma_max, torch.full((z.shape[0],), self.sigma_max, device=z.device), labels)


def build(preset_or_cfg, **overrides):
    cfg = PRESETS[preset_or_cfg] if isinstance(preset_or_cfg, str) else preset_or_cfg
    return EDMPrecond(UNetConfig(**{**asdict(cfg), **overrides}))


def parse_overrides(text):
    """"model_channels=32,channel_mult=(1,2)" -> dict of UNetConfig overrides (Python literals)."""
    fields = set(UNetConfig.__dataclass_fields__)
    out = {}
    for item in filter(None, re.split(r",(?![^(]*\))", text)):
        key, _, value = item.partition("=")
        if key.strip() not in fields:
            raise ValueError(f"{item!r}: {key.strip()!r} is not a UNetConfig field ({sorted(fields)})")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise ValueError(f"{item!r}: {value!r} is not a Python literal") from None
    return out


def count_params(cfg: UNetConfig):
    """Parameter count without allocating memory (meta device)."""
    with torch.device("meta"):
        return sum(p.numel() for p in EDMPrecond(cfg).parameters())


# ----------------------------------------------------------------------------- our checkpoints

def config_from_dict(d):
    d = dict(d)
    d["channel_mult"], d["attn_resolutions"] = tuple(d["channel_mult"]), tuple(d["attn_resolutions"])
    return UNetConfig(**d)


def atomic_save(obj, path):
    """torch.save to a temp file, then rename: a crash never leaves a half-written checkpoint."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_file(path):
    """torch.load(weights_only=True) with a clear error for a missing, corrupt or truncated file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip/pickle errors on truncation or corruption
        raise ValueError(f"checkpoint {path!r} is corrupt or truncated ({type(e).__name__}: {e})") from None


def save_model(model: EDMPrecond, path, **extra):
    atomic_save({"config": asdict(model.cfg), "state_dict": model.state_dict(), **extra}, path)


def load_model(path):
    """Rebuild an EDMPrecond from our checkpoint's stored config. Returns (model, checkpoint dict)."""
    ckpt = load_file(path)
    if not isinstance(ckpt, dict) or "config" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"{path!r} is not an edm_unet checkpoint (expected keys 'config' and 'state_dict')")
    model = EDMPrecond(config_from_dict(ckpt["config"]))
    model.load_state_dict(ckpt["state_dict"])
    return model, ckpt


# ----------------------------------------------------------------------------- EDM .pkl import

class _Persistent(dict):
    """What `_reconstruct_persistent_obj(meta)` yields here: the meta dict itself, never executed."""


class _PlainObject:
    """A non-persistent object (e.g. ModuleDict) reduced the ordinary way: keeps its state only."""

    def __setstate__(self, state):
        self.state = state


def _load_storage(blob):
    """torch.storage._load_from_bytes: a nested torch.save blob, read safely."""
    return torch.load(io.BytesIO(blob), weights_only=True)


def _rebuild_parameter(data, requires_grad, backward_hooks, *state):
    return data


def _np_scalar(dtype, data):
    if dtype.hasobject:
        raise pickle.UnpicklingError(f"refusing numpy scalar of object dtype {dtype}")
    return np.frombuffer(data, dtype=dtype)[0].item()


_ALLOWED = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _Persistent,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("collections", "OrderedDict"): dict,
    ("dnnlib.util", "EasyDict"): dict,
    ("torch.nn.modules.container", "ModuleDict"): _PlainObject,
    ("numpy.core.multiarray", "scalar"): _np_scalar,
    ("numpy._core.multiarray", "scalar"): _np_scalar,
    ("numpy", "dtype"): np.dtype,
    ("builtins", "set"): set,
}


class RefusedGlobal(pickle.UnpicklingError):
    """The file names a global outside the allow-list: nothing of it was executed."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise RefusedGlobal(
                f"refusing to load global '{module}.{name}': not one of the globals an EDM checkpoint needs")
        return _ALLOWED[(module, name)]


def _walk(node, prefix, out):
    """Collect (name -> tensor) from a persistent/plain module tree like nn.Module.state_dict()."""
    state = node.get("state") if isinstance(node, _Persistent) else getattr(node, "state", None)
    if not isinstance(state, dict):
        raise ValueError(f"unexpected object at '{prefix or '<root>'}' in EDM checkpoint: {type(node).__name__}")
    for kind in ("_parameters", "_buffers"):
        for name, t in state.get(kind, {}).items():
            if t is not None:
                out[prefix + name] = t
    for name, child in state.get("_modules", {}).items():
        if child is not None:
            _walk(child, f"{prefix}{name}.", out)


def import_edm(path):
    """Read an official EDM checkpoint safely; return our EDMPrecond holding its `ema` weights."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"EDM checkpoint {path!r} does not exist")
    if zipfile.is_zipfile(path):  # torch.save writes zip archives; EDM's snapshots are plain pickles
        raise ValueError(f"{path}: a PyTorch checkpoint (zip archive), not an EDM network-snapshot .pkl; "
                         f"if edm_unet.py wrote it, pass it directly where a checkpoint is read "
                         f"(msd.py --teacher, sample.py --teacher)")
    try:
        with open(path, "rb") as f:
            data = _RestrictedUnpickler(f).load()
    except RefusedGlobal as e:
        raise ValueError(f"{path}: {e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: corrupt or truncated EDM pickle ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("ema"), _Persistent):
        raise ValueError(f"{path}: expected a dict with a persistent 'ema' network (EDM's network-snapshot format)")
    meta = data["ema"]
    if meta.get("class_name", "").split(".")[-1] != "EDMPrecond":
        raise ValueError(f"{path}: 'ema' is a {meta.get('class_name')!r}, expected EDMPrecond")
    kw = meta["state"].get("_init_kwargs", {})
    if kw.get("model_type", "DhariwalUNet") != "DhariwalUNet":
        raise ValueError(f"{path}: model_type {kw.get('model_type')!r} is not supported (expected 'DhariwalUNet')")
    if kw.get("augment_dim", 0):
        raise ValueError(f"{path}: augment_dim={kw['augment_dim']} is not supported (expected 0)")
    cfg = UNetConfig(  # EDM's defaults where the training script did not record a value
        model_channels=int(kw.get("model_channels", 192)), channel_mult=tuple(kw.get("channel_mult", (1, 2, 3, 4))),
        num_blocks=int(kw.get("num_blocks", 3)), attn_resolutions=tuple(kw.get("attn_resolutions", (32, 16, 8))),
        dropout=float(kw.get("dropout", 0.10)), label_dim=int(kw.get("label_dim", 0)),
        img_resolution=int(kw["img_resolution"]), img_channels=int(kw["img_channels"]),
        sigma_data=float(kw.get("sigma_data", 0.5)), channel_mult_emb=int(kw.get("channel_mult_emb", 4)))
    tensors = {}
    _walk(meta, "", tensors)
    for name in [n for n in tensors if n.endswith("resample_filter")]:  # fixed 2x2 box filters
        f = tensors.pop(name).float()
        if f.numel() != 4 or not torch.allclose(f.flatten(), f.flatten()[:1].expand(4)):
            raise ValueError(f"{path}: {name} is not the 2x2 box filter this network assumes")
    model = EDMPrecond(cfg)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: tensors do not match the network; missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


# ----------------------------------------------------------------------------- CLI

def summary(cfg: UNetConfig):
    with torch.device("meta"):
        model = EDMPrecond(cfg)
    print(f"{'block':<20s}{'in->out':>12s}{'attn':>6s}{'params':>14s}")
    for part in ("enc", "dec"):
        for name, b in getattr(model.model, part).items():
            n = sum(p.numel() for p in b.parameters())
            cin, cout = (b.in_channels, b.out_channels) if isinstance(b, nn.Conv2d) else (b.norm0.num_channels, b.conv0.out_channels)
            attn = "yes" if getattr(b, "num_heads", 0) else ""
            print(f"{part + '.' + name:<20s}{f'{cin}->{cout}':>12s}{attn:>6s}{n:>14,d}")
    print(f"total parameters: {count_params(cfg):,d}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="B", choices=sorted(PRESETS))
    p.add_argument("--summary", action="store_true", help="print the per-level layout and parameter count")
    p.add_argument("--import-edm", metavar="PKL", help="official EDM checkpoint to import")
    p.add_argument("--out", help="where to write our checkpoint (with --import-edm)")
    args = p.parse_args(argv)
    if args.import_edm:
        if not args.out:
            p.error("--import-edm needs --out teacher.pt")
        model = import_edm(args.import_edm)
        save_model(model, args.out)
        print(f"imported {args.import_edm}: {sum(t.numel() for t in model.parameters()):,d} parameters -> {args.out}")
    else:
        summary(PRESETS[args.preset])


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # the user's input: one line and argparse's exit status 2
        sys.exit(print(f"error: {e}", file=sys.stderr) or 2)
