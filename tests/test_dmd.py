"""dmd.py: the DM gradient (Eq. 6), the denoising loss (Eq. 8), the regression loss (Eq. 9)."""
import lpips
import torch

import dmd


def test_dm_grad_matches_hand_computed_value():
    x = torch.tensor([[1.0, -1.0], [0.5, 0.5]])
    mu_real = torch.tensor([[0.0, 0.0], [0.0, 1.5]])
    mu_fake = torch.tensor([[1.0, 1.0], [1.0, 0.5]])
    # sample 0: mean|x - mu_real| = (1 + 1)/2 = 1 -> grad = (1, 1)
    # sample 1: mean|x - mu_real| = (0.5 + 1)/2 = 0.75 -> grad = (1, -1) / 0.75
    expected = torch.tensor([[1.0, 1.0], [1 / 0.75, -1 / 0.75]])
    torch.testing.assert_close(dmd.dm_grad(x, mu_real, mu_fake), expected)
    # the surrogate loss has exactly grad / numel as its gradient w.r.t. x
    x = x.clone().requires_grad_(True)
    dmd.dm_loss(x, mu_real, mu_fake).backward()
    torch.testing.assert_close(x.grad, expected / x.numel())


def test_dm_grad_vanishes_when_fake_equals_real():
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    mu = torch.randn(4, 3, 8, 8)
    assert torch.count_nonzero(dmd.dm_grad(x, mu, mu)) == 0
    D = lambda x_t, sigma, y: 0.9 * x_t  # noqa: E731  same denoiser for real and fake
    loss = dmd.dm_step_loss(x, torch.full((4,), 0.5), None, D, D)
    loss.backward()
    assert loss.item() == 0 and torch.count_nonzero(x.grad) == 0


def test_karras_schedule_and_t_range():
    s = dmd.karras_sigmas(1000)
    assert s.shape == (1000,) and torch.all(s[1:] > s[:-1])
    torch.testing.assert_close(s[[0, -1]], torch.tensor([0.002, 80.0]))
    sig = dmd.sample_sigma(10_000, s, 20, 980)
    assert sig.min() >= s[20] and sig.max() <= s[979]
    try:
        dmd.sample_sigma(4, s, 0, 1001)
    except ValueError as e:
        assert "1001" in str(e)
    else:
        raise AssertionError("out-of-range t accepted")


def test_fake_score_denoising_loss_decreases_on_fixed_batch():
    torch.manual_seed(0)
    x = torch.randn(64, 4) * 0.5 + 1.0
    sigma = torch.rand(64) * 2 + 0.1
    noise = torch.randn_like(x)
    net = torch.nn.Sequential(torch.nn.Linear(5, 64), torch.nn.SiLU(), torch.nn.Linear(64, 4))
    D = lambda x_t, s, y: net(torch.cat([x_t, s[:, None].log()], 1))  # noqa: E731
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(50):
        loss = dmd.denoise_loss(D, x, sigma, None, 0.5, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_regression_loss_mse_and_lpips():
    a, b = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(dmd.regression_loss(a, b), ((a - b) ** 2).mean())
    torch.manual_seed(0)
    fn = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    up = torch.nn.functional.interpolate
    ref = fn(up(a, size=(224, 224), mode="bilinear"), up(b, size=(224, 224), mode="bilinear")).mean()
    torch.testing.assert_close(dmd.regression_loss(a, b, fn), ref)
    assert dmd.regression_loss(a, a, fn).item() < 1e-6
