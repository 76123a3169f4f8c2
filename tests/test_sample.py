"""sample.py: EDM Heun sampler, per-seed determinism, the paired set, routing to students."""
import numpy as np
import pytest
import torch

import edm_unet
import sample
from test_msd import free_port


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
        rnd, y, z = sample.draw_inputs(chunk, D.cfg, "cpu")
        return sample.heun_sampler(D, z, y, rnd, **kw), y

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
    assert sample.generate_pairs(D, list(range(10)), two, 4, kw)  # the rest, in other chunks, then the merge
    a, b = sample.load_pairs(one), sample.load_pairs(two)
    for k in ("seeds", "labels", "noise", "images"):
        assert np.array_equal(a[k], b[k]), k
    assert a["images"].dtype == np.uint8 and a["noise"].dtype == np.float32 and list(a["seeds"]) == list(range(10))
    # resume: a run killed after some chunks reuses them (tampered here to prove it) and writes the rest
    import os
    three = str(tmp_path / "three.npz")
    sample.generate_pairs(D, list(range(10)), three, 3, kw, rank=1, world=2)  # "killed": only chunks 1, 3
    part = tmp_path / "three.npz.parts" / "000000003-3.npz"
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
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                    os.path.join(root, "sample.py"), "pairs", *common, "--out", str(tmp_path / "two.npz")],
                   check=True, env=env, cwd=root, capture_output=True, timeout=300)
    a, b = sample.load_pairs(str(tmp_path / "one.npz")), sample.load_pairs(str(tmp_path / "two.npz"))
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    # image modes shard the same way: routed student images from 2 processes equal 1 process
    paths = student_ckpts(tmp_path, [list(range(5)), list(range(5, 10))])
    common = ["students", "--ckpt", *paths, "--seeds", "0-6", "--batch", "2", "--device", "cpu"]
    sample.main([*common, "--out", str(tmp_path / "one_imgs")])
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                    os.path.join(root, "sample.py"), *common, "--out", str(tmp_path / "two_imgs")],
                   check=True, env=env, cwd=root, capture_output=True, timeout=300)
    x1 = next(sample.ImageFolder(str(tmp_path / "one_imgs")).batches(10))
    x2 = next(sample.ImageFolder(str(tmp_path / "two_imgs")).batches(10))
    assert torch.equal(x1[0], x2[0]) and torch.equal(x1[1], x2[1])


def test_uint8_round_trip_is_unbiased():
    """to_uint8 writes floor(127.5 x + 128); from_uint8 must return the bin centre, as EDM reads images."""
    x = torch.rand(1_000_000, generator=torch.Generator().manual_seed(0)) * 2 - 1
    err = sample.from_uint8(sample.to_uint8(x)) - x
    assert abs(err.mean().item()) < 1e-4  # was -1/255 = -0.0039 with the bin's lower edge
    assert err.abs().max().item() <= 0.5 / 127.5 + 1e-6
    u = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(sample.to_uint8(sample.from_uint8(u)), u)  # every 8-bit value survives


