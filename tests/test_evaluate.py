"""evaluate.py: Frechet distance, statistics files, the EDM-format reader, the Inception path offline."""
import json
import os
import re
from unittest import mock

import numpy as np
import pytest
import torch

import evaluate
import sample


def test_frechet_distance_matches_hand_computed_2d_gaussians():
    # diagonal covariances commute: FD = |mu1-mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2
    mu1, mu2 = np.array([0.0, 1.0]), np.array([3.0, -1.0])
    s1, s2 = np.diag([4.0, 1.0]), np.diag([1.0, 9.0])
    expected = (9 + 4) + (2 - 1) ** 2 + (1 - 3) ** 2
    assert evaluate.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, abs=1e-9)
    # non-diagonal: a rotated covariance against itself shifted is |dmu|^2
    r = np.array([[np.cos(0.3), -np.sin(0.3)], [np.sin(0.3), np.cos(0.3)]])
    s = r @ np.diag([2.0, 0.5]) @ r.T
    assert evaluate.frechet_distance(mu1, s, mu1 + [1, 2], s) == pytest.approx(5.0, abs=1e-8)


def test_frechet_distance_is_zero_for_identical_stats_even_when_singular():
    feats = np.random.default_rng(0).normal(size=(10, 32))  # 10 samples in 32-d: singular covariance
    mu, sigma = evaluate.stats(feats)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the singular case is handled, not warned about
        assert abs(evaluate.frechet_distance(mu, sigma, mu, sigma)) < 1e-4
    with pytest.raises(ValueError, match="do not match"):
        evaluate.frechet_distance(mu, sigma, mu[:3], sigma[:3, :3])


def test_stats_npz_round_trip_and_bad_file(tmp_path):
    feats = np.random.default_rng(1).normal(size=(50, 4))
    mu, sigma = evaluate.stats(feats)
    np.testing.assert_allclose(sigma, np.cov(feats.T))
    path = str(tmp_path / "ref.npz")
    evaluate.save_stats(path, mu, sigma)
    assert sorted(np.load(path).files) == ["mu", "sigma"]  # EDM's format
    mu2, sigma2 = evaluate.load_stats(path)
    np.testing.assert_array_equal(mu, mu2), np.testing.assert_array_equal(sigma, sigma2)
    np.savez(tmp_path / "bad.npz", mean=mu)
    with pytest.raises(ValueError, match="bad.npz.*'mu' and 'sigma'"):
        evaluate.load_stats(str(tmp_path / "bad.npz"))


def test_inception_score_bounds():
    uniform = torch.zeros(100, 10)  # every p(y|x) equal -> IS 1
    assert evaluate.inception_score(uniform)[0] == pytest.approx(1.0)
    sharp = torch.full((100, 10), -50.0)
    sharp[torch.arange(100), torch.arange(100) % 10] = 50.0  # confident and balanced -> IS = #classes
    assert evaluate.inception_score(sharp, splits=1)[0] == pytest.approx(10.0, rel=1e-6)


def write_set(out, n=6, size=8, channels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    labels = [i % 3 for i in range(n)]
    sample.write_images(str(out), images, labels, list(range(n)))
    return images, labels


@pytest.mark.parametrize("suffix", ["", ".zip"])
def test_image_folder_reads_back_what_sample_writes(tmp_path, suffix):
    images, labels = write_set(tmp_path / f"set{suffix}")
    data = sample.ImageFolder(str(tmp_path / f"set{suffix}"))
    got, y = next(data.batches(100))
    assert torch.equal(got, images) and y.tolist() == labels
    sub = sample.ImageFolder(str(tmp_path / f"set{suffix}"), classes=[1])
    assert len(sub) == 2 and torch.equal(next(sub.batches(10))[0], images[1::3])


def test_corrupt_or_wrong_size_image_names_the_file(tmp_path):
    write_set(tmp_path / "set")
    with open(tmp_path / "set" / "img00000003.png", "wb") as f:
        f.write(b"\x89PNG not really")
    data = sample.ImageFolder(str(tmp_path / "set"))
    with pytest.raises(ValueError, match="img00000003.png.*corrupt"):
        list(data.batches(4))
    write_set(tmp_path / "set2")
    from PIL import Image
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "set2" / "img00000005.png")
    with pytest.raises(ValueError, match=r"img00000005.png.*\(3, 4, 4\), expected \(3, 8, 8\)"):
        list(sample.ImageFolder(str(tmp_path / "set2")).batches(10))
    meta = json.load(open(tmp_path / "set2" / "dataset.json"))
    meta["labels"] = meta["labels"][1:]
    json.dump(meta, open(tmp_path / "set2" / "dataset.json", "w"))
    with pytest.raises(ValueError, match="img00000000.png.*no label"):
        sample.ImageFolder(str(tmp_path / "set2"))


