"""The equations the README maps to functions, each pinned to a value computed independently here."""
import math

import numpy as np
import pytest
import torch

import adm
import dmd
import edm_unet
import evaluate
import toy2d
import tsm

# two samples of 2 elements: x, sigma, noise, and a denoiser D(x_t) = 0.25 x_t
X = torch.tensor([[1.0, -2.0], [0.0, 3.0]])
SIGMA = torch.tensor([2.0, 0.5])
NOISE = torch.tensor([[0.5, 1.0], [2.0, -2.0]])
quarter = lambda x_t, sigma, y: 0.25 * x_t  # noqa: E731


def test_edm_weight_is_one_over_c_out_squared():
    """lambda_t = (sigma^2 + sd^2) / (sigma sd)^2 = 1 / c_out^2 (EDM Table 1): the weight makes c_out F's target unit."""
    sigma = torch.tensor([0.002, 0.3, 1.0, 7.0, 80.0], dtype=torch.float64)
    c_out = edm_unet.precond(sigma, 0.5)[1]
    torch.testing.assert_close(dmd.edm_weight(sigma, 0.5), 1 / c_out ** 2)


def test_denoise_loss_by_hand():
    """Eq. 8 on x_t = x + sigma * noise: x_t = [2, 0] and [1, 2]; D = [0.5, 0] and [0.25, 0.5];
    squared errors [0.25, 4] and [0.0625, 6.25]; lambda = 4.25 and 8; mean of the 4 weighted errors."""
    expect = (4.25 * 0.25 + 4.25 * 4 + 8 * 0.0625 + 8 * 6.25) / 4  # 17.140625
    assert dmd.denoise_loss(quarter, X, SIGMA, None, 0.5, NOISE).item() == pytest.approx(expect, rel=1e-6)
    denoised = quarter(X + SIGMA[:, None] * NOISE, SIGMA, None)
    assert dmd.weighted_error(denoised, X, SIGMA, 0.5).item() == pytest.approx(expect, rel=1e-6)


def test_tsm_loss_by_hand_and_its_data_branch():
    """Eq. 3: lambda_t ||student(x_t) - teacher(x_t)||^2 with student 0.5 x_t, teacher 0.25 x_t; teacher=None is Eq. 8."""
    half = lambda x_t, sigma, y: 0.5 * x_t  # noqa: E731
    # x_t = [2, 0], [1, 2]: differences 0.25 x_t = [0.5, 0], [0.25, 0.5]; squared [0.25, 0], [0.0625, 0.25]
    expect = (4.25 * 0.25 + 0 + 8 * 0.0625 + 8 * 0.25) / 4
    assert tsm.tsm_loss(half, quarter, X, SIGMA, None, 0.5, NOISE).item() == pytest.approx(expect, rel=1e-6)
    assert tsm.tsm_loss(half, None, X, SIGMA, None, 0.5, NOISE).item() == dmd.denoise_loss(half, X, SIGMA, None, 0.5, NOISE).item()


def test_lognormal_sigma_has_edms_moments():
    """App. D.2.2: ln sigma ~ N(-1.2, 1.2^2)."""
    log_s = tsm.sample_sigma_lognormal(400_000, generator=torch.Generator().manual_seed(0)).log()
    assert log_s.mean().item() == pytest.approx(-1.2, abs=0.01) and log_s.std().item() == pytest.approx(1.2, abs=0.01)


def test_dm_gradient_by_hand():
    """Eq. 6 in DMD's normalised form: (mu_fake - mu_real) / mean|x - mu_real|, and the loss's gradient is it / numel."""
    x = torch.tensor([[1.0, 3.0]], requires_grad=True)
    real, fake = torch.tensor([[0.0, 1.0]]), torch.tensor([[2.0, 2.0]])
    grad = dmd.dm_grad(x, real, fake)  # mean|x - real| = (1 + 2) / 2 = 1.5
    torch.testing.assert_close(grad, torch.tensor([[2 / 1.5, 1 / 1.5]]))
    dmd.dm_loss(x, real, fake).backward()
    torch.testing.assert_close(x.grad, grad / 2)  # descent moves x away from mu_fake, toward mu_real


