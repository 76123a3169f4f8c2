"""Mixed precision on the CPU: every stage at fp32, bf16 and fp16; the GradScalers; EDM's float32 layers."""
import json

import numpy as np
import pytest
import torch

import adm
import edm_unet
import msd
import sample

ARCH = "img_resolution=8,model_channels=8,attn_resolutions=(4,)"
# A first step's losses come from the same weights at every precision, so they differ only by rounding:
# within 2% of fp32 (+ 1e-3 for terms that are zero in exact arithmetic, e.g. Eq. 6 while fake = teacher)
RTOL, ATOL = 2e-2, 1e-3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 8x8 teacher (16 channels), 16 teacher pairs and 30 random 'real' images."""
    d = tmp_path_factory.mktemp("precision")
    torch.manual_seed(0)
    D = edm_unet.build("tiny", img_resolution=8, model_channels=16, attn_resolutions=(4,))
    with torch.no_grad():
        for p in D.parameters():
            p.normal_(0, 0.05)
    edm_unet.save_model(D, d / "teacher.pt")
    sample.generate_pairs(D.eval(), list(range(16)), str(d / "pairs.npz"), 8, dict(num_steps=2))
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (30, 1, 8, 8), generator=g, dtype=torch.uint8)
    sample.write_images(str(d / "data"), imgs, [i % 10 for i in range(30)], list(range(30)))
    return d


MODES = {"dm": [], "all-students": ["--all-students"], "sid": ["--loss", "sid"],
         "adm": ["--stage", "adm", "--head-width", "32"],
         "tsm": ["--stage", "tsm", "--preset", "tiny", "--arch", ARCH]}


def run(tiny, out, precision, *extra):
    argv = ["--teacher", str(tiny / "teacher.pt"), "--pairs", str(tiny / "pairs.npz"), "--data", str(tiny / "data"),
            "--out", str(out), "--batch", "4", "--device", "cpu", "--num-students", "2", "--precision", precision,
            "--log-every", "1", "--sample-every", "1000", "--grad-probe-every", "0", "--lr", "1e-3",
            "--reg-loss", "mse", *extra]
    r = msd.main(argv)
    return r, [json.loads(line) for line in open(out / "log.jsonl")]


LOSSES = ("dm", "sid", "reg", "fake", "gan_g", "gan_d", "tsm")


@pytest.mark.parametrize("mode", list(MODES))
def test_every_stage_trains_at_every_precision_close_to_fp32(tiny, tmp_path, mode):
    runs = {p: run(tiny, tmp_path / p, p, "--iters", "2", *MODES[mode]) for p in ("fp32", "bf16", "fp16")}
    ref_r, ref_log = runs["fp32"]
    for p, (r, log) in runs.items():
        assert r["skipped"] == 0 and len(log) == 2, p
        terms = [k for k in LOSSES if k in log[0]]
        assert terms and all(np.isfinite(row[k]) for row in log for k in terms), (p, log)
        for k in terms:
            assert abs(log[0][k] - ref_log[0][k]) <= RTOL * abs(ref_log[0][k]) + ATOL, (p, k, log[0][k], ref_log[0][k])
        assert (r["scalers"][0] is not None) == (p == "fp16")  # a GradScaler for fp16 only
        if p != "fp32":  # autocast took effect: the low-precision run is not the fp32 run
            flat = lambda m: torch.cat([v.flatten().float() for v in m.state_dict().values()])  # noqa: E731
            assert not torch.equal(flat(r["net"]), flat(ref_r["net"])), p


def snapshots(monkeypatch):
    """Record G's weights, the fake score's weights and both loss scales after every step."""
    seen, real = [], msd.log_and_checkpoint

    def spy(r, step, *a):
        real(r, step, *a)
        flat = lambda m: torch.cat([v.detach().flatten().clone() for v in m.state_dict().values()])  # noqa: E731
        seen.append(dict(net=flat(r.net), fake=flat(r.fake), skipped=r.skipped,
                         scales=[s.get_scale() for s in r.scalers]))
    monkeypatch.setattr(msd, "log_and_checkpoint", spy)
    return seen


def overflow_at(monkeypatch, steps):
    """G's regression term times 1e30 at the given steps (1-based): finite in float32, but its gradient
    overflows float16 on the way back into the network, as a real fp16 overflow does."""
    real, calls = msd.generator_losses, []

    def poisoned(*a, **k):
        calls.append(1)
        terms, x = real(*a, **k)
        return ({**terms, "reg": terms["reg"] * 1e30} if len(calls) in steps else terms), x
    monkeypatch.setattr(msd, "generator_losses", poisoned)


def test_fp16_overflow_skips_the_step_lowers_its_own_scale_and_the_next_step_proceeds(tiny, tmp_path, monkeypatch):
    seen = snapshots(monkeypatch)
    overflow_at(monkeypatch, {2})
    r, log = run(tiny, tmp_path / "o", "fp16", "--iters", "3")
    s1, s2, s3 = seen
    assert s1["skipped"] == 0 and s1["scales"] == [65536.0, 65536.0]
    assert s2["skipped"] == 1 and torch.equal(s2["net"], s1["net"])  # G's step skipped: no inf reached its weights
    assert s2["scales"] == [32768.0, 65536.0]  # G's scaler backed off; the fake score's (its own) did not
    assert not torch.equal(s2["fake"], s1["fake"])  # ... and the fake score's step went on
    assert s3["skipped"] == 1 and not torch.equal(s3["net"], s2["net"])  # the next step proceeds
    assert torch.isfinite(s3["net"]).all() and log[-1]["skipped"] == 1


def test_fp16_resume_is_bit_exact_and_restores_both_scalers(tiny, tmp_path, monkeypatch):
    overflow_at(monkeypatch, {1, 3})
    straight, _ = run(tiny, tmp_path / "a", "fp16", "--iters", "3")
    overflow_at(monkeypatch, {1})
    run(tiny, tmp_path / "b", "fp16", "--iters", "2")  # "killed" after step 2, with G's scale lowered at step 1
    overflow_at(monkeypatch, {1})  # the resumed run's first step is step 3: it overflows as the straight run's did
    resumed, _ = run(tiny, tmp_path / "b", "fp16", "--iters", "3", "--resume")
    assert straight["skipped"] == resumed["skipped"] == 2
    for a, b in zip(straight["scalers"], resumed["scalers"]):
        assert a.state_dict() == b.state_dict()
    assert straight["scalers"][0].get_scale() == 16384.0 and straight["scalers"][1].get_scale() == 65536.0
    for m in ("net", "fake"):
        for (k, v), w in zip(straight[m].state_dict().items(), resumed[m].state_dict().values()):
            assert torch.equal(v, w), (m, k)


def test_fp16_micro_batches_scale_every_backward(tiny, tmp_path):
    """Accumulated micro-batches reach the same unscaled gradient norm as the whole batch."""
    _, whole = run(tiny, tmp_path / "w", "fp16", "--iters", "1")
    _, micro = run(tiny, tmp_path / "m", "fp16", "--iters", "1", "--micro-batch", "2")
    for k in ("gnorm_net", "gnorm_fake", "reg", "fake"):
        assert micro[0][k] == pytest.approx(whole[0][k], rel=1e-2), k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_edms_float32_layers_and_the_gan_head_stay_float32_under_autocast(dtype):
    torch.manual_seed(0)
    D = edm_unet.build("tiny", img_resolution=8, model_channels=32, attn_resolutions=(4,)).eval()
    with torch.no_grad():
        for p in D.parameters():
            p.normal_(0, 0.05)
    x, sigma, y = torch.randn(3, 1, 8, 8), torch.tensor([0.1, 1.0, 20.0]), torch.tensor([0, 4, 9])
    c_noise, onehot = sigma.log() / 4, torch.nn.functional.one_hot(y, 10).float()
    ref = D.model.embed(c_noise, onehot)
    affine = []
    for block in [*D.model.enc.values(), *D.model.dec.values()]:
        if isinstance(block, edm_unet.UNetBlock):
            block.affine.register_forward_hook(lambda m, i, o: affine.append(o.dtype))
    head = adm.init_head(D, width=32)
    critic = adm.FakeWithHead(D, head)
    with torch.autocast("cpu", dtype=dtype):
        emb = D.model.embed(c_noise, onehot)  # EDM: the mapping path in float32
        denoised, logits = critic(x, sigma, y)
        feats = []
        D.model.feature_hook = lambda h, e: feats.append(h)
        D(x, sigma, y)
        D.model.feature_hook = None
    assert emb.dtype == torch.float32 and torch.equal(emb, ref)
    assert affine and set(affine) == {torch.float32}  # every block's affine(emb), as EDM
    assert feats[0].dtype == dtype  # the trunk did run in low precision ...
    assert logits.dtype == torch.float32 and torch.equal(logits, head(feats[0].float()))  # ... the head did not (DMD2)
    assert denoised.dtype == torch.float32


def _weight_grad_against_float64(layer, call):
    """The weight gradient that backward left on `layer` (a float32 nn.Linear) against g^T x in float64,
    with x the layer's inputs and g the gradients reaching its outputs, over every call of the layer."""
    xs, gs, got = [], [], []
    def seen(module, inputs, out):
        xs.append(inputs[0].detach())
        out.register_hook(gs.append)
    h1 = layer.register_forward_hook(seen)
    h2 = layer.weight.register_hook(lambda g: got.append(g.detach().clone()))
    try:
        call()
    finally:
        h1.remove(), h2.remove()
    assert xs and len(gs) == len(xs) and len(got) == 1
    assert all(x.dtype == torch.float32 for x in xs)  # the layer did run in float32 under autocast
    want = sum(g.double().T @ x.double() for g, x in zip(gs, xs))
    return got[0].double(), want


