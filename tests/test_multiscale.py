"""Tests for tokenizers/multiscale.py (VAR's multi-scale residual VQVAE) and its objective: the published state-dict
layout, the phi tick rule, the resizing modes against matrices written here, encoding against an independent
per-scale loop, the quantizer API of the next-scale generators (teacher inputs == the sampling steps), the training
pass and its gradients, the continuous residual pyramid, files, configs, and a golden comparison with the reference
code (FoundationVision/VAR 78b9539; tests/fixtures/README.md says how the fixture was made)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tokenizers
from tokenizers import (
    MULTISCALE_PRESETS,
    KLTokenizer,
    KLVAEConfig,
    MultiScaleQuantizer,
    MultiScaleVQConfig,
    MultiScaleVQObjective,
    MultiScaleVQVAE,
    multiscale_preset,
    pyramid_teacher_inputs,
    pyramid_to_fhat,
    residual_pyramid,
)
from tokenizers.multiscale import phi_ticks

FIXTURES = Path(__file__).resolve().parent / "fixtures"
MANIFEST = FIXTURES / "manifests" / "var_vqvae_state_dict.tsv"
GOLDEN = FIXTURES / "var_vqvae_golden.pt"
# 1 channel, stride 2, Cz 4, V 16, 4 scales up to 4x4 (8x8 images, L = 30)
TINY = MultiScaleVQConfig(in_channels=1, out_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_num_groups=4,
                          z_channels=4, vocab_size=16, patch_nums=(1, 2, 3, 4))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny(seed: int = 0, config: MultiScaleVQConfig = TINY) -> MultiScaleVQVAE:
    return MultiScaleVQVAE(config, generator=gen(seed)).eval()


def quantizer(config: MultiScaleVQConfig = TINY, seed: int = 0) -> MultiScaleQuantizer:
    """A quantizer with random phi convs and a codebook on the scale of randn latents."""
    q = tiny(seed, config).quantize
    with torch.no_grad():
        q.embedding.weight.copy_(torch.randn(q.embedding.weight.shape, generator=gen(seed + 100)) * 0.7)
    return q


def latent(config: MultiScaleVQConfig = TINY, b: int = 2, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    side = config.patch_nums[-1]
    return torch.randn(b, config.z_channels, side, side, generator=gen(seed), dtype=dtype)


# ---- independent resizing: explicit interpolation matrices (x -> M x M^T) -------------------------------------
def area_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """Adaptive average pooling: output i averages inputs floor(i n_in / n_out) .. ceil((i+1) n_in / n_out) - 1."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        lo, hi = (i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


def bicubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> torch.Tensor:
    """Keys cubic convolution (A = -0.75), half-pixel centres (align_corners False), border taps clamped."""
    def kernel(t: float) -> float:
        t = abs(t)
        if t <= 1:
            return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1
        return a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a if t < 2 else 0.0

    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for o in range(n_out):
        src = (o + 0.5) * n_in / n_out - 0.5
        x0 = math.floor(src)
        for tap in range(x0 - 1, x0 + 3):
            m[o, min(max(tap, 0), n_in - 1)] += kernel(src - tap)
    return m


