"""Score identity Distillation (SiD; Zhou et al., ICML 2024) as a one-step loss for MSD's students.

MSD names other distillation methods for its students as future work (MSD App. J.1, item 5). SiD
replaces DM's Eq. 6 with a loss built on the score identity, on the same three networks: the
generator G, the frozen teacher mu_real and a fake score mu_fake trained on G's samples.

Generator loss, as the SiD authors' `generator_loss` computes it, per sample:
    x_t = x + sigma * eps,  f_real = mu_real(x_t),  f_fake = mu_fake(x_t),  w = mean|x - f_real| (no grad)
    L = sum_pixels (f_real - f_fake) * ((f_real - x) - alpha * (f_real - f_fake)) / w,  alpha = 1.2
The gradient reaches G through x directly and through x_t in both networks (their parameters are
frozen for this loss, but it is not computed under no_grad). Were both networks' outputs constants,
dL/dx would be (f_fake - f_real) / w, DM's normalised Eq. 6 gradient (dmd.dm_grad), and alpha
would do nothing: SiD's difference from DM is the backward pass through the two denoisers.

Noise levels: the generator loss draws t uniformly in [0, t_max] (t_max = 0.8) on EDM's continuous
Karras curve from sigma_min = 0.002 upwards, so sigma <= 24.4, never 80; the fake score trains by
EDM's denoising loss (dmd.denoise_loss, MSD Eq. 8) at EDM's log-normal sigma (P_mean -1.2, P_std
1.2; tsm.sample_sigma_lognormal). We take the mean over batch and pixels instead of SiD's sum, so
that the constant-network case's gradient equals dmd.dm_loss's exactly (Adam does not see the
scale; only gradient clipping would). Shape-agnostic like dmd.py: (B, ...) tensors, float32 sums.

Used by `toy2d.py --loss sid` and `msd.py --loss sid` (dm and adm stages, one run or --all-students),
with SiD's Adam beta1 = 0; the regression term (Eq. 9) and the GAN stay available on top.
"""
import torch

import dmd


def sample_sigma(batch, t_max=0.8, sigma_min=0.002, sigma_max=80.0, rho=7.0, generator=None, device="cpu"):
    """SiD's generator noise levels: t ~ U[0, t_max] on EDM's Karras curve, t = 0 at sigma_min. -> (B,)."""
    t = torch.rand(batch, generator=generator, device=device) * t_max
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (lo + t * (hi - lo)) ** rho


def sid_loss(x, sigma, labels, mu_real, mu_fake, noise, alpha=1.2):
    """SiD's generator loss on G's samples x (B, ...), mean over batch and elements, in float32.
    Gradients flow through both denoisers into x; freeze their parameters before calling."""
    x_t = x + dmd._bcast(sigma, x) * noise
    f_real, f_fake = mu_real(x_t, sigma, labels).float(), mu_fake(x_t, sigma, labels).float()
    x = x.float()
    dims = tuple(range(1, x.ndim))
    with torch.no_grad():
        w = (x - f_real).abs().mean(dim=dims, keepdim=True).clamp_min(1e-5)  # SiD's weight_factor
    return ((f_real - f_fake) * ((f_real - x) - alpha * (f_real - f_fake)) / w).mean()


if __name__ == "__main__":
    raise SystemExit("sid.py holds SiD's generator loss and noise levels; train with them by "
                     "`python toy2d.py --students 1 8 --loss sid` or `msd.py --loss sid`")
