"""Tests for tokenizers/training.py: each loss term against its closed form, gradient isolation between
the VAE and the discriminator, the disc_start switch, parameter groups, a DDP smoke run, a short
training run on grey blobs, and the scaling-factor estimate against 1/std computed by hand."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from tokenizers import (
    KLTokenizer,
    KLVAEObjective,
    PatchDiscriminator,
    VAETrainConfig,
    adversarial_factor,
    compute_scaling_factor,
    estimate_scaling_factor,
    kl_vae_preset,
)


def tiny_tokenizer(channels: int, seed: int = 0, attention: bool = True, dtype=torch.float64) -> KLTokenizer:
    """kl_f4_c4 (stride 4, 4 latent channels) with small widths."""
    cfg = kl_vae_preset("kl_f4_c4", in_channels=channels, out_channels=channels, block_out_channels=(8, 16, 16),
                        layers_per_block=1, norm_num_groups=4, encoder_attention=attention,
                        mid_block_add_attention=attention)
    torch.manual_seed(seed)
    return KLTokenizer(cfg).to(dtype)


def objective(channels: int, dtype=torch.float64, **overrides) -> KLVAEObjective:
    values = dict(kl_weight=0.3, disc_weight=0.7, disc_start=5, disc_channels=8, disc_layers=2)
    values.update(overrides)
    tok = tiny_tokenizer(channels, dtype=dtype)
    torch.manual_seed(1)
    return KLVAEObjective(tok, VAETrainConfig(**values)).to(dtype)


def images(channels: int, size: int = 8, batch: int = 2, seed: int = 2, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, channels, size, size, generator=g, dtype=dtype) * 2 - 1)


def hand_terms(obj: KLVAEObjective, x: torch.Tensor, seed: int, recon_loss: str) -> dict[str, torch.Tensor]:
    """Each term from its formula, sampling z = mu + exp(logvar/2) * eps with eps from the same seed."""
    tok = obj.tokenizer
    mu, logvar = tok.encode_moments(x).chunk(2, dim=1)  # logvar already clamped to [-30, 20]
    eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(seed), dtype=mu.dtype)
    z = mu + torch.exp(0.5 * logvar) * eps
    recon = tok.vae.decode(z).sample
    diff = x - recon
    out = {
        "recon": diff.abs().mean() if recon_loss == "l1" else (diff**2).mean(),
        "kl": (0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3))).mean(),
    }
    if obj.discriminator is not None:
        real, fake = obj.discriminator(x), obj.discriminator(recon)
        out["g_adv"] = -fake.mean()
        out["d_loss"] = 0.5 * (torch.clamp(1 - real, min=0).mean() + torch.clamp(1 + fake, min=0).mean())
        out["logits_real"], out["logits_fake"] = real.mean(), fake.mean()
    return out


@pytest.mark.parametrize("channels,size,recon_loss", [(1, 16, "l1"), (3, 8, "l2"), (3, 16, "l1")])
@pytest.mark.parametrize("step", [0, 5, 9])
def test_total_matches_hand_computation(channels, size, recon_loss, step):
    obj = objective(channels, recon_loss=recon_loss)
    x = images(channels, size)
    loss, logs = obj(x, step=step, generator=torch.Generator().manual_seed(7))
    ref = hand_terms(obj, x, seed=7, recon_loss=recon_loss)
    assert set(logs) == set(ref)
    for key in ref:
        torch.testing.assert_close(logs[key], ref[key], rtol=1e-10, atol=1e-12)
        assert not logs[key].requires_grad
    f = 1.0 if step >= 5 else 0.0
    expected = ref["recon"] + 0.3 * ref["kl"] + f * (0.7 * ref["g_adv"] + ref["d_loss"])
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    assert ref["kl"] > 0 and ref["d_loss"] > 0  # the terms are not trivially zero


def test_disabled_discriminator_leaves_recon_plus_kl():
    obj = objective(1, disc_weight=0.0)
    assert obj.discriminator is None
    assert all(not n.startswith("discriminator") for n, _ in obj.named_parameters())
    x = images(1, 16)
    loss, logs = obj(x, step=100, generator=torch.Generator().manual_seed(3))
    ref = hand_terms(obj, x, seed=3, recon_loss="l1")
    assert set(logs) == {"recon", "kl"}
    torch.testing.assert_close(loss, ref["recon"] + 0.3 * ref["kl"], rtol=1e-10, atol=1e-12)


def test_patch_discriminator_shape_and_groupnorm():
    d = PatchDiscriminator(3, channels=8, layers=3)
    assert d(torch.zeros(2, 3, 16, 24)).shape == (2, 1, 2, 3)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in d.modules())
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in d.modules()) == 2
    with pytest.raises(ValueError, match="disc_layers"):
        d(torch.zeros(1, 3, 4, 4))


def _grads(loss, params):
    return [torch.zeros_like(p) if g is None else g
            for p, g in zip(params, torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))]


def _norm(grads):
    return torch.sqrt(sum((g**2).sum() for g in grads))


def test_adversarial_terms_train_only_their_own_network():
    obj = objective(3)
    vae_p, disc_p = list(obj.tokenizer.parameters()), list(obj.discriminator.parameters())
    t = obj.terms(images(3, 16), generator=torch.Generator().manual_seed(4))
    assert _norm(_grads(t["g_adv"], disc_p)) == 0  # g_adv: D's weights detached
    assert _norm(_grads(t["g_adv"], vae_p)) > 1e-6
    assert _norm(_grads(t["d_loss"], vae_p)) == 0  # d_loss: reconstruction detached
    assert _norm(_grads(t["d_loss"], disc_p)) > 1e-6
    assert _norm(_grads(t["recon"] + t["kl"], disc_p)) == 0


@pytest.mark.parametrize("step", [2, 5])  # before / at disc_start = 5
def test_backward_gradients_before_and_after_disc_start(step):
    obj = objective(1)
    x = images(1, 16)
    vae_p, disc_p = list(obj.tokenizer.parameters()), list(obj.discriminator.parameters())
    t = obj.terms(x, generator=torch.Generator().manual_seed(6))
    f = adversarial_factor(step, 5)
    vae_ref = _grads(t["recon"] + 0.3 * t["kl"] + f * 0.7 * t["g_adv"], vae_p)
    disc_ref = _grads(t["d_loss"], disc_p)
    loss, _ = obj(x, step=step, generator=torch.Generator().manual_seed(6))
    loss.backward()
    assert all(p.grad is not None for p in obj.parameters())  # DDP: every parameter gets a gradient
    for p, g in zip(vae_p, vae_ref):
        torch.testing.assert_close(p.grad, g, rtol=1e-9, atol=1e-13)
    if step < 5:
        assert all(torch.count_nonzero(p.grad) == 0 for p in disc_p)
        # and the VAE gradient is that of recon + kl alone
        plain = _grads(t["recon"] + 0.3 * t["kl"], vae_p)
        assert all(torch.allclose(p.grad, g, rtol=1e-9, atol=1e-13) for p, g in zip(vae_p, plain))
    else:
        for p, g in zip(disc_p, disc_ref):
            torch.testing.assert_close(p.grad, g, rtol=1e-9, atol=1e-13)
        assert _norm([p.grad for p in disc_p]) > 1e-6


def test_param_groups_cover_every_parameter_once():
    obj = objective(3, disc_lr_mult=0.25)
    groups = obj.param_groups(lr=2e-3, weight_decay=0.05)
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in obj.parameters())
    names = {id(p): n for n, p in obj.named_parameters()}
    for g in groups:
        is_disc = g["name"].startswith("disc")
        assert all(names[id(p)].startswith("discriminator.") == is_disc for p in g["params"])
        mult = 0.25 if is_disc else 1.0
        assert g["lr"] == pytest.approx(2e-3 * mult) and g["lr_mult"] == mult
        no_decay = g["name"].endswith("no_decay")
        assert g["weight_decay"] == (0.0 if no_decay else 0.05)
        for p in g["params"]:
            assert (p.ndim < 2 or names[id(p)].endswith(".bias")) == no_decay
    torch.optim.AdamW(groups)  # accepted as is


def test_runs_under_ddp_across_disc_start(tmp_path):
    """find_unused_parameters=False raises on the 2nd step if any parameter got no gradient."""
    obj = objective(1, dtype=torch.float32, disc_start=1)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model = DistributedDataParallel(obj)
        opt = torch.optim.AdamW(obj.param_groups(1e-3, 0.01))
        g = torch.Generator().manual_seed(0)
        for step in range(3):
            loss, _ = model(images(1, 8, dtype=torch.float32), step=step, generator=g)
            opt.zero_grad()
            loss.backward()
            opt.step()
            assert torch.isfinite(loss)
    finally:
        dist.destroy_process_group()


def blobs(n: int = 16, size: int = 16, seed: int = 0) -> torch.Tensor:
    """(n, 1, size, size) grey Gaussian blobs in [-1, 1] with random centres and widths."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    c = 3 + (size - 6) * torch.rand(n, 2, generator=g)
    s = 1.5 + 2.5 * torch.rand(n, 1, 1, generator=g)
    r2 = (yy - c[:, 0, None, None]) ** 2 + (xx - c[:, 1, None, None]) ** 2
    return (2 * torch.exp(-r2 / (2 * s**2)) - 1)[:, None]


