"""Tests for tokenizers/: presets, strict LDM -> diffusers conversion, an independent pure-torch LDM
forward, encode/decode scaling, sampling, uint8 conversion, scaling factor, save/load."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tokenizers import (
    KLTokenizer,
    KLVAEConfig,
    build_autoencoder,
    compute_scaling_factor,
    kl_vae_preset,
)

KL16_PARAMS = 66_456_019  # SPEC.md section 1
# The reference key/shape manifest (a copy of shared/manifests/kl16_vae_state_dict.tsv in tests/fixtures); its
# digest below (sha256 of the sorted "key<TAB>AxB" rows, computed from that file) also pins the test's own layout.
MANIFEST = Path(__file__).resolve().parent / "fixtures" / "manifests" / "kl16_vae_state_dict.tsv"
KL16_LAYOUT_SHA256 = "92cd57baf736de336143e68caa880057d5d343c802bca7a3096b7e742f8baa32"

# Small LDM VAE with the KL-16 structure: 3 levels, encoder attention at the lowest level, mid attention.
SMALL_CH, SMALL_MULT, SMALL_RES, SMALL_Z, SMALL_GROUPS = 16, (1, 2, 2), 2, 4, 8
SMALL = KLVAEConfig(block_out_channels=(16, 32, 32), layers_per_block=2, latent_channels=4, norm_num_groups=8,
                    scaling_factor=0.37)


def layout_digest(shapes: dict[str, tuple]) -> str:
    rows = sorted(f"{k}\t{'x'.join(map(str, s))}" for k, s in shapes.items())
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


def read_manifest() -> dict[str, tuple[int, ...]]:
    rows = [line.split("\t") for line in MANIFEST.read_text().splitlines()[1:] if line.strip()]
    return {key: tuple(int(s) for s in shape.split("x")) for key, shape, _ in rows}


def kl16_shapes() -> dict[str, tuple[int, ...]]:
    """KL-16's LDM key -> shape, from the manifest."""
    return read_manifest()


# ---- an independent description of the LDM VAE (written from the LDM Encoder/Decoder layout) -------
def ldm_shapes(ch: int, ch_mult: tuple[int, ...], num_res: int, z: int, in_ch: int = 3) -> dict[str, tuple]:
    """Key -> shape of the LDM-format VAE with encoder attention at the lowest level and mid attention."""
    shapes: dict[str, tuple] = {}

    def norm(p, c):
        shapes[f"{p}.weight"], shapes[f"{p}.bias"] = (c,), (c,)

    def conv(p, cout, cin, k):
        shapes[f"{p}.weight"], shapes[f"{p}.bias"] = (cout, cin, k, k), (cout,)

    def resnet(p, cin, cout):
        norm(f"{p}.norm1", cin); conv(f"{p}.conv1", cout, cin, 3)
        norm(f"{p}.norm2", cout); conv(f"{p}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{p}.nin_shortcut", cout, cin, 1)

    def attn(p, c):
        norm(f"{p}.norm", c)
        for name in ("q", "k", "v", "proj_out"):
            conv(f"{p}.{name}", c, c, 1)

    n = len(ch_mult)
    conv("encoder.conv_in", ch, in_ch, 3)
    cin = ch
    for i, mult in enumerate(ch_mult):
        for j in range(num_res):
            resnet(f"encoder.down.{i}.block.{j}", cin, ch * mult)
            cin = ch * mult
            if i == n - 1:
                attn(f"encoder.down.{i}.attn.{j}", cin)
        if i != n - 1:
            conv(f"encoder.down.{i}.downsample.conv", cin, cin, 3)
    for part in ("encoder", "decoder"):
        c = ch * ch_mult[-1]
        if part == "decoder":
            conv("decoder.conv_in", c, z, 3)
        resnet(f"{part}.mid.block_1", c, c); attn(f"{part}.mid.attn_1", c); resnet(f"{part}.mid.block_2", c, c)
        if part == "encoder":
            norm("encoder.norm_out", c); conv("encoder.conv_out", 2 * z, c, 3)
    cin = ch * ch_mult[-1]
    for i in reversed(range(n)):
        for j in range(num_res + 1):
            resnet(f"decoder.up.{i}.block.{j}", cin, ch * ch_mult[i])
            cin = ch * ch_mult[i]
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", cin, cin, 3)
    norm("decoder.norm_out", ch); conv("decoder.conv_out", in_ch, ch, 3)
    conv("quant_conv", 2 * z, 2 * z, 1); conv("post_quant_conv", z, z, 1)
    return shapes


