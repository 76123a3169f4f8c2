"""Memory of K students in training: K fake scores against one shared (msd.py --all-students [--shared-fake]).

    python bench/stack_memory.py            # K = 4 students of each ImageNet preset (MSD Table 7)
    python bench/stack_memory.py --k 4 8
    python bench/stack_memory.py --results bench/results/stack/memory   # the table of docs/stack.md

Counted from the presets' parameter counts (no network is built, no GPU needed): parameters plus
AdamW's two moment buffers, float32, for the K generators and for the fake scores. A fake score is
as large as the network it starts from: the student after TSM in the DM stage (MSD App. D.2.2),
the teacher (B) in the ADM stage (App. D.2.1). Not counted: gradients and activations (they scale
with batch and precision), an EMA copy, the teacher (one frozen copy either way), the GAN head.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import edm_unet  # noqa: E402

BYTES = 4 * 3  # float32 parameter + AdamW exp_avg + exp_avg_sq


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, nargs="+", default=[4], help="numbers of students (default 4, MSD Table 1)")
    p.add_argument("--results", default="", help="also write the table and run.json into this folder")
    args = p.parse_args(argv)
    if min(args.k) < 1:
        p.error(f"--k must be >= 1, got {args.k}")
    cfg = lambda name: edm_unet.UNetConfig(**{**edm_unet.PRESETS[name].__dict__, "label_dim": 1000})  # noqa: E731
    gib = lambda n: n * BYTES / 2 ** 30  # noqa: E731
    teacher = edm_unet.count_params(cfg("B"))
    lines = ["| K | student | fake score starts from | K generators, GiB | K fake scores, GiB | one shared fake score, GiB "
             "| total, K fakes / shared, GiB | saved |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    rows = []
    for K in args.k:
        for name in ("B", "S", "XS", "XXS"):
            student = edm_unet.count_params(cfg(name))
            for start, fake in (("the student (DM stage)", student), ("the teacher B (ADM stage)", teacher)):
                if name == "B" and fake == teacher and start.startswith("the student"):
                    start = "the student = the teacher"
                elif name == "B":
                    continue
                g, sep, shr = gib(K * student), gib(K * fake), gib(fake)
                rows.append(dict(K=K, student=name, start=start, generators=g, fakes=sep, shared=shr))
                lines.append(f"| {K} | {name} ({student / 1e6:.1f}M) | {start} | {g:.2f} | {sep:.2f} | {shr:.2f} | "
                             f"{g + sep:.2f} / {g + shr:.2f} | {100 * (sep - shr) / (g + sep):.0f}% |")
    print("\n".join(lines))
    if args.results:
        import digits  # noqa: E402  (the benches' run.json writer)
        os.makedirs(args.results, exist_ok=True)
        with open(os.path.join(args.results, "table.md"), "w") as f:
            f.write("Parameters + AdamW state, float32 (bench/stack_memory.py's docstring says what is not counted):\n\n"
                    + "\n".join(lines) + "\n")
        digits.save_run(args.results, "bench/stack_memory.py", argv if argv is not None else sys.argv[1:], 0)
    return rows


if __name__ == "__main__":
    main()
