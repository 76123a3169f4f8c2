"""msd.py: partitions, the DM step, frozen teacher, resume, torchrun equivalence, bad input, NaN skips."""
import glob
import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import dmd
import edm_unet
import msd
import runtime
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


def free_port():
    """A TCP port free right now, for torchrun's rendezvous: two test runs on one machine must not collide."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    r = msd.main(args(files, tmp_path / "s", "--iters", "3", "--max-bad-steps", "5"))  # skipped, not applied
    assert r["skipped"] == 3 and r["log"]["skipped"] == 3
    start = edm_unet.load_model(files / "teacher.pt")[0].state_dict()
    for k, v in r["net"].state_dict().items():
        assert torch.equal(v, start[k]), k  # G never took a step: no NaN reached its weights
    with pytest.raises(RuntimeError, match="3 non-finite steps in a row at step 3"):
        msd.main(args(files, tmp_path / "n", "--iters", "5", "--max-bad-steps", "2"))


def test_two_process_torchrun_equals_one_process(files, tmp_path):
    one = msd.main(args(files, tmp_path / "one", "--iters", "2", "--micro-batch", "1"))  # accumulation path
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
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
    r = types.SimpleNamespace(cfg=cfg, shape=(1,), device=torch.device("cpu"), parts=[(torch.arange(3), 0, 0)],
                              sigmas=sigmas, n_real=0)
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
        assert "(default: " in text or flag in ("--lpips-random", "--compile", "--channels-last", "--deterministic", "--resume",
                                                "--all-students", "--shared-fake"), flag
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
    assert "msd" not in graph["tsm"] and "msd" not in reach("runtime", set())  # the plumbing never needs the method


def adm_batch(batch=4096, gan_t_max=1000):
    import types
    cfg = msd.Config(stage="adm", batch=batch, gan_t_max=gan_t_max)
    r = types.SimpleNamespace(cfg=cfg, shape=(1, 2, 2), device=torch.device("cpu"), parts=[(torch.arange(3), 0, 0)],
                              sigmas=dmd.karras_sigmas(1000), n_real=5)
    return r, msd.draw_batch(r, step=0, stream=0)


def test_each_gan_input_is_noised_at_its_own_level_as_dmd2():
    """DMD2's compute_cls_logits draws t in [0, gan_t_max) anew for G's term and for D's fake and real inputs."""
    r, b = adm_batch()
    for k in ("sigma_gan", "sigma_gan_fake", "sigma_gan_real"):
        assert b[k].min() == r.sigmas[0] and b[k].max() == r.sigmas[999], k
    assert not torch.equal(b["sigma_gan"], b["sigma"]) and not torch.equal(b["sigma_gan_fake"], b["sigma_gan_real"])
    assert adm_batch(gan_t_max=10)[1]["sigma_gan"].max() == r.sigmas[9]
    seen = []

    def critic(x_t, sigma, y):  # records what the GAN terms feed the discriminator
        seen.append((x_t, sigma))
        return x_t, x_t.flatten(1).sum(1)
    b = {k: v[:6] for k, v in b.items()}
    x = torch.randn(6, 1, 2, 2)
    ident = lambda x_t, sigma, y: x_t
    msd.generator_losses(r.cfg, lambda z, y: x, ident, ident, critic, None, b, None, r.sigmas)
    torch.testing.assert_close(seen[0][1], b["sigma_gan"])
    torch.testing.assert_close(seen[0][0], x + b["sigma_gan"].view(-1, 1, 1, 1) * b["noise_gan"])
    real = (torch.randn(6, 1, 2, 2), torch.zeros(6, dtype=torch.long))
    terms = msd.critic_losses(r.cfg, critic, x, b, 0.5, real)
    torch.testing.assert_close(seen[1][1], torch.cat([b["sigma_fake"], b["sigma_gan_fake"], b["sigma_gan_real"]]))
    torch.testing.assert_close(seen[1][0][12:], real[0] + b["sigma_gan_real"].view(-1, 1, 1, 1) * b["noise_gan_real"])
    logits = seen[1][0].flatten(1).sum(1)
    torch.testing.assert_close(terms["gan_d"], torch.nn.functional.softplus(logits[6:12]).mean()
                               + torch.nn.functional.softplus(-logits[12:]).mean())


