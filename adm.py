"""Adversarial distribution matching (MSD Sec. 3.2 "ADM stage", Eq. 4; App. D.2.1; DMD2).

A GAN classifier head reads the output of the fake score's middle block (MSD App. D.2.1: in EDM's
layout the two lowest-resolution decoder blocks `_in0` and `_in1`, 8x8 for ImageNet-64; the
`UNet.feature_hook` of edm_unet.py), so the fake score doubles as the discriminator's trunk.
Diffusion-GAN as in DMD2's `compute_cls_logits`: every image the head judges (G's samples in G's
term, G's samples and real images in D's term) is first noised at its own sigma_t, t drawn
uniformly from [0, --gan-t-max) of the 1000 Karras levels (DMD2's ImageNet script: all 1000).
Classes condition the head through the fake score's own label embedding: every UNet block the
feature passes through is modulated by emb = f(sigma) + map_label(y).

Where the paper's text is silent we take DMD2's values: the head is 768 wide, and its last
convolution is followed by GroupNorm and SiLU before the linear output. What remains different
from DMD2 (the README's differences list): DMD2 reads the *encoder's* output (before `_in0`),
we read the middle block's, as MSD's text says.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import edm_unet


WIDTH = 768  # DMD2's head width (its ImageNet fake score's 8x8 features are 768 wide too)


def check_width(width):
    """GroupNorm(32, width) needs a positive multiple of 32."""
    if width < 32 or width % 32:
        raise ValueError(f"--head-width {width}: expected a positive multiple of 32 (GroupNorm's 32 groups; "
                         f"e.g. 32, 64, 256 or DMD2's {WIDTH})")


class GANHead(nn.Module):
    """MSD App. D.2.1: [4x4 conv stride 2, GroupNorm, SiLU] down to 4x4, one 4x4 conv with stride 4
    [+ GroupNorm, SiLU: DMD2], then a linear layer to one logit per image. h: (B, C, r, r) -> (B,)."""

    def __init__(self, channels, resolution, width=WIDTH):
        super().__init__()
        check_width(width)
        if resolution < 4 or resolution & (resolution - 1):
            raise ValueError(f"GAN head needs a power-of-two feature resolution >= 4, got {resolution}")
        layers, c, r = [], channels, resolution
        while r > 4:
            layers += [nn.Conv2d(c, width, 4, stride=2, padding=1), nn.GroupNorm(32, width), nn.SiLU()]
            c, r = width, r // 2
        layers += [nn.Conv2d(c, width, 4, stride=4), nn.GroupNorm(32, width), nn.SiLU(),  # (B, width, 1, 1)
                   nn.Flatten(), nn.Linear(width, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, h):
        with edm_unet.float32(h):  # DMD2's compute_cls_logits: the head runs in float32 on rep.float()
            return self.net(h.float()).squeeze(1)

    @classmethod
    def for_denoiser(cls, denoiser: edm_unet.EDMPrecond, width=WIDTH):
        """A head sized for the bottleneck of `denoiser` (channels x resolution of its middle block)."""
        cfg = denoiser.cfg
        return cls(cfg.model_channels * cfg.channel_mult[-1], cfg.img_resolution >> (len(cfg.channel_mult) - 1), width)


class FakeWithHead(nn.Module):
    """The discriminator D = head(bottleneck of mu_fake): one fake-score forward gives both the
    denoised output (for the Eq. 8 loss) and the GAN logit. (x_t, sigma, labels) -> ((B, C, H, W), (B,))."""

    def __init__(self, fake_score: edm_unet.EDMPrecond, head: GANHead):
        super().__init__()
        self.fake_score, self.head = fake_score, head

    def forward(self, x_t, sigma, labels):
        feats = []
        self.fake_score.model.feature_hook = lambda h, emb: feats.append(h)
        try:
            denoised = self.fake_score(x_t, sigma, labels)
        finally:
            self.fake_score.model.feature_hook = None
        return denoised, self.head(feats[-1])


def gan_g_loss(logits_fake):
    """Non-saturating generator loss softplus(-D(G(z))) (DMD2 Eq. 4), mean over the batch."""
    return F.softplus(-logits_fake.float()).mean()


def gan_d_loss(logits_fake, logits_real):
    """softplus(D(fake)) + softplus(-D(real)), means over the batch (DMD2's classification loss)."""
    return F.softplus(logits_fake.float()).mean() + F.softplus(-logits_real.float()).mean()


def init_head(denoiser, seed=0, width=WIDTH):
    """A freshly initialised head, independent of the global RNG stream (so resume stays exact)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return GANHead.for_denoiser(denoiser, width)