def random_ldm_state_dict(shapes: dict[str, tuple], seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Random weights that keep activations O(1): conv ~ N(0, 1/fan_in), norm weight ~ 1, small biases."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in shapes.items():
        t = torch.randn(shape, generator=g, dtype=torch.float64)
        if len(shape) == 4:
            t = t / math.sqrt(shape[1] * shape[2] * shape[3])
        elif key.endswith("weight"):  # GroupNorm scale
            t = 1.0 + 0.1 * t
        else:
            t = 0.1 * t
        sd[key] = t.to(dtype)
    return sd


# ---- an independent pure-torch forward of the LDM VAE on the LDM state dict ------------------------
def _gn(sd, p, x):
    return F.group_norm(x, SMALL_GROUPS, sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-6)


def _conv(sd, p, x, stride=1, padding=None):
    w = sd[f"{p}.weight"]
    return F.conv2d(x, w, sd[f"{p}.bias"], stride=stride, padding=w.shape[-1] // 2 if padding is None else padding)


def _resnet(sd, p, x):
    h = _conv(sd, f"{p}.conv1", F.silu(_gn(sd, f"{p}.norm1", x)))
    h = _conv(sd, f"{p}.conv2", F.silu(_gn(sd, f"{p}.norm2", h)))
    if f"{p}.nin_shortcut.weight" in sd:
        x = _conv(sd, f"{p}.nin_shortcut", x)
    return x + h


def _attn(sd, p, x):
    b, c, hh, ww = x.shape
    h = _gn(sd, f"{p}.norm", x)
    q, k, v = (_conv(sd, f"{p}.{n}", h).reshape(b, c, hh * ww) for n in ("q", "k", "v"))
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * c**-0.5, dim=2)  # (B, query, key)
    out = torch.einsum("bcj,bij->bci", v, w).reshape(b, c, hh, ww)
    return x + _conv(sd, f"{p}.proj_out", out)


def ldm_encode(sd, x, n_levels=len(SMALL_MULT), num_res=SMALL_RES):
    h = _conv(sd, "encoder.conv_in", x)
    for i in range(n_levels):
        for j in range(num_res):
            h = _resnet(sd, f"encoder.down.{i}.block.{j}", h)
            if f"encoder.down.{i}.attn.{j}.q.weight" in sd:
                h = _attn(sd, f"encoder.down.{i}.attn.{j}", h)
        if i != n_levels - 1:
            h = _conv(sd, f"encoder.down.{i}.downsample.conv", F.pad(h, (0, 1, 0, 1)), stride=2, padding=0)
    h = _resnet(sd, "encoder.mid.block_2", _attn(sd, "encoder.mid.attn_1", _resnet(sd, "encoder.mid.block_1", h)))
    h = _conv(sd, "encoder.conv_out", F.silu(_gn(sd, "encoder.norm_out", h)))
    return _conv(sd, "quant_conv", h)  # (B, 2z, h, w) = mean || logvar (unclamped)


def ldm_decode(sd, z, n_levels=len(SMALL_MULT), num_res=SMALL_RES):
    h = _conv(sd, "decoder.conv_in", _conv(sd, "post_quant_conv", z))
    h = _resnet(sd, "decoder.mid.block_2", _attn(sd, "decoder.mid.attn_1", _resnet(sd, "decoder.mid.block_1", h)))
    for i in reversed(range(n_levels)):
        for j in range(num_res + 1):
            h = _resnet(sd, f"decoder.up.{i}.block.{j}", h)
        if i != 0:
            h = _conv(sd, f"decoder.up.{i}.upsample.conv", F.interpolate(h, scale_factor=2.0, mode="nearest"))
    return _conv(sd, "decoder.conv_out", F.silu(_gn(sd, "decoder.norm_out", h)))


@pytest.fixture(scope="module")
def small_sd() -> dict[str, torch.Tensor]:
    return random_ldm_state_dict(ldm_shapes(SMALL_CH, SMALL_MULT, SMALL_RES, SMALL_Z), seed=1, dtype=torch.float64)


@pytest.fixture(scope="module")
def small_tok(small_sd) -> KLTokenizer:
    return KLTokenizer.from_ldm_state_dict(small_sd, SMALL)


def images(shape=(2, 3, 16, 16), seed=2, dtype=torch.float64):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 2 - 1


# ---- presets and strict conversion -----------------------------------------------------------------
def test_kl16_preset_param_count_and_layout_match_manifest():
    config = kl_vae_preset("kl16")
    # 0.2325: SPEC.md section 1 (the library keeps it only in tokenizers/kl_vae.py)
    assert config.stride == 16 and config.latent_channels == 16 and config.scaling_factor == 0.2325
    with torch.device("meta"):
        vae = build_autoencoder(config)
    assert sum(p.numel() for p in vae.parameters()) == KL16_PARAMS
    # The test's own LDM description (used for the small reference model) reproduces the manifest.
    ours = ldm_shapes(128, (1, 1, 2, 2, 4), 2, 16)
    assert len(ours) == 312 and layout_digest(ours) == KL16_LAYOUT_SHA256
    assert ours == read_manifest()


def test_tiny_preset_is_the_lean_one_at_half_width():
    """kl_f4_c8_tiny (the main job's tokenizer) has the lean preset's state-dict keys, so it stays load-compatible
    with diffusers' AutoencoderKL, and every width halved: each tensor dim is the lean one's or half of it."""
    with torch.device("meta"):
        lean = build_autoencoder(kl_vae_preset("kl_f4_c8_lean", in_channels=1, out_channels=1)).state_dict()
        tiny = build_autoencoder(kl_vae_preset("kl_f4_c8_tiny", in_channels=1, out_channels=1)).state_dict()
    assert tiny.keys() == lean.keys()
    halved = 0
    for k in lean:
        a, b = lean[k].shape, tiny[k].shape
        assert len(a) == len(b) and all(y in (x, x // 2) for x, y in zip(a, b)), k
        halved += a != b
    assert halved > len(lean) // 2
    assert 3 * sum(v.numel() for v in tiny.values()) < sum(v.numel() for v in lean.values())
    tok = KLTokenizer(kl_vae_preset("kl_f4_c8_tiny", in_channels=1, out_channels=1))
    with torch.no_grad():
        assert tok.encode(torch.zeros(2, 1, 32, 32), sample=False).shape == (2, 8, 8, 8)


def test_unknown_preset_and_bad_configs_raise():
    with pytest.raises(ValueError, match="kl16"):
        kl_vae_preset("kl_f16_c99")
    with pytest.raises(ValueError, match="divisible by norm_num_groups"):
        KLVAEConfig(block_out_channels=(24, 48), norm_num_groups=32)
    with pytest.raises(ValueError, match="valid keys"):
        KLVAEConfig.from_dict({"latent_channel": 4})
    with pytest.raises(ValueError, match="not divisible by the tokenizer stride 4"):
        KLTokenizer(kl_vae_preset("kl_f4_c4")).encode(torch.zeros(1, 3, 30, 32))


def test_kl16_checkpoint_file_loads_strictly(tmp_path):
    shapes = kl16_shapes()
    sd = {k: torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, (k, s) in enumerate(shapes.items())}
    path = tmp_path / "kl16.ckpt"
    torch.save({"model": sd}, path)
    tok = KLTokenizer.from_ldm_checkpoint(path)  # default config: kl16
    loaded = tok.vae.state_dict()
    assert len(loaded) == 312
    # spot-check values, incl. the 20 encoder-attention keys diffusers' converter leaves out
    assert torch.equal(loaded["encoder.down_blocks.4.attentions.1.to_q.weight"],
                       sd["encoder.down.4.attn.1.q.weight"][:, :, 0, 0])
    assert torch.equal(loaded["decoder.up_blocks.0.resnets.2.conv1.weight"], sd["decoder.up.4.block.2.conv1.weight"])
    assert torch.equal(loaded["decoder.up_blocks.3.resnets.0.conv_shortcut.weight"],
                       sd["decoder.up.1.block.0.nin_shortcut.weight"])
    assert all(t.device.type == "cpu" for t in loaded.values())
    # Agreement with diffusers' own converter on every key it maps (an independent key map).
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    theirs = convert_ldm_vae_checkpoint(sd, dict(tok.vae.config))
    shared = [k for k in theirs if k in loaded]
    assert len(shared) == 292 and all(torch.equal(theirs[k], loaded[k]) for k in shared)


@pytest.mark.parametrize("defect", ["missing", "extra", "shape"])
def test_defective_state_dict_names_the_key(defect):
    sd = {k: torch.empty(s, device="meta") for k, s in kl16_shapes().items()}
    if defect == "missing":
        del sd["encoder.down.4.attn.1.proj_out.bias"]
        pattern = r"missing keys \(1\):\n    encoder\.down\.4\.attn\.1\.proj_out\.bias"
    elif defect == "extra":
        sd["loss.logvar"] = torch.empty(1, device="meta")
        pattern = r"unexpected keys \(1\):\n    loss\.logvar"
    else:
        sd["decoder.up.2.block.0.conv1.weight"] = torch.empty(256, 512, 3, 3, device="meta")
        pattern = r"shape mismatches \(1\):\n    decoder\.up\.2\.block\.0\.conv1\.weight: checkpoint \(256, 512, 3, 3\)"
    with pytest.raises(ValueError, match=pattern):
        KLTokenizer.from_ldm_state_dict(sd, "kl16")


def test_bad_checkpoint_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        KLTokenizer.from_ldm_checkpoint(tmp_path / "nope.ckpt")
    junk = tmp_path / "junk.ckpt"
    junk.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
        KLTokenizer.from_ldm_checkpoint(junk)
    mar_like = tmp_path / "mar.pth"
    torch.save({"model": {"z_proj.weight": torch.zeros(2, 2)}, "model_ema": {}}, mar_like)
    with pytest.raises(ValueError, match="not a KL-VAE state dict"):
        KLTokenizer.from_ldm_checkpoint(mar_like)
    small = tmp_path / "small.pt"  # a bare state dict of a different architecture
    torch.save(random_ldm_state_dict(ldm_shapes(SMALL_CH, SMALL_MULT, SMALL_RES, SMALL_Z)), small)
    with pytest.raises(ValueError, match="KLVAEConfig"):
        KLTokenizer.from_ldm_checkpoint(small, "kl16")
    assert KLTokenizer.from_ldm_checkpoint(small, SMALL).stride == 4
    from safetensors.torch import save_file

    sd = random_ldm_state_dict(ldm_shapes(SMALL_CH, SMALL_MULT, SMALL_RES, SMALL_Z), seed=3)
    save_file(sd, str(tmp_path / "small.safetensors"))
    loaded = KLTokenizer.from_ldm_checkpoint(tmp_path / "small.safetensors", SMALL).vae.state_dict()
    assert torch.equal(loaded["encoder.mid_block.attentions.0.to_out.0.weight"],
                       sd["encoder.mid.attn_1.proj_out.weight"][:, :, 0, 0])


# ---- the converted diffusers model equals an independent LDM forward ------------------------------
def test_converted_model_matches_pure_torch_ldm_forward(small_sd, small_tok):
    x = images()
    with torch.no_grad():
        moments = small_tok.encode_moments(x)
        ref = ldm_encode(small_sd, x)
        assert moments.shape == (2, 8, 4, 4)
        assert torch.allclose(moments, torch.cat([ref[:, :4], ref[:, 4:].clamp(-30, 20)], 1), atol=1e-9)
        z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        out = small_tok.vae.decode(z).sample
        assert torch.allclose(out, ldm_decode(small_sd, z), atol=1e-9)
        # The comparison is sensitive to the key map: swapping q and k of one encoder attention breaks it.
        swapped = dict(small_sd)
        swapped["encoder.down.2.attn.1.q.weight"] = small_sd["encoder.down.2.attn.1.k.weight"]
        swapped["encoder.down.2.attn.1.k.weight"] = small_sd["encoder.down.2.attn.1.q.weight"]
        wrong = KLTokenizer.from_ldm_state_dict(swapped, SMALL).encode_moments(x)
        assert (wrong - moments).abs().max() > 1e-3


def test_float32_agrees_with_reference_to_1e5(small_sd):
    sd32 = {k: v.float() for k, v in small_sd.items()}
    tok = KLTokenizer.from_ldm_state_dict(sd32, SMALL)
    x = images(dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(tok.encode_moments(x)[:, :4], ldm_encode(sd32, x)[:, :4], atol=1e-5)


# ---- scaling, sampling, uint8, scaling factor ------------------------------------------------------
def test_encode_decode_apply_the_scaling_factor(small_tok):
    x, s = images(), SMALL.scaling_factor
    with torch.no_grad():
        moments = small_tok.encode_moments(x)
        assert torch.allclose(small_tok.encode(x, sample=False), moments[:, :4] * s, atol=0, rtol=1e-12)
        t = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        assert torch.allclose(small_tok.decode(t), small_tok.vae.decode(t / s).sample, atol=1e-12)
        assert small_tok.decode(t).shape == (2, 3, 16, 16)


def test_posterior_sample_is_reproducible_and_matches_hand_formula(small_sd, small_tok):
    x, s = images(), SMALL.scaling_factor
    with torch.no_grad():
        a = small_tok.encode(x, generator=torch.Generator().manual_seed(7))
        b = small_tok.encode(x, generator=torch.Generator().manual_seed(7))
        c = small_tok.encode(x, generator=torch.Generator().manual_seed(8))
        ref = ldm_encode(small_sd, x)  # independent moments
        mean, logvar = ref[:, :4], ref[:, 4:].clamp(-30, 20)
        noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        by_hand = (mean + torch.exp(0.5 * logvar) * noise) * s
        posterior = small_tok.vae.encode(x).latent_dist
        theirs = posterior.sample(generator=torch.Generator().manual_seed(7)) * s
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert torch.allclose(a, by_hand, atol=1e-12) and torch.allclose(a, theirs, atol=1e-12)
    # logvar is clamped to [-30, 20] before the std is taken
    extreme = torch.cat([torch.zeros(1, 4, 2, 2), torch.full((1, 4, 2, 2), 100.0)], 1).double()
    g = torch.Generator().manual_seed(0)
    expect = torch.exp(torch.tensor(10.0)).double() * torch.randn(1, 4, 2, 2, generator=g, dtype=torch.float64) * s
    assert torch.allclose(small_tok.sample_from_moments(extreme, torch.Generator().manual_seed(0)), expect)


def test_to_uint8_formula():
    x = torch.tensor([-1.5, -1.0, -0.999, 0.0, 0.5, 0.99, 1.0, 2.0]).reshape(1, 1, 2, 4).expand(1, 3, 2, 4)
    u = KLTokenizer.to_uint8(x)
    assert u.dtype == torch.uint8 and u.shape == (1, 2, 4, 3)
    # round(clip((x+1)/2*255)): 0, 0, 0.1275->0, 127.5->128 (round half to even: 128), 191.25->191, 253.725->254
    assert u[0, :, :, 0].flatten().tolist() == [0, 0, 0, 128, 191, 254, 255, 255]


def test_compute_scaling_factor():
    latents = torch.tensor([1.0, 3.0, 5.0, 7.0]) + 100.0  # std (unbiased) = sqrt(20/3), mean irrelevant
    assert compute_scaling_factor(latents) == pytest.approx(1.0 / math.sqrt(20.0 / 3.0), rel=1e-12)
    with pytest.raises(ValueError, match="constant"):
        compute_scaling_factor(torch.ones(10))


# ---- save / load -----------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path, small_tok):
    path = tmp_path / "tok.safetensors"
    small_tok.save(path)
    loaded = KLTokenizer.load(path)
    assert loaded.config == SMALL and not loaded.training
    theirs, ours = loaded.vae.state_dict(), small_tok.vae.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
    x = images()
    with torch.no_grad():
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        assert torch.equal(small_tok.encode(x, g1), loaded.encode(x, g2))
        t = small_tok.encode(x, sample=False)
        assert torch.equal(small_tok.decode(t), loaded.decode(t))
    plain = tmp_path / "plain.safetensors"  # a safetensors file without our metadata
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, str(plain))
    with pytest.raises(ValueError, match="from_ldm_checkpoint"):
        KLTokenizer.load(plain)
