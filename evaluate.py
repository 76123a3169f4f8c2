"""Evaluation: FID (and Inception Score) in the TF-Inception feature space used by EDM, DMD2 and MSD.

    python evaluate.py ref --data imagenet-64x64.zip --out ref.npz [--classes 0-249]
    python evaluate.py fid --images samples.zip --ref imagenet-64x64.npz [--classes 0-249] [--is]

Features: pool3 (2048-d) of the TF-Inception v3 graph of 2015-12-05, through torch-fidelity's port
(`FeatureExtractorInceptionV3`), which reproduces TF's bilinear resize to 299 px and its input
scaling, so FIDs compare with EDM's `fid.py` and the papers. Weights download on first use (~100 MB,
torch hub cache); `--inception-weights FILE` reads a local copy instead (weights_only=True).

Reference statistics are `.npz` files with `mu` (2048,) and `sigma` (2048, 2048), EDM's format: its
published https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/imagenet-64x64.npz works as `--ref`.
`--classes` restricts samples (and a reference computed here) to a class subset: MSD's
per-partition FID. Any other feature extractor (bench/digits.py's classifier) plugs into `features`.
"""
import argparse
import os
import sys
import warnings
from unittest import mock

import numpy as np
import scipy.linalg
import torch
from tqdm import tqdm

import sample


# ----------------------------------------------------------------------------- feature extractor

def load_inception(weights=None, device="cpu"):
    """torch-fidelity's TF-compatible Inception v3 returning (pool3 (B, 2048), unbiased logits (B, 1008)).

    weights=None downloads torch-fidelity's converted 2015-12-05 weights once; a path loads a local
    state dict safely (torch-fidelity itself would unpickle it with weights_only=False).
    """
    from torch_fidelity import feature_extractor_inceptionv3 as fe
    names = ["2048", "logits_unbiased"]
    if weights is None:
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", names)
    else:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: state):
            net = fe.FeatureExtractorInceptionV3("inception-v3-compat", names)
    return net.to(device).eval()


@torch.no_grad()
def features(batches, extractor, device="cpu", total=None, rgb=True):
    """Run `extractor` over ((B, C, H, W) uint8, labels) batches. -> tuple of float64 arrays (N, D_i).

    Any extractor of uint8 images works (bench/digits.py passes a digits classifier); with rgb=True
    1-channel images are repeated to the 3 channels Inception expects.
    """
    out = []
    for images, _ in tqdm(batches, total=total, desc="features", leave=False):
        images = images.to(device)
        if rgb and images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        f = extractor(images)
        out.append([t.double().cpu() for t in (f if isinstance(f, (tuple, list)) else (f,))])
    return tuple(torch.cat(cols).numpy() for cols in zip(*out))


# ----------------------------------------------------------------------------- statistics and metrics

def stats(feats):
    """(mu, sigma) of features (N, D) in float64, sigma the unbiased covariance (as EDM and TF)."""
    feats = np.asarray(feats, dtype=np.float64)
    if len(feats) < 2:
        raise ValueError(f"need at least 2 samples for a covariance, got {len(feats)}")
    return feats.mean(0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64 (Heusel et al. 2017).

    As the reference implementations: if sqrtm is not finite (singular product, e.g. fewer samples
    than dimensions) retry with eps on the diagonals; drop an imaginary part that is numerical noise,
    and refuse a large one.
    """
    mu1, mu2 = np.atleast_1d(np.float64(mu1)), np.atleast_1d(np.float64(mu2))
    s1, s2 = np.atleast_2d(np.float64(sigma1)), np.atleast_2d(np.float64(sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    covmean = _sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(s1)) * eps
        covmean = _sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm has a large imaginary part ({np.abs(covmean.imag).max():.3g})")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _sqrtm(m):
    """scipy's sqrtm without its 'Matrix is singular' warning (EDM's fid.py passes disp=False): a
    singular product (fewer samples than dimensions) is expected, and a non-finite root is retried."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        return scipy.linalg.sqrtm(m)


def inception_score(logits, splits=10):
    """IS = exp(E_x KL(p(y|x) || p(y))), mean and std over `splits` chunks (Salimans et al. 2016)."""
    logits = torch.as_tensor(logits, dtype=torch.float64)
    p = logits.softmax(1)
    scores = []
    for chunk in p.chunk(splits):
        kl = (chunk * (chunk.clamp_min(1e-30).log() - chunk.mean(0, keepdim=True).log())).sum(1)
        scores.append(kl.mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def save_stats(path, mu, sigma):
    sample.atomic_savez(path, mu=mu, sigma=sigma)


def load_stats(path):
    """Read (mu, sigma) from an EDM-format .npz with a clear error for anything else."""
    try:
        data = np.load(path)
        return np.float64(data["mu"]), np.float64(data["sigma"])
    except FileNotFoundError:
        raise FileNotFoundError(f"reference statistics {path!r} do not exist") from None
    except Exception as e:
        raise ValueError(f"{path!r} is not a statistics file with 'mu' and 'sigma' ({type(e).__name__}: {e})") from None


def dataset_features(data, extractor, batch=250, device="cpu"):
    """Features of every image of an EDM-format dataset (a sample.ImageFolder)."""
    return features(data.batches(batch), extractor, device, total=-(-len(data) // batch))


# ----------------------------------------------------------------------------- CLI

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["ref", "fid"])
    p.add_argument("--data", help="ref: dataset (EDM zip/folder) to compute reference statistics from")
    p.add_argument("--out", help="ref: output .npz")
    p.add_argument("--images", help="fid: generated images (EDM zip/folder, e.g. from sample.py)")
    p.add_argument("--ref", help="fid: reference .npz (mu, sigma)")
    p.add_argument("--classes", default=None, help="restrict to these labels, e.g. 0-249 (per-partition FID)")
    p.add_argument("--is", dest="inception_score", action="store_true", help="also print the Inception Score")
    p.add_argument("--inception-weights", default=None, help="local Inception state dict (default: download)")
    p.add_argument("--batch", type=sample.positive(), default=250, help="images per forward (default 250)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: cuda if available")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda asked for, but CUDA is not available")
    if args.mode == "ref" and not (args.data and args.out):
        p.error("mode ref needs --data and --out")
    if args.mode == "fid" and not (args.images and args.ref):
        p.error("mode fid needs --images and --ref")
    # every input is checked before the Inception weights load (a download on first use)
    classes = sample.parse_seeds(args.classes) if args.classes else None
    ref = load_stats(args.ref) if args.mode == "fid" else None
    data = sample.ImageFolder(args.data if args.mode == "ref" else args.images, classes=classes)
    if args.inception_weights and not os.path.isfile(args.inception_weights):
        raise FileNotFoundError(f"--inception-weights {args.inception_weights!r} does not exist")
    net = load_inception(args.inception_weights, args.device)
    if args.mode == "ref":
        pool, _ = dataset_features(data, net, args.batch, args.device)
        save_stats(args.out, *stats(pool))
        print(f"wrote statistics of {len(pool)} images to {args.out}")
        return
    pool, logits = dataset_features(data, net, args.batch, args.device)
    fid = frechet_distance(*stats(pool), *ref)
    print(f"FID {fid:.4f}  ({len(pool)} images{'' if classes is None else ', classes ' + args.classes})")
    if args.inception_score:
        print("IS {:.3f} +- {:.3f}".format(*inception_score(logits)))
    return fid


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # the user's input: one line and argparse's exit status 2
        sys.exit(print(f"error: {e}", file=sys.stderr) or 2)
