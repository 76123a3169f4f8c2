"""msd.py: partitions, the DM step, frozen teacher, resume, torchrun equivalence, bad input, NaN skips."""
import glob
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import dmd
import edm_unet
import msd
import sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny random teacher (16x16x1, 10 classes) and 16 teacher pairs from 2 Heun steps."""
    d = tmp_path_factory.mktemp("msd")
    torch.manual_seed(0)
    D = edm_unet.build("tiny")
    with torch.no_grad():
        for p in D.parameters():
            p.normal_(0, 0.02)
    edm_unet.save_model(D, d / "teacher.pt")
    sample.generate_pairs(D.eval(), list(range(16)), str(d / "pairs.npz"), 8, dict(num_steps=2))
    return d


def args(files, out, *extra):
    return ["--teacher", str(files / "teacher.pt"), "--pairs", str(files / "pairs.npz"), "--out", str(out),
            "--batch", "4", "--lpips-random", "--lpips-size", "32", "--precision", "fp32", "--device", "cpu",
            "--num-students", "2", "--log-every", "1", "--sample-every", "1000", "--grad-probe-every", "0",
            "--lr", "1e-3", *extra]


def test_partitions_cover_every_class_once_and_equal_sized():
    for split in ("consecutive", "random", "kmeans"):
        emb = np.random.default_rng(0).normal(size=(12, 5))
        parts = msd.make_partition(12, 4, split, seed=3, embeddings=emb)
        assert sorted(c for p in parts for c in p) == list(range(12)), split
        assert [len(p) for p in parts] == [3, 3, 3, 3], split
    assert msd.make_partition(1000, 4)[1] == list(range(250, 500))  # the paper's consecutive blocks
    assert msd.make_partition(12, 4, "random", seed=1) == msd.make_partition(12, 4, "random", seed=1)
    assert msd.make_partition(12, 4, "random", seed=1) != msd.make_partition(12, 4, "random", seed=2)


def test_kmeans_split_is_deterministic_and_groups_clusters():
    rng = np.random.default_rng(0)
    centers = np.array([[0, 0], [10, 0], [0, 10]], float)
    emb = np.concatenate([c + rng.normal(0, 0.3, (4, 2)) for c in centers])[rng.permutation(12)]
    a = msd.make_partition(12, 3, "kmeans", seed=0, embeddings=emb)
    assert a == msd.make_partition(12, 3, "kmeans", seed=0, embeddings=emb)
    truth = np.argmin(((emb[:, None] - centers[None]) ** 2).sum(-1), 1)
    assert sorted(sorted(truth[p].tolist()) for p in a) == [[0] * 4, [1] * 4, [2] * 4]  # each part is one blob


def test_bad_partition_is_a_clear_error_before_loading(tmp_path):
    with pytest.raises(ValueError, match=r"--partition 4: expected 0..3"):
        msd.main(["--partition", "4", "--num-students", "4", "--teacher", "nope.pt", "--device", "cpu"])
    with pytest.raises(FileNotFoundError, match="--teacher 'nope.pt' does not exist"):
        msd.main(["--teacher", "nope.pt", "--pairs", "nope.npz", "--device", "cpu"])
    with pytest.raises(ValueError, match="--precision fp16 needs CUDA"):
        msd.main(["--precision", "fp16", "--device", "cpu"])


def test_dm_gradient_is_zero_when_fake_equals_real():
    torch.manual_seed(0)
    D = edm_unet.build("tiny").eval()
    x = torch.randn(3, 1, 16, 16, requires_grad=True)
    sigma, y = torch.tensor([0.5, 2.0, 10.0]), torch.tensor([1, 2, 3])
    dmd.dm_step_loss(x, sigma, y, D, D, torch.randn_like(x)).backward()
    assert x.grad.abs().max() == 0


def test_one_step_trains_g_and_fake_and_leaves_teacher_frozen(files, tmp_path):
    before = edm_unet.load_model(files / "teacher.pt")[0].state_dict()
    r = msd.main(args(files, tmp_path / "o", "--iters", "1"))
    for k, v in r["teacher"].state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not any(p.requires_grad for p in r["teacher"].parameters())
    changed = lambda m: sum(not torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert changed(r["net"]) > 0 and changed(r["fake"]) > 0
    assert np.isfinite([r["log"][k] for k in ("dm", "reg", "fake")]).all()
    snap, ckpt = edm_unet.load_model(tmp_path / "o" / "student.pt")
    assert ckpt["partition"] == [0, 1, 2, 3, 4] and ckpt["stage"] == "dm"


def test_kill_and_resume_equals_straight_run_and_skips_a_truncated_checkpoint(files, tmp_path, capsys):
    straight = msd.main(args(files, tmp_path / "a", "--iters", "4"))
    msd.main(args(files, tmp_path / "b", "--iters", "3", "--ckpt-every", "1"))  # "killed" after step 3
    newest = tmp_path / "b" / "resume-00000003.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # a checkpoint truncated on disk
    resumed = msd.main(args(files, tmp_path / "b", "--iters", "4", "--resume"))
    out = capsys.readouterr().out
    assert "resume-00000003.pt' is corrupt or truncated" in out and "resumed from" in out and "resume-00000002.pt" in out
    assert resumed["step"] == 4
    for m in ("net", "fake"):
        for (k, v), w in zip(straight[m].state_dict().items(), resumed[m].state_dict().values()):
            assert torch.equal(v, w), (m, k)  # bitwise: every draw is a function of (seed, step)
    names = sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "b" / "resume-*")))
    assert names == ["resume-00000002.pt", "resume-00000003.pt.corrupt", "resume-00000004.pt"]


def test_lpips_term_equals_the_lpips_package():
    import lpips
    torch.manual_seed(0)
    fn = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    x, t = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    up = lambda a: torch.nn.functional.interpolate(a, size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(dmd.regression_loss(x, t, fn, size=64), fn(up(x), up(t)).mean())
    grey = dmd.regression_loss(x[:, :1], t[:, :1], fn, size=64)  # 1-channel images go in as 3 equal channels
    torch.testing.assert_close(grey, fn(up(x[:, :1]).repeat(1, 3, 1, 1), up(t[:, :1]).repeat(1, 3, 1, 1)).mean())


def test_non_finite_steps_are_skipped_then_stop_the_run(files, tmp_path, monkeypatch):
    real = msd.generator_losses

    def poisoned(*a, **k):
        terms, x = real(*a, **k)
        return {**terms, "dm": terms["dm"] * float("nan")}, x
    monkeypatch.setattr(msd, "generator_losses", poisoned)
    with pytest.raises(RuntimeError, match="3 non-finite steps in a row at step 3"):
        msd.main(args(files, tmp_path / "n", "--iters", "5", "--max-bad-steps", "2"))


def test_two_process_torchrun_equals_one_process(files, tmp_path):
    one = msd.main(args(files, tmp_path / "one", "--iters", "2", "--micro-batch", "1"))  # accumulation path
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29518",
                    os.path.join(ROOT, "msd.py"), *args(files, tmp_path / "two", "--iters", "2")],
                   check=True, env=env, cwd=ROOT, capture_output=True, timeout=600)
    two, _ = edm_unet.load_model(tmp_path / "two" / "student.pt")
    start = edm_unet.load_model(files / "teacher.pt")[0].state_dict()
    flat = lambda sd: torch.cat([v.flatten() for v in sd.values()])
    d_one, d_two = flat(one["net"].state_dict()) - flat(start), flat(two.state_dict()) - flat(start)
    # Adam turns float-rounding differences of near-zero gradients into sign flips of +-lr, so
    # compare the whole update: the same direction and size within 1%
    rel = ((d_one - d_two).norm() / d_one.norm()).item()
    print("relative difference of the updates", rel)
    assert d_one.norm() > 0 and rel < 1e-2


def test_grad_probe_runs_with_two_fake_steps_per_generator_step(files, tmp_path, capsys):
    msd.main(args(files, tmp_path / "p", "--iters", "1", "--fake-steps-per-gen", "2", "--grad-probe-every", "1"))
    probe = [line for line in capsys.readouterr().out.splitlines() if line.startswith("grad probe")]
    assert len(probe) == 1 and " reg " in probe[0] and " dm " in probe[0]


def test_fake_score_draws_all_levels_and_dm_t_includes_980():
    """Eq. 8 over all 1000 levels (DMD Alg. 1, DMD2); Eq. 6 over DMD2's t in [20, 980], both ends included."""
    import types
    cfg = msd.Config(batch=20_000)
    sigmas = dmd.karras_sigmas(1000)
    r = types.SimpleNamespace(cfg=cfg, shape=(1,), device=torch.device("cpu"), classes=torch.arange(3),
                              sigmas=sigmas, n_pairs=0, n_real=0)
    b = msd.draw_batch(r, step=0, stream=0)
    assert b["sigma_fake"].min() == sigmas[0] and b["sigma_fake"].max() == sigmas[999]
    assert b["sigma"].min() == sigmas[20] and b["sigma"].max() == sigmas[980]


