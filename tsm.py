"""Teacher score matching (MSD Sec. 3.3, Eq. 3): pretrain a smaller student denoiser.

    python msd.py --stage tsm --teacher teacher.pt --preset S --data imagenet-64x64.zip --partition 0 --num-students 4
    python msd.py --stage tsm --target data --preset tiny --arch "model_channels=32,img_resolution=8,attn_resolutions=(4,)" \
        --data out/digits/train --num-students 1 --iters 2500 --batch 128 --lr 2e-3 --precision fp32 \
        --out out/teacher       # plain EDM training on the digits that `python bench/digits.py` writes

L_TSM = E_t[lambda_t ||mu_student(x_t, t) - mu_teacher(x_t, t)||^2] with EDM's log-normal sigma
(P_mean, P_std) = (-1.2, 1.2) and lambda_t = (sigma^2 + 0.5^2)/(sigma * 0.5)^2 (App. D.2.2). The
result initialises both the generator and the fake score of the DM stage (`msd.py --init`).
`--target data` regresses onto the clean image instead: EDM's denoising score matching, used to
train a small teacher from data. This file holds the loss only; the training loop (precision,
torchrun, resume, logging) is msd.py's, run as `python msd.py --stage tsm`.
"""
import torch

import dmd


def sample_sigma_lognormal(batch, P_mean=-1.2, P_std=1.2, generator=None, device="cpu"):
    """EDM's training noise levels: ln sigma ~ N(P_mean, P_std^2). -> (B,)."""
    return (torch.randn(batch, generator=generator, device=device) * P_std + P_mean).exp()


def tsm_loss(student, teacher, x, sigma, labels, sigma_data, noise):
    """Eq. 3 on x_t = x + sigma * noise; teacher=None gives EDM's loss against x itself (`--target data`)."""
    if teacher is None:
        return dmd.denoise_loss(student, x, sigma, labels, sigma_data, noise)
    x_t = x + dmd._bcast(sigma, x) * noise
    with torch.no_grad():
        target = teacher(x_t, sigma, labels)
    return dmd.weighted_error(student(x_t, sigma, labels), target, sigma, sigma_data)


if __name__ == "__main__":
    raise SystemExit("tsm.py holds Eq. 3; train a student with it: python msd.py --stage tsm ... (python msd.py --help)")
