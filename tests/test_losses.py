"""G's one-step losses (msd.py --loss dm | sid | f): each through every path, msd.py's gradient on G
against the loss module's own function (with the wiring faults it must catch), and f-distill's h(r)."""
import json

import numpy as np
import pytest
import torch

import curves
import dmd
import edm_unet
import fdistill
import msd
import runtime
import sid
from test_adm_tsm import data  # noqa: F401  (30 real images beside the teacher)
from test_msd import args, files  # noqa: F401  (the tiny teacher and pairs)

PATHS = {"dm": ("--stage", "dm"), "adm": ("--stage", "adm", "--lambda-reg", "0"),
         "all": ("--all-students", "--reg-pairs", "own"), "shared": ("--all-students", "--reg-pairs", "own", "--shared-fake")}
LOSS_PATHS = [(loss, path) for loss in ("dm", "sid") for path in PATHS] + [("f", "adm")]


@pytest.mark.parametrize("loss,path", LOSS_PATHS)
def test_every_loss_through_every_path_with_probe_checkpoints_and_curves(files, data, tmp_path, loss, path):  # noqa: F811
    out = tmp_path / "run"
    argv = args(files, out, "--loss", loss, "--iters", "2", "--ckpt-every", "2", "--reg-loss", "mse", "--data", data,
                *PATHS[path])
    argv[argv.index("--grad-probe-every") + 1] = "1"  # the default is on (every 1000 steps): here every step
    r = msd.main(argv)
    assert r["log"]["skipped"] == 0 and np.isfinite(r["log"][loss]) and not {"dm", "sid", "f"} - {loss} & set(r["log"])
    assert json.load(open(out / "run.json"))["loss"] == loss
    titles = curves.plot([str(out)], str(tmp_path / "c.png"))
    assert curves.PANELS[loss] in titles and (out / "curves.png").stat().st_size > 0
    if path in ("dm", "adm"):  # the probe runs in single runs (off with --all-students), against the run's own loss
        probes = [json.loads(line)["grad_probe"] for line in open(out / "log.jsonl") if "grad_probe" in line]
        assert len(probes) == 2 and all(loss in p and np.isfinite(p[loss]) for p in probes)
        assert (out / "student.pt").exists()
    else:
        assert all((out / f"p{k}" / "student.pt").exists() for k in range(2))


def other_net(files, tmp_path, name, seed):
    """The teacher with its weights moved: a G or fake score that differs from mu_real (else Eq. 6 is 0)."""
    D = edm_unet.load_model(files / "teacher.pt")[0]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in D.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    edm_unet.save_model(D, tmp_path / name)
    return str(tmp_path / name)


def own_function(loss, r, b, G, teacher, fake, critic, sigma):
    """The loss module's own function on G's samples: dmd.py, sid.py or fdistill.py."""
    x = G(b["z"], b["y"])
    if loss == "dm":
        return dmd.dm_step_loss(x, sigma, b["y"], teacher, fake, b["noise"])
    if loss == "sid":
        return sid.sid_loss(x, sigma, b["y"], teacher, fake, b["noise"], r.cfg.sid_alpha)
    return fdistill.f_loss(x, sigma, b["y"], teacher, critic, b["noise"], r.sigmas, r.cfg.f_div)[0]


@pytest.mark.parametrize("loss,stage", [("dm", "dm"), ("sid", "dm"), ("sid", "adm"), ("f", "adm")])
def test_msd_gradient_on_G_is_the_loss_modules_own(files, data, tmp_path, monkeypatch, loss, stage):  # noqa: F811
    """lambda_reg = 0 (and the GAN's weight 0): G's gradient in msd.update_generator is exactly the gradient of
    the loss module's function on the same batch and networks; a detached input, swapped networks or the
    fake score's sigma in G's place would each give another gradient (asserted, so the test can see them)."""
    G0, F0 = other_net(files, tmp_path, "g.pt", 1), other_net(files, tmp_path, "f.pt", 2)
    r = msd.setup(msd.parse_args(args(files, tmp_path / "o", "--loss", loss, "--stage", stage, "--lambda-reg", "0",
                                      "--lambda-gan-g", "0", "--data", data, "--init", G0, "--fake-init", F0, "--iters", "1")))
    b = msd.draw_batch(r, 0, 0)
    params = [p for p in r.net.parameters()]
    G = edm_unet.OneStep(r.net)
    critic = r.critic if stage == "adm" else None

    def grad(teacher, fake, critic, sigma):
        return torch.cat([g.flatten() for g in torch.autograd.grad(own_function(loss, r, b, G, teacher, fake, critic,
                                                                                 sigma), params)])
    want = grad(r.teacher, r.fake, critic, b["sigma"])
    swapped = grad(r.fake, r.teacher, (lambda x_t, s, y: (r.teacher(x_t, s, y), r.critic(x_t, s, y)[1])) if critic else None,
                   b["sigma"])
    wrong_sigma = grad(r.teacher, r.fake, critic, b["sigma_fake"])
    seen, step = [], runtime.optimizer_step

    def record(cfg, module, opt, scaler):  # G's gradient as msd.py hands it to the optimiser
        seen.append(torch.cat([p.grad.flatten() for p in module.parameters()]))
        return step(cfg, module, opt, scaler)
    monkeypatch.setattr(runtime, "optimizer_step", record)
    msd.update_generator(r, b)
    got = seen[0]
    if critic is not None:  # G's terms leave the critic (fake score + head) no gradient
        assert all(p.grad is None for p in r.critic.parameters())
    assert want.norm() > 0  # a detached input would give 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7 * want.abs().max().item())
    for fault in (swapped, wrong_sigma):
        assert (fault - want).norm() > 0.01 * want.norm()
    if loss == "f":  # and h(r) matters: DM's gradient (h = 1) differs
        dm = torch.cat([g.flatten() for g in torch.autograd.grad(
            dmd.dm_step_loss(G(b["z"], b["y"]), b["sigma"], b["y"], r.teacher, r.fake, b["noise"]), params)])
        assert (dm - want).norm() > 0.01 * want.norm()


