"""Tests for the multi-scale branches of tokenizers/base.py: ``tokenizer_kind`` and ``open_tokenizer`` with VAR's
multi-scale VQVAE (fresh from a preset, a project .safetensors, the published bare-state-dict layout), and the one
clear message for each wrong combination of file and preset. Tiny configs keep it fast; the published config is
only built on the meta device (inside the refusal of a file that does not fit it)."""

from __future__ import annotations

import pytest
import torch

from tokenizers import (
    KLTokenizer,
    KLVAEConfig,
    MultiScaleVQConfig,
    MultiScaleVQVAE,
    VQConfig,
    VQTokenizer,
    multiscale_preset,
    open_tokenizer,
    tokenizer_kind,
)

# 1 channel, stride 2, Cz 4, V 16, 4 scales up to 4x4 (8x8 images)
TINY = MultiScaleVQConfig(in_channels=1, out_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_num_groups=4,
                          z_channels=4, vocab_size=16, patch_nums=(1, 2, 3, 4))
TINY_KL = KLVAEConfig(in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                      latent_channels=4, norm_num_groups=4)
TINY_VQ = VQConfig(in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
                   codebook_size=16, norm_num_groups=4)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(b: int = 2, seed: int = 4) -> torch.Tensor:
    return torch.rand(b, 1, 8, 8, generator=gen(seed)) * 2 - 1


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tokenizer_kind_of_multiscale_presets():
    for preset in ("var_vqvae", "msvq_f4", "hmsvq_f4", TINY):
        assert tokenizer_kind(preset) == "multiscale"
    with pytest.raises(ValueError, match="no continuous view.*drop continuous=True"):
        tokenizer_kind("msvq_f4", continuous=True)
    with pytest.raises(ValueError, match=r"multi-scale \[.*'msvq_f4'"):
        tokenizer_kind("mystery")


def test_fresh_tokenizer_from_a_preset():
    tok = open_tokenizer(None, "msvq_f4", in_channels=1)
    assert isinstance(tok, MultiScaleVQVAE) and tok.config == multiscale_preset("msvq_f4", in_channels=1,
                                                                                out_channels=1)
    assert same_weights(tok, MultiScaleVQVAE(tok.config))  # the class's default generator (torch.initial_seed())
    assert open_tokenizer(None, "hmsvq_f4").config.hybrid
    small = open_tokenizer(None, TINY, in_channels=3)  # a config object is taken as it is
    assert small.config == TINY and small.kind == "multiscale"


def test_project_file_loads_whatever_preset(tmp_path):
    tok = MultiScaleVQVAE(TINY, generator=gen(1))
    path = tmp_path / "msvq.safetensors"
    tok.save(path)
    for preset in ("var_vqvae", "kl16", "vq16", TINY):
        opened = open_tokenizer(path, preset)
        assert isinstance(opened, MultiScaleVQVAE) and opened.config == TINY and same_weights(opened, tok)
    with torch.no_grad():
        assert torch.equal(open_tokenizer(path, "kl16").encode(images()), tok.eval().encode(images()))


def test_published_layout_loads_strictly_by_preset_name_and_by_config(tmp_path):
    config = multiscale_preset("msvq_f4", in_channels=1, out_channels=1)
    tok = MultiScaleVQVAE(config, generator=gen(2))
    path = tmp_path / "vae.pth"
    torch.save(tok.state_dict(), path)  # the published file's form: a bare state dict
    opened = open_tokenizer(path, "msvq_f4", in_channels=1)
    assert isinstance(opened, MultiScaleVQVAE) and opened.config == config and same_weights(opened, tok)
    small = MultiScaleVQVAE(TINY, generator=gen(3))
    small_path = tmp_path / "small.pth"
    torch.save(small.state_dict(), small_path)
    assert same_weights(open_tokenizer(small_path, TINY), small)
    # "var_vqvae" names the published architecture: a file of another size is refused, listing the differences
    with pytest.raises(ValueError, match=r"does not fit this multi-scale VQVAE config \(ch 160.*missing keys"):
        open_tokenizer(small_path, "var_vqvae")


def test_wrong_files_are_refused_with_one_message(tmp_path):
    kl, vq = tmp_path / "kl.safetensors", tmp_path / "vq.safetensors"
    KLTokenizer(TINY_KL).save(kl)
    VQTokenizer(TINY_VQ, generator=gen(4)).save(vq)
    with pytest.raises(ValueError, match="is a KL-VAE tokenizer file.*multi-scale preset"):
        open_tokenizer(kl, "var_vqvae")
    with pytest.raises(ValueError, match="is a VQ tokenizer file.*multi-scale preset"):
        open_tokenizer(vq, TINY)
    ldm = tmp_path / "kl16.ckpt"
    torch.save({"model": {"encoder.conv_in.weight": torch.zeros(2, 1, 3, 3)}}, ldm)
    with pytest.raises(ValueError, match="LDM-format checkpoint.*KL preset"):
        open_tokenizer(ldm, "msvq_f4")
    transformer = tmp_path / "var_d16.pth"
    torch.save({"class_emb.weight": torch.zeros(3, 2), "blocks.0.attn.mat_qkv.weight": torch.zeros(2, 2)}, transformer)
    with pytest.raises(ValueError, match="VAR transformer checkpoint"):
        open_tokenizer(transformer, "var_vqvae")
    var_vae = tmp_path / "vae_ch160v4096z32.pth"  # vice versa: the VAR VQVAE layout with a KL or VQ preset
    torch.save(MultiScaleVQVAE(TINY, generator=gen(5)).state_dict(), var_vae)
    with pytest.raises(ValueError, match="is a multi-scale VQVAE checkpoint.*multi-scale preset"):
        open_tokenizer(var_vae, TINY_KL)
    with pytest.raises(ValueError, match="not a VQ tokenizer file.*multi-scale preset"):
        open_tokenizer(var_vae, "vq16")
    with pytest.raises(FileNotFoundError):
        open_tokenizer(tmp_path / "missing.pth", "var_vqvae")


def test_scaling_factor_and_continuous_are_refused(tmp_path):
    with pytest.raises(ValueError, match="no scaling factor.*drop scaling_factor"):
        open_tokenizer(None, "msvq_f4", scaling_factor=0.5)
    with pytest.raises(ValueError, match="no continuous view"):
        open_tokenizer(None, TINY, continuous=True)
    path = tmp_path / "msvq.safetensors"
    MultiScaleVQVAE(TINY, generator=gen(6)).save(path)
    with pytest.raises(ValueError, match="no scaling factor"):  # a multi-scale file opened with a KL preset
        open_tokenizer(path, "kl16", scaling_factor=0.5)
    with pytest.raises(ValueError, match="no continuous view"):
        open_tokenizer(path, "vq16", continuous=True)