def resize(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return (m @ x.double() @ m.t()).to(x.dtype)


@pytest.mark.parametrize("n_in,n_out", [(8, 1), (8, 3), (16, 5), (13, 6), (4, 4)])
def test_area_down_is_adaptive_average_pooling(n_in, n_out):
    x = torch.randn(2, 3, n_in, n_in, generator=gen(2))
    got = tokenizers.multiscale.area_down(x, n_out)
    assert torch.allclose(got, resize(x, area_matrix(n_in, n_out)), atol=1e-6)


@pytest.mark.parametrize("n_in,n_out", [(1, 8), (2, 8), (3, 8), (5, 16), (13, 16), (6, 8)])
def test_bicubic_up_is_keys_cubic_half_pixel_clamped(n_in, n_out):
    x = torch.randn(2, 3, n_in, n_in, generator=gen(3))
    got = tokenizers.multiscale.bicubic_up(x, n_out)
    assert torch.allclose(got, resize(x, bicubic_matrix(n_in, n_out)), atol=1e-5)


# ---- the published layout -------------------------------------------------------------------------------------
def test_state_dict_equals_the_published_manifest():
    rows = [line.rstrip("\n").split("\t") for line in MANIFEST.read_text().splitlines()[1:]]
    with torch.device("meta"):
        model = MultiScaleVQVAE("var_vqvae")
    mine = [[k, "x".join(map(str, v.shape)), str(v.dtype).removeprefix("torch.")]
            for k, v in model.state_dict().items()]
    assert len(rows) == 324 and mine == rows  # keys, order, shapes, dtypes, the usage buffer included
    assert sum(p.numel() for p in model.parameters()) == 108_948_355  # SPEC-VAR §1 (measured on the reference)
    assert [k for k, _ in model.named_buffers()] == ["quantize.ema_vocab_hit_SV"]


def test_published_config_numbers():
    cfg = MULTISCALE_PRESETS["var_vqvae"]
    assert cfg == MultiScaleVQConfig()
    assert (cfg.stride, cfg.num_tokens, cfg.image_size, cfg.token_channels, cfg.num_scales) == (16, 680, 256, 4096, 10)
    small = multiscale_preset("msvq_f4", in_channels=1, out_channels=1)
    assert (small.stride, small.image_size, small.num_tokens, small.patch_nums[-1]) == (4, 32, 130, 8)
    with pytest.raises(ValueError, match="valid presets"):
        multiscale_preset("nope")


# ---- phi ------------------------------------------------------------------------------------------------------
def test_phi_mapping_of_the_published_model():
    with torch.device("meta"):
        q = MultiScaleQuantizer(MultiScaleVQConfig())
    assert [q.phi_index(k) for k in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    with pytest.raises(ValueError, match="scale index"):
        q.phi_index(10)


@pytest.mark.parametrize("count", range(1, 9))
def test_phi_ticks_are_numpys_linspace(count):
    start = 1 / 3 / count if count == 4 else 1 / 2 / count
    assert phi_ticks(count) == np.linspace(start, 1 - start, count).tolist()


@pytest.mark.parametrize("share,scales", [(0, 6), (1, 6), (2, 6), (3, 7), (4, 6), (4, 13), (5, 10)])
def test_phi_index_is_the_nearest_tick(share, scales):
    cfg = MultiScaleVQConfig(patch_nums=tuple(range(1, scales + 1)), share_quant_resi=share)
    with torch.device("meta"):
        q = MultiScaleQuantizer(cfg)
    n = {0: scales, 1: 1}.get(share, share)
    ticks = np.linspace(1 / 3 / n, 1 - 1 / 3 / n, n) if n == 4 else np.linspace(1 / 2 / n, 1 - 1 / 2 / n, n)
    want = [int(np.argmin(np.abs(ticks - k / (scales - 1)))) if n > 1 else 0 for k in range(scales)]
    assert [q.phi_index(k) for k in range(scales)] == want


@pytest.mark.parametrize("share,keys", [(0, ["quant_resi.0.weight", "quant_resi.3.bias"]),
                                        (1, ["quant_resi.qresi.weight"]),
                                        (2, ["quant_resi.qresi_ls.0.weight", "quant_resi.qresi_ls.1.bias"])])
def test_phi_key_layouts(share, keys):
    with torch.device("meta"):
        q = MultiScaleQuantizer(MultiScaleVQConfig(patch_nums=(1, 2, 3, 4), share_quant_resi=share))
    names = list(q.state_dict())
    assert all(k in names for k in keys)
    assert sum(k.startswith("quant_resi.") for k in names) == 2 * {0: 4, 1: 1, 2: 2}[share]


def test_phi_formula_and_identity_when_quant_resi_is_zero():
    q = quantizer()
    h = torch.randn(2, 4, 4, 4, generator=gen(5))
    for k in range(4):
        conv = [q.quant_resi.qresi_ls[i] for i in range(4)][q.phi_index(k)]
        want = 0.5 * h + 0.5 * F.conv2d(h, conv.weight, conv.bias, padding=1)
        assert torch.allclose(q.phi(h, k), want, atol=1e-6)
    with torch.device("meta"):
        q0 = MultiScaleQuantizer(MultiScaleVQConfig(patch_nums=(1, 2), quant_resi=0.0))
    assert not [k for k in q0.state_dict() if k.startswith("quant_resi")]
    assert q0.phi(h, 1) is h


# ---- encoding against an independent loop ---------------------------------------------------------------------
def reference_encode(q: MultiScaleQuantizer, f: torch.Tensor):
    """Algorithm 1 with the matrices above, float64 brute-force distances, the phi formula written out."""
    side, codebook = f.shape[-1], q.embedding.weight.detach().double()
    rest, f_hat, codes = f.double(), torch.zeros_like(f.double()), []
    for k, pn in enumerate(q.patch_nums):
        last = k == len(q.patch_nums) - 1
        z = rest if last else resize(rest, area_matrix(side, pn))
        d = (z.permute(0, 2, 3, 1).reshape(-1, 1, z.shape[1]) - codebook[None]).square().sum(-1)
        top = d.topk(2, dim=1, largest=False).values
        assert (top[:, 1] - top[:, 0]).min() > 1e-4  # no near tie: the argmin is well defined in float32
        idx = d.argmin(1).reshape(f.shape[0], -1)
        e = codebook[idx].reshape(f.shape[0], pn, pn, -1).permute(0, 3, 1, 2)
        up = e if last else resize(e, bicubic_matrix(pn, side))
        conv = [q.quant_resi.qresi_ls[i] for i in range(len(q.quant_resi.qresi_ls))][q.phi_index(k)]
        h = 0.5 * up + 0.5 * F.conv2d(up, conv.weight.double(), conv.bias.double(), padding=1)
        rest, f_hat = rest - h, f_hat + h
        codes.append(idx)
    return codes, f_hat


def test_encode_indices_matches_an_independent_per_scale_computation():
    q = quantizer()
    f = latent()
    codes, f_hat = reference_encode(q, f)
    got = q.encode_indices(f)
    assert [c.shape for c in got] == [(2, pn * pn) for pn in TINY.patch_nums]
    assert all(c.dtype == torch.int64 for c in got)
    assert all(torch.equal(a, b) for a, b in zip(got, codes))
    assert torch.allclose(q.indices_to_fhat(got).double(), f_hat, atol=1e-5)


def test_teacher_inputs_equal_the_sampling_steps_and_the_codes_pyramid():
    q = quantizer()
    codes = [torch.randint(16, (3, pn * pn), generator=gen(7)) for pn in TINY.patch_nums]
    teacher = q.teacher_inputs(codes)
    assert teacher.shape == (3, TINY.num_tokens - 1, 4)
    f_hat, steps = torch.zeros(3, 4, 4, 4), []
    for k, pn in enumerate(TINY.patch_nums):
        h = q.embed_codes(codes[k]).transpose(1, 2).reshape(3, 4, pn, pn)
        out, nxt = q.next_input(k, f_hat, h)
        assert out is f_hat  # updated in place
        steps.append(nxt)
    assert steps[-1] is f_hat
    assert torch.allclose(torch.cat([s.flatten(2).transpose(1, 2) for s in steps[:-1]], 1), teacher, atol=1e-6)
    assert torch.allclose(f_hat, q.indices_to_fhat(codes), atol=1e-6)
    maps = [q.embed_codes(c).transpose(1, 2).reshape(3, 4, pn, pn) for c, pn in zip(codes, TINY.patch_nums)]
    assert torch.allclose(pyramid_teacher_inputs(maps, 4, phi=q.phi), teacher, atol=1e-6)
    assert torch.allclose(pyramid_to_fhat(maps, phi=q.phi), f_hat, atol=1e-6)


def test_quantizer_input_checks():
    q = quantizer()
    codes = [torch.zeros(2, pn * pn, dtype=torch.long) for pn in TINY.patch_nums]
    with pytest.raises(ValueError, match=r"scale 1 needs codes of shape \(B, 4\)"):
        q.indices_to_fhat([codes[0], codes[2]])
    with pytest.raises(ValueError, match=r"lie in \[0, 16\)"):
        q.teacher_inputs(codes[:3] + [torch.full((2, 16), 16)])
    with pytest.raises(ValueError, match="all 4 scales"):
        q.teacher_inputs(codes[:3])
    with pytest.raises(ValueError, match="integer"):
        q.embed_codes(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"\(B, 4, 4, 4\)"):
        q.encode_indices(torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match=r"h of shape \(B, 4, 2, 2\)"):
        q.next_input(1, torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 3, 3))
    assert q.indices_to_fhat(codes[:2]).shape == (2, 4, 4, 4)  # a coarse prefix


# ---- training pass ---------------------------------------------------------------------------------------------
def test_forward_straight_through_loss_and_gradients():
    q = quantizer().train()
    f = latent().requires_grad_(True)
    f_hat, vq, usage = q(f)
    idx = q.encode_indices(f.detach())
    assert torch.allclose(f_hat, q.indices_to_fhat(idx), atol=1e-6)
    # running sums F_k of the scales 0..k
    sums, acc = [], torch.zeros_like(f)
    for k in range(4):
        acc = acc + q.indices_to_fhat(idx[: k + 1]) - (q.indices_to_fhat(idx[:k]) if k else 0)
        sums.append(acc.detach())
    want = sum((1 + 0.25) * (s - f.detach()).square().mean() for s in sums) / 4
    assert torch.allclose(vq, want, atol=1e-6)
    (grad_st,) = torch.autograd.grad(f_hat.sum(), f, retain_graph=True)
    assert torch.equal(grad_st, torch.ones_like(f))  # straight-through: identity to f
    (grad_vq,) = torch.autograd.grad(vq, f, retain_graph=True)  # only the beta (commitment) term reaches f
    want_grad = sum(0.25 * 2 * (f.detach() - s) / f.numel() for s in sums) / 4
    assert torch.allclose(grad_vq, want_grad, atol=1e-7)
    vq.backward()
    assert q.embedding.weight.grad.abs().sum() > 0 and q.quant_resi.qresi_ls[0].weight.grad.abs().sum() > 0
    assert usage.shape == (4,)


def test_usage_ema_copy_then_smoothing_and_margin():
    q = quantizer().train()
    f1, f2 = latent(seed=1), latent(seed=2)
    hits = lambda f: torch.stack([torch.bincount(c.flatten(), minlength=16).float() for c in q.encode_indices(f)])
    q(f1)
    h1 = hits(f1)
    assert torch.equal(q.ema_vocab_hit_SV[0], h1[0])  # the first scale of the first forward is copied ...
    assert torch.allclose(q.ema_vocab_hit_SV[1:], 0.1 * h1[1:])  # ... the counter then counts scales (reference)
    ema = q.ema_vocab_hit_SV.clone()
    _, _, usage = q(f2)
    assert torch.allclose(q.ema_vocab_hit_SV, 0.9 * ema + 0.1 * hits(f2))
    margin = 2 * 16 / 16 * 0.08  # world 1 x B*H*W / V x 0.08
    assert torch.allclose(usage, (q.ema_vocab_hit_SV >= margin).float().mean(1) * 100)
    q.eval()
    before = q.ema_vocab_hit_SV.clone()
    q(f1)
    assert torch.equal(q.ema_vocab_hit_SV, before)  # not updated outside training


# ---- the continuous pyramid ------------------------------------------------------------------------------------
def test_residual_pyramid_reconstructs_and_follows_the_formula():
    f = torch.randn(2, 3, 8, 8, generator=gen(9), dtype=torch.float64)
    pns = (1, 2, 3, 4, 6, 8)
    r = residual_pyramid(f, pns)
    assert [tuple(x.shape) for x in r] == [(2, 3, p, p) for p in pns]
    up = [x if x.shape[-1] == 8 else resize(x, bicubic_matrix(x.shape[-1], 8)) for x in r]
    assert torch.allclose(sum(up), f, atol=1e-12, rtol=0)  # exact at the last scale (float64 rounding only)
    assert torch.allclose(pyramid_to_fhat(r), f, atol=1e-12, rtol=0)
    rest = f.clone()
    for k, p in enumerate(pns[:-1]):
        assert torch.allclose(r[k], resize(rest, area_matrix(8, p)), atol=1e-12)
        rest = rest - up[k]
    assert torch.allclose(r[-1], rest, atol=1e-12)
    inputs = pyramid_teacher_inputs(r, 8)
    assert inputs.shape == (2, sum(p * p for p in pns) - 1, 3)
    pos = 0
    for k, p in enumerate(pns[1:]):
        want = resize(sum(up[: k + 1]), area_matrix(8, p)).flatten(2).transpose(1, 2)
        assert torch.allclose(inputs[:, pos:pos + p * p], want, atol=1e-12)
        pos += p * p


def test_residual_pyramid_with_phi_leaves_the_last_residual():
    q = quantizer()
    f = latent()
    r = residual_pyramid(f, TINY.patch_nums, phi=q.phi)
    last = r[-1]
    assert torch.allclose(pyramid_to_fhat(r, phi=q.phi) + last - q.phi(last, 3), f, atol=1e-5)
    with pytest.raises(ValueError, match="H = patch_nums"):
        residual_pyramid(f, (1, 2, 8))
    with pytest.raises(ValueError, match="H x H"):
        pyramid_teacher_inputs(r, 8)


# ---- the tokenizer ---------------------------------------------------------------------------------------------
def images(b: int = 2, size: int = 8, seed: int = 4) -> torch.Tensor:
    return torch.rand(b, 1, size, size, generator=gen(seed)) * 2 - 1


def test_encode_decode_shapes_and_paths():
    tok = tiny()
    x = images()
    assert tok.kind == "multiscale" and tok.stride == 2 and tok.token_channels == 16 and tok.in_channels == 1
    assert tok.token_shape(8, 8) == (30,)
    codes = tok.encode(x)
    assert codes.shape == (2, 30) and codes.dtype == torch.int64
    per_scale = tok.encode_indices(x)
    assert torch.equal(torch.cat(per_scale, 1), codes)
    assert all(torch.equal(a, b) for a, b in zip(tok.split_scales(codes), per_scale))
    assert torch.equal(tok.sample_from_moments(tok.encode_moments(x)), codes)
    with torch.no_grad():
        f_hat = tok.quantize.indices_to_fhat(per_scale)
        out = tok.decode(codes)
        assert torch.equal(out, tok.decode(f_hat)) and out.shape == (2, 1, 8, 8)
        assert torch.equal(out, tok.decoder(tok.post_quant_conv(f_hat)).clamp(-1, 1))
    assert tok.to_uint8(out).shape == (2, 8, 8, 1)
    with pytest.raises(ValueError, match="takes 8x8 images"):
        tok.encode(images(size=16))
    with pytest.raises(ValueError, match=r"\(B, 30\)"):
        tok.split_scales(codes[:, :29])


def test_init_from_a_generator_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    a, b, c = tiny(0), tiny(0), tiny(1)
    assert torch.equal(torch.get_rng_state(), state)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["encoder.conv_in.weight"], sc["encoder.conv_in.weight"])
    conv = sa["encoder.conv_in.weight"]  # U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in 9
    assert conv.abs().max() <= 1 / 3 and torch.equal(sa["encoder.norm_out.weight"], torch.ones(16))
    assert torch.equal(sa["quantize.ema_vocab_hit_SV"], torch.zeros(4, 16))
    wide = MultiScaleVQConfig(**{**TINY.to_dict(), "z_channels": 64})  # codebook inits (the reference's eini)
    normal = tiny(0, wide).quantize.embedding.weight.detach()
    assert 0.9 < normal.std() < 1.1 and normal.abs().max() > 2.5  # N(0, 1), nn.Embedding's
    uniform = tiny(0, dataclasses.replace(wide, codebook_init=-1.0)).quantize.embedding.weight.detach()
    assert uniform.abs().max() <= 1 / 16 and abs(uniform.std() - 1 / 16 / math.sqrt(3)) < 0.005  # U(-1/V, 1/V)
    trunc = tiny(0, dataclasses.replace(wide, codebook_init=1.0)).quantize.embedding.weight.detach()
    assert trunc.abs().max() <= 2.0 and 0.8 < trunc.std() < 0.95  # trunc-normal at the absolute bounds +-2


