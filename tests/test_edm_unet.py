"""edm_unet.py: exact sizes, EDM's function, checkpoints and the safe EDM importer (CPU, seconds)."""
import copy
import math
import os
import pickle
import sys
import types
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn as nn

import edm_unet as E


def test_preset_parameter_counts_match_msd_table7():
    expected = {"B": 295_899_267, "S": 172_813_603, "XS": 85_943_555, "XXS": 25_990_659}
    for name, n in expected.items():
        assert E.count_params(E.PRESETS[name]) == n, name


def tiny(**kw):
    torch.manual_seed(0)
    return E.build("tiny", **kw).eval()


def test_fresh_unet_outputs_zero_so_denoiser_is_c_skip_x():
    D = tiny()
    x = torch.randn(3, 1, 16, 16)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    y = torch.tensor([0, 3, 9])
    F_x = D.model(x, sigma.log() / 4, nn.functional.one_hot(y, 10).float())
    assert torch.count_nonzero(F_x) == 0
    c_skip = 0.25 / (sigma ** 2 + 0.25)
    torch.testing.assert_close(D(x, sigma, y), c_skip[:, None, None, None] * x)


def test_precond_closed_forms():
    sigma, sd = torch.tensor([0.002, 0.5, 80.0]), 0.5
    c_skip, c_out, c_in, c_noise = E.precond(sigma, sd)
    for i, s in enumerate(sigma.tolist()):
        assert math.isclose(c_skip[i].item(), sd ** 2 / (s ** 2 + sd ** 2), rel_tol=1e-6)
        assert math.isclose(c_out[i].item(), s * sd / math.sqrt(s ** 2 + sd ** 2), rel_tol=1e-6)
        assert math.isclose(c_in[i].item(), 1 / math.sqrt(s ** 2 + sd ** 2), rel_tol=1e-6)
        assert math.isclose(c_noise[i].item(), math.log(s) / 4, rel_tol=1e-6)


