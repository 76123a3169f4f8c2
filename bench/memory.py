"""Peak memory of one msd.py step per GPU, by stage, student preset and rows per GPU, and the
--micro-batch each stage needs on 40, 80 and 141 GB cards.

    python bench/memory.py                                  # the paper's recipe (App. D.2: 4 GPUs per student)
    python bench/memory.py --rows dm:B:32 tsm:S:144          # stage:student preset:rows per GPU
    python bench/memory.py --results bench/results/memory    # + table.md, run.json and docs/performance.md's table

Counted on the CPU without arithmetic: msd.py's own set-up and one step (G's update, then the fake
score's; bf16 autocast; LPIPS-VGG at 224 px; a random-weight teacher B) run on fake tensors, which
carry shapes and dtypes only, under a dispatch mode that counts the bytes of the tensor storages
alive after each operation, as CUDA's allocator statistic max_memory_allocated counts them. Two
steps, at 2 and at 4 rows, give at every operation live(rows) = fixed + rows x per_row (weights,
gradients and AdamW's moments are fixed, activations grow with the rows); the peak at any rows is
the largest of these. GroupNorm is counted as CUDA's autocast runs it (float32; the CPU's runs it
in bf16). A test holds the count against a real CPU step. Not counted: the CUDA context (about 0.5
GiB), cuDNN's and attention kernels' workspaces, the allocator's rounding and fragmentation (hence
a card's usable memory is taken as USABLE of it), an EMA copy (off by default) and DDP's gradient
buckets (one more copy of the gradients under torchrun). bench/gpu_check.py holds the estimate
against the allocator on a GPU (within TOL).
"""
import argparse
import contextlib
import os
import sys
import tempfile
import time
import weakref

import numpy as np
import torch
from torch.utils import _pytree as pytree
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import edm_unet  # noqa: E402
import msd  # noqa: E402
import runtime  # noqa: E402
import sample  # noqa: E402