def test_step_seeds_never_collide():
    """No two (seed, step, stream) share a seed: the old seed * 1_000_003 + 16 step + stream gave step s's
    stream 16 to step s + 1's stream 0, and seed 1's step 0 to seed 0's step 62,500."""
    steps = [0, 1, 2, 62_498, 62_499, 62_500, 62_501, 2 ** 32 - 1]
    streams = list(range(0, 20)) + [255, 256, 257, 4095]
    seen = {}
    for seed in (0, 1, 2, 2 ** 19 - 1):
        for step in steps:
            for stream in streams:
                v = runtime.step_seed(seed, step, stream)
                assert 0 <= v < 2 ** 64 and v not in seen, ((seed, step, stream), seen.get(v))
                seen[v] = (seed, step, stream)
    assert runtime.step_seed(0, 5, 16) != runtime.step_seed(0, 6, 0)
    assert runtime.step_seed(3, 100, 1) == 3 * 1_000_003 + 1601  # the compact form every measured result used
    torch.Generator().manual_seed(runtime.step_seed(2 ** 19 - 1, 2 ** 32 - 1, 4095))  # fits torch's 64-bit seed
    for flag, value in (("--seed", str(2 ** 19)), ("--fake-steps-per-gen", "256")):
        with pytest.raises(ValueError, match=re.escape(flag)):
            msd.main(["--teacher", "nope.pt", "--device", "cpu", flag, value])


def test_stage_and_head_refusals_are_one_clear_line(files, tmp_path):
    with pytest.raises(ValueError, match=r"--lambda-reg 0.25 with --stage adm: the ADM stage has no regression term"):
        msd.main(["--stage", "adm", "--lambda-reg", "0.25", "--teacher", "nope.pt", "--device", "cpu"])
    with pytest.raises(ValueError, match=r"--head-width 16: expected a positive multiple of 32"):
        msd.main(["--stage", "adm", "--head-width", "16", "--teacher", "nope.pt", "--device", "cpu"])
    p = np.load(files / "pairs.npz")
    np.savez(tmp_path / "class0.npz", **{**p, "labels": np.zeros_like(p["labels"])})
    with pytest.raises(ValueError, match=r"--reg-pairs own: .*class0.npz holds no pair of partition 1 \(classes \[5, 6, 7, 8, 9\]\)"):
        msd.main(args(files, tmp_path / "o", "--pairs", str(tmp_path / "class0.npz"), "--reg-pairs", "own", "--partition", "1"))


def test_a_pickled_pairs_file_is_refused_without_suggesting_to_unpickle_it(files, tmp_path):
    np.savez(tmp_path / "evil.npz", seeds=np.array([object()] * 2), labels=np.zeros(2), noise=np.zeros(2), images=np.zeros(2))
    with pytest.raises(ValueError) as e:
        msd.main(args(files, tmp_path / "o", "--pairs", str(tmp_path / "evil.npz")))
    text = str(e.value)
    assert "holds pickled objects" in text and "expected an .npz of plain arrays" in text
    assert "allow_pickle" not in text and "pickle.load" not in text


def test_stage_defaults_follow_their_sources_and_warmup_ramps_the_lr(files, tmp_path):
    assert msd.STAGE_DEFAULTS["dm"]["fake_steps_per_gen"] == 1 and msd.STAGE_DEFAULTS["dm"]["warmup"] == 0  # DMD Alg. 1
    assert msd.STAGE_DEFAULTS["adm"]["fake_steps_per_gen"] == 5 and msd.STAGE_DEFAULTS["adm"]["warmup"] == 100  # DMD2
    out = tmp_path / "w"
    msd.main(args(files, out, "--iters", "4", "--warmup", "2", "--lr", "1e-3"))
    rows = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [row["lr"] for row in rows] == [0.0, 5e-4, 1e-3, 1e-3]  # DMD2's constant_with_warmup: lr * step / warmup


def test_ema_follows_its_half_life_and_resumes_exactly(files, tmp_path):
    """EMA beta = 0.5 ** (batch / (half-life kimg * 1000)); a run killed and resumed keeps the same EMA bit for bit."""
    one = msd.main(args(files, tmp_path / "e1", "--iters", "1", "--ema-halflife-kimg", "0.002"))
    beta = 0.5 ** (4 / 2)  # batch 4, half-life 2 images
    start = edm_unet.load_model(files / "teacher.pt")[0].state_dict()
    for k, v in one["ema"].state_dict().items():
        torch.testing.assert_close(v, start[k] + (1 - beta) * (one["net"].state_dict()[k] - start[k]))
    straight = msd.main(args(files, tmp_path / "ea", "--iters", "3", "--ema-halflife-kimg", "0.002"))
    msd.main(args(files, tmp_path / "eb", "--iters", "2", "--ema-halflife-kimg", "0.002"))
    resumed = msd.main(args(files, tmp_path / "eb", "--iters", "3", "--ema-halflife-kimg", "0.002", "--resume"))
    for (k, v), w in zip(straight["ema"].state_dict().items(), resumed["ema"].state_dict().values()):
        assert torch.equal(v, w), k
    snap, _ = edm_unet.load_model(tmp_path / "ea" / "student.pt")  # student.pt is the EMA when one is kept
    assert all(torch.equal(v, straight["ema"].state_dict()[k]) for k, v in snap.state_dict().items())