def test_training_reduces_reconstruction_error():
    torch.manual_seed(0)
    obj = KLVAEObjective(tiny_tokenizer(1, attention=False, dtype=torch.float32),
                         VAETrainConfig(kl_weight=1e-6, disc_weight=0.1, disc_start=60, disc_channels=8,
                                        disc_layers=2))
    opt = torch.optim.AdamW(obj.param_groups(lr=2e-3, weight_decay=0.0))
    x, g = blobs(), torch.Generator().manual_seed(1)
    history = []
    for step in range(120):
        loss, logs = obj(x, step=step, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(logs["recon"].item())
    assert sum(history[-10:]) / 10 < 0.5 * history[0], history[::10]


@pytest.mark.parametrize("channels", [1, 3])
def test_estimate_scaling_factor_is_one_over_std(channels):
    tok = tiny_tokenizer(channels)
    batches = [images(channels, 16, batch=3, seed=10), images(channels, 8, batch=2, seed=11) * 0.5]
    s = estimate_scaling_factor(tok, batches, generator=torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    latents = []
    for x in batches:  # same draws, in the same order, by hand
        mu, logvar = tok.encode_moments(x).chunk(2, dim=1)
        eps = torch.randn(mu.shape, generator=g, dtype=mu.dtype)
        latents.append((mu + torch.exp(0.5 * logvar) * eps).flatten())
    z = torch.cat(latents)
    n = z.numel()
    std = torch.sqrt(((z - z.mean()) ** 2).sum() / (n - 1)).item()
    assert s == pytest.approx(1.0 / std, rel=1e-10)
    assert s == pytest.approx(compute_scaling_factor(z), rel=1e-10)
    tok.config = dataclasses.replace(tok.config, scaling_factor=s)  # how a run stores it
    assert tok.scaling_factor == s
    with pytest.raises(ValueError, match="at least one image batch"):
        estimate_scaling_factor(tok, [])


def test_bad_configs_and_inputs_raise():
    for bad in (dict(recon_loss="l3"), dict(kl_weight=-1.0), dict(disc_weight=float("nan")),
                dict(disc_start=-1), dict(disc_start=1.5), dict(disc_lr_mult=0.0), dict(disc_channels=0),
                dict(disc_layers=0)):
        with pytest.raises(ValueError):
            VAETrainConfig(**bad)
    assert (adversarial_factor(4, 5), adversarial_factor(5, 5), adversarial_factor(6, 0)) == (0.0, 1.0, 1.0)
    cfg = kl_vae_preset("kl_f4_c4", in_channels=1, out_channels=3, block_out_channels=(8, 16, 16),
                        norm_num_groups=4)
    with pytest.raises(ValueError, match="in_channels == out_channels"):
        KLVAEObjective(KLTokenizer(cfg))
    obj = objective(1)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        obj(images(3, 8), step=0)
    with pytest.raises(ValueError, match="multiple of 4"):
        obj(images(1, 10), step=0)
