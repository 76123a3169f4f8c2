"""msd.py's split into the method (msd.py) and its plumbing (runtime.py) changed no behaviour: a tiny dm,
adm, tsm and --all-students run write student.pt files byte for byte equal to those of the code before
the split, checked out of git history and run beside the current code."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEFORE = "8dafc679078517e262ea23166d855de122dedc96"  # the last commit before runtime.py

RUNS = r'''
import os, sys
root, out = sys.argv[1], sys.argv[2]
sys.path.insert(0, root)
import torch, edm_unet, msd, sample
torch.manual_seed(0)
D = edm_unet.build("tiny", img_resolution=8, model_channels=16, attn_resolutions=(4,))
with torch.no_grad():
    for p in D.parameters():
        p.normal_(0, 0.05)
j = lambda *a: os.path.join(out, *a)
os.makedirs(out)
edm_unet.save_model(D, j("teacher.pt"))
sample.generate_pairs(D.eval(), list(range(16)), j("pairs.npz"), 8, dict(num_steps=2))
g = torch.Generator().manual_seed(0)
imgs = torch.randint(0, 256, (30, 1, 8, 8), generator=g, dtype=torch.uint8)
sample.write_images(j("data"), imgs, [i % 10 for i in range(30)], list(range(30)))
base = ["--teacher", j("teacher.pt"), "--pairs", j("pairs.npz"), "--data", j("data"), "--batch", "4", "--device", "cpu",
        "--num-students", "2", "--precision", "fp32", "--log-every", "1", "--sample-every", "1000", "--grad-probe-every", "1",
        "--lr", "1e-3", "--reg-loss", "mse", "--iters", "3", "--ema-halflife-kimg", "0.01", "--seed", "7"]
runs = {"dm": ["--partition", "1", "--micro-batch", "2"], "all": ["--all-students", "--grad-probe-every", "0"],
        "adm": ["--stage", "adm", "--head-width", "32", "--fake-steps-per-gen", "2", "--warmup", "2"],
        "tsm": ["--stage", "tsm", "--preset", "tiny", "--arch", "img_resolution=8,model_channels=8,attn_resolutions=(4,)"]}
for name, extra in runs.items():
    msd.main(base + extra + ["--out", j(name)])
'''
FILES = ["dm/student.pt", "all/p0/student.pt", "all/p1/student.pt", "adm/student.pt", "tsm/student.pt"]


def test_student_files_equal_those_of_the_code_before_the_split(tmp_path):
    git = lambda *a: subprocess.run(["git", "-C", ROOT, *a], capture_output=True)  # noqa: E731
    if git("cat-file", "-e", BEFORE + "^{commit}").returncode:
        pytest.skip(f"not a git checkout holding {BEFORE[:8]} (the code before the split); nothing to compare with")
    old = tmp_path / "before"
    old.mkdir()
    archive = git("archive", BEFORE)
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
    # the network file is today's in both trees: the split never touched it, and its attention since
    # hands SDPA contiguous q, k, v, which rounds differently
    shutil.copy(os.path.join(ROOT, "edm_unet.py"), old / "edm_unet.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for tree, out in ((str(old), tmp_path / "a"), (ROOT, tmp_path / "b")):
        proc = subprocess.run([sys.executable, "-c", RUNS, tree, str(out)], capture_output=True, text=True, env=env,
                              cwd=str(tmp_path), timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    for f in FILES:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