def test_own_pairs_keep_exactly_the_partitions_pairs(files):
    p = sample.load_pairs(str(files / "pairs.npz"))
    mcfg = edm_unet.load_model(files / "teacher.pt")[0].cfg
    for reg, part in (("own", [0, 1, 2, 3, 4]), ("own", [5, 6, 7, 8, 9]), ("all", [0, 1, 2, 3, 4])):
        cfg = msd.Config(pairs=str(files / "pairs.npz"), reg_pairs=reg)
        z, y, img = msd.load_pairs(cfg, part, mcfg, torch.device("cpu"))
        keep = np.isin(p["labels"], part) if reg == "own" else np.ones(len(p["labels"]), bool)
        assert keep.sum() < len(keep) or reg == "all"
        assert y.tolist() == p["labels"][keep].tolist() and torch.equal(z, torch.from_numpy(p["noise"][keep]))
        assert torch.equal(img, sample.from_uint8(torch.from_numpy(p["images"][keep])))


def test_resume_refuses_another_stage_or_partition(files, tmp_path):
    msd.main(args(files, tmp_path / "m", "--iters", "1"))
    with pytest.raises(ValueError, match=r"is stage dm with classes \[\[0, 1, 2, 3, 4\]\].*this run is stage dm with \[\[5, 6, 7, 8, 9\]\]"):
        msd.main(args(files, tmp_path / "m", "--iters", "2", "--partition", "1", "--resume"))
    # a file from before "owned" (one run's flat "partition") still resumes its own partition
    path = glob.glob(str(tmp_path / "m" / "resume-*.pt"))[0]
    ckpt = torch.load(path, weights_only=True)
    ckpt["partition"] = ckpt.pop("owned")[0]
    torch.save(ckpt, path)
    assert msd.main(args(files, tmp_path / "m", "--iters", "2", "--resume"))["step"] == 2


def test_loss_weights_are_the_documented_lambdas():
    cfg = msd.Config(lambda_reg=0.25, lambda_gan_g=3e-3, lambda_gan_d=1e-2)
    assert msd.loss_weights(cfg) == {"dm": 1.0, "reg": 0.25, "gan_g": 3e-3, "fake": 1.0, "gan_d": 1e-2, "tsm": 1.0}
    assert msd.loss_weights(msd.Config(loss="f"))["f"] == 1.0 and "dm" not in msd.loss_weights(msd.Config(loss="sid"))
    terms = {"dm": torch.tensor(2.0), "reg": torch.tensor(4.0), "gan_g": torch.tensor(100.0)}
    assert msd.weighted(cfg, terms).item() == pytest.approx(2.0 + 0.25 * 4.0 + 3e-3 * 100.0)
    assert msd.weighted(cfg, {"fake": torch.tensor(3.0), "gan_d": torch.tensor(50.0)}).item() == pytest.approx(3.5)


def test_lpips_weights_offline_stop_the_run_with_one_line_before_any_step(files, tmp_path, monkeypatch):
    import urllib.error
    import torchvision.models._api as tv_api

    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(tv_api.WeightsEnum, "get_state_dict", offline)
    argv = [a for a in args(files, tmp_path / "run", "--iters", "1") if a != "--lpips-random"]
    with pytest.raises(ValueError, match=r"LPIPS could not load torchvision's VGG16 weights \(URLError.*--reg-loss mse") as e:
        msd.main(argv)
    assert "\n" not in str(e.value) and not (tmp_path / "run" / "log.jsonl").exists()  # no step ran
    runtime.load_lpips(True, 0, torch.device("cpu"))  # a random VGG needs no download


def test_deterministic_flag_sets_deterministic_kernels_and_cublas_workspace(files, tmp_path, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        msd.main(args(files, tmp_path / "a", "--iters", "1", "--reg-loss", "mse", "--deterministic"))
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        msd.main(args(files, tmp_path / "b", "--iters", "1", "--reg-loss", "mse"))
        assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
