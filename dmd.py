"""Distribution matching (DM): the losses of MSD's DM stage, shape-agnostic.

MSD (Song et al. 2025) Sec. 3.2 / App. I.2 builds its DM stage on DMD (Yin et al. 2024):
  * the student G is pushed along the difference of two denoisers, the frozen teacher
    mu_real and a "fake" denoiser mu_fake trained on G's own samples   (MSD Eq. 6, DMD Eq. 7-8)
  * mu_fake learns by plain denoising score matching on detached samples (MSD Eq. 8)
  * a regression loss on (noise, teacher sample) pairs keeps modes covered (MSD Eq. 9)

Every function here works on tensors of any shape (B, ...): the 2-D toy (B, 2) and
ImageNet (B, 3, 64, 64) call the same code. A denoiser is any callable
D(x, sigma, labels) -> x_hat with sigma of shape (B,), in EDM's convention x_t = x + sigma*eps
(alpha_t = 1).
"""
import torch
import torch.nn.functional as F


def karras_sigmas(num_steps=1000, sigma_min=0.002, sigma_max=80.0, rho=7.0, dtype=torch.float32):
    """EDM Eq. 5 noise levels, *ascending* (index 0 = sigma_min), as DMD indexes its t.

    MSD App. D.1/D.2: (sigma_min, sigma_max) = (0.002, 80) discretised into 1000 steps.
    """
    i = torch.arange(num_steps, dtype=torch.float64) / (num_steps - 1)
    s = (sigma_min ** (1 / rho) + i * (sigma_max ** (1 / rho) - sigma_min ** (1 / rho))) ** rho
    return s.to(dtype)  # (num_steps,)


def sample_sigma(batch, sigmas, t_min, t_max, generator=None):
    """t ~ Uniform{t_min, ..., t_max - 1} over the ascending schedule; returns sigma_t, (B,).

    DMD2 uses t in [0.02T, 0.98T]; MSD's toy uses "the first 750 of the 1000 steps".
    """
    if not 0 <= t_min < t_max <= len(sigmas):
        raise ValueError(f"t range [{t_min}, {t_max}) must lie inside [0, {len(sigmas)}]")
    t = torch.randint(t_min, t_max, (batch,), generator=generator, device=sigmas.device)
    return sigmas[t]


def edm_weight(sigma, sigma_data):
    """lambda_t = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2 (EDM Table 1; MSD App. D.2)."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def _bcast(v, x):
    """Reshape a per-sample vector (B,) to broadcast against x (B, ...)."""
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def denoise_loss(denoiser, x, sigma, labels, sigma_data, noise=None):
    """MSD Eq. 8: E[lambda_t ||mu(x + sigma*eps, sigma) - x||^2]; also EDM's training loss.

    Used for the fake score (on *detached* generator samples) and for training a teacher.
    Returns a scalar: the weighted squared error, mean over batch and elements.
    """
    if noise is None:
        noise = torch.randn_like(x)
    x_t = x + _bcast(sigma, x) * noise
    return weighted_error(denoiser(x_t, sigma, labels), x, sigma, sigma_data)


def weighted_error(denoised, target, sigma, sigma_data):
    """mean(lambda_t ||denoised - target||^2) in float32: the EDM-weighted error of Eq. 3 and Eq. 8."""
    err = (denoised.float() - target.float()) ** 2
    return (_bcast(edm_weight(sigma, sigma_data), err) * err).mean()


def dm_grad(x, mu_real, mu_fake):
    """The per-sample DM gradient of Eq. 6 in DMD's normalised form (DMD Eq. 8).

    w_t * alpha_t * (s_fake - s_real) with s = -(x_t - mu)/sigma^2 and
    w_t = sigma_t^2/alpha_t * C*S / ||mu_real - x||_1 reduces to
    grad = (mu_fake - mu_real) / mean|x - mu_real|   (mean over all non-batch elements).
    Computed in float32; all inputs are treated as constants.
    """
    x, mu_real, mu_fake = x.detach().float(), mu_real.detach().float(), mu_fake.detach().float()
    dims = tuple(range(1, x.ndim))
    norm = (x - mu_real).abs().mean(dim=dims, keepdim=True).clamp_min(1e-8)  # ||.||_1 / (C*S)
    return (mu_fake - mu_real) / norm


def dm_loss(x, mu_real, mu_fake, scale=None):
    """A loss whose gradient w.r.t. x is grad / numel: 0.5 * ||x - stopgrad(x - grad)||^2 (DMD Alg. 1).
    scale (B,): a constant weight per sample on grad (f-distill's h(r), fdistill.py)."""
    grad = dm_grad(x, mu_real, mu_fake)
    if scale is not None:
        grad = _bcast(scale.detach().float(), grad) * grad
    target = (x.detach().float() - grad)
    return 0.5 * F.mse_loss(x.float(), target)


def dm_step_loss(x, sigma, labels, mu_real, mu_fake, noise=None):
    """Noise G's samples x at sigma, query both denoisers without grad, return the Eq. 6 loss."""
    if noise is None:
        noise = torch.randn_like(x)
    with torch.no_grad():
        x_t = x.detach() + _bcast(sigma, x) * noise
        real = mu_real(x_t, sigma, labels)
        fake = mu_fake(x_t, sigma, labels)
    return dm_loss(x, real, fake)


def regression_loss(x, target, lpips_fn=None, size=224):
    """MSD Eq. 9: l(G(z), y) on the paired set.

    lpips_fn=None gives mean squared error (the 2-D toy); otherwise LPIPS on images upsampled
    bilinearly to size x size as DMD does (MSD App. D.2.1). Images are in [-1, 1]; grey images
    are repeated to the 3 channels VGG expects.
    """
    if lpips_fn is None:
        return F.mse_loss(x.float(), target.float())
    if x.shape[1] == 1:
        x, target = x.repeat(1, 3, 1, 1), target.repeat(1, 3, 1, 1)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        target = F.interpolate(target, size=(size, size), mode="bilinear", align_corners=False)
    return lpips_fn(x, target).mean()