def test_save_load_round_trip_and_wrong_files(tmp_path):
    tok = tiny(3)
    tok.quantize.ema_vocab_hit_SV.fill_(2.0)
    path = tmp_path / "msvq.safetensors"
    tok.save(path)
    back = MultiScaleVQVAE.load(path)
    assert back.config == TINY and not back.training
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in tok.state_dict().items())
    x = images()
    assert torch.equal(back.encode(x), tok.encode(x))
    kl = tmp_path / "kl.safetensors"
    KLTokenizer(KLVAEConfig(block_out_channels=(8,), layers_per_block=1, latent_channels=2, norm_num_groups=4)).save(kl)
    with pytest.raises(ValueError, match="not a multi-scale VQ tokenizer file"):
        MultiScaleVQVAE.load(kl)
    with pytest.raises(FileNotFoundError):
        MultiScaleVQVAE.load(tmp_path / "missing.safetensors")


def test_published_layout_file_loads_strictly_and_wrong_files_are_refused(tmp_path):
    tok = tiny(5)
    state = tok.state_dict()
    good = tmp_path / "vae.pth"
    torch.save({**state, "quantize.ema_vocab_hit_SV": torch.ones(10, 16)}, good)  # other scale count: swapped
    back = MultiScaleVQVAE.from_var_checkpoint(good, TINY)
    assert torch.equal(back.quantize.ema_vocab_hit_SV, torch.zeros(4, 16))
    assert torch.equal(back.encode(images()), tok.encode(images()))
    cases = {
        "transformer": ({"class_emb.weight": torch.zeros(3, 2), "blocks.0.attn.mat_qkv.weight": torch.zeros(2, 2)},
                        "VAR transformer checkpoint"),
        "kl": ({"encoder.conv_in.weight": torch.zeros(1), "quant_conv.weight": torch.zeros(1)}, "KL-VAE"),
        "trainer": ({"trainer": {"var_wo_ddp": {}}}, "not a bare state dict"),
        "other_size": ({**state, "quantize.embedding.weight": torch.zeros(32, 4)}, "shape mismatches"),
        "missing": ({k: v for k, v in state.items() if k != "post_quant_conv.bias"}, "1 missing keys"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / f"{name}.pth"
        torch.save(content, path)
        with pytest.raises(ValueError, match=message):
            MultiScaleVQVAE.from_var_checkpoint(path, TINY)


def test_load_state_dict_swaps_a_usage_buffer_of_another_scale_count():
    tok = tiny()
    state = {**tok.state_dict(), "quantize.ema_vocab_hit_SV": torch.ones(7, 16)}
    tok.load_state_dict(state)
    assert torch.equal(tok.quantize.ema_vocab_hit_SV, torch.zeros(4, 16))


# ---- config ----------------------------------------------------------------------------------------------------
def test_config_round_trip_and_unknown_keys():
    data = json.loads(json.dumps(TINY.to_dict()))
    assert MultiScaleVQConfig.from_dict(data) == TINY
    with pytest.raises(ValueError, match="valid keys"):
        MultiScaleVQConfig.from_dict({**data, "codebook_size": 3})


@pytest.mark.parametrize("field,value,message", [
    ("ch", 0, "ch must be an int"), ("norm_num_groups", 3, "not divisible by norm_num_groups"),
    ("patch_nums", (1, 3, 2), "strictly increasing"), ("patch_nums", (4,), "patch_nums must be >= 2"),
    ("dropout", 0.1, "dropout must be 0.0"), ("quant_resi", 1.5, "quant_resi must be"),
    ("share_quant_resi", -1, "share_quant_resi"), ("vocab_size", 1, "vocab_size"), ("using_sa", "yes", "using_sa"),
    ("beta", -1.0, "beta must be"), ("codebook_init", float("nan"), "codebook_init"),
])
def test_bad_config_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        MultiScaleVQConfig(**{**TINY.to_dict(), field: value})


# ---- objective -------------------------------------------------------------------------------------------------
def test_objective_loss_logs_param_groups_and_training():
    tok = tiny(2).train()
    obj = MultiScaleVQObjective(tok, recon_loss="l2")
    x = images(4)
    loss, logs = obj(x, step=0)
    assert set(logs) == {"recon", "vq", "usage", "usage_last"}
    assert torch.allclose(loss, logs["recon"] + logs["vq"])
    groups = obj.param_groups(1e-3, 0.05)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in tok.parameters()) and len(ids) == len(set(ids))
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0, 0.0]
    assert groups[2]["params"] == [tok.quantize.embedding.weight]
    opt = torch.optim.AdamW(groups)
    first = float(loss.detach())
    for step in range(15):
        loss, _ = obj(x, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.8 * first
    with pytest.raises(ValueError, match="recon_loss"):
        MultiScaleVQObjective(tok, recon_loss="l3")


# ---- golden comparison with the reference ----------------------------------------------------------------------
def test_golden_against_the_reference_code():
    """Tolerance 1e-5 (codes exactly): bit-equal on the machine that wrote the fixture; other CPUs' conv and
    interpolation kernels may round differently."""
    d = torch.load(GOLDEN, weights_only=True)
    cfg = MultiScaleVQConfig(**d["config"])
    with torch.device("meta"):
        tok = MultiScaleVQVAE(cfg)
    tok.load_state_dict({k: v.float() for k, v in d["state_dict"].items()}, strict=True, assign=True)
    tok.eval()
    q, x = tok.quantize, d["images"]
    close = lambda a, b: torch.allclose(a, b, atol=1e-5, rtol=0)
    with torch.no_grad():
        assert close(tok.encode_latent(x), d["f"])
        idx = tok.encode_indices(x)
        assert all(torch.equal(a, b) for a, b in zip(idx, d["idx"]))
        assert close(q.indices_to_fhat(idx), d["f_hat"])
        assert close(tok.decode_fhat(d["f_hat"]), d["images_from_fhat"])
        assert close(tok.decode(torch.cat(d["idx"], 1)), d["images_from_idx"])
        assert close(q.teacher_inputs(d["idx"]), d["teacher_inputs"])
        assert close(q.teacher_inputs(d["random_codes"]), d["random_codes_teacher_inputs"])
        f_hat = torch.zeros_like(d["f_hat"])
        for k, (codes, pn) in enumerate(zip(d["random_codes"], cfg.patch_nums)):
            f_hat, nxt = q.next_input(k, f_hat, q.embed_codes(codes).transpose(1, 2).reshape(2, -1, pn, pn))
            assert close(nxt, d["next_inputs"][k])
        assert close(f_hat, d["next_f_hat"])
    tok.train()
    with torch.no_grad():
        q(tok.encode_latent(x))  # the first forward of the reference run (usage EMA copy)
    f_hat, vq, usage = q(tok.encode_latent(x))
    rec = tok.decoder(tok.post_quant_conv(f_hat))
    (vq + (rec - x).abs().mean()).backward()
    assert close(rec, d["train_rec"]) and close(vq, d["train_vq_loss"])
    assert torch.equal(usage.double(), d["train_usages"]) and close(q.ema_vocab_hit_SV, d["train_ema_vocab_hit_SV"])
    params = dict(tok.named_parameters())
    for name, grad in d["train_grads"].items():
        assert torch.allclose(params[name].grad, grad, atol=1e-6, rtol=0), name


# ---- HART's hybrid tokenizer (arXiv 2410.10812 Sec. 3.1) --------------------------------------------------------
HYBRID = dataclasses.replace(TINY, hybrid=True)


def test_hybrid_config_preset_and_older_files(tmp_path):
    assert not TINY.hybrid and MULTISCALE_PRESETS["hmsvq_f4"] == dataclasses.replace(MULTISCALE_PRESETS["msvq_f4"],
                                                                                    hybrid=True)
    assert MultiScaleVQConfig.from_dict(json.loads(json.dumps(HYBRID.to_dict()))) == HYBRID
    with pytest.raises(ValueError, match="hybrid must be true or false"):
        dataclasses.replace(TINY, hybrid=1)
    tok = tiny(3, HYBRID)
    path = tmp_path / "hybrid.safetensors"
    tok.save(path)
    assert MultiScaleVQVAE.load(path).config == HYBRID  # recorded in the file
    from safetensors.torch import load_file, save_file

    old = {k: v for k, v in TINY.to_dict().items() if k != "hybrid"}  # a file written before the key existed
    save_file(load_file(str(path)), str(tmp_path / "old.safetensors"),
              metadata={"format": "mar-multiscale-vq-v1", "config": json.dumps(old)})
    assert MultiScaleVQVAE.load(tmp_path / "old.safetensors").config == TINY


def test_encode_hybrid_residual_is_the_latent_minus_the_vq_reconstruction():
    tok = tiny(6)
    with torch.no_grad():
        tok.quantize.embedding.weight.copy_(torch.randn(16, 4, generator=gen(106)) * 0.7)
        x = images(3, seed=8)
        f = tok.quant_conv(tok.encoder(x))  # the encoder output, computed here
        codes_ref, f_hat_ref = reference_encode(tok.quantize, f)  # the independent float64 quantizer
        codes, f_hat, r = tok.encode_hybrid(x)
    assert all(torch.equal(a, b) for a, b in zip(codes, codes_ref))
    assert torch.allclose(f_hat.double(), f_hat_ref, atol=1e-5)
    assert torch.allclose(r.double(), f.double() - f_hat_ref, atol=1e-5)
    assert torch.equal(r, f - tok.quantize.indices_to_fhat(codes))  # exactly, by definition
    assert r.abs().max() > 1e-3  # a real residual: quantization loses something
    with torch.no_grad():
        same = tok.residual(f)
    assert all(torch.equal(a, b) for a, b in zip(same[0], codes)) and torch.equal(same[2], r)


def per_sample_recon(tok, x, inputs):
    """l1 recon of each sample decoded on its own from its decoder input (B, Cz, H, H)."""
    return torch.stack([(x[b:b + 1] - tok.decoder(tok.post_quant_conv(inputs[b:b + 1]))).abs().mean()
                        for b in range(len(x))])


def test_hybrid_objective_picks_each_samples_path_by_the_coin():
    tok = tiny(7, HYBRID).train()
    obj = MultiScaleVQObjective(tok)
    x = images(6, seed=9)
    coin = torch.rand(6, generator=gen(11)) < 0.5  # the objective's draw, written out
    assert 0 < int(coin.sum()) < 6
    loss, logs = obj(x, step=0, generator=gen(11))
    assert set(logs) == {"recon", "vq", "usage", "usage_last", "continuous_frac", "recon_continuous",
                         "recon_discrete"}
    # two manual decodes: the continuous latent f, and the VQ reconstruction of its codes
    f = tok.encode_latent(x)
    f_hat_st, vq, _ = tok.quantize(f)
    continuous = per_sample_recon(tok, x, f)
    discrete = per_sample_recon(tok, x, f_hat_st)
    assert not torch.allclose(continuous, discrete, atol=1e-4)  # the paths are told apart
    want = torch.where(coin, continuous, discrete)
    close = lambda a, b: torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    assert close(logs["recon"], want.mean()) and close(loss, want.mean() + vq)
    assert close(logs["recon_continuous"], continuous[coin].mean())
    assert close(logs["recon_discrete"], discrete[~coin].mean())
    assert float(logs["continuous_frac"]) == float(coin.float().mean())
    # the gradient reaches the encoder on both paths (straight-through or directly)
    params = [tok.encoder.conv_in.weight, tok.decoder.conv_out.weight]
    got = torch.autograd.grad(loss, params)
    manual = torch.autograd.grad(want.mean() + vq, params)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, manual))
    with pytest.raises(ValueError, match="torch.Generator"):
        obj(x, step=0)