@pytest.mark.parametrize("stage", ["dm", "adm"])
def test_backward_runs_outside_autocast_so_float32_layers_get_float32_weight_gradients(tiny, tmp_path, stage):
    """PyTorch's AMP recipe: forward under autocast, backward outside it. A backward inside autocast
    runs the weight-gradient matmuls of EDM's float32 layers (mapping path, each block's affine) and
    of the GAN head in bf16: about 1e-2 relative error instead of float32's 1e-6."""
    argv = ["--teacher", str(tiny / "teacher.pt"), "--pairs", str(tiny / "pairs.npz"), "--data", str(tiny / "data"),
            "--out", str(tmp_path), "--batch", "4", "--device", "cpu", "--num-students", "2", "--precision", "bf16",
            "--reg-loss", "mse", "--grad-probe-every", "0"]
    if stage == "adm":
        argv += ["--stage", "adm", "--head-width", "32", "--fake-steps-per-gen", "1"]
    r = msd.setup(msd.parse_args(argv))
    with torch.no_grad():  # G apart from the fake score, so the DM term and all its gradients are not zero
        for p in r.net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    b = msd.draw_batch(r, 0, 0)
    layers = {"G's map_layer1": r.net.model.map_layer1, "G's 8x8_block0.affine": r.net.model.enc["8x8_block0"].affine}
    for name, layer in layers.items():
        got, want = _weight_grad_against_float64(layer, lambda: msd.update_generator(r, b))
        assert want.abs().max() > 0, name
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()), msg=name)
    if stage == "adm":
        _, xs, _ = msd.update_generator(r, b)
        head = [m for m in r.head.modules() if isinstance(m, torch.nn.Linear)][-1]
        got, want = _weight_grad_against_float64(head, lambda: msd.update_fake_score(r, b, xs, 0))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()), msg="GAN head")