CARDS = {"40 GB (A100)": 40_536, "80 GB (H100)": 81_559, "141 GB (H200)": 143_771}  # MiB, as nvidia-smi reports them
USABLE = 0.9   # of a card's memory: the rest for the CUDA context, workspaces, fragmentation
TOL = 0.25     # bench/gpu_check.py: |estimate - allocator's peak| / allocator's peak on a GPU
DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "performance.md")
MARKERS = ("<!-- memory table: written by bench/memory.py -->", "<!-- end of the memory table -->")
PAPER = (("dm", "B", 32), ("adm", "B", 48), ("tsm", "S", 144), ("dm", "S", 32), ("adm", "S", 48))  # App. D.2 / 4 GPUs


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages created inside it and still alive, after each operation."""

    def __init__(self):
        super().__init__()
        self.live, self.ids, self.series = 0, set(), []

    def _free(self, key, n):
        self.ids.discard(key)
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:  # a fake tensor's value (a finite-norm check, an
            return 1                                             # index list): any number, the shapes are the same
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if st._cdata not in self.ids:  # a view shares its base's storage: counted once
                    self.ids.add(st._cdata)
                    self.live += st.nbytes()
                    weakref.finalize(st, self._free, st._cdata, st.nbytes())
        self.series.append(self.live)
        return out


def files(tmp, stage, preset):
    """A random-weight teacher (B; tiny for a tiny student), a student of the preset, a paired set and
    real images of partition 0 of 4. -> msd.py's arguments for one step of the stage."""
    j = lambda *a: os.path.join(tmp, *a)  # noqa: E731
    big = preset != "tiny"
    teacher = j("teacher.pt" if big else "teacher_tiny.pt")
    if not os.path.exists(teacher):
        torch.manual_seed(0)
        T = edm_unet.build("B" if big else "tiny")
        edm_unet.save_model(T, teacher)
        import dm_step
        c = T.cfg
        dm_step.fake_pairs(c, teacher[:-3] + "_pairs.npz", n=64)
        g = torch.Generator().manual_seed(0)
        imgs = torch.randint(0, 256, (64, c.img_channels, c.img_resolution, c.img_resolution), generator=g, dtype=torch.uint8)
        sample.write_images(teacher[:-3] + "_data", imgs, [i % (c.label_dim // 4) for i in range(64)], list(range(64)))
    if preset not in ("B", "tiny") and not os.path.exists(j(f"{preset}.pt")):
        edm_unet.save_model(edm_unet.build(preset), j(f"{preset}.pt"))
    argv = ["--stage", stage, "--teacher", teacher, "--pairs", teacher[:-3] + "_pairs.npz", "--data", teacher[:-3] + "_data",
            "--num-students", "4", "--reg-loss", "lpips", "--lpips-random", "--fake-steps-per-gen", "1",
            "--grad-probe-every", "0", "--iters", "1", "--out", j("out")]
    if stage == "tsm":
        argv += ["--preset", preset]
    elif preset not in ("B", "tiny"):
        argv += ["--init", j(f"{preset}.pt")]
    return argv


def group_norm_fp32(x, num_groups, weight=None, bias=None, eps=1e-5, _group_norm=torch.nn.functional.group_norm):
    """GroupNorm as CUDA's autocast runs it (float32 in, float32 out); the CPU's runs it in bf16."""
    with torch.autocast(x.device.type, enabled=False):
        return _group_norm(x.float(), num_groups, None if weight is None else weight.float(),
                           None if bias is None else bias.float(), eps)


def one_step(argv, rows, precision, device, count=False, fake_tensors=True, cuda_groupnorm=True):
    """msd.py's set-up, then one G update and one fake-score update. count: counting live bytes, on
    fake tensors (shapes and dtypes, no arithmetic) with CUDA's autocast policy for GroupNorm
    (fake_tensors=False: the real CPU step, for tests) -> bytes alive after each operation (an array)."""
    r = msd.setup(msd.parse_args(argv + ["--batch", str(rows), "--precision", precision, "--device", device]))
    nets = [m for m in (r.teacher, r.net, r.fake, r.head, r.lpips_fn) if m is not None]
    fake, mode, load = FakeTensorMode(allow_non_fake_inputs=True), LiveBytes(), runtime.real_batch
    fake_step = count and fake_tensors
    if fake_step:
        for m in nets:  # the same modules, their tensors replaced by fake ones of the same shapes and dtypes
            for mod in m.modules():
                for k, p in mod._parameters.items():
                    if p is not None:
                        mod._parameters[k] = torch.nn.Parameter(fake.from_tensor(p), requires_grad=p.requires_grad)
                for k, t in mod._buffers.items():
                    if t is not None:
                        mod._buffers[k] = fake.from_tensor(t)
        r.pairs = tuple(fake.from_tensor(t) for t in r.pairs) if r.pairs is not None else None
        r.opt_net = msd.adamw(r.cfg, r.net.parameters())  # the optimisers over the fake parameters
        r.opt_critic = msd.adamw(r.cfg, r.critic.parameters()) if r.critic is not None else None
        # real images: the batch's shape, not its pixels (loading reads one file per row)
        runtime.real_batch = lambda real, idx, dev: (torch.zeros((len(idx), *r.shape), device=dev),
                                                     torch.zeros(len(idx), dtype=torch.long, device=dev))
    group_norm = torch.nn.functional.group_norm
    if fake_step and cuda_groupnorm:
        torch.nn.functional.group_norm = group_norm_fp32
    try:
        with fake if fake_step else contextlib.nullcontext(), mode if count else contextlib.nullcontext():
            b = msd.draw_batch(r, 0, 0)
            if r.cfg.stage == "tsm":  # Stage 0: the student denoiser's step
                msd.update_denoiser(r, b)
            else:
                _, xs, _ = msd.update_generator(r, b)
                msd.update_fake_score(r, b, xs, 0)
    finally:
        runtime.real_batch, torch.nn.functional.group_norm = load, group_norm
    if count:
        seen, before = set(), 0  # what the run held before the step: weights and buffers
        for t in (t for m in nets for t in (*m.parameters(), *m.buffers())):
            if t.untyped_storage()._cdata not in seen:
                seen.add(t.untyped_storage()._cdata)
                before += t.untyped_storage().nbytes()
        return before + np.array(mode.series, dtype=np.float64)


def estimate(stage, preset, rows, precision="bf16", tmp=None, cuda_groupnorm=True):
    """Bytes alive after each operation of one step at 2 and at 4 rows give, operation by operation,
    live(rows) = fixed + rows x per_row (weights and AdamW's moments fixed, activations per row); the
    peak at any rows is the largest of these. -> {fixed, per_row (arrays over the operations), peak}."""
    with tempfile.TemporaryDirectory() as t:
        argv = files(tmp or t, stage, preset)
        s2, s4 = (one_step(argv, n, precision, "cpu", count=True, cuda_groupnorm=cuda_groupnorm) for n in (2, 4))
    if len(s2) != len(s4):
        raise RuntimeError(f"{stage} {preset}: {len(s2)} operations at 2 rows, {len(s4)} at 4: not the same step")
    est = dict(fixed=2 * s2 - s4, per_row=(s4 - s2) / 2)
    return dict(est, peak=peak_at(est, rows))


def peak_at(est, rows):
    return float((est["fixed"] + rows * est["per_row"]).max())


def measure(stage, preset, rows, precision="bf16"):
    """The CUDA allocator's peak (max_memory_allocated) over the same step on the GPU, in bytes."""
    with tempfile.TemporaryDirectory() as t:
        argv = files(t, stage, preset)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        one_step(argv, rows, precision, "cuda")
        return torch.cuda.max_memory_allocated()


def micro_batch_for(est, rows, mib):
    """The largest micro-batch dividing `rows` whose step fits USABLE of a card of `mib` MiB (0: none)."""
    fits = [m for m in range(rows, 0, -1) if rows % m == 0 and peak_at(est, m) <= USABLE * mib * 2 ** 20]
    return fits[0] if fits else 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", default=[f"{s}:{pr}:{n}" for s, pr, n in PAPER],
                   help="stage:student preset:rows per GPU (default: App. D.2's batches over 4 GPUs per student)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--results", default="", help="also write table.md and run.json into this folder")
    args = p.parse_args(argv)
    specs = []
    for spec in args.rows:
        parts = spec.split(":")
        if len(parts) != 3 or parts[0] not in msd.STAGE_DEFAULTS or parts[1] not in edm_unet.PRESETS or not parts[2].isdigit() \
                or int(parts[2]) < 1:
            p.error(f"--rows {spec!r}: expected stage:preset:rows, stage in {list(msd.STAGE_DEFAULTS)}, preset in "
                    f"{list(edm_unet.PRESETS)}, rows >= 1")
        specs.append((parts[0], parts[1], int(parts[2])))
    t0 = time.time()
    lines = [f"Peak memory of one step per GPU, {args.precision}, counted on the CPU (bench/memory.py; its docstring says "
             f"what it leaves out); --micro-batch: the largest that divides the rows and fits {USABLE:.0%} of the card.", "",
             "| stage | student | rows per GPU | peak at 0 rows, GiB | peak GiB | " + " | ".join(
                 f"--micro-batch on {c}" for c in CARDS) + " |", "| --- " * (5 + len(CARDS)) + "|"]
    with tempfile.TemporaryDirectory() as tmp:
        for stage, preset, rows in specs:
            est = estimate(stage, preset, rows, args.precision, tmp=tmp)
            gib = lambda n: f"{n / 2 ** 30:.2f}"  # noqa: E731
            fit = [micro_batch_for(est, rows, mib) for mib in CARDS.values()]
            lines.append(f"| {stage} | {preset} | {rows} | {gib(peak_at(est, 0))} | "
                         f"{gib(est['peak'])} | " + " | ".join(
                             "does not fit" if m == 0 else "none needed" if m == rows else str(m) for m in fit) + " |")
            print(lines[-1], flush=True)
    print("\n".join(lines))
    if args.results:
        import capacity_ladder  # noqa: E402  (writes a table between a doc's markers)
        import digits  # noqa: E402  (the benches' run.json writer)
        os.makedirs(args.results, exist_ok=True)
        with open(os.path.join(args.results, "table.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        info = digits.save_run(args.results, "bench/memory.py", argv if argv is not None else sys.argv[1:], time.time() - t0)
        capacity_ladder.write_between_markers(DOC, "\n".join(lines) + f"\n\n`{info['command']}`, commit {info['commit'][:10]}, "
                                              f"{info['cpu']}, torch {info['torch']}, {info['seconds']} s.", *MARKERS)
    return lines


if __name__ == "__main__":
    main()
