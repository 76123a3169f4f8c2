"""sid.py: SiD's generator loss by hand, alpha's effect, its gradient against DM's (Eq. 6); --loss sid in msd.py."""
import json
import types

import numpy as np
import pytest
import torch

import dmd
import edm_unet
import msd
import sid
from test_adm_tsm import data  # noqa: F401  (30 real images beside the teacher)
from test_msd import args, files  # noqa: F401  (the tiny teacher and pairs)


def linear(a):
    return lambda x_t, sigma, y: a * x_t  # a denoiser whose backward pass is known: d out / d x_t = a


def setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 2, 2, generator=g, dtype=torch.float64)
    return x, torch.tensor([0.5, 2.0, 10.0], dtype=torch.float64), torch.randn(3, 2, 2, generator=g, dtype=torch.float64)


def test_loss_equals_a_hand_computation():
    x, sigma, noise = setup()
    a, b, alpha = 0.9, 0.6, 1.2
    loss = sid.sid_loss(x, sigma, None, linear(a), linear(b), noise, alpha)
    total = 0.0
    for i in range(3):  # SiD's per-sample formula, element by element
        xt = [[x[i, j, k].item() + sigma[i].item() * noise[i, j, k].item() for k in range(2)] for j in range(2)]
        w = sum(abs(x[i, j, k].item() - a * xt[j][k]) for j in range(2) for k in range(2)) / 4
        for j in range(2):
            for k in range(2):
                d = (a - b) * xt[j][k]
                total += d * ((a * xt[j][k] - x[i, j, k].item()) - alpha * d) / w
    assert loss.item() == pytest.approx(total / 12, rel=1e-6)


def grad_of(alpha, a=0.9, b=0.6, stop=False):
    x, sigma, noise = setup()
    x.requires_grad_(True)
    wrap = (lambda f: (lambda *args: f(*args).detach())) if stop else (lambda f: f)
    sid.sid_loss(x, sigma, None, wrap(linear(a)), wrap(linear(b)), noise, alpha).backward()
    return x.grad, x.detach(), sigma, noise


def test_alpha_changes_the_generator_gradient():
    assert not torch.allclose(grad_of(1.2)[0], grad_of(0.5)[0])
    assert torch.allclose(grad_of(1.2, stop=True)[0], grad_of(0.5, stop=True)[0])  # constants: alpha does nothing


def test_gradient_is_dms_plus_the_two_networks_backward_pass():
    """With networks' outputs held constant the gradient is DMD's (dm_loss's); with them it adds exactly
    the terms of the formula's derivative through f_real = a x_t and f_fake = b x_t (alpha = 1)."""
    a, b, alpha = 0.9, 0.6, 1.0
    g_stop, x, sigma, noise = grad_of(alpha, a, b, stop=True)
    x_t = x + sigma.view(-1, 1, 1) * noise
    xr = x.clone().requires_grad_(True)
    dmd.dm_loss(xr, a * x_t, b * x_t).backward()
    torch.testing.assert_close(g_stop, xr.grad)  # Eq. 6, normalised as DMD's Eq. 8
    g_full = grad_of(alpha, a, b)[0]
    d, r = (a - b) * x_t, a * x_t - x
    w = (x - a * x_t).abs().mean(dim=(1, 2), keepdim=True)
    through_nets = ((a - b) * (r - alpha * d) + d * (a - alpha * (a - b))) / w / x.numel()  # d/dx beyond -d/w
    torch.testing.assert_close(g_full - g_stop, through_nets)


def test_generator_noise_levels_stop_near_24():
    s = sid.sample_sigma(100_000, generator=torch.Generator().manual_seed(0))
    assert s.min() >= 0.002 and s.max() <= 24.45 and s.max() > 24.2  # t <= 0.8 on the Karras curve, never 80
    assert sid.sample_sigma(1, t_max=0.0).item() == pytest.approx(0.002)


