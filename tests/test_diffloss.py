"""Tests of diffloss/mlp.py and diffloss/loss.py: checkpoint names and shapes, init, an independent
functional re-implementation of the denoiser, masking of the loss, and sampling with and without CFG
recomputed step by step by hand."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import diffloss.mlp as mlp_module
from diffloss import DiffLoss, SimpleMLPAdaLN, guided_model_output, respace_timesteps, timestep_embedding

MANIFEST = Path(__file__).resolve().parent / "fixtures" / "manifests" / "mar_base_state_dict.tsv"
C, D, W, DEPTH = 4, 6, 32, 2


def _randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.3) -> None:
    """Give every parameter random values (the zero-initialised net would output exactly 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def _tiny(steps="100", seed=0, dtype=torch.float32) -> DiffLoss:
    dl = DiffLoss(C, D, DEPTH, W, num_sampling_steps=steps).to(dtype)
    _randomize(dl, seed)
    return dl


def _reference_net(sd: dict, x, t, c, depth):
    """The SPEC's denoiser written out with plain tensor ops (float64)."""
    def lin(h, name):
        return h @ sd[name + ".weight"].T + sd[name + ".bias"]

    def ln(h, w=None, b=None):
        h = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-6)
        return h if w is None else h * w + b
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float64) / 128)
    args = t.double()[:, None] * freqs
    temb = lin(F.silu(lin(torch.cat([args.cos(), args.sin()], -1), "time_embed.mlp.0")), "time_embed.mlp.2")
    y = temb + lin(c, "cond_embed")
    h = lin(x, "input_proj")
    for i in range(depth):
        p = f"res_blocks.{i}."
        shift, scale, gate = lin(F.silu(y), p + "adaLN_modulation.1").chunk(3, -1)
        m = ln(h, sd[p + "in_ln.weight"], sd[p + "in_ln.bias"]) * (1 + scale) + shift
        h = h + gate * lin(F.silu(lin(m, p + "mlp.0")), p + "mlp.2")
    shift, scale = lin(F.silu(y), "final_layer.adaLN_modulation.1").chunk(2, -1)
    return lin(ln(h) * (1 + scale) + shift, "final_layer.linear")


# ----------------------------------------------------------------------------- the denoiser
def test_parameter_names_and_shapes_match_mar_base_checkpoint():
    expect = {}
    for line in MANIFEST.read_text().splitlines():
        key, shape, _ = line.split("\t")
        if key.startswith("diffloss."):
            expect[key[len("diffloss."):]] = tuple(int(s) for s in shape.split("x"))
    assert len(expect) == 60
    with torch.device("meta"):
        dl = DiffLoss(target_channels=16, z_channels=768, depth=6, width=1024)
    assert {k: tuple(v.shape) for k, v in dl.state_dict().items()} == expect
    # the schedules are plain CPU float64 tables, never on the default (here meta) device
    assert dl.train_diffusion.betas.device.type == "cpu" and dl.gen_diffusion.timestep_map.device.type == "cpu"


def test_timestep_embedding_formula():
    t = torch.tensor([0, 1, 10, 999])
    emb = timestep_embedding(t, 256, dtype=torch.float64)
    i = torch.arange(128, dtype=torch.float64)
    arg = t.double()[:, None] * torch.exp(-math.log(10000) * i / 128)
    torch.testing.assert_close(emb, torch.cat([arg.cos(), arg.sin()], -1), rtol=0, atol=1e-12)
    emb32 = timestep_embedding(t, 256)  # float32 as the reference: args rounded to float32
    assert emb32.dtype == torch.float32 and emb32.shape == (4, 256)
    torch.testing.assert_close(emb32.double(), emb, rtol=0, atol=2e-4)
    assert emb[0, :128].eq(1).all() and emb[0, 128:].eq(0).all()
    assert timestep_embedding(t, 7).shape == (4, 7) and timestep_embedding(t, 7)[:, -1].eq(0).all()


def test_init_zero_output_and_distributions():
    net = SimpleMLPAdaLN(C, 64, 2 * C, D, 3, generator=torch.Generator().manual_seed(0))
    x, c = torch.randn(5, C), torch.randn(5, D)
    assert torch.equal(net(x, torch.tensor([0, 1, 2, 500, 999]), c), torch.zeros(5, 2 * C))
    sd = net.state_dict()
    zero = [k for k in sd if "adaLN_modulation" in k or k.startswith("final_layer.linear")]
    assert len(zero) == 2 * 3 + 4 and all(sd[k].eq(0).all() for k in zero)
    for k, v in sd.items():
        if k.endswith(".bias") and "in_ln" not in k:
            assert v.eq(0).all(), k
        if "in_ln.weight" in k:
            assert v.eq(1).all()
    for k in ["time_embed.mlp.0.weight", "time_embed.mlp.2.weight"]:
        assert abs(sd[k].std().item() - 0.02) < 0.002, k
    for k in ["input_proj.weight", "cond_embed.weight", "res_blocks.0.mlp.0.weight", "res_blocks.2.mlp.2.weight"]:
        bound = math.sqrt(6 / sum(sd[k].shape))  # xavier_uniform
        assert sd[k].abs().max() <= bound and sd[k].abs().max() > 0.9 * bound, k
        assert abs(sd[k].std().item() - bound / math.sqrt(3)) < 0.1 * bound, k
    same = SimpleMLPAdaLN(C, 64, 2 * C, D, 3, generator=torch.Generator().manual_seed(0)).state_dict()
    other = SimpleMLPAdaLN(C, 64, 2 * C, D, 3, generator=torch.Generator().manual_seed(1)).state_dict()
    assert all(torch.equal(sd[k], same[k]) for k in sd)
    assert not torch.equal(sd["input_proj.weight"], other["input_proj.weight"])