def test_h_of_each_divergence_by_hand():
    r = torch.tensor([0.5, 2.0, 4.0, 1.0], dtype=torch.float64)
    t_bin = torch.tensor([0, 0, 3, 3])
    hand = {"rkl": lambda q: 1.0, "kl": lambda q: q, "js": lambda q: q / (1 + q), "sf": lambda q: 1 / (1 + q),
            "neyman": lambda q: 1 / q, "sh": lambda q: q ** 0.5, "jf": lambda q: 1 + q}
    assert set(hand) == set(fdistill.H)
    normed = [0.5 / 1.25, 2.0 / 1.25, 4.0 / 2.5, 1.0 / 2.5]  # r over its bin's mean: bin 0 (0.5, 2), bin 3 (4, 1)
    for name, h in hand.items():
        w = [h(q) for q in normed]
        want = [v / (sum(w) / 4) for v in w]
        assert fdistill.weights(r, t_bin, name).tolist() == pytest.approx(want, rel=1e-12), name
    logits = torch.tensor([-30.0, np.log(0.05), 0.0, np.log(3.0), 30.0])
    assert fdistill.density_ratio(logits).tolist() == pytest.approx([0.1, 0.1, 1.0, 3.0, 20.0], rel=1e-6)
    sigmas = dmd.karras_sigmas(1000)
    assert fdistill.level_bin(sigmas[[0, 99, 100, 500, 999]], sigmas).tolist() == [0, 0, 1, 5, 9]


def test_f_loss_gradient_is_h_times_dms_and_the_critic_gets_none():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2, 3, generator=g, requires_grad=True)
    noise = torch.randn(4, 2, 3, generator=g)
    sigmas = dmd.karras_sigmas(1000)
    sigma = sigmas[[10, 30, 500, 990]]
    head = torch.nn.Linear(6, 1)  # a critic with weights: f's term must leave them no gradient
    real = lambda x_t, s, y: 0.9 * x_t  # noqa: E731
    critic = lambda x_t, s, y: (0.6 * x_t, head(x_t.flatten(1)).squeeze(1))  # noqa: E731
    for f_div in fdistill.H:
        x.grad = None
        loss, h = fdistill.f_loss(x, sigma, None, real, critic, noise, sigmas, f_div)
        loss.backward()
        x_t = x.detach() + sigma.view(-1, 1, 1) * noise
        r = head(x_t.flatten(1)).squeeze(1).detach().clamp(-10, 10).exp().clamp(0.1, 20)
        torch.testing.assert_close(h, fdistill.weights(r, torch.tensor([0, 0, 5, 9]), f_div))
        want = h.view(-1, 1, 1) * dmd.dm_grad(x, 0.9 * x_t, 0.6 * x_t) / x.numel()  # h_i times DM's per-sample gradient
        torch.testing.assert_close(x.grad, want)
        assert head.weight.grad is None and head.bias.grad is None
        if f_div == "rkl":
            assert torch.equal(h, torch.ones(4))


def test_f_rkl_run_equals_dm_exactly_and_f_is_refused_outside_adm(files, data, tmp_path):  # noqa: F811
    common = ("--stage", "adm", "--lambda-reg", "0", "--data", data, "--iters", "3", "--warmup", "0",  # Adam's first step is
              "--init", other_net(files, tmp_path, "g.pt", 1), "--batch", "12")  # sign(grad) * lr: h shows from the
    # second on, and only in bins of 2 samples or more (r over its bin's mean is 1 for a sample alone in its bin)
    msd.main(args(files, tmp_path / "dm", *common))
    msd.main(args(files, tmp_path / "rkl", "--loss", "f", "--f-div", "rkl", *common))
    js = msd.main(args(files, tmp_path / "js", "--loss", "f", "--f-div", "js", *common))
    one = lambda name: edm_unet.load_model(tmp_path / name / "student.pt")[0].state_dict()  # noqa: E731
    dm, rkl, f_js = one("dm"), one("rkl"), one("js")
    assert all(torch.equal(dm[k], rkl[k]) for k in dm)
    assert any(not torch.equal(dm[k], f_js[k]) for k in dm) and np.isfinite(js["log"]["f"])
    for stage in (("--stage", "dm"), ("--stage", "tsm", "--preset", "tiny", "--data", data)):
        with pytest.raises(ValueError, match="--loss f with --stage .*: it trains G in the adm stage only .*ADM critic"):
            msd.main(args(files, tmp_path / "x", "--loss", "f", *stage))
    with pytest.raises(SystemExit):  # argparse: "invalid choice: 'tv' (choose from 'rkl', 'kl', ...)"
        msd.main(args(files, tmp_path / "x", "--loss", "f", "--f-div", "tv", *common))
