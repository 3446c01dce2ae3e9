"""The opt-in fast sampling path, and the guard that the exact (default) path did not move.

Exactness guard: ``exact_path_cases()`` runs the DEFAULT API (no fast-path keyword) on a tiny model
with fixed seeds; its outputs were written to ``tests/fixtures/exact_path_golden.pt`` BEFORE the fast
path was added, with the code of commit 388742d (``python tests/test_fast_path.py --write-golden``).
On the machine that wrote it they are reproduced bit for bit; elsewhere they agree to float32 noise.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffloss import cosine_diffusion, respace_timesteps
from diffloss.diffusion import annealed_step_counts
from mar import create_model
from mar.model import compile_for_sampling

GOLDEN = Path(__file__).resolve().parent / "fixtures" / "exact_path_golden.pt"


# ------------------------------------------------------------------ the exactness guard
def tiny_model(**kw):
    """mar_tiny at 16 px, stride 4 (seq_len 16, C 4); the head gets random weights (an untrained head
    outputs exactly 0 and would hide the transformer and the eps/variance arithmetic)."""
    args = dict(img_size=16, vae_stride=4, token_channels=4, num_classes=10, buffer_size=4,
                num_sampling_steps="10", attn_dropout=0.0, proj_dropout=0.0, label_drop_prob=0.5,
                generator=torch.Generator().manual_seed(0))
    args.update(kw)
    model = create_model("mar_tiny", **args)
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for p in model.diffloss.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def exact_path_cases(model) -> dict[str, torch.Tensor]:
    """Every output the guard pins, computed with the default arguments only."""
    out = {}
    gen = lambda s: torch.Generator().manual_seed(s)
    out["tokens_nocfg"] = model.sample_tokens(2, num_iter=4, labels=torch.tensor([1, 7]), generator=gen(11))
    out["tokens_cfg_linear"] = model.sample_tokens(2, num_iter=4, cfg=3.0, labels=torch.tensor([2, 9]),
                                                   temperature=0.9, generator=gen(12))
    out["tokens_cfg_constant_per_sample"] = model.sample_tokens(
        3, num_iter=5, cfg=2.0, cfg_schedule="constant", labels=torch.tensor([0, 4, 8]),
        generator=[gen(100 + i) for i in range(3)])
    out["tokens_uncond_16_iter"] = model.sample_tokens(1, num_iter=16, generator=gen(13))
    z = torch.randn(6, model.diffloss.net.cond_embed.in_features, generator=gen(14))
    out["head_nocfg"] = model.diffloss.sample(z, temperature=1.0, generator=gen(15))
    out["head_cfg"] = model.diffloss.sample(z, temperature=0.8, cfg=4.0, generator=gen(16))
    model.train()
    tokens = torch.randn(3, 4, 4, 4, generator=gen(17))
    loss = model(tokens, torch.tensor([3, 5, 6]), generator=gen(18))
    loss.backward()
    out["train_loss"] = loss.detach()
    out["train_grad_norms"] = torch.stack([p.grad.norm() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    model.eval()
    return out


def test_exact_path_matches_golden_values():
    if not GOLDEN.exists():
        pytest.fail(f"{GOLDEN} is missing: it is committed with the tests")
    golden = torch.load(GOLDEN, weights_only=True)
    got = exact_path_cases(tiny_model())
    assert set(got) == set(golden)
    for name, want in golden.items():
        assert got[name].shape == want.shape and got[name].dtype == want.dtype, name
        # Relative to the largest entry: an untrained-style head makes the first respaced step (t = 999,
        # abar ~ 1e-9) amplify by ~1e4, so entries span several orders of magnitude.
        err = (got[name] - want).abs().max().item()
        assert err <= 1e-5 * want.abs().max().item() + 1e-7, f"{name}: max abs error {err:.3e}"


def test_fast_path_plumbing_with_reference_settings_is_the_exact_path():
    """The fast-path branch with ddpm and a constant schedule equal to num_sampling_steps (10) takes the
    same draws and arithmetic as the exact path: bit-identical, also with per-sample generators."""
    model = tiny_model()
    gen = lambda s: torch.Generator().manual_seed(s)
    for cfg, generator in [(1.0, lambda: gen(11)), (3.0, lambda: [gen(100 + i) for i in range(2)])]:
        kw = dict(num_iter=4, cfg=cfg, labels=torch.tensor([1, 7]))
        exact = model.sample_tokens(2, generator=generator(), **kw)
        plumbed = model.sample_tokens(2, generator=generator(), diffusion_steps_schedule=(10, 10), **kw)
        assert torch.equal(exact, plumbed)
        explicit = model.sample_tokens(2, generator=generator(), sampler="ddpm", eta=0.0, autocast_dtype=None,
                                       diffusion_steps_schedule=None, **kw)
        assert torch.equal(exact, explicit)


# ------------------------------------------------------------------ DDIM
def _ref_abar() -> np.ndarray:
    """Independent cosine abar (float64 Python): beta_i = min(1 - a((i+1)/T)/a(i/T), 0.999)."""
    a = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return np.cumprod([1 - min(1 - a((i + 1) / 1000) / a(i / 1000), 0.999) for i in range(1000)])


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_one_ddim_step_by_hand(eta):
    diff = cosine_diffusion(10)
    g = torch.Generator().manual_seed(4)
    xt, eps, v, noise = (torch.randn(3, 2, generator=g, dtype=torch.float64) for _ in range(4))
    out, abar = torch.cat([eps, v], 1), _ref_abar()
    for idx in [9, 4, 1, 0]:
        a = abar[int(diff.timestep_map[idx])]
        a_prev = abar[int(diff.timestep_map[idx - 1])] if idx else 1.0
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a)) * math.sqrt(1 - a / a_prev)
        x0 = (xt - math.sqrt(1 - a) * eps) / math.sqrt(a)
        expect = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma**2) * eps + sigma * noise * 0.7
        t = torch.full((3,), idx)
        torch.testing.assert_close(diff.ddim_step(out, xt, t, noise, eta, 0.7), expect, rtol=1e-9, atol=1e-9)
        if idx == 0:  # the last step returns x0_hat, whatever eta and noise
            torch.testing.assert_close(diff.ddim_step(out, xt, t, noise, eta), x0, rtol=1e-9, atol=1e-9)


def _toy_net(v_value=None):
    """A denoiser-like toy: eps_hat = x_t + 0.3 sqrt(abar_t) tanh(x W), so x0_hat stays O(1) (a random
    eps at t = 999, where abar ~ 1e-9, would blow x up by ~1e4 and drown every difference)."""
    w = torch.randn(4, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 0.3
    abar = torch.from_numpy(_ref_abar())

    def net_fn(x, ts):
        eps = x + 0.3 * abar[ts].sqrt()[:, None] * torch.tanh(x @ w[:, :4])
        v = torch.tanh(x @ w[:, 4:]) if v_value is None else torch.full_like(eps, v_value)
        return torch.cat([eps, v], 1)
    return net_fn


def test_ddim_eta0_is_deterministic_and_a_chain_of_steps():
    diff, net_fn = cosine_diffusion(10), _toy_net()
    x_T = torch.randn(3, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    a = diff.ddim_sample_loop(net_fn, (3, 4), x_T, eta=0.0, generator=torch.Generator().manual_seed(1))
    b = diff.ddim_sample_loop(net_fn, (3, 4), x_T, eta=0.0, temperature=0.3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)  # no draws at eta = 0, and temperature only scales injected noise
    x = x_T
    for idx in reversed(range(10)):
        t = torch.full((3,), idx)
        x = diff.ddim_step(net_fn(x, diff.timestep_map[t]), x, t, None, 0.0)
    assert torch.equal(a, x)


@pytest.mark.parametrize("steps", [None, 10])
def test_ddim_eta1_equals_ddpm_when_the_variance_is_the_posterior_variance(steps):
    """eta = 1: the DDIM mean is algebraically the ancestral mean and sigma^2 = pvar_t, so with v = -1
    (learned-range variance at its lower end, log var = log pvar_t for t > 0) the two samplers coincide
    on the full 1000-step schedule and respaced; with a learned v they differ (DDIM ignores v)."""
    diff = cosine_diffusion(steps)
    K = diff.num_timesteps
    x_T = torch.randn(3, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    step_noise = torch.randn(K, 3, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    fixed = _toy_net(v_value=-1.0)
    ddpm = diff.p_sample_loop(fixed, (3, 4), x_T, 0.9, step_noise=step_noise)
    ddim = diff.ddim_sample_loop(fixed, (3, 4), x_T, eta=1.0, temperature=0.9, step_noise=step_noise)
    torch.testing.assert_close(ddim, ddpm, rtol=1e-9, atol=1e-9)
    if steps is not None:  # (on the full schedule beta_t ~ pvar_t, so the learned variance barely matters)
        learned = _toy_net()
        a = diff.ddim_sample_loop(learned, (3, 4), x_T, 1.0, 0.9, step_noise=step_noise)
        b = diff.p_sample_loop(learned, (3, 4), x_T, 0.9, step_noise=step_noise)
        assert b.abs().max() < 10 and (a - b).abs().max() > 0.05


def test_diffloss_ddim_cfg_halves_agree_at_eta0():
    """Deterministic DDIM with CFG: both halves start from the same x_T and get the same guided eps, so
    they stay identical (the ancestral sampler's halves differ by their fresh noise)."""
    model = tiny_model()
    z = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    seen = []
    h = model.diffloss.net.register_forward_hook(lambda m, a, o: seen.append(a[0].clone()))
    out = model.diffloss.sample(z, cfg=3.0, sampler="ddim", generator=torch.Generator().manual_seed(1))
    h.remove()
    assert len(seen) == 10 and out.shape == (3, 4)
    x_T = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    again = model.diffloss.sample(z, cfg=3.0, sampler="ddim", noise=(x_T, None))
    assert torch.equal(out, again)  # x_T is the only draw


# ------------------------------------------------------------------ annealed diffusion steps
def test_annealed_step_counts_formula():
    assert annealed_step_counts(100, 20, 5) == [100, 80, 60, 40, 20]
    assert annealed_step_counts(50, 50, 3) == [50, 50, 50]
    assert annealed_step_counts(7, 99, 1) == [7]
    assert annealed_step_counts(2, 1000, 4) == [2, 335, 667, 1000]
    cos = annealed_step_counts(100, 10, 5, "cosine")
    assert cos != annealed_step_counts(100, 10, 5, "linear") and cos[0] == 100 and cos[-1] == 10
    assert cos == [round(10 + 90 * (1 + math.cos(math.pi * k / 4)) / 2)
                                                          for k in range(5)]
    for bad in [(1, 10, 3, "linear"), (10, 2.5, 3, "linear"), (10, 5, 3, "exp"), (10, 5, 0, "linear")]:
        with pytest.raises(ValueError):
            annealed_step_counts(*bad)


def test_generation_uses_the_requested_step_counts_per_iteration():
    model = tiny_model()
    calls, net_calls = [], [0]
    inner = model.diffloss.sample

    def spy(*a, **kw):
        calls.append(kw["num_steps"])
        return inner(*a, **kw)

    model.diffloss.sample = spy
    h = model.diffloss.net.register_forward_hook(lambda *_: net_calls.__setitem__(0, net_calls[0] + 1))
    try:
        for shape in ("linear", "cosine"):
            calls.clear()
            net_calls[0] = 0
            model.sample_tokens(2, num_iter=6, cfg=2.0, labels=torch.tensor([3, 4]), diffusion_steps_schedule=(40, 5),
                                diffusion_steps_shape=shape, generator=torch.Generator().manual_seed(0))
            want = annealed_step_counts(40, 5, 6, shape)
            assert calls == want and want[0] == 40 and want[-1] == 5
            assert net_calls[0] == sum(want)  # one net call per respaced step
    finally:
        del model.diffloss.sample
        h.remove()
    cached = model.diffloss._respaced
    assert set(cached) == set(annealed_step_counts(40, 5, 6)) | set(annealed_step_counts(40, 5, 6, "cosine"))
    for k, diff in cached.items():
        assert diff.num_timesteps == k and torch.equal(diff.timestep_map, respace_timesteps(1000, k))
        assert model.diffloss.sampling_diffusion(k) is diff  # built once


def test_fast_path_per_sample_generators_are_batch_independent():
    model = tiny_model()
    labels, gens = torch.tensor([2, 5, 7]), lambda: [torch.Generator().manual_seed(100 + i) for i in range(3)]
    kw = dict(num_iter=4, cfg=1.5, diffusion_steps_schedule=(12, 3))
    for sampler, eta in [("ddim", 0.0), ("ddim", 0.7), ("ddpm", 0.0)]:
        batch = model.sample_tokens(3, labels=labels, generator=gens(), sampler=sampler, eta=eta, **kw)
        for i in range(3):
            one = model.sample_tokens(1, labels=labels[i:i + 1], generator=[gens()[i]], sampler=sampler, eta=eta, **kw)
            err = (one[0] - batch[i]).abs().max() / batch[i].abs().max()
            assert err < 1e-5, (sampler, eta, i, err)


# ------------------------------------------------------------------ static shapes (row_bucket)
def test_row_bucket_gives_the_same_tokens_with_few_static_shapes():
    """The head's rows padded to a multiple of R: its net sees only multiples of R (so CUDA graphs can capture
    them), the draws are unchanged, and the tokens equal the unpadded ones to float rounding, on the exact
    sampler, DDIM, per-sample generators and the feature cache."""
    model = tiny_model()
    seen = []
    hook = model.diffloss.net.register_forward_hook(lambda m, args, out: seen.append(len(args[0])))
    labels, gens = torch.tensor([2, 5, 7]), lambda: [torch.Generator().manual_seed(100 + i) for i in range(3)]
    cases = [dict(cfg=3.0), dict(cfg=1.0), dict(cfg=2.0, sampler="ddim", diffusion_steps_schedule=(8, 3)),
             dict(cfg=2.0, sampler="ddim", feature_cache="both", cache_refresh=2)]
    for kw in cases:
        seen.clear()
        ref = model.sample_tokens(3, num_iter=5, labels=labels, generator=gens(), **kw)
        plain = sorted(set(seen))
        seen.clear()
        padded = model.sample_tokens(3, num_iter=5, labels=labels, generator=gens(), row_bucket=32, **kw)
        assert len(plain) > 2 and all(n % 32 for n in plain), (kw, plain)  # the rows as they come: many counts
        assert set(seen) <= {32, 64} and seen, (kw, sorted(set(seen)))  # padded: multiples of 32 only
        assert _rel_err(padded, ref) < 1e-5, kw
    hook.remove()
    with pytest.raises(ValueError, match="row_bucket must be"):
        model.sample_tokens(1, num_iter=2, row_bucket=0)
    with pytest.raises(ValueError, match="row_bucket must be"):
        model.diffloss.sample(torch.randn(2, 64), row_bucket=2.5)


def test_row_padded_net_returns_the_real_rows():
    from diffloss.loss import pad_rows, padded_rows, row_padded

    assert [padded_rows(n, 8) for n in (1, 8, 9, 16)] == [8, 8, 16, 16] and padded_rows(5, None) == 5
    calls = []

    def net(x, t, c):
        calls.append((len(x), len(t), len(c)))
        return x * 2 + t[:, None] + c[:, :1]

    c = torch.arange(5.0)[:, None].repeat(1, 3)
    x, t = torch.ones(5, 2), torch.arange(5)
    out = row_padded(net, c, 4)(x, t, c)
    assert calls == [(8, 8, 8)] and torch.equal(out, net(x, t, c))
    assert torch.equal(pad_rows(x, 7)[5:], torch.zeros(2, 2))


# ------------------------------------------------------------------ autocast
def _rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def test_autocast_is_close_to_fp32_and_restores_frozen_parameters():
    model = tiny_model()
    x = torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(1))
    vis = torch.arange(9).expand(2, -1)
    ce = model.class_emb(torch.tensor([1, 2]))
    with torch.no_grad():
        z32 = model.forward_mae_decoder(model.forward_mae_encoder(x, vis, ce), vis)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z16 = model.forward_mae_decoder(model.forward_mae_encoder(x, vis, ce), vis)
    assert 0 < _rel_err(z16, z32) < 2e-2  # bf16 matmuls: an 8-bit mantissa
    kw = dict(num_iter=4, cfg=2.0, labels=torch.tensor([1, 7]), sampler="ddim")
    ref = model.sample_tokens(2, generator=torch.Generator().manual_seed(3), **kw)
    for dtype in (torch.float16, torch.bfloat16):  # (bf16 last: `fast` is compared below)
        fast = model.sample_tokens(2, generator=torch.Generator().manual_seed(3), autocast_dtype=dtype, **kw)
        assert fast.dtype == torch.float32 and 0 < _rel_err(fast, ref) < 5e-2, dtype
    model.requires_grad_(False)
    frozen = model.sample_tokens(2, generator=torch.Generator().manual_seed(3), autocast_dtype=torch.bfloat16, **kw)
    assert torch.equal(frozen, fast)  # same bf16 weights, cast once instead of per call
    assert not any(p.requires_grad for p in model.parameters())