def test_forward_matches_reference_implementation():
    net = SimpleMLPAdaLN(C, W, 2 * C, D, DEPTH).double()
    _randomize(net, seed=1)
    g = torch.Generator().manual_seed(2)
    x, c = torch.randn(7, C, generator=g, dtype=torch.float64), torch.randn(7, D, generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (7,), generator=g)
    torch.testing.assert_close(net(x, t, c), _reference_net(net.state_dict(), x, t, c, DEPTH), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="in_channels"):
        net(torch.zeros(7, C + 1, dtype=torch.float64), t, c)


def test_grad_checkpointing_same_values_and_grads(monkeypatch):
    calls = []
    real = mlp_module.checkpoint
    monkeypatch.setattr(mlp_module, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    nets = [SimpleMLPAdaLN(C, W, 2 * C, D, DEPTH, grad_checkpointing=ck) for ck in (False, True)]
    for net in nets:
        _randomize(net, seed=3)
    g = torch.Generator().manual_seed(4)
    x, c, t = torch.randn(5, C, generator=g), torch.randn(5, D, generator=g), torch.tensor([1, 2, 3, 4, 5])
    grads = []
    for net in nets:
        net(x, t, c).pow(2).sum().backward()
        grads.append([p.grad for p in net.parameters()])
    assert len(calls) == DEPTH
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        nets[1](x, t, c)
    assert len(calls) == DEPTH  # no checkpointing without grad


# ----------------------------------------------------------------------------- DiffLoss.forward
def test_forward_masked_loss_equals_manual_computation():
    dl = _tiny()
    g = torch.Generator().manual_seed(5)
    n = 10
    target, z = torch.randn(n, C, generator=g), torch.randn(n, D, generator=g)
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1, 1.0])
    seen = {}
    dl.net.register_forward_pre_hook(lambda m, args: seen.update(x=args[0], t=args[1]))
    loss = dl(target, z, mask, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    t = torch.randint(0, 1000, (n,), generator=g)
    noise = torch.randn(n, C, generator=g)
    assert torch.equal(seen["t"], t)
    torch.testing.assert_close(seen["x"], dl.train_diffusion.q_sample(target, t, noise))
    row = dl.train_diffusion.training_losses(dl.net, target, t, z, noise)
    torch.testing.assert_close(loss, (row * mask).sum() / mask.sum())
    assert not torch.allclose(loss, row.mean())
    # rows with mask 0 do not count
    target2 = target.clone()
    target2[mask == 0] += 5.0
    torch.testing.assert_close(dl(target2, z, mask, generator=torch.Generator().manual_seed(7)), loss)
    torch.testing.assert_close(dl(target, z, generator=torch.Generator().manual_seed(7)), row.mean())
    torch.testing.assert_close(dl(target, z, torch.ones(n), generator=torch.Generator().manual_seed(7)), row.mean())
    loss.backward()
    assert all(p.grad is not None for p in dl.parameters())


def test_forward_rejects_bad_shapes():
    dl = _tiny()
    with pytest.raises(ValueError, match="target"):
        dl(torch.zeros(3, C + 1), torch.zeros(3, D))
    with pytest.raises(ValueError, match="z must"):
        dl(torch.zeros(3, C), torch.zeros(4, D))
    with pytest.raises(ValueError, match="mask"):
        dl(torch.zeros(3, C), torch.zeros(3, D), torch.ones(4))


# ----------------------------------------------------------------------------- DiffLoss.sample
def _hand_sample(dl: DiffLoss, z, temperature, cfg, seed):
    """Sampling written out step by step (CFG as in SPEC section 3)."""
    diff, g = dl.gen_diffusion, torch.Generator().manual_seed(seed)
    guided = cfg != 1.0
    n = len(z) // 2 if guided else len(z)
    x = torch.randn(n, C, generator=g, dtype=z.dtype)
    if guided:
        x = torch.cat([x, x])
    timesteps = []
    for idx in reversed(range(diff.num_timesteps)):
        t_orig = torch.full((len(z),), int(diff.timestep_map[idx]))
        timesteps.append(int(t_orig[0]))
        if guided:
            out = dl.net(torch.cat([x[:n], x[:n]]), t_orig, z)
            eps = out[n:, :C] + cfg * (out[:n, :C] - out[n:, :C])
            out = torch.cat([torch.cat([eps, eps]), out[:, C:]], 1)  # variance channels per half
        else:
            out = dl.net(x, t_orig, z)
        noise = torch.randn(len(z), C, generator=g, dtype=z.dtype)
        x = diff.p_sample(out, x, torch.full((len(z),), idx), noise, temperature)
    return x[:n], timesteps


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_sample_equals_hand_loop(cfg):
    dl = _tiny(steps="5", dtype=torch.float64)
    z = torch.randn(6, D, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    out = dl.sample(z, temperature=0.8, cfg=cfg, generator=torch.Generator().manual_seed(9))
    ref, timesteps = _hand_sample(dl, z, 0.8, cfg, seed=9)
    assert out.shape == ((3 if cfg != 1.0 else 6), C) and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert timesteps == [999, 749, 500, 250, 0]


def test_cfg_initial_noise_is_shared_by_both_halves(monkeypatch):
    """The uncond half of x never reaches the output, so the initial noise is checked at the loop's input."""
    dl = _tiny(steps=3)
    seen = {}
    real = dl.gen_diffusion.p_sample_loop

    def spy(net_fn, shape, noise, *args, **kwargs):
        seen["noise"] = noise.clone()
        return real(net_fn, shape, noise, *args, **kwargs)
    monkeypatch.setattr(dl.gen_diffusion, "p_sample_loop", spy)
    dl.sample(torch.randn(6, D), cfg=2.5, generator=torch.Generator().manual_seed(12))
    expect = torch.randn(3, C, generator=torch.Generator().manual_seed(12))
    assert torch.equal(seen["noise"], torch.cat([expect, expect]))


def test_guided_model_output_combines_eps_and_keeps_variance_per_half():
    dl = _tiny()
    g = torch.Generator().manual_seed(10)
    x, z, t = torch.randn(6, C, generator=g), torch.randn(6, D, generator=g), torch.full((6,), 500)
    raw = dl.net(torch.cat([x[:3], x[:3]]), t, z)
    for s in [1.0, 4.0]:
        out = guided_model_output(dl.net, x, t, z, s)
        eps = raw[3:, :C] + s * (raw[:3, :C] - raw[3:, :C])
        torch.testing.assert_close(out[:3, :C], eps)
        torch.testing.assert_close(out[3:, :C], eps)
        torch.testing.assert_close(out[:, C:], raw[:, C:])  # variance channels of each half, unmixed
        assert not torch.allclose(out[:3, C:], out[3:, C:])
    torch.testing.assert_close(guided_model_output(dl.net, x, t, z, 1.0)[:, :C], torch.cat([raw[:3, :C]] * 2))


def test_sample_determinism_temperature_and_errors():
    dl = _tiny(steps=4)
    z = torch.randn(8, D, generator=torch.Generator().manual_seed(11))
    a = dl.sample(z, cfg=2.0, generator=torch.Generator().manual_seed(0))
    b = dl.sample(z, cfg=2.0, generator=torch.Generator().manual_seed(0))
    c = dl.sample(z, cfg=2.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    cold = [dl.sample(z, temperature=0.0, generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    assert not torch.allclose(cold[0], cold[1])  # only x_T differs...
    x_T = torch.randn(8, C, generator=torch.Generator().manual_seed(0))
    fixed = dl.gen_diffusion.p_sample_loop(lambda x, t: dl.net(x, t, z), (8, C), x_T, 0.0,
                                           torch.Generator().manual_seed(5))
    torch.testing.assert_close(cold[0], fixed)  # ...the injected noise has no effect at temperature 0
    with pytest.raises(ValueError, match="even"):
        dl.sample(z[:5], cfg=2.0)


@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_sample_with_explicit_noise_equals_generator_draws(cfg):
    dl = _tiny(steps=4)
    z = torch.randn(6, D, generator=torch.Generator().manual_seed(13))
    n = 3 if cfg != 1.0 else 6
    g = torch.Generator().manual_seed(14)
    x_T = torch.randn(n, C, generator=g)
    per_step = torch.stack([torch.randn(6, C, generator=g) for _ in range(4)])
    out = dl.sample(z, 0.9, cfg, noise=(x_T, per_step))
    torch.testing.assert_close(out, dl.sample(z, 0.9, cfg, generator=torch.Generator().manual_seed(14)), rtol=0, atol=0)
    with pytest.raises(ValueError, match="x_T"):
        dl.sample(z, cfg=cfg, noise=(x_T[:2], per_step))
    with pytest.raises(ValueError, match="step_noise"):
        dl.sample(z, cfg=cfg, noise=(x_T, per_step[:3]))


def test_set_sampling_steps():
    dl = _tiny()
    assert torch.equal(dl.gen_diffusion.timestep_map, respace_timesteps(1000, 100))
    assert dl.num_sampling_steps == 100
    dl.set_sampling_steps("10")
    assert dl.num_sampling_steps == 10
    assert torch.equal(dl.gen_diffusion.timestep_map, respace_timesteps(1000, 10))
    assert dl.train_diffusion.num_timesteps == 1000
    seen = []
    dl.net.register_forward_pre_hook(lambda m, args: seen.append(int(args[1][0])))
    dl.sample(torch.randn(2, D))
    assert seen == respace_timesteps(1000, 10).flip(0).tolist()
