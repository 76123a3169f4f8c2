"""stack.py and msd.py --all-students: K students in one run equal K separate runs; one shared fake score."""
import numpy as np
import pytest
import torch

import edm_unet
import msd
import stack
from test_msd import args, files  # noqa: F401  (the tiny teacher and pairs)


def tiny_nets(K, seed=0):
    torch.manual_seed(seed)
    nets = []
    for _ in range(K):
        n = edm_unet.build("tiny", img_resolution=8, model_channels=8, attn_resolutions=(4,))
        with torch.no_grad():
            for p in n.parameters():
                p.normal_(0, 0.05)
        nets.append(n.eval())
    return nets


def test_stack_is_k_networks_in_one_call():
    nets, B = tiny_nets(3), 4
    S = stack.Stack(nets)
    x, sigma, y = torch.randn(3 * B, 1, 8, 8), torch.rand(3 * B) * 5 + 0.1, torch.randint(0, 10, (3 * B,))
    out = S(x, sigma, y)
    ref = torch.cat([n(x[k * B:(k + 1) * B], sigma[k * B:(k + 1) * B], y[k * B:(k + 1) * B]) for k, n in enumerate(nets)])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for k, n in enumerate(nets):  # unstacked in the single network's format
        assert all(torch.equal(v, n.state_dict()[name]) for name, v in S.student(k).items())
    # each student's gradient norm clipped on its own, as clip_grad_norm_ on each network
    (out ** 2).sum().backward()
    for k, n in enumerate(nets):
        (n(x[k * B:(k + 1) * B], sigma[k * B:(k + 1) * B], y[k * B:(k + 1) * B]) ** 2).sum().backward()
    norms = stack.clip_per_student(S, 0.5)
    for k, n in enumerate(nets):
        ref_norm = torch.nn.utils.clip_grad_norm_(n.parameters(), 0.5)
        torch.testing.assert_close(norms[k], ref_norm, rtol=1e-4, atol=0)
        for p, q in zip(S.stacked, n.parameters()):
            torch.testing.assert_close(p.grad[k], q.grad, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("reg", ["all", "own"])
def test_all_students_in_one_run_equal_separate_runs(files, tmp_path, reg):  # noqa: F811
    common = ("--iters", "3", "--reg-pairs", reg, "--ema-halflife-kimg", "0.01", "--grad-probe-every", "0")
    for k in range(2):
        msd.main(args(files, tmp_path / f"sep{k}", "--partition", str(k), *common))
    r = msd.main(args(files, tmp_path / "all", "--all-students", *common))
    start = edm_unet.load_model(files / "teacher.pt")[0].state_dict()
    for k in range(2):
        sep, meta = edm_unet.load_model(tmp_path / f"sep{k}" / "student.pt")
        one, meta1 = edm_unet.load_model(tmp_path / "all" / f"p{k}" / "student.pt")  # today's format: sample.py routes it
        assert meta1["partition"] == meta["partition"] == msd.make_partition(10, 2)[k]
        d_sep = torch.cat([(v - start[n]).flatten() for n, v in sep.state_dict().items()])
        d_one = torch.cat([(v - start[n]).flatten() for n, v in one.state_dict().items()])
        rel = ((d_sep - d_one).norm() / d_sep.norm()).item()
        print(f"student {k}: relative difference of the EMA updates {rel:.2e}")
        assert d_sep.norm() > 0 and rel < 1e-3
    assert r["log"]["skipped"] == 0 and np.isfinite([r["log"][t] for t in ("dm", "reg", "fake")]).all()


def test_all_students_resume_bit_exact_and_one_shared_fake_score(files, tmp_path):  # noqa: F811
    common = ("--all-students", "--shared-fake", "--grad-probe-every", "0")
    straight = msd.main(args(files, tmp_path / "a", "--iters", "4", *common))
    msd.main(args(files, tmp_path / "b", "--iters", "2", *common))
    resumed = msd.main(args(files, tmp_path / "b", "--iters", "4", "--resume", *common))
    for m in ("net", "fake"):
        for (n, v), w in zip(straight[m].state_dict().items(), resumed[m].state_dict().values()):
            assert torch.equal(v, w), (m, n)
    single = sum(p.numel() for p in edm_unet.load_model(files / "teacher.pt")[0].parameters())
    assert sum(p.numel() for p in straight["fake"].parameters()) == single  # one fake score, not K
    assert sum(p.numel() for p in straight["net"].parameters()) == 2 * single  # two students
    for bad, expect in ((["--shared-fake"], "--shared-fake needs --all-students"),
                        (["--all-students", "--stage", "adm"], "--all-students with --stage adm"),
                        (["--all-students", "--micro-batch", "2"], "one process without --micro-batch"),
                        (["--all-students", "--channels-last"], "--channels-last with --all-students")):
        with pytest.raises(ValueError, match=expect):
            msd.main(args(files, tmp_path / "x", *bad))


def test_stacked_log_counts_all_images_and_own_pairs_error_names_the_student(files, tmp_path):  # noqa: F811
    r = msd.main(args(files, tmp_path / "s", "--iters", "1", "--all-students"))
    assert r["log"]["images_all"] == 2 * r["log"]["images"] == 2 * 4  # K x B images in its one step (batch 4)
    assert r["log"]["img_per_s_all"] == pytest.approx(2 * r["log"]["img_per_s"], rel=1e-3)  # 4 significant digits, any speed
    p = np.load(files / "pairs.npz")
    np.savez(tmp_path / "class0.npz", **{**p, "labels": np.zeros_like(p["labels"])})  # no pair of student 1's classes
    with pytest.raises(ValueError, match=r"holds no pair of partition 1 \(classes \[5, 6, 7, 8, 9\]\)"):
        msd.main(args(files, tmp_path / "o", "--all-students", "--reg-pairs", "own", "--pairs", str(tmp_path / "class0.npz")))


def test_one_shared_fake_score_draws_k_times_b_distinct_levels_and_noises():
    """Each student's block of G's draws is its own run's; the shared fake score's Eq. 8 draws are K*B distinct
    ones (with K fake scores, each block repeats its own run's B draws, as K separate runs would)."""
    import types
    import dmd
    sigmas = dmd.karras_sigmas(1000)
    parts = [(torch.arange(0, 5), 0, 0), (torch.arange(5, 10), 0, 0)]
    batches = {}
    for shared in (False, True):
        cfg = msd.Config(batch=64, all_students=True, shared_fake=shared, num_students=2)
        r = types.SimpleNamespace(cfg=cfg, shape=(1, 2, 2), device=torch.device("cpu"), parts=parts, sigmas=sigmas, n_real=0)
        batches[shared] = msd.draw_batch(r, step=3, stream=0)
    sep, shr = batches[False], batches[True]
    for k in ("z", "y", "sigma", "noise"):  # G's draws: the same either way, and the students' blocks repeat z
        assert torch.equal(sep[k], shr[k]), k
    assert torch.equal(sep["noise_fake"][:64], sep["noise_fake"][64:])  # separate: each block its own run's draws
    assert not torch.equal(shr["noise_fake"][:64], shr["noise_fake"][64:])
    assert len(torch.unique(shr["noise_fake"].flatten(1), dim=0)) == 128 and len(torch.unique(shr["sigma_fake"])) > 64