def random_inception_weights(path):
    """A randomly initialised extractor of the real class, saved as a state dict (no download)."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe
    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(torch.nn.Module, "load_state_dict", lambda *a, **k: None):
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for m in net.modules():  # He init keeps activations alive through 90-odd random layers
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)


def test_fid_cli_offline_with_a_local_inception(tmp_path, capsys):
    weights = str(tmp_path / "inception.pt")
    random_inception_weights(weights)
    write_set(tmp_path / "a.zip", n=12, size=16, seed=0)
    write_set(tmp_path / "b", n=12, size=16, seed=0)  # same pixels as a folder
    evaluate.main(["ref", "--data", str(tmp_path / "a.zip"), "--out", str(tmp_path / "ref.npz"),
                   "--inception-weights", weights, "--device", "cpu", "--batch", "5"])
    mu, sigma = evaluate.load_stats(str(tmp_path / "ref.npz"))
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
    fid = evaluate.main(["fid", "--images", str(tmp_path / "b"), "--ref", str(tmp_path / "ref.npz"), "--is",
                         "--inception-weights", weights, "--device", "cpu"])
    assert abs(fid) < 1e-3  # identical images
    net = evaluate.load_inception(weights)
    images, labels = write_set(tmp_path / "c", n=12, size=16, seed=1)
    printed = re.search(r"IS ([\d.]+) \+- ([\d.]+)", capsys.readouterr().out)
    is_b = evaluate.inception_score(evaluate.features([(write_set(tmp_path / "b2", n=12, size=16, seed=0)[0], None)], net)[1])
    assert printed and float(printed[1]) == pytest.approx(is_b[0], abs=1e-3) and float(printed[2]) == pytest.approx(is_b[1], abs=1e-3)
    fid_other = evaluate.main(["fid", "--images", str(tmp_path / "c"), "--ref", str(tmp_path / "ref.npz"),
                               "--classes", "0-1", "--inception-weights", weights, "--device", "cpu"])
    keep = [i for i, y in enumerate(labels) if y in (0, 1)]  # --classes 0-1: 8 of the 12 images
    pool = evaluate.features([(images[keep], None)], net)[0]
    assert len(keep) == 8 and fid_other == pytest.approx(evaluate.frechet_distance(*evaluate.stats(pool), mu, sigma), rel=1e-6)
    assert fid_other > 0.1  # other images (a random Inception gives small distances)


def test_missing_inputs_are_refused_before_the_inception_weights_load(tmp_path, monkeypatch):
    def no_download(*a, **k):
        raise AssertionError("the Inception network was loaded before the inputs were checked")
    monkeypatch.setattr(evaluate, "load_inception", no_download)
    with pytest.raises(FileNotFoundError, match="dataset 'missing.zip' does not exist"):
        evaluate.main(["ref", "--data", "missing.zip", "--out", str(tmp_path / "r.npz")])
    with pytest.raises(FileNotFoundError, match="reference statistics 'nope.npz' do not exist"):
        evaluate.main(["fid", "--images", "missing.zip", "--ref", "nope.npz"])
    imgs = tmp_path / "imgs"
    sample.write_images(str(imgs), torch.zeros(2, 1, 8, 8, dtype=torch.uint8), [0, 1], [0, 1])
    with pytest.raises(FileNotFoundError, match="--inception-weights 'w.pt' does not exist"):
        evaluate.main(["ref", "--data", str(imgs), "--out", str(tmp_path / "r.npz"), "--inception-weights", "w.pt"])
