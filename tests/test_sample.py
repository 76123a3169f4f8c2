"""sample.py: EDM Heun sampler, per-seed determinism, the paired set, routing to students."""
import numpy as np
import pytest
import torch

import edm_unet
import sample


class GaussianDenoiser(torch.nn.Module):
    """Exact denoiser of 1-D data N(m, s^2): D(x, sigma) = (s^2 x + sigma^2 m) / (s^2 + sigma^2)."""

    def __init__(self, m=0.3, s=0.2):
        super().__init__()
        self.m, self.s = m, s

    def forward(self, x, sigma, labels):
        sig2 = sigma.double().reshape(-1, *([1] * (x.ndim - 1))) ** 2
        return (self.s ** 2 * x + sig2 * self.m) / (self.s ** 2 + sig2)


def test_deterministic_heun_reaches_the_data_distribution():
    z = torch.randn(20_000, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    x = sample.heun_sampler(GaussianDenoiser(), z, None, num_steps=256)
    assert abs(x.mean().item() - 0.3) < 0.01 and abs(x.std().item() - 0.2) < 0.01
    # the probability-flow ODE keeps (x_t - m) / sqrt(s^2 + t^2) fixed, so x_0 = m + s (80 z - m) / sqrt(s^2 + 80^2)
    exact = 0.3 + 0.2 * (80 * z - 0.3) / (0.2 ** 2 + 80 ** 2) ** 0.5
    torch.testing.assert_close(x, exact, atol=2e-3, rtol=0)


def tiny_teacher():
    torch.manual_seed(0)
    D = edm_unet.build("tiny")
    with torch.no_grad():
        for p in D.parameters():
            p.normal_(0, 0.02)
    return D.eval()


def test_images_depend_only_on_their_seed_not_on_batch_size():
    D = tiny_teacher()
    seeds = list(range(7))
    kw = dict(num_steps=4, S_churn=40, S_min=0.05, S_max=50, S_noise=1.003)  # churn draws per-seed noise too

    def run(chunk):
        rnd = sample.SeededRandom(chunk)
        y = rnd.randint(10)
        return sample.heun_sampler(D, rnd.randn((1, 16, 16)), y, rnd, **kw), y

    x7, y7 = run(seeds)
    x1 = torch.cat([run([s])[0] for s in seeds])
    y1 = torch.cat([run([s])[1] for s in seeds])
    assert torch.equal(y7, y1)
    torch.testing.assert_close(x7, x1, atol=1e-4, rtol=0)  # equal up to float32 rounding of batched convs


def test_pairs_identical_for_world_size_1_and_2_and_resumable(tmp_path):
    D = tiny_teacher()
    kw = dict(num_steps=3)
    one, two = str(tmp_path / "one.npz"), str(tmp_path / "two.npz")
    sample.generate_pairs(D, list(range(10)), one, 3, kw)
    assert not sample.generate_pairs(D, list(range(10)), two, 3, kw, rank=1, world=2)  # rank 1's share
    assert sample.generate_pairs(D, list(range(10)), two, 3, kw, rank=0, world=2)      # rank 0 merges
    a, b = sample.load_pairs(one), sample.load_pairs(two)
    for k in ("seeds", "labels", "noise", "images"):
        assert np.array_equal(a[k], b[k]), k
    assert a["images"].dtype == np.uint8 and a["noise"].dtype == np.float32 and list(a["seeds"]) == list(range(10))
    # resume: a run killed after some chunks reuses them (tampered here to prove it) and writes the rest
    import os
    three = str(tmp_path / "three.npz")
    sample.generate_pairs(D, list(range(10)), three, 3, kw, rank=1, world=2)  # "killed": only chunks 1, 3
    part = tmp_path / "three.npz.parts" / "000000003.npz"
    d = dict(np.load(part))
    d["images"][:] = 7
    np.savez(part, **d)
    assert sample.generate_pairs(D, list(range(10)), three, 3, kw)
    c = sample.load_pairs(three)
    assert (c["images"][3:6] == 7).all() and np.array_equal(c["images"][:3], a["images"][:3])
    assert not os.path.exists(tmp_path / "three.npz.parts")  # cleaned up once the file is written


def student_ckpts(tmp_path, partitions):
    paths = []
    for k, part in enumerate(partitions):
        path = tmp_path / f"student_{k}.pt"
        edm_unet.save_model(tiny_teacher(), path, partition=part)
        paths.append(str(path))
    return paths


def test_routing_sends_each_label_to_its_owner_and_refuses_orphans(tmp_path):
    paths = student_ckpts(tmp_path, [[0, 1, 2, 3, 4], [5, 6, 7, 8]])  # class 9 is owned by no one
    students, owner = sample.load_students(paths)
    with torch.no_grad():  # make the students differ
        for p in students[1].parameters():
            p.add_(0.05)
    z, y = torch.randn(4, 1, 16, 16), torch.tensor([0, 5, 4, 8])
    out = sample.route(students, owner, z, y)
    torch.testing.assert_close(out[[0, 2]], students[0](z[[0, 2]], y[[0, 2]]))
    torch.testing.assert_close(out[[1, 3]], students[1](z[[1, 3]], y[[1, 3]]))
    with pytest.raises(ValueError, match=r"labels \[9\] are owned by no student"):
        sample.route(students, owner, z, torch.tensor([0, 9, 1, 2]))
    with pytest.raises(ValueError, match="class 4 is owned by two students"):
        sample.load_students(student_ckpts(tmp_path, [[0, 4], [4, 5]]))


def test_students_cli_writes_edm_layout(tmp_path):
    import json
    import zipfile
    paths = student_ckpts(tmp_path, [list(range(5)), list(range(5, 10))])
    sample.main(["students", "--ckpt", *paths, "--seeds", "0-11", "--out", str(tmp_path / "imgs.zip"), "--batch", "5"])
    with zipfile.ZipFile(tmp_path / "imgs.zip") as zf:
        names = zf.namelist()
        labels = json.loads(zf.read("dataset.json"))["labels"]
    assert len([n for n in names if n.endswith(".png")]) == 12 and labels[0][0] == "img00000000.png"
    assert (tmp_path / "imgs_grid.png").exists()


def test_bad_seed_range_is_a_clear_error():
    with pytest.raises(ValueError, match="bad seed range"):
        sample.parse_seeds("0-x")
    assert sample.parse_seeds("1,5,7-9") == [1, 5, 7, 8, 9]


def test_pairs_under_torchrun_two_processes_equal_one_process(tmp_path):
    """The real multi-process path: torchrun --nproc_per_node=2 on gloo (CPU)."""
    import os
    import subprocess
    import sys
    edm_unet.save_model(tiny_teacher(), tmp_path / "t.pt")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    common = ["--teacher", str(tmp_path / "t.pt"), "--count", "6", "--steps", "2", "--batch", "2", "--device", "cpu"]
    sample.main(["pairs", *common, "--out", str(tmp_path / "one.npz")])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                    os.path.join(root, "sample.py"), "pairs", *common, "--out", str(tmp_path / "two.npz")],
                   check=True, env=env, cwd=root, capture_output=True, timeout=300)
    a, b = sample.load_pairs(str(tmp_path / "one.npz")), sample.load_pairs(str(tmp_path / "two.npz"))
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    # image modes shard the same way: routed student images from 2 processes equal 1 process
    paths = student_ckpts(tmp_path, [list(range(5)), list(range(5, 10))])
    common = ["students", "--ckpt", *paths, "--seeds", "0-6", "--batch", "2", "--device", "cpu"]
    sample.main([*common, "--out", str(tmp_path / "one_imgs")])
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                    os.path.join(root, "sample.py"), *common, "--out", str(tmp_path / "two_imgs")],
                   check=True, env=env, cwd=root, capture_output=True, timeout=300)
    x1 = next(sample.ImageFolder(str(tmp_path / "one_imgs")).batches(10))
    x2 = next(sample.ImageFolder(str(tmp_path / "two_imgs")).batches(10))
    assert torch.equal(x1[0], x2[0]) and torch.equal(x1[1], x2[1])