def test_gan_losses_by_value_and_sign():
    """DMD2: D minimises softplus(D(fake)) + softplus(-D(real)); G minimises softplus(-D(G(z)))."""
    f, r = torch.tensor([0.0, 2.0]), torch.tensor([0.0, -1.0])
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    assert adm.gan_d_loss(f, r).item() == pytest.approx((sp(0) + sp(2)) / 2 + (sp(0) + sp(1)) / 2, rel=1e-6)
    assert adm.gan_g_loss(torch.tensor([0.0, 3.0])).item() == pytest.approx((sp(0) + sp(-3)) / 2, rel=1e-6)
    # a discriminator that calls fakes fake and reals real has a small loss; one that has it backwards, a large one
    assert adm.gan_d_loss(torch.tensor([-8.0]), torch.tensor([8.0])).item() < 1e-3
    assert adm.gan_d_loss(torch.tensor([8.0]), torch.tensor([-8.0])).item() > 15
    assert adm.gan_g_loss(torch.tensor([8.0])).item() < 1e-3 < 7 < adm.gan_g_loss(torch.tensor([-8.0])).item()


def test_gan_head_refuses_a_resolution_it_cannot_halve_to_4():
    for res in (6, 12, 2):
        with pytest.raises(ValueError, match=f"power-of-two feature resolution >= 4, got {res}"):
            adm.GANHead(64, res, width=32)
    assert adm.GANHead(64, 16, width=32)(torch.randn(3, 64, 16, 16)).shape == (3,)


def fd_by_eigenvalues(mu1, s1, mu2, s2):
    """|mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 sum sqrt(eig(sqrt(s1) s2 sqrt(s1))): tr sqrt(s1 s2) without sqrtm of a product."""
    w, v = np.linalg.eigh(s1)
    root = v @ np.diag(np.sqrt(w)) @ v.T
    eig = np.linalg.eigvalsh(root @ s2 @ root)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(eig, 0, None)).sum())


def test_frechet_distance_with_covariances_that_do_not_commute():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
    assert not np.allclose(s1 @ s2, s2 @ s1)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    assert evaluate.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(fd_by_eigenvalues(mu1, s1, mu2, s2), rel=1e-9)
    s3, s4 = np.array([[2.0, 1.0], [1.0, 2.0]]), np.diag([1.0, 3.0])  # small enough to check by eye: 2 + 5 + 4 - 2 tr
    assert evaluate.frechet_distance(np.zeros(2), s3, np.ones(2), s4) == pytest.approx(fd_by_eigenvalues(np.zeros(2), s3, np.ones(2), s4))


def test_stacked_students_are_independent_networks():
    """A loss on student s's rows moves student s alone: every other student's gradients are exactly zero."""
    torch.manual_seed(0)
    net = toy2d.StackedMLP(3, 4, 16, 2, 2, "relu")
    x = torch.randn(3, 10, 4)
    for s in range(3):
        net.zero_grad()
        net(x)[s].pow(2).sum().backward()
        for p in list(net.weights) + list(net.biases):
            others = [i for i in range(3) if i != s]
            assert p.grad[s].abs().sum() > 0 and p.grad[others].abs().sum() == 0, s


def test_pair_pools_hold_exactly_a_students_own_pairs():
    labels = torch.tensor([0, 3, 1, 2, 3, 0, 7, 1])
    own = toy2d.Ownership([[0, 1], [2, 3], [4, 5, 6, 7]])
    table, count = toy2d.pair_index(labels, own, "own")
    pools = [set(table[s, :count[s]].tolist()) for s in range(3)]
    assert pools == [{0, 2, 5, 7}, {1, 3, 4}, {6}] and count.tolist() == [4, 3, 1]
    table, count = toy2d.pair_index(labels, own, "all")  # F_DM: every pair for every student
    assert count.tolist() == [8, 8, 8] and all(set(table[s].tolist()) == set(range(8)) for s in range(3))
