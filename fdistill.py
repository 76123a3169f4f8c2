"""f-distill (Xu et al. 2025, "One-step Diffusion Models with f-Divergence Distribution Matching") as
a one-step loss for MSD's students: DM's per-sample gradient (MSD Eq. 6) weighted by h(r).

DM's gradient minimises the reverse KL between G's samples and the teacher's. f-distill minimises
another f-divergence: its gradient is DM's, each sample's weighted by h(r(x_t)), where
r = p_real / p_fake is the density ratio at the noised sample and h follows from f (h = 1 is the
reverse KL, i.e. DM). r comes from the GAN discriminator: with the logistic loss, its optimal logit
is log r. In MSD that is the ADM stage's critic (adm.py), so `--loss f` runs in the ADM stage only.

How r and h are computed (NVIDIA FastGen's `f_distill.py`, the authors' reference; we follow it
except where noted):
  * r = exp(logit), the logit clamped to [-10, 10], then r clamped to [0.1, 20] (FastGen's defaults);
    r is a constant: G's term puts no gradient on the critic, nor on G through r.
  * bin normalisation: r is divided by the mean r of its noise-level bin (10 bins). FastGen keeps a
    running mean per bin (EMA rate 0.0 by default, 0.5 in its ImageNet-64 config); we use rate 0.0,
    this micro-batch's bin means, so no state travels in the resume file. FastGen's bins are equal
    ranges of its time variable; ours are equal ranges of the 1000 Karras levels' index t (one tenth
    of DM's uniform t each). FastGen all-reduces the bin and h statistics over ranks; ours are each
    rank's micro-batch.
  * h is divided by its batch mean, so the weights average 1 and the loss scale is DM's.
  * FastGen's discriminator reads the teacher's features at G's noised sample; MSD's critic is a head
    on the fake score's middle block (adm.py). We read r from MSD's critic, evaluated at the DM
    term's own x_t: that one forward also gives mu_fake(x_t) for Eq. 6, so r costs nothing extra.
"""
import torch

import dmd

H = {  # h(r) for each divergence FastGen offers (its all_f_div_weighting_function)
    "rkl": lambda r: torch.ones_like(r),    # reverse KL: DM itself
    "kl": lambda r: r,                      # forward KL
    "js": lambda r: r / (1 + r),            # Jensen-Shannon
    "sf": lambda r: 1 / (1 + r),            # softened reverse KL
    "neyman": lambda r: 1 / r,              # Neyman chi^2 (r >= 0.1 after clamping)
    "sh": lambda r: r.sqrt(),               # squared Hellinger
    "jf": lambda r: 1 + r,                  # Jeffreys
}
LOGIT_CLAMP, RATIO_RANGE, BINS = 10.0, (0.1, 20.0), 10


def density_ratio(logits):
    """r = p_real / p_fake from the critic's logits (B,), clamped as FastGen does; a constant. -> (B,)."""
    return logits.detach().float().clamp(-LOGIT_CLAMP, LOGIT_CLAMP).exp().clamp(*RATIO_RANGE)


def weights(r, t_bin, f_div):
    """h(r / its bin's mean r), divided by its batch mean. r, t_bin (B,) -> (B,)."""
    count = torch.bincount(t_bin, minlength=BINS).float()
    mean = torch.bincount(t_bin, weights=r, minlength=BINS) / count.clamp_min(1)
    h = H[f_div](r / mean[t_bin])
    return h / h.mean().clamp_min(1e-6)


def level_bin(sigma, sigmas):
    """The bin of each sigma: tenths of the index t of the ascending Karras levels `sigmas`. -> (B,) long."""
    t = torch.searchsorted(sigmas, sigma.contiguous()).clamp(max=len(sigmas) - 1)
    return t * BINS // len(sigmas)


def f_loss(x, sigma, labels, mu_real, critic, noise, sigmas, f_div="js"):
    """f-distill's loss on G's samples x (B, ...): its gradient is h(r) times DM's (dmd.dm_loss's).
    critic(x_t, sigma, labels) -> (mu_fake(x_t), logits): adm.FakeWithHead. -> (loss, h)."""
    with torch.no_grad():
        x_t = x.detach() + dmd._bcast(sigma, x) * noise
        real = mu_real(x_t, sigma, labels)
        fake, logits = critic(x_t, sigma, labels)
        h = weights(density_ratio(logits), level_bin(sigma, sigmas), f_div)
    return dmd.dm_loss(x, real, fake, scale=h), h


if __name__ == "__main__":
    raise SystemExit("fdistill.py holds f-distill's weights and loss; train with them by "
                     "`msd.py --stage adm --loss f --f-div js`")