def naive_attention(qkv, heads):
    B, C3, H, W = qkv.shape
    C = C3 // 3
    q, k, v = qkv.reshape(B * heads, C // heads, 3, H * W).unbind(2)  # (B*heads, c, HW)
    w = torch.einsum("ncq,nck->nqk", q, k / math.sqrt(C // heads)).softmax(dim=2)
    return torch.einsum("nqk,nck->ncq", w, v).reshape(B, C, H, W)


def test_sdpa_attention_equals_naive_softmax():
    torch.manual_seed(1)
    qkv = torch.randn(2, 3 * 128, 8, 8)
    torch.testing.assert_close(E.UNetBlock.attention(qkv, 2), naive_attention(qkv, 2), atol=1e-5, rtol=1e-5)


def test_attention_hands_sdpa_inputs_a_fused_kernel_accepts(monkeypatch):
    """Flash, memory-efficient and cuDNN attention need q, k, v with a last dimension of stride 1
    (else SDPA runs the math path with full L x L matrices): what reaches SDPA, from NCHW and from
    a channels-last qkv."""
    seen, sdpa = [], E.F.scaled_dot_product_attention
    monkeypatch.setattr(E.F, "scaled_dot_product_attention", lambda q, k, v: seen.append((q, k, v)) or sdpa(q, k, v))
    qkv = torch.randn(2, 3 * 128, 8, 8)
    for x in (qkv, qkv.to(memory_format=torch.channels_last)):
        E.UNetBlock.attention(x, 2)
    assert len(seen) == 2
    for q, k, v in seen:
        for t in (q, k, v):
            assert t.shape == (2, 2, 64, 64) and t.is_contiguous() and t.stride(-1) == 1


def test_qkv_channel_layout_per_head_then_channel_then_qkv():
    """With q = k = 0 attention is uniform, so the output is the spatial mean of v; pick v by hand."""
    C, heads = 128, 2
    block = E.UNetBlock(C, C, 16, attention=True)
    assert block.num_heads == heads
    x = torch.randn(1, C, 4, 4)
    with torch.no_grad():
        block.qkv.weight.zero_(), block.qkv.bias.zero_()
        for h in range(heads):
            for c in range(C // heads):
                j = h * (C // heads) + c
                block.qkv.weight[j * 3 + 2, j, 0, 0] = 1.0  # v channel j reads input channel j
        out = E.UNetBlock.attention(block.qkv(x), heads)
    torch.testing.assert_close(out, x.mean(dim=(2, 3), keepdim=True).expand_as(x))


def test_one_step_generator_starts_as_teacher_at_sigma_max():
    D = tiny()
    with torch.no_grad():
        for p in D.parameters():
            p.add_(0.01 * torch.randn_like(p))
    G = E.OneStep.from_teacher(D)
    z, y = torch.randn(2, 1, 16, 16), torch.tensor([1, 2])
    torch.testing.assert_close(G(z, y), D(80 * z, torch.full((2,), 80.0), y))
    assert G.denoiser is not D and all(p.requires_grad for p in G.parameters())


def test_our_checkpoint_round_trip(tmp_path):
    D = tiny()
    with torch.no_grad():
        for p in D.parameters():
            p.normal_()
    E.save_model(D, tmp_path / "m.pt", step=7)
    D2, ckpt = E.load_model(tmp_path / "m.pt")
    assert ckpt["step"] == 7 and D2.cfg == D.cfg
    for (n, a), (_, b) in zip(D.state_dict().items(), D2.state_dict().items()):
        assert torch.equal(a, b), n


def test_truncated_and_corrupt_checkpoints_give_clear_errors(tmp_path):
    E.save_model(tiny(), tmp_path / "m.pt")
    blob = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        E.load_model(tmp_path / "cut.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        E.load_model(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        E.load_model(tmp_path / "missing.pt")


# ----------------------------------------------------------------------------- EDM pickles built here

@pytest.fixture
def edm_modules(monkeypatch):
    """Stand-ins for EDM's torch_utils.persistence and dnnlib.util so that pickle can *write* the format."""
    tu, pers = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")
    dn, util = types.ModuleType("dnnlib"), types.ModuleType("dnnlib.util")

    def _reconstruct_persistent_obj(meta):  # what plain pickle.load would run: it execs module_src
        exec(meta["module_src"], {})
    pers._reconstruct_persistent_obj = _reconstruct_persistent_obj
    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"

    class EasyDict(dict):
        pass
    EasyDict.__module__, EasyDict.__qualname__ = "dnnlib.util", "EasyDict"
    util.EasyDict = EasyDict
    for name, mod in [("torch_utils", tu), ("torch_utils.persistence", pers), ("dnnlib", dn), ("dnnlib.util", util)]:
        monkeypatch.setitem(sys.modules, name, mod)
    return pers, EasyDict


class Persistent(nn.Module):
    """Pickles like an EDM persistent module: _reconstruct_persistent_obj(meta)."""

    def __init__(self, class_name, state, module_src):
        super().__init__()
        object.__setattr__(self, "meta", dict(type="class", version=6, module_src=module_src,
                                              class_name=class_name, state=state))

    def __reduce_ex__(self, protocol):
        return (sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (self.meta,))


def to_edm_tree(module, module_src, init_kwargs=None):
    """Mirror our module tree as EDM writes it; enc/dec become real torch ModuleDicts."""
    children = OrderedDict()
    for name, child in module.named_children():
        if isinstance(child, nn.ModuleDict):
            md = nn.ModuleDict()
            for k, c in child.items():
                md[k] = to_edm_tree(c, module_src)
            children[name] = md
        elif isinstance(child, (nn.Dropout, E.Skip)) and not list(child.parameters()):
            children[name] = None if isinstance(child, nn.Dropout) else to_edm_tree(child, module_src)
        else:
            children[name] = to_edm_tree(child, module_src)
    buffers = OrderedDict(module.named_buffers(recurse=False))
    params = OrderedDict((n, nn.Parameter(p.detach().clone())) for n, p in module.named_parameters(recurse=False))
    if isinstance(module, E.UNetBlock) and module.resample is not E.same:  # EDM's resampling conv buffers
        buffers["resample_filter"] = torch.full((1, 1, 2, 2), 0.25)
    if isinstance(module, E.Skip):
        buffers["resample_filter"] = torch.full((1, 1, 2, 2), 0.25)
        params = OrderedDict(weight=params.get("weight"), bias=params.get("bias"))
    state = {"training": False, "_parameters": params, "_buffers": buffers, "_modules": children}
    if init_kwargs is not None:
        state["_init_kwargs"] = init_kwargs
    return Persistent(type(module).__name__, state, module_src)


def write_edm_pickle(path, model, edm_modules, module_src):
    pers, EasyDict = edm_modules
    cfg = model.cfg
    kw = EasyDict(img_resolution=cfg.img_resolution, img_channels=cfg.img_channels, label_dim=cfg.label_dim,
                  use_fp16=False, model_type="DhariwalUNet", model_channels=cfg.model_channels,
                  channel_mult=list(cfg.channel_mult), num_blocks=cfg.num_blocks,
                  attn_resolutions=list(cfg.attn_resolutions), dropout=np.float64(cfg.dropout))
    ema = to_edm_tree(model, module_src, kw)
    ema.meta["class_name"] = "training.networks.EDMPrecond"
    loss_fn = Persistent("training.loss.EDMLoss", {"P_mean": -1.2, "P_std": 1.2}, module_src)
    data = dict(ema=ema, loss_fn=loss_fn, augment_pipe=None, dataset_kwargs=EasyDict(path="imagenet.zip"))
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=4)


def test_edm_pickle_imports_to_identical_weights_without_running_its_code(tmp_path, edm_modules):
    src = tiny()
    with torch.no_grad():
        for p in src.parameters():
            p.normal_()
    side_effect = tmp_path / "module_src_ran"
    write_edm_pickle(tmp_path / "net.pkl", src, edm_modules, f"open({str(side_effect)!r}, 'w').close()")
    raw = (tmp_path / "net.pkl").read_bytes()
    assert b"_reconstruct_persistent_obj" in raw and b"ModuleDict" in raw and b"_load_from_bytes" in raw
    model = E.import_edm(tmp_path / "net.pkl")
    assert not side_effect.exists()
    assert model.cfg == src.cfg
    for (n, a), (_, b) in zip(src.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), n
    x, sigma, y = torch.randn(2, 1, 16, 16), torch.tensor([0.3, 3.0]), torch.tensor([4, 7])
    torch.testing.assert_close(model(x, sigma, y), src(x, sigma, y))
    # the CLI writes our own checkpoint from it
    E.main(["--import-edm", str(tmp_path / "net.pkl"), "--out", str(tmp_path / "teacher.pt")])
    loaded, _ = E.load_model(tmp_path / "teacher.pt")
    torch.testing.assert_close(loaded(x, sigma, y), src(x, sigma, y))


class Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_pickle_with_foreign_global_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"ema": Evil(marker)}))
    with pytest.raises(ValueError, match=r"refusing to load global '(posix|os|nt)\.system'"):
        E.import_edm(tmp_path / "evil.pkl")
    assert not marker.exists()
    (tmp_path / "builtin.pkl").write_bytes(pickle.dumps({"ema": print}))
    with pytest.raises(ValueError, match="builtins.print"):
        E.import_edm(tmp_path / "builtin.pkl")


def test_truncated_edm_pickle_gives_clear_error(tmp_path, edm_modules):
    write_edm_pickle(tmp_path / "net.pkl", tiny(), edm_modules, "pass")
    blob = (tmp_path / "net.pkl").read_bytes()
    (tmp_path / "cut.pkl").write_bytes(blob[: len(blob) // 3])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        E.import_edm(tmp_path / "cut.pkl")


def test_bf16_autocast_keeps_preconditioning_in_float32():
    D = tiny()
    with torch.no_grad():
        for p in D.parameters():
            p.normal_(0, 0.05)
    x, sigma, y = torch.randn(2, 1, 16, 16), torch.tensor([0.5, 5.0]), torch.tensor([1, 2])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = D(x, sigma, y)
    assert out.dtype == torch.float32
    ref = D(x, sigma, y).detach()
    c_skip = E.precond(sigma, 0.5)[0]
    net_part = (ref - c_skip.view(-1, 1, 1, 1) * x).abs().max()  # c_out * F in float32
    assert (out - ref).abs().max() < 0.02 * net_part  # bf16 touches only c_out * F, within 2% of it
    D.model.forward = lambda x_in, c_noise, labels: torch.zeros_like(x_in).to(torch.bfloat16)  # F = 0: D is c_skip x alone
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        skip_only = D(x, sigma, y)
    assert skip_only.dtype == torch.float32 and torch.equal(skip_only, c_skip.view(-1, 1, 1, 1) * x)  # exact float32


def test_bottleneck_feature_hook_sees_lowest_resolution():
    D = tiny()
    seen = []
    D.model.feature_hook = lambda h, emb: seen.append(h.shape)
    D(torch.randn(2, 1, 16, 16), torch.tensor([1.0, 2.0]), torch.tensor([0, 1]))
    assert seen == [torch.Size([2, 128, 8, 8])]


def test_channels_last_and_dynamo_trace_match_eager():
    """The GPU speed paths (channels_last, torch.compile) on the CPU: same outputs; the whole
    denoiser traces as one graph (no graph breaks), checked with the cheap 'eager' backend."""
    torch.manual_seed(0)
    D = E.build("tiny").eval()
    with torch.no_grad():
        for p in D.parameters():
            p.normal_(0, 0.02)
    x, sigma, y = torch.randn(2, 1, 16, 16), torch.tensor([0.5, 3.0]), torch.tensor([1, 7])
    with torch.no_grad():
        ref = D(x, sigma, y)
        D_cl = copy.deepcopy(D).to(memory_format=torch.channels_last)
        torch.testing.assert_close(D_cl(x.contiguous(memory_format=torch.channels_last), sigma, y), ref, atol=1e-5, rtol=1e-4)
        torch._dynamo.reset()
        compiled = torch.compile(D, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(x, sigma, y), ref, atol=1e-6, rtol=1e-5)


def test_import_edm_recognises_our_own_checkpoint_and_a_missing_file(tmp_path):
    cfg = E.UNetConfig(32, (1,), 1, (), 0.0, 10, 8, 1)
    E.save_model(E.EDMPrecond(cfg), tmp_path / "teacher.pt")
    with pytest.raises(ValueError, match="a PyTorch checkpoint .zip archive., not an EDM network-snapshot .pkl"):
        E.import_edm(str(tmp_path / "teacher.pt"))
    with pytest.raises(FileNotFoundError, match="EDM checkpoint 'nope.pkl' does not exist"):
        E.import_edm("nope.pkl")


def edm_keys_small():
    """EDM's DhariwalUNet state_dict for img_resolution 8, 1 channel, 10 labels, model_channels 32,
    channel_mult (1, 2), num_blocks 1, attn_resolutions (4,): names and shapes written out from EDM's
    layout (encoder conv/down/blocks, decoder in0/in1/up/blocks with concatenated skips, map_label
    without bias), not from our module tree."""
    E_ = 128  # emb_channels = 4 * model_channels
    block = lambda cin, cout, attn=False, skip=False: {
        "norm0.weight": (cin,), "norm0.bias": (cin,), "conv0.weight": (cout, cin, 3, 3), "conv0.bias": (cout,),
        "affine.weight": (2 * cout, E_), "affine.bias": (2 * cout,), "norm1.weight": (cout,), "norm1.bias": (cout,),
        "conv1.weight": (cout, cout, 3, 3), "conv1.bias": (cout,),
        **({"skip.weight": (cout, cin, 1, 1), "skip.bias": (cout,)} if skip else {}),
        **({"norm2.weight": (cout,), "norm2.bias": (cout,), "qkv.weight": (3 * cout, cout, 1, 1), "qkv.bias": (3 * cout,),
            "proj.weight": (cout, cout, 1, 1), "proj.bias": (cout,)} if attn else {})}
    blocks = {"enc.8x8_block0": block(32, 32), "enc.4x4_down": block(32, 32), "enc.4x4_block0": block(32, 64, True, True),
              "dec.4x4_in0": block(64, 64, True), "dec.4x4_in1": block(64, 64),
              "dec.4x4_block0": block(128, 64, True, True), "dec.4x4_block1": block(96, 64, True, True),
              "dec.8x8_up": block(64, 64), "dec.8x8_block0": block(96, 32, skip=True), "dec.8x8_block1": block(64, 32, skip=True)}
    keys = {"map_layer0.weight": (E_, 32), "map_layer0.bias": (E_,), "map_layer1.weight": (E_, E_), "map_layer1.bias": (E_,),
            "map_label.weight": (E_, 10), "enc.8x8_conv.weight": (32, 1, 3, 3), "enc.8x8_conv.bias": (32,),
            "out_norm.weight": (32,), "out_norm.bias": (32,), "out_conv.weight": (1, 32, 3, 3), "out_conv.bias": (1,)}
    keys.update({f"{b}.{k}": s for b, ks in blocks.items() for k, s in ks.items()})
    return {"model." + k: s for k, s in keys.items()}


def test_state_dict_names_and_shapes_are_edms():
    D = E.build("tiny", img_resolution=8, model_channels=32, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,))
    ours = {k: tuple(v.shape) for k, v in D.state_dict().items()}
    theirs = edm_keys_small()
    assert set(ours) == set(theirs), (sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours)))
    assert ours == theirs, [(k, ours[k], theirs[k]) for k in ours if ours[k] != theirs[k]]