def edm_generate(D, seeds, num_steps, S_churn=0.0, S_min=0.0, S_max=float("inf"), S_noise=1.0):
    """EDM generate.py + edm_sampler (EDM Alg. 2), written here from the paper and EDM's draw order:
    per seed a CPU generator; latents randn(C, H, W), then label randint(label_dim), then at each
    step one float64 randn of x's shape (multiplied by 0 where gamma = 0)."""
    gens = [torch.Generator().manual_seed(s % (1 << 32)) for s in seeds]
    c, r = D.cfg.img_channels, D.cfg.img_resolution
    latents = torch.stack([torch.randn(c, r, r, generator=g) for g in gens])
    labels = torch.stack([torch.randint(D.cfg.label_dim, (), generator=g) for g in gens])
    i = torch.arange(num_steps, dtype=torch.float64)
    t = (80 ** (1 / 7) + i / (num_steps - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    t = torch.cat([t, torch.zeros(1, dtype=torch.float64)])
    x_next = latents.double() * t[0]
    with torch.no_grad():
        for n, (t_cur, t_next) in enumerate(zip(t[:-1], t[1:])):
            x_cur = x_next
            gamma = min(S_churn / num_steps, 2 ** 0.5 - 1) if S_min <= t_cur <= S_max else 0
            t_hat = t_cur + gamma * t_cur
            eps = torch.stack([torch.randn(x_cur.shape[1:], generator=g, dtype=torch.float64) for g in gens])
            x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * eps
            net = lambda x, s: D(x.float(), s.float().expand(len(x)), labels).double()
            d_cur = (x_hat - net(x_hat, t_hat)) / t_hat
            x_next = x_hat + (t_next - t_hat) * d_cur
            if n < num_steps - 1:
                d_prime = (x_next - net(x_next, t_next)) / t_next
                x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return (x_next * 127.5 + 128).clip(0, 255).to(torch.uint8), labels


@pytest.mark.parametrize("churn", [0.0, 40.0])
def test_a_seed_gives_edms_image(tmp_path, churn):
    D = tiny_teacher()
    with torch.no_grad():  # a teacher whose output depends visibly on the label and the noise
        for p in D.parameters():
            p.mul_(5)
    edm_unet.save_model(D, tmp_path / "t.pt")
    seeds = [0, 1, 7, 12345]
    sample.main(["teacher", "--teacher", str(tmp_path / "t.pt"), "--seeds", "0,1,7,12345", "--steps", "6",
                 "--S-churn", str(churn), "--S-min", "0.05", "--S-max", "50", "--batch", "3", "--device", "cpu",
                 "--out", str(tmp_path / "ours")])
    ref, labels = edm_generate(D, seeds, 6, churn, 0.05, 50, 1.003)
    ours, our_labels = next(sample.ImageFolder(str(tmp_path / "ours")).batches(10))
    assert torch.equal(our_labels, labels)
    assert torch.equal(ours, ref), (ours.int() - ref.int()).abs().max()
    # the paired set and the routed students see the same z and label for a seed
    rnd, y, z = sample.draw_inputs(seeds, D.cfg, "cpu")
    g = torch.Generator().manual_seed(7)
    assert torch.equal(z[2], torch.randn(1, 16, 16, generator=g)) and y[2] == torch.randint(10, (), generator=g)


def run_cli(*args, timeout=300):
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.Popen([sys.executable, os.path.join(root, "sample.py"), *args], cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_killed_run_resumed_with_another_batch_size_writes_every_seed_once(tmp_path):
    import os
    import signal
    import time
    edm_unet.save_model(tiny_teacher(), tmp_path / "t.pt")
    common = ["teacher", "--teacher", str(tmp_path / "t.pt"), "--seeds", "0-23", "--steps", "12", "--device", "cpu"]
    sample.main([*common, "--batch", "24", "--out", str(tmp_path / "straight")])
    parts = tmp_path / "killed.parts"
    proc = run_cli(*common, "--batch", "4", "--out", str(tmp_path / "killed"))
    t0 = time.time()
    while len(list(parts.glob("*-4.npz"))) < 2:
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < 120
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed").exists() and 2 <= len(list(parts.glob("*.npz"))) < 6
    resumed = run_cli(*common, "--batch", "6", "--out", str(tmp_path / "killed"))
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    a = sample.ImageFolder(str(tmp_path / "straight"))
    b = sample.ImageFolder(str(tmp_path / "killed"))
    assert a.names == b.names == [f"img{s:08d}.png" for s in range(24)]
    xa, ya = next(a.batches(24))
    xb, yb = next(b.batches(24))
    assert torch.equal(ya, yb) and torch.equal(xa, xb)
    assert not parts.exists()


def test_parts_of_another_run_are_refused_with_what_differs(tmp_path, monkeypatch):
    import re
    D = tiny_teacher()
    out = str(tmp_path / "p.npz")
    sample.generate_pairs(D, list(range(6)), out, 3, dict(num_steps=3), rank=1, world=2)  # "killed" half-way
    with pytest.raises(ValueError, match=re.escape("sampler: {'num_steps': 3} there, {'num_steps': 4} now")):
        sample.generate_pairs(D, list(range(6)), out, 3, dict(num_steps=4))
    # a teacher run that dies in its first chunk leaves nothing; one that dies later keeps its parts,
    # and a rerun with another teacher file is refused
    edm_unet.save_model(D, tmp_path / "a.pt")
    edm_unet.save_model(edm_unet.build("tiny"), tmp_path / "b.pt")
    real, calls = sample.heun_sampler, []

    def dies_at_chunk(n):
        def f(*a, **k):
            calls.append(1)
            if len(calls) >= n:
                raise RuntimeError("killed")
            return real(*a, **k)
        return f
    common = ["--seeds", "0-5", "--steps", "2", "--batch", "2", "--device", "cpu", "--out", str(tmp_path / "imgs")]
    monkeypatch.setattr(sample, "heun_sampler", dies_at_chunk(1))
    with pytest.raises(RuntimeError, match="killed"):
        sample.main(["teacher", "--teacher", str(tmp_path / "a.pt"), *common])
    assert not (tmp_path / "imgs.parts").exists()
    calls.clear()
    monkeypatch.setattr(sample, "heun_sampler", dies_at_chunk(2))
    with pytest.raises(RuntimeError, match="killed"):
        sample.main(["teacher", "--teacher", str(tmp_path / "a.pt"), *common])
    assert len(list((tmp_path / "imgs.parts").glob("*.npz"))) == 1
    monkeypatch.setattr(sample, "heun_sampler", real)
    with pytest.raises(ValueError, match=r"imgs.parts was made by another run \(models: \['"):
        sample.main(["teacher", "--teacher", str(tmp_path / "b.pt"), *common])
    sample.main(["teacher", "--teacher", str(tmp_path / "a.pt"), *common])  # the same teacher resumes
    assert len(sample.ImageFolder(str(tmp_path / "imgs"))) == 6


@pytest.mark.parametrize("bad", [["--num", "0"], ["--num", "-3"], ["--batch", "0"], ["--steps", "0"], ["--steps", "1"]])
def test_bad_numbers_stop_before_any_work(tmp_path, bad, capsys):
    edm_unet.save_model(tiny_teacher(), tmp_path / "t.pt")
    with pytest.raises(SystemExit) as e:
        sample.main(["pairs", "--teacher", str(tmp_path / "t.pt"), "--out", str(tmp_path / "p.npz"), *bad])
    assert e.value.code == 2 and bad[0] in capsys.readouterr().err
    assert not (tmp_path / "p.npz.parts").exists()


def test_user_errors_print_one_line_and_exit_2(tmp_path):
    edm_unet.save_model(tiny_teacher(), tmp_path / "t.pt")
    for args, expect in ((["--seeds", "3-0"], "empty"), (["--seeds", "0-3,2"], "seed 2 is listed twice")):
        proc = run_cli("teacher", "--teacher", str(tmp_path / "t.pt"), "--out", str(tmp_path / "x"), *args)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2 and err.strip().startswith("error:") and expect in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "x.parts").exists()
    proc = run_cli("teacher", "--teacher", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x"))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and err.strip() == "error: checkpoint '" + str(tmp_path / "missing.pt") + "' does not exist"
    (tmp_path / "junk.txt").write_text("not numpy")
    with pytest.raises(ValueError, match="junk.txt' is not a paired-set file"):
        sample.load_pairs(str(tmp_path / "junk.txt"))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="obj.npy' is not a paired-set file"):
        sample.load_pairs(str(tmp_path / "obj.npy"))


def test_each_pair_is_the_teacher_image_of_its_seed_and_class_fixes_only_the_label(tmp_path):
    """pairs[i] = (z of seed i, label of seed i, teacher-mode image of seed i); --class keeps z and sets the label."""
    D = tiny_teacher()
    edm_unet.save_model(D, tmp_path / "t.pt")
    common = ["--teacher", str(tmp_path / "t.pt"), "--steps", "3", "--batch", "3", "--device", "cpu"]
    sample.main(["pairs", "--num", "5", "--out", str(tmp_path / "p.npz"), *common])
    sample.main(["teacher", "--seeds", "0-4", "--out", str(tmp_path / "t"), *common])
    p = sample.load_pairs(str(tmp_path / "p.npz"))
    images, labels = next(sample.ImageFolder(str(tmp_path / "t")).batches(100))
    assert p["seeds"].tolist() == list(range(5)) and p["labels"].tolist() == labels.tolist()
    assert np.array_equal(p["images"], images.numpy())
    _, y, z = sample.draw_inputs(list(range(5)), D.cfg, "cpu")
    assert torch.equal(torch.from_numpy(p["noise"]), z) and p["labels"].tolist() == y.tolist()
    sample.main(["teacher", "--seeds", "0-4", "--class", "3", "--out", str(tmp_path / "c3"), *common])
    images3, labels3 = next(sample.ImageFolder(str(tmp_path / "c3")).batches(100))
    _, y3, z3 = sample.draw_inputs(list(range(5)), D.cfg, "cpu", cls=3)
    assert labels3.tolist() == [3] * 5 and y3.tolist() == [3] * 5 and torch.equal(z3, z)
    x3 = sample.heun_sampler(D, z3, y3, num_steps=3)
    assert torch.equal(sample.to_uint8(x3), images3)  # the image of seed i drawn as class 3


def test_each_torchrun_rank_takes_its_local_gpu_before_the_process_group(monkeypatch):
    """sample.py and msd.py (runtime.setup_dist) under torchrun on CUDA: rank r sets GPU LOCAL_RANK
    and hands it to init_process_group (device_id), so no rank opens a context on GPU 0. CPU: gloo."""
    import torch.distributed as dist
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", torch.device(d))))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append(("init", backend, kw)))
    monkeypatch.setenv("RANK", "5"), monkeypatch.setenv("WORLD_SIZE", "8"), monkeypatch.setenv("LOCAL_RANK", "1")
    assert sample.dist_info("cuda") == (5, 8, torch.device("cuda", 1))
    assert calls == [("set_device", torch.device("cuda", 1)), ("init", "nccl", {"device_id": torch.device("cuda", 1)})]
    calls.clear()
    assert sample.dist_info("cpu") == (5, 8, torch.device("cpu"))
    assert calls == [("init", "gloo", {"device_id": None})]