# ------------------------------------------------------------------ options and errors
def test_bad_fast_path_options_are_rejected():
    model = tiny_model()
    run = lambda **kw: model.sample_tokens(1, num_iter=2, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="unknown sampler"):
        run(sampler="euler")
    with pytest.raises(ValueError, match="ddim"):
        run(eta=0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        run(sampler="ddim", eta=1.5)
    with pytest.raises(ValueError, match="diffusion_steps_schedule"):
        run(diffusion_steps_schedule=(100, 0))
    with pytest.raises(ValueError, match="autocast_dtype"):
        run(autocast_dtype=torch.float64)
    with pytest.raises(ValueError, match="num_steps"):
        model.diffloss.sample(torch.randn(2, 64), num_steps=1001)


def test_compile_for_sampling_keeps_parameter_names():
    """Compilation itself is left to the benchmarks (12-19 s cold); this checks the in-place wrapping."""
    model = tiny_model()
    keys = list(model.state_dict())
    assert compile_for_sampling(model) is model
    assert list(model.state_dict()) == keys
    assert all(b._compiled_call_impl is not None for b in model.encoder_blocks)
    assert model.diffloss.net._compiled_call_impl is not None
    # head_kwargs: the head (and an attached distilled head's student) compiled with its own, static settings
    from diffloss.distill import DistilledHead

    model = tiny_model()
    model.diffloss.attach_distilled(DistilledHead(4, model.diffloss.net.cond_embed.in_features, depth=1, width=8,
                                                  steps=(1,), teacher_steps=4))
    calls = []
    for module in (model.diffloss.net, model.diffloss.distilled_head.student.net, model.encoder_blocks[0]):
        module.compile = lambda m=module, **kw: calls.append((m, kw))
    compile_for_sampling(model, head_kwargs={"mode": "reduce-overhead", "dynamic": False})
    got = {id(m): kw for m, kw in calls}
    assert got[id(model.encoder_blocks[0])] == {"dynamic": True}
    assert got[id(model.diffloss.net)] == got[id(model.diffloss.distilled_head.student.net)] == {
        "mode": "reduce-overhead", "dynamic": False}


# ------------------------------------------------------------------ the quality benchmark script runs
def test_fast_path_quality_script_end_to_end(tmp_path, monkeypatch, capsys):
    """benchmarks/fast_path_quality.py on an untrained tiny model, a random tokenizer and a classifier
    trained for one epoch on the 200-image fixture: correctness of the plumbing only."""
    import json

    from mar.engine.checkpoint import export_safetensors
    from mar.eval.classifier import FashionClassifier, fashion_mnist_uint8, save_classifier, train_classifier
    from tokenizers import KLTokenizer, kl_vae_preset

    fixture = Path(__file__).resolve().parent / "fixtures" / "fashion-mnist"
    KLTokenizer(kl_vae_preset("kl_f4_c4", in_channels=1, out_channels=1)).save(tmp_path / "tok.safetensors")
    model_cfg = dict(preset="mar_tiny", img_size=32, vae_stride=4, token_channels=4, num_classes=10, buffer_size=4,
                     num_sampling_steps="10")
    model = tiny_model(img_size=32)  # same sizes as model_cfg, with a random head
    export_safetensors(model.state_dict(), tmp_path / "mar.safetensors", {"config": json.dumps(
        {"model": model_cfg, "tokenizer": {"preset": "kl_f4_c4", "checkpoint": str(tmp_path / "tok.safetensors")}})})
    x, y = fashion_mnist_uint8("train", str(fixture))
    clf = FashionClassifier()
    train_classifier(clf, x, y, epochs=1, generator=torch.Generator().manual_seed(0))
    save_classifier(clf, str(tmp_path / "clf.safetensors"))

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import fast_path_quality

    out = tmp_path / "out"
    variants = ["exact", "sampler=ddim,anneal=8-2,precision=bf16"]
    fast_path_quality.main(["--weights", str(tmp_path / "mar.safetensors"),
                            "--classifier", str(tmp_path / "clf.safetensors"),
                            "--fmnist-root", str(fixture), "--num-images", "12", "--batch", "8", "--num-iter", "4",
                            "--metrics", "fid,isc", "--variant", *variants, "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert list(results) == variants
    for spec in variants:
        files = sorted(p.name for p in (out / fast_path_quality.folder_name(spec)).iterdir())
        assert files == [f"{i:06d}_c{i % 10:03d}.png" for i in range(12)]
        r = results[spec]
        assert 0.0 <= r["class_accuracy"] <= 1.0 and math.isfinite(r["fd_fmnist"]) and r["s_per_image"] > 0
    assert results[variants[0]]["fd_fmnist"] != results[variants[1]]["fd_fmnist"]  # different images
    assert "speed-up" in capsys.readouterr().out

    # a variant's own guidance scale (cfg=W) overrides --cfg: the same images as the exact path run at --cfg W
    args = ["--weights", str(tmp_path / "mar.safetensors"), "--classifier", str(tmp_path / "clf.safetensors"),
            "--fmnist-root", str(fixture), "--num-images", "4", "--batch", "4", "--num-iter", "4", "--metrics", "fid"]
    fast_path_quality.main([*args, "--cfg", "3.0", "--variant", "exact", "cfg=1.0", "--out", str(tmp_path / "a")])
    fast_path_quality.main([*args, "--cfg", "1.0", "--variant", "exact", "--out", str(tmp_path / "b")])
    read = lambda d: [p.read_bytes() for p in sorted(d.iterdir())]  # noqa: E731
    assert read(tmp_path / "a" / "cfg_1.0") == read(tmp_path / "b" / "exact")
    assert read(tmp_path / "a" / "exact") != read(tmp_path / "b" / "exact")  # guidance changes the images


def test_variant_grammar():
    """benchmarks/common.parse_variant: every key maps to its sample_tokens keyword; cfg and iters are split off."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from common import parse_variant, split_cfg, split_num_iter

    v = parse_variant("sampler=ddim,steps=8,cache=both,refresh=4,iters=8,cfg=3.5")
    assert v == {"sampler": "ddim", "diffusion_steps_schedule": (8, 8), "feature_cache": "both", "cache_refresh": 4,
                 "num_iter": 8, "cfg": 3.5}
    rest, num_iter = split_num_iter(v, 16)
    rest, cfg = split_cfg(rest, 4.0)
    assert (num_iter, cfg) == (8, 3.5) and "num_iter" not in rest and "cfg" not in rest and "cfg" in v
    assert split_cfg(parse_variant("exact"), 4.0) == ({}, 4.0)
    with pytest.raises(ValueError, match="unknown variant key 'cgf'"):
        parse_variant("cgf=3")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write-golden"]:
        sys.exit("usage: python tests/test_fast_path.py --write-golden   (only when the exact path changes on purpose)")
    torch.save(exact_path_cases(tiny_model()), GOLDEN)
    print(f"wrote {GOLDEN}")