def test_hybrid_objective_with_one_path_only_logs_the_overall_recon():
    tok = tiny(7, HYBRID).train()
    obj = MultiScaleVQObjective(tok)
    for seed in range(40):
        u = float(torch.rand(1, generator=gen(seed)))
        _, logs = obj(images(1), step=0, generator=gen(seed))
        present = "recon_continuous" if u < 0.5 else "recon_discrete"
        absent = "recon_discrete" if u < 0.5 else "recon_continuous"
        assert absent not in logs and torch.allclose(logs[present], logs["recon"])
        assert all(math.isfinite(float(v)) for v in logs.values())


def test_hybrid_objective_trains_and_the_plain_one_is_unchanged():
    x = images(4)
    tok = tiny(2, HYBRID).train()
    obj = MultiScaleVQObjective(tok, recon_loss="l2")
    opt = torch.optim.AdamW(obj.param_groups(1e-3, 0.0))
    first = float(obj(x, 0, gen(100))[0].detach())
    for step in range(15):
        loss, _ = obj(x, step, gen(100 + step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(obj(x, 15, gen(100))[0].detach()) < 0.8 * first
    plain = MultiScaleVQObjective(tiny(2).train(), recon_loss="l2")  # no draw, the same numbers with or without
    g = gen(5)
    state = g.get_state()
    a, logs = plain(x, 0, g)
    assert torch.equal(g.get_state(), state) and set(logs) == {"recon", "vq", "usage", "usage_last"}
    b, _ = plain(x, 0)
    tok = plain.tokenizer
    f_hat, vq, _ = tok.quantize(tok.encode_latent(x))
    want = (x - tok.decoder(tok.post_quant_conv(f_hat))).square().mean() + vq
    assert torch.equal(a, b) and torch.equal(a, want)