def test_resume_where_no_checkpoint_loads_stops_and_overwrites_nothing(files, tmp_path, capsys):
    out = tmp_path / "r"
    msd.main(args(files, out, "--iters", "2", "--ckpt-every", "1"))
    for p in out.glob("resume-*.pt"):
        p.write_bytes(p.read_bytes()[:100])
    snapshot = (out / "student.pt").read_bytes()
    with pytest.raises(ValueError, match=r"none of the resume files .* loads \(resume-00000002.pt, resume-00000001.pt are"):
        msd.main(args(files, out, "--iters", "4", "--resume"))
    assert (out / "student.pt").read_bytes() == snapshot
    assert sorted(p.name for p in out.glob("resume-*")) == ["resume-00000001.pt", "resume-00000002.pt"]
    capsys.readouterr()
    msd.main(args(files, tmp_path / "fresh", "--iters", "1", "--resume"))  # nothing there yet: a fresh start, said once
    assert capsys.readouterr().out.count("no resume-*.pt in") == 1


def test_bad_numbers_and_files_are_refused_before_loading(files, tmp_path):
    for flag, value, expect in (("--lr", "-1", "--lr -1.0: expected > 0"), ("--lr", "0", "--lr 0.0: expected > 0"),
                                ("--batch", "0", "--batch 0: expected > 0"), ("--iters", "-5", "--iters -5: expected >= 0"),
                                ("--t-max", "1001", "--t-max 1001"), ("--beta2", "1", "--beta2 1.0: expected in")):
        with pytest.raises(ValueError, match=re.escape(expect)):
            msd.main(["--teacher", "nope.pt", "--device", "cpu", flag, value])
    (tmp_path / "junk.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"--pairs: '.*junk.txt' is not a paired-set file"):
        msd.main(args(files, tmp_path / "o", "--pairs", str(tmp_path / "junk.txt")))


def test_cli_user_error_is_one_line_with_exit_status_2(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "msd.py"), "--teacher", str(tmp_path / "none.pt"),
                           "--pairs", "p.npz", "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"error: --teacher '{tmp_path / 'none.pt'}' does not exist"]


def test_every_flag_has_help_with_its_default():
    import argparse
    parser_help = {}
    real = argparse.ArgumentParser.add_argument

    def spy(self, *a, **k):
        parser_help[a[0]] = k.get("help", "")
        return real(self, *a, **k)
    argparse.ArgumentParser.add_argument = spy
    try:
        msd.parse_args([])
    finally:
        argparse.ArgumentParser.add_argument = real
    parser_help.pop("-h")
    assert len(parser_help) == len(msd.dataclasses.fields(msd.Config))
    for flag, text in parser_help.items():
        assert len(text) > 15, flag
        assert "(default: " in text or flag in ("--lpips-random", "--compile", "--channels-last", "--resume"), flag
    assert "App. D.2" in parser_help["--lr"] and "default: 0.01" in parser_help["--weight-decay"]


def test_no_two_project_files_import_each_other():
    import ast
    mods = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py"))}
    graph = {}
    for m in mods:
        tree = ast.parse(open(os.path.join(ROOT, m + ".py")).read())
        graph[m] = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} & mods
        graph[m] |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module in mods}

    def reach(a, seen):
        for b in graph[a] - seen:
            seen.add(b)
            reach(b, seen)
        return seen
    assert not [m for m in mods if m in reach(m, set())], graph
    assert "msd" not in graph["tsm"]
