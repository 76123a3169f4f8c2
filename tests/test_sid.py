"""sid.py: SiD's generator loss by hand, alpha's effect, and its gradient against DM's (Eq. 6)."""
import pytest
import torch

import dmd
import sid


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
