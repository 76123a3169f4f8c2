"""toy2d.py: data geometry, ownership, the l1 metric, the CD parametrisation, tiny end-to-end runs."""
import math

import numpy as np
import pytest
import torch

import toy2d


def test_class_geometry():
    cfg = toy2d.ToyConfig()
    y = torch.arange(8).repeat_interleave(2000)
    x = toy2d.sample_data(y, cfg, torch.Generator().manual_seed(0))
    for c in range(8):
        pts = x[y == c]
        centre = 0.5 * torch.tensor([math.cos(2 * math.pi * c / 8), math.sin(2 * math.pi * c / 8)])
        torch.testing.assert_close(pts.mean(0), centre, atol=5e-3, rtol=0)
        r = (pts - centre).norm(dim=1)  # on the inner circle of radius 0.1
        assert abs(r.mean().item() - 0.1) < 2e-3 and r.std().item() < 0.01
        ang = torch.atan2(*(pts - centre).flip(1).T) % (2 * math.pi)
        off = (ang / (2 * math.pi / 8) - (ang / (2 * math.pi / 8)).round()).abs() * 2 * math.pi / 8 * 0.1
        assert off.max().item() < 0.03  # every point within 6 std of one of the 8 modes


@pytest.mark.parametrize("K", [1, 2, 4, 8])
def test_partition_owns_every_class_once(K):
    groups = toy2d.partition(K)
    assert len(groups) == K and sorted(c for g in groups for c in g) == list(range(8))
    assert all(len(g) == 8 // K for g in groups)
    own = toy2d.Ownership(groups)
    y = own.labels(500)
    for k, g in enumerate(groups):
        assert set(y[k].tolist()) == set(g)


@pytest.mark.parametrize("bad", ["3", "0"])
def test_bad_student_count_is_a_clear_error(bad, capsys):
    with pytest.raises(SystemExit):
        toy2d.parse_args(["--students", bad])
    assert f"got {bad}" in capsys.readouterr().err


def test_hist_l1_on_known_inputs():
    a = torch.rand(5000, 2) * 0.2
    assert toy2d.hist_l1(a, a) == 0
    assert toy2d.hist_l1(a, a + 0.5) == pytest.approx(2.0)  # disjoint supports


def test_consistency_parametrisation_is_identity_at_sigma_min():
    cfg = toy2d.ToyConfig(width=16, depth=1)
    f = toy2d.ToyDenoiser(2, cfg, boundary=True)
    x = torch.randn(6, 2)
    torch.testing.assert_close(f(x, torch.full((6,), cfg.sigma_min), torch.arange(6) % 8), x)


def test_students_start_as_copies_of_the_teacher():
    cfg = toy2d.ToyConfig(width=16, depth=2)
    teacher = toy2d.ToyDenoiser(1, cfg)
    students = toy2d.stack_copies(teacher, 3)
    z, y = torch.randn(9, 2), torch.arange(9) % 8
    torch.testing.assert_close(students.generate(z, y), teacher.generate(z, y))


@pytest.mark.parametrize("method", ["dmd", "cd"])
def test_tiny_end_to_end_run(tmp_path, method):
    out = toy2d.main(["--students", "2", "--method", method, "--out", str(tmp_path), "--teacher-iters", "30",
                      "--iters", "20", "--width", "16", "--depth", "2", "--batch", "16", "--eval-samples", "2000",
                      "--teacher-steps", "4", "--num-pairs", "64"])
    assert out["ks"] == [1, 2] and all(math.isfinite(v) for v in out["l1"] + [out["floor"]])
    assert out["losses"] and all(math.isfinite(v) for v in out["losses"].values())
    assert (tmp_path / f"toy2d_{method}.png").stat().st_size > 10_000
    assert (tmp_path / f"teacher_{'relu' if method == 'dmd' else 'silu'}.pt").exists()  # --act auto
    terms = ["dm", "reg", "fake"] if method == "dmd" else ["cd"]
    assert list(out["loss_curves"]) == terms and (tmp_path / f"toy2d_{method}_losses.png").stat().st_size > 5_000
    for t in terms:  # one line per K, a point every 100 steps and at the last step
        assert sorted(out["loss_curves"][t]) == [1, 2]
        steps, values = out["loss_curves"][t][2]
        assert steps == [20] and all(math.isfinite(v) and v >= 0 for v in values)


def test_per_student_loss_curve_leaves_training_unchanged_and_averages_to_the_logged_loss():
    """The curve measures each student on the step's own batch without touching the training's random draws:
    the students' weights are bit-identical with and without it, and its mean over students is the logged loss."""
    cfg = toy2d.ToyConfig(width=16, depth=2, teacher_iters=20)
    teacher = toy2d.train_teacher(cfg)
    own = toy2d.Ownership([g for k in (1, 2) for g in toy2d.partition(k)])
    g = torch.Generator().manual_seed(0)
    y_pair, z_pair = torch.randint(0, 8, (32,), generator=g), torch.randn(32, 2, generator=g)
    pairs = (z_pair, y_pair, toy2d.heun_sample(teacher, z_pair, y_pair, 4, cfg))
    runs = []
    for every in (1, 10 ** 9):  # a curve point at every step, or only at the last one
        torch.manual_seed(5)
        dc = toy2d.DistillConfig(iters=6, batch=8)
        runs.append(toy2d.distill_dmd(teacher, own, pairs, dc, log_every=1, curve_every=every))
    for p, q in zip(runs[0][0].parameters(), runs[1][0].parameters()):
        assert torch.equal(p, q)
    last, curve = runs[0][1], runs[0][2]
    assert [r["step"] for r in curve] == list(range(1, 7)) and [r["step"] for r in runs[1][2]] == [6]
    for term in ("dm", "reg", "fake"):  # log_every=1: the last logged means are the last step's losses
        assert np.mean(curve[-1][term]) == pytest.approx(last[term], rel=1e-4), term


@pytest.mark.parametrize("bad,expect", [(["--lr", "-1"], "--lr must be > 0"), (["--lr", "0"], "--lr must be > 0"),
                                        (["--batch", "0"], "--batch must be at least 1"),
                                        (["--eval-samples", "0"], "--eval-samples must be at least 8"),
                                        (["--teacher-steps", "1"], "--teacher-steps must be at least 2"),
                                        (["--ema", "1"], "--ema must be in [0, 1)"),
                                        (["--t-max", "2000"], "--t-max 2000"), (["--lr-decay", "step"], "--lr-decay must be one of"),
                                        (["--act", "tanh"], "--act must be one of")])
def test_bad_numbers_are_refused_at_parse_time(bad, expect, capsys):
    with pytest.raises(SystemExit) as e:
        toy2d.parse_args(bad)
    assert e.value.code == 2 and expect in capsys.readouterr().err


def test_every_toy_flag_has_help_and_the_running_mean_is_a_mean(monkeypatch):
    import argparse
    helps, real = {}, argparse.ArgumentParser.add_argument

    def spy(self, *a, **k):
        helps[a[0]] = k.get("help", "")
        return real(self, *a, **k)
    monkeypatch.setattr(argparse.ArgumentParser, "add_argument", spy)
    toy2d.parse_args([])
    for f in list(toy2d.fields(toy2d.ToyConfig)) + list(toy2d.fields(toy2d.DistillConfig)):
        text = helps["--" + f.name.replace("_", "-")]
        assert len(text.split("(default:")[0]) > 10 and "(default:" in text, f.name
    m = toy2d.RunningMean()
    for v in (0.0, 2.0, 4.0):
        m.add(dm=torch.tensor(v))
    assert m.report() == {"dm": 2.0} and m.report() == {}


def test_on_mode_separates_spots_from_rings():
    cfg = toy2d.ToyConfig()
    y = torch.arange(8).repeat(4000)
    x = toy2d.sample_data(y, cfg, torch.Generator().manual_seed(0))
    assert toy2d.on_mode(x, y, cfg) == pytest.approx(1 - math.exp(-4.5), abs=0.005)
    assert toy2d.on_mode(x, (y + 1) % 8, cfg) == 0  # another class's ring is far away
    a = torch.rand(len(y)) * 2 * math.pi  # the same rings, drawn evenly along each circle
    ring = toy2d.mode_centres(y, cfg)[:, 0] - cfg.inner_radius * torch.tensor([1.0, 0]) + cfg.inner_radius * torch.stack([a.cos(), a.sin()], 1)
    assert 0.3 < toy2d.on_mode(ring, y, cfg) < 0.39


def test_relu_mlp_is_piecewise_linear_in_its_input():
    torch.manual_seed(0)
    second_diff = {}
    for act in ("relu", "silu"):
        net = toy2d.StackedMLP(1, 2, 16, 2, 2, act).double()
        x, h = torch.randn(1, 1, 2, dtype=torch.float64), 1e-3 * torch.randn(1, 1, 2, dtype=torch.float64)
        second_diff[act] = (net(x + h) - 2 * net(x) + net(x - h)).abs().max().item()
    assert second_diff["relu"] < 1e-14 < 1e-9 < second_diff["silu"]  # relu: affine on the step; silu: curved
    assert toy2d.ToyDenoiser(1, toy2d.ToyConfig(width=16, depth=2, act="relu")).net.act is torch.nn.functional.relu


def test_act_auto_is_relu_for_dm_and_silu_for_cd():
    assert toy2d.parse_args([])[1].act == "relu"
    assert toy2d.parse_args(["--method", "cd"])[1].act == "silu"
    assert toy2d.parse_args(["--method", "cd", "--act", "relu"])[1].act == "relu"


def test_toy_fit_bench_quick(tmp_path, capsys):
    import importlib.util
    import os
    spec = importlib.util.spec_from_file_location("toy_fit", os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench", "toy_fit.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.main(["--quick", "--out", str(tmp_path), "--variants", "silu:8", "relu:8"])
    assert [(r["act"], r["width"]) for r in rows] == [("silu", 8), ("relu", 8)]
    assert all(math.isfinite(r["mse"]) and 0 <= r["on_mode"] <= 1 for r in rows)
    assert (tmp_path / "teacher_relu.pt").exists() and "mean nothing" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        mod.main(["--quick", "--out", str(tmp_path), "--variants", "tanh:8"])
    assert "got 'tanh:8'" in capsys.readouterr().err


def test_sid_loss_runs_end_to_end_and_its_alpha_reaches_the_students(tmp_path, capsys):
    out = toy2d.main(["--students", "2", "--loss", "sid", "--out", str(tmp_path), "--teacher-iters", "30",
                      "--iters", "20", "--width", "16", "--depth", "2", "--batch", "16", "--eval-samples", "2000",
                      "--teacher-steps", "4", "--num-pairs", "64"])
    assert set(out["losses"]) == {"sid", "reg", "fake"} and all(math.isfinite(v) for v in out["l1"])
    assert (tmp_path / "toy2d_sid.png").stat().st_size > 10_000 and (tmp_path / "toy2d_sid_losses.png").exists()
    cfg = toy2d.ToyConfig(width=16, depth=2, teacher_iters=20)
    teacher = toy2d.train_teacher(cfg)
    own = toy2d.Ownership(toy2d.partition(2))
    pairs = (torch.randn(16, 2), torch.arange(16) % 8, torch.randn(16, 2))
    G = {}
    for alpha in (1.2, 0.5):  # step 1: mu_fake = mu_real, so SiD's gradient is 0; from step 2 alpha acts
        torch.manual_seed(3)
        G[alpha] = toy2d.distill_dmd(teacher, own, pairs, toy2d.DistillConfig(iters=3, batch=8, loss="sid", sid_alpha=alpha))[0]
    assert any(not torch.equal(p, q) for p, q in zip(G[1.2].parameters(), G[0.5].parameters()))
    with pytest.raises(SystemExit):
        toy2d.parse_args(["--loss", "sid", "--method", "cd"])
    assert "--loss sid replaces DM's Eq. 6 in --method dmd" in capsys.readouterr().err