def test_msd_sid_draws_sids_levels_and_freezes_the_fake_score_for_gs_loss(files, tmp_path):  # noqa: F811
    """--loss sid: G's sigma <= 24.4 (t <= 0.8), mu_fake's log-normal, Adam's beta1 = 0; G's backward goes
    through mu_fake without leaving a gradient on it; the step trains G on SiD + Eq. 9 and mu_fake on Eq. 8."""
    cfg = msd.Config(batch=20_000, loss="sid")
    r = types.SimpleNamespace(cfg=cfg, shape=(1,), device=torch.device("cpu"), parts=[(torch.arange(3), 0, 0)],
                              sigmas=dmd.karras_sigmas(1000), n_real=0)
    b = msd.draw_batch(r, step=0, stream=0)
    assert 0.002 <= b["sigma"].min() and 24.2 < b["sigma"].max() <= 24.45
    ln = b["sigma_fake"].log()
    assert abs(ln.mean() + 1.2) < 0.05 and abs(ln.std() - 1.2) < 0.05  # EDM's P_mean, P_std
    r = msd.setup(msd.parse_args(args(files, tmp_path / "o", "--loss", "sid", "--iters", "1", "--reg-loss", "mse")))
    assert r.opt_net.param_groups[0]["betas"] == (0.0, 0.999) == r.opt_critic.param_groups[0]["betas"]
    b = msd.draw_batch(r, 0, 0)
    terms, xs, ok = msd.update_generator(r, b)
    assert set(terms) == {"sid", "reg", "gnorm_net"} and ok and np.isfinite(terms["sid"].item())
    assert all(p.grad is None for p in r.fake.parameters()) and all(p.requires_grad for p in r.fake.parameters())
    before = [p.detach().clone() for p in r.fake.parameters()]
    f_terms, ok = msd.update_fake_score(r, b, xs, 0)
    assert ok and any(not torch.equal(p, q) for p, q in zip(r.fake.parameters(), before))


def test_msd_sid_all_students_equal_separate_runs_and_every_stage_runs(files, data, tmp_path):  # noqa: F811
    common = ("--iters", "2", "--loss", "sid", "--reg-pairs", "own", "--reg-loss", "mse")  # 2: at step 1 mu_fake = mu_real
    for k in range(2):
        msd.main(args(files, tmp_path / f"sep{k}", "--partition", str(k), *common))
    r = msd.main(args(files, tmp_path / "all", "--all-students", *common))
    start = edm_unet.load_model(files / "teacher.pt")[0].state_dict()
    for k in range(2):  # the stack's backward through K fake scores (vmap) is each run's backward
        sep = edm_unet.load_model(tmp_path / f"sep{k}" / "student.pt")[0].state_dict()
        one = edm_unet.load_model(tmp_path / "all" / f"p{k}" / "student.pt")[0].state_dict()
        d_sep = torch.cat([(v - start[n]).flatten() for n, v in sep.items()])
        d_one = torch.cat([(v - start[n]).flatten() for n, v in one.items()])
        assert d_sep.norm() > 0 and ((d_sep - d_one).norm() / d_sep.norm()).item() < 1e-3
    assert np.isfinite([r["log"][t] for t in ("sid", "reg", "fake")]).all() and "dm" not in r["log"]
    shared = msd.main(args(files, tmp_path / "shared", "--all-students", "--shared-fake", *common))
    gan = msd.main(args(files, tmp_path / "adm", "--stage", "adm", "--lambda-reg", "0", "--data", data,
                        "--iters", "1", "--loss", "sid", "--reg-loss", "mse"))
    for out in (shared, gan):
        assert out["log"]["skipped"] == 0 and np.isfinite(out["log"]["sid"])
    assert "gan_g" in gan["log"]
    with pytest.raises(ValueError, match="--loss sid with --stage tsm"):
        msd.main(args(files, tmp_path / "t", "--stage", "tsm", "--loss", "sid", "--preset", "tiny", "--data", data))


def test_msd_sid_survives_the_gradient_probe_and_its_checkpoints(files, tmp_path):  # noqa: F811
    """The probe is on by default: its SiD term is the one the curves divide by (a KeyError 'dm' once)."""
    out = tmp_path / "sid"
    argv = [a for a in args(files, out, "--loss", "sid", "--iters", "2", "--ckpt-every", "2", "--reg-loss", "mse")]
    argv[argv.index("--grad-probe-every") + 1] = "1"
    msd.main(argv)
    probes = [json.loads(line)["grad_probe"] for line in open(out / "log.jsonl") if "grad_probe" in line]
    assert len(probes) == 2 and all(set(p) == {"sid", "reg"} for p in probes)
    assert (out / "curves.png").stat().st_size > 0 and (out / "student.pt").exists()
