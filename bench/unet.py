"""Forward and forward+backward speed of edm_unet presets (images/s), CPU or CUDA.

    python bench/unet.py                                     # CPU: small presets, small batches
    python bench/unet.py --device cuda --precision bf16 --presets B S XS XXS --batch 1 32 64 --compile
    python bench/unet.py --device cuda --presets B XXS --batch 1 --compile --compile-mode reduce-overhead

--baseline also times fp32 eager in the same run, so the speed-up is measured in one run, and
prints the optimised path's largest deviation from fp32 eager (relative to the output's std).
`--compile-mode reduce-overhead` captures CUDA graphs (what batch-1 latency needs).
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import edm_unet as E  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_it(fn, device, warmup, reps):
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / reps


def bench(preset, batch, device, precision, compile_, warmup, reps, channels_last, mode="default"):
    cfg = E.PRESETS[preset]
    torch.manual_seed(0)
    D = E.EDMPrecond(cfg)
    for m in D.modules():  # EDM zero-initialises each block's last layers and the output: F = 0 would make
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and not m.weight.any():  # every path's output equal
            m.reset_parameters()
    D = D.to(device)
    if channels_last:
        D = D.to(memory_format=torch.channels_last)
    net = torch.compile(D, mode=mode) if compile_ else D
    x = torch.randn(batch, cfg.img_channels, cfg.img_resolution, cfg.img_resolution, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    sigma = torch.full((batch,), 1.0, device=device)
    y = torch.randint(0, cfg.label_dim, (batch,), device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]

    def fwd():
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            net(x, sigma, y)

    def fwd_bwd():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = net(x, sigma, y)
        out.square().mean().backward()

    D.eval()
    t_f = time_it(fwd, device, warmup, reps)
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        out = net(x, sigma, y).float().clone()
    D.train()
    t_fb = time_it(fwd_bwd, device, warmup, reps)
    return t_f, t_fb, out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--presets", nargs="+", default=["tiny", "XXS", "XS"], choices=sorted(E.PRESETS))
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead", "max-autotune"])
    p.add_argument("--baseline", action="store_true", help="also time fp32 eager in the same run")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda asked for, but CUDA is not available")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}, torch {torch.__version__}")
    runs = [(args.precision, args.compile, args.channels_last)]
    if args.baseline:
        runs.insert(0, ("fp32", False, False))
    print("| preset | params | batch | precision | compile | channels_last | forward ms | forward img/s | "
          "fwd+bwd ms | fwd+bwd img/s | max dev. from fp32 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for preset in args.presets:
        for batch in args.batch:
            ref = None
            for precision, comp, cl in runs:
                t_f, t_fb, out = bench(preset, batch, device, precision, comp, args.warmup, args.reps, cl, args.compile_mode)
                ref = out if ref is None and precision == "fp32" and not comp and not cl else ref
                dev = f"{((out - ref).abs().max() / ref.std()).item():.2e}" if ref is not None else "-"
                mode = ("yes" + ("" if args.compile_mode == "default" else f" ({args.compile_mode})")) if comp else "no"
                print(f"| {preset} | {E.count_params(E.PRESETS[preset]) / 1e6:.1f}M | {batch} | {precision} | {mode} | "
                      f"{'yes' if cl else 'no'} | {t_f * 1e3:.1f} | {batch / t_f:.1f} | {t_fb * 1e3:.1f} | {batch / t_fb:.1f} | {dev} |",
                      flush=True)


if __name__ == "__main__":
    main()
