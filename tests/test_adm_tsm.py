"""adm.py and tsm.py: the GAN head, GAN losses, TSM loss, and their stages in msd.py."""
import numpy as np
import pytest
import torch

import adm
import edm_unet
import msd
import sample
import tsm
from test_msd import files  # noqa: F401  (the module-scoped tiny teacher + pairs fixture)


@pytest.mark.parametrize("preset,res", [("B", 8), ("S", 8), ("XS", 8), ("XXS", 8), ("tiny", 8)])
def test_gan_head_gives_one_logit_per_image(preset, res):
    with torch.device("meta"):
        D = edm_unet.build(preset)
        head = adm.GANHead.for_denoiser(D)
        cfg = D.cfg
        h = torch.empty(5, cfg.model_channels * cfg.channel_mult[-1], res, res)
        assert head(h).shape == (5,)


def test_gan_gradient_reaches_head_encoder_and_middle_block_only():
    """The head reads the middle block's output: a GAN loss trains the head, the encoder and `_in0`/`_in1`,
    and leaves every later decoder block and the output layer without gradient."""
    torch.manual_seed(0)
    fake = edm_unet.build("tiny").eval()
    with torch.no_grad():
        for p in fake.parameters():
            p.normal_(0, 0.02)
    critic = adm.FakeWithHead(fake, adm.init_head(fake, width=32))
    x, sigma, y = torch.randn(3, 1, 16, 16), torch.tensor([0.3, 1.0, 5.0]), torch.tensor([0, 1, 2])
    denoised, logits = critic(x, sigma, y)
    assert logits.shape == (3,) and denoised.shape == x.shape and fake.model.feature_hook is None
    adm.gan_d_loss(logits, -logits).backward()
    grad = lambda prefix: sum(float(p.grad.abs().sum()) for n, p in fake.named_parameters()
                              if n.startswith(prefix) and p.grad is not None)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in critic.head.parameters())
    assert grad("model.enc.") > 0 and grad("model.dec.8x8_in0.") > 0 and grad("model.dec.8x8_in1.") > 0
    for later in ("model.dec.8x8_block", "model.dec.16x16", "model.out_"):
        assert grad(later) == 0, later


def test_tsm_loss_zero_for_the_teacher_itself_and_decreases_for_a_tiny_student():
    torch.manual_seed(0)
    teacher = edm_unet.build("tiny").eval()
    with torch.no_grad():
        for p in teacher.parameters():
            p.normal_(0, 0.02)
    x, y = torch.rand(8, 1, 16, 16) * 2 - 1, torch.arange(8)
    sigma, noise = tsm.sample_sigma_lognormal(8, generator=torch.Generator().manual_seed(1)), torch.randn_like(x)
    assert tsm.tsm_loss(teacher, teacher, x, sigma, y, 0.5, noise).item() == 0
    student = edm_unet.build("tiny", model_channels=32)
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        loss = tsm.tsm_loss(student, teacher, x, sigma, y, 0.5, noise)
        opt.zero_grad(), loss.backward(), opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.fixture(scope="module")
def data(files):  # noqa: F811
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (30, 1, 16, 16), generator=g, dtype=torch.uint8)
    sample.write_images(str(files / "data"), imgs, [i % 10 for i in range(30)], list(range(30)))
    return str(files / "data")


def common(out):
    return ["--out", str(out), "--batch", "4", "--precision", "fp32", "--device", "cpu", "--num-students", "2",
            "--log-every", "1", "--sample-every", "1000", "--grad-probe-every", "0"]


def test_adm_stage_starts_from_dm_generator_with_fake_reset_to_teacher(files, data, tmp_path):  # noqa: F811
    dm = msd.main(["--teacher", str(files / "teacher.pt"), "--pairs", str(files / "pairs.npz"), "--iters", "1",
                   "--lpips-random", "--lpips-size", "32", "--lr", "1e-3", *common(tmp_path / "dm")])
    snap = str(tmp_path / "dm" / "student.pt")
    start = msd.main(["--stage", "adm", "--teacher", str(files / "teacher.pt"), "--init", snap, "--data", data,
                      "--iters", "0", *common(tmp_path / "adm0")])
    teacher = edm_unet.load_model(files / "teacher.pt")[0].state_dict()
    for k, v in start["fake"].state_dict().items():
        assert torch.equal(v, teacher[k]), k  # fake score re-initialised from the teacher (App. D.2.1)
    for k, v in start["net"].state_dict().items():
        assert torch.equal(v, dm["net"].state_dict()[k]), k  # G from the DM stage
    run = msd.main(["--stage", "adm", "--teacher", str(files / "teacher.pt"), "--init", snap, "--data", data,
                    "--iters", "2", "--lr", "1e-3", *common(tmp_path / "adm")])
    assert np.isfinite([run["log"][k] for k in ("dm", "gan_g", "gan_d", "fake")]).all()
    assert not torch.equal(run["head"].net[0].weight, start["head"].net[0].weight)


def test_smaller_student_tsm_then_dm(files, data, tmp_path):  # noqa: F811
    t = msd.main(["--stage", "tsm", "--teacher", str(files / "teacher.pt"), "--preset", "tiny",
                  "--arch", "model_channels=32", "--data", data, "--iters", "2", *common(tmp_path / "tsm")])
    assert t["net"].cfg.model_channels == 32
    d = msd.main(["--teacher", str(files / "teacher.pt"), "--init", str(tmp_path / "tsm" / "student.pt"),
                  "--pairs", str(files / "pairs.npz"), "--iters", "1", "--lpips-random", "--lpips-size", "32",
                  *common(tmp_path / "dm")])
    assert d["net"].cfg.model_channels == 32 and d["fake"].cfg.model_channels == 32  # both from TSM (App. D.2.2)
    assert np.isfinite(d["log"]["dm"])


def test_head_reads_the_middle_block_output_and_has_dmd2s_layout():
    """MSD App. D.2.1: the head sits on the middle block (EDM's `_in0` + `_in1`); DMD2: 768 wide, GroupNorm
    and SiLU after the stride-4 convolution too."""
    torch.manual_seed(0)
    fake = edm_unet.build("tiny").eval()
    marker = torch.full((2, 128, 8, 8), 7.0)
    fake.model.dec["8x8_in1"].forward = lambda x, emb: marker  # the middle block's last block
    feats = []
    fake.model.feature_hook = lambda h, emb: feats.append(h)
    fake(torch.randn(2, 1, 16, 16), torch.tensor([1.0, 2.0]), torch.tensor([0, 1]))
    assert len(feats) == 1 and torch.equal(feats[0], marker)
    head = adm.GANHead.for_denoiser(fake)
    kinds = [type(m).__name__ for m in head.net]
    assert kinds == ["Conv2d", "GroupNorm", "SiLU", "Conv2d", "GroupNorm", "SiLU", "Flatten", "Linear"]
    assert head.net[0].out_channels == 768 == adm.WIDTH and head.net[3].kernel_size == (4, 4) == head.net[3].stride
