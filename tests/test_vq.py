"""Tests for tokenizers/vq.py: nearest-code lookup and ties, the straight-through estimator, the VQ-VAE loss terms
and where their gradients go, dead-code restart, usage/perplexity, shapes and stride, initialisation from a
generator, save/load and open_tokenizer, the continuous view, and a few training steps. Numbers are compared with
independent computations (python loops, explicit broadcasting, hand formulas)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tokenizers import (
    KLTokenizer,
    KLVAEConfig,
    VQConfig,
    VQContinuousTokens,
    VQObjective,
    VQTokenizer,
    VQTrainConfig,
    codebook_statistics,
    kl_vae_preset,
    open_tokenizer,
    tokenizer_kind,
    vq_preset,
)

# Tiny VQ: 1 channel, 2 levels (stride 2), C = 4, K = 16.
TINY = VQConfig(in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
                codebook_size=16, norm_num_groups=4)
TINY_KL = KLVAEConfig(in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                      latent_channels=4, norm_num_groups=4)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny(seed: int = 0, config: VQConfig = TINY) -> VQTokenizer:
    return VQTokenizer(config, generator=gen(seed))


def images(b: int = 2, c: int = 1, size: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.rand(b, c, size, size, generator=gen(seed)) * 2 - 1


def set_codebook(tok: VQTokenizer, values: torch.Tensor) -> None:
    with torch.no_grad():
        tok.codebook.copy_(values)


def brute_force_codes(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Python loops: for each position the first k with the smallest sum_c (z_c - e_kc)^2 (strict <)."""
    b, c, h, w = z.shape
    out = torch.empty(b, h, w, dtype=torch.long)
    for i in range(b):
        for y in range(h):
            for x in range(w):
                best, best_d = -1, math.inf
                for k in range(codebook.shape[0]):
                    d = sum((float(z[i, ch, y, x]) - float(codebook[k, ch])) ** 2 for ch in range(c))
                    if d < best_d:
                        best, best_d = k, d
                out[i, y, x] = best
    return out


# ---- lookup ----------------------------------------------------------------------------------------------------
def test_lookup_matches_brute_force_on_random_values():
    tok = tiny()
    set_codebook(tok, torch.randn(16, 4, generator=gen(2)))
    z = torch.randn(2, 4, 3, 5, generator=gen(3))
    codes = tok.lookup(z)
    assert codes.shape == (2, 3, 5) and codes.dtype == torch.int64
    # explicit broadcasting: (N, K) squared distances; make sure no near-tie makes the comparison ambiguous
    d = (z.permute(0, 2, 3, 1).reshape(-1, 1, 4) - tok.codebook.detach()[None]).square().sum(-1)
    top2 = d.topk(2, dim=1, largest=False).values
    assert (top2[:, 1] - top2[:, 0]).min() > 1e-4
    assert torch.equal(codes.flatten(), d.argmin(1))
    assert torch.equal(codes, brute_force_codes(z, tok.codebook.detach()))


def test_lookup_exact_ties_pick_the_lowest_index():
    tok = tiny()
    book = 10.0 + torch.arange(16.0)[:, None] * torch.ones(16, 4)  # far from everything below
    v = torch.tensor([0.5, -1.0, 2.0, 0.25])
    book[5] = v
    book[2] = v  # an exact duplicate: distance 0 at codes 2 and 5
    book[9] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    book[7] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # equidistant (1) from z = 0 with code 9
    book[12] = torch.tensor([0.0, 0.0, -1.0, 0.0])  # also at distance 1, higher index
    set_codebook(tok, book)
    z = torch.zeros(1, 4, 1, 2)
    z[0, :, 0, 0] = v
    codes = tok.lookup(z)
    assert codes.tolist() == [[[2, 7]]]
    assert torch.equal(codes, brute_force_codes(z, book))


# ---- straight-through estimator and loss terms -----------------------------------------------------------------
def test_straight_through_gradient_is_identity_and_values_are_codebook_vectors():
    tok = tiny()
    z = torch.randn(2, 4, 3, 3, generator=gen(4), requires_grad=True)
    w = torch.randn(2, 4, 3, 3, generator=gen(5))
    z_q, codes, _ = tok.quantize(z)
    assert torch.equal(codes, brute_force_codes(z.detach(), tok.codebook.detach()))
    manual = tok.codebook.detach()[codes].permute(0, 3, 1, 2)  # (B, h, w, C) -> (B, C, h, w)
    assert torch.equal(z_q, manual) and torch.equal(tok.codes_to_latent(codes), manual)
    (w * z_q).sum().backward()
    assert torch.equal(z.grad, w)
    assert tok.codebook.grad is None  # the codebook learns only from the codebook term


def test_loss_values_and_where_their_gradients_go():
    tok = tiny()
    set_codebook(tok, torch.randn(16, 4, generator=gen(6)) * 0.5)
    z0 = torch.randn(2, 4, 3, 3, generator=gen(7))
    codes = brute_force_codes(z0, tok.codebook.detach())
    book = tok.codebook.detach().clone()
    n = z0.numel()
    # hand computation with loops over positions
    total = 0.0
    grad_book = torch.zeros(16, 4)
    for i in range(2):
        for y in range(3):
            for x in range(3):
                k = int(codes[i, y, x])
                diff = z0[i, :, y, x] - book[k]
                total += float(diff.square().sum())
                grad_book[k] -= 2.0 * diff / n
    hand = total / n
    e_hand = book[codes].permute(0, 3, 1, 2)

    z = z0.clone().requires_grad_(True)
    _, got_codes, terms = tok.quantize(z)
    assert torch.equal(got_codes, codes)
    assert terms["codebook"].item() == pytest.approx(hand, rel=1e-6)
    assert terms["commitment"].item() == pytest.approx(hand, rel=1e-6)  # same value, different gradient
    terms["codebook"].backward(retain_graph=True)
    assert z.grad is None  # codebook term: codebook only
    torch.testing.assert_close(tok.codebook.grad, grad_book, rtol=1e-5, atol=1e-7)
    used = torch.zeros(16, dtype=torch.bool)
    used[codes.unique()] = True
    assert torch.all(tok.codebook.grad[~used] == 0)
    tok.codebook.grad = None
    terms["commitment"].backward()
    assert tok.codebook.grad is None  # commitment term: encoder output only
    torch.testing.assert_close(z.grad, 2.0 * (z0 - e_hand) / n, rtol=1e-5, atol=1e-7)


def test_objective_loss_is_recon_plus_codebook_plus_beta_commitment():
    tok = tiny(config=VQConfig(**{**TINY.to_dict(), "beta": 0.4}))
    obj = VQObjective(tok, VQTrainConfig(recon_loss="l2")).eval()
    x = images()
    with torch.no_grad():
        loss, logs = obj(x, step=0)
        z = tok.encode_latent(x)
        codes = brute_force_codes(z, tok.codebook)
        e = tok.codebook[codes].permute(0, 3, 1, 2)
        recon = tok.vq.decoder(tok.vq.post_quant_conv(e))
    assert set(logs) == {"recon", "codebook", "commitment", "usage", "perplexity", "dead"}
    assert logs["recon"].item() == pytest.approx((x - recon).square().mean().item(), rel=1e-5)
    assert logs["codebook"].item() == pytest.approx((z - e).square().mean().item(), rel=1e-5)
    expected = logs["recon"] + logs["codebook"] + 0.4 * logs["commitment"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert all(not v.requires_grad and v.ndim == 0 for v in logs.values())


# ---- usage / perplexity ----------------------------------------------------------------------------------------
def test_usage_and_perplexity_on_a_known_histogram():
    codes = torch.tensor([[[0, 0, 0, 0], [1, 1, 2, 2]]])  # histogram of K = 8: 4, 2, 2, 0, ...
    usage, ppl = codebook_statistics(codes, 8)
    assert usage.item() == pytest.approx(3 / 8)
    entropy = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert ppl.item() == pytest.approx(math.exp(entropy), rel=1e-6)
    assert ppl.item() == pytest.approx(2**1.5, rel=1e-6)
    usage, ppl = codebook_statistics(torch.arange(8).reshape(1, 2, 4), 8)  # uniform: perplexity K
    assert usage.item() == 1.0 and ppl.item() == pytest.approx(8.0, rel=1e-6)
    usage, ppl = codebook_statistics(torch.full((1, 2, 2), 3), 8)
    assert usage.item() == 1 / 8 and ppl.item() == pytest.approx(1.0)

    tok = tiny()
    obj = VQObjective(tok).eval()
    x = images(b=3)
    with torch.no_grad():
        _, logs = obj(x, step=0)
        counts = torch.bincount(tok.encode(x).flatten(), minlength=16).double()
    p = counts[counts > 0] / counts.sum()
    assert logs["usage"].item() == pytest.approx(len(p) / 16)
    assert logs["perplexity"].item() == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-5)


# ---- dead-code restart -----------------------------------------------------------------------------------------
def test_restart_changes_only_dead_codes_with_batch_vectors_and_is_deterministic():
    obj = VQObjective(tiny(), VQTrainConfig(dead_after_steps=3))
    counts = torch.tensor([0, 5, 2, 3, 0, 1, 9, 0, 0, 2, 0, 0, 3, 0, 1, 0])
    obj.unused_steps.copy_(counts)
    z_flat = torch.randn(10, 4, generator=gen(8))
    before = obj.tokenizer.codebook.detach().clone()
    twin = copy.deepcopy(obj)
    idx = obj.restart_dead_codes(z_flat, gen(11))
    assert idx.tolist() == [1, 3, 6, 12]
    after = obj.tokenizer.codebook.detach()
    live = torch.ones(16, dtype=torch.bool)
    live[idx] = False
    assert torch.equal(after[live], before[live])  # bit for bit
    picked = []
    for k in idx.tolist():
        matches = [j for j in range(10) if torch.equal(after[k], z_flat[j])]
        assert len(matches) == 1
        picked.append(matches[0])
    assert len(set(picked)) == len(picked)  # distinct batch vectors while the batch has enough
    expected_counts = counts.clone()
    expected_counts[idx] = 0
    assert torch.equal(obj.unused_steps, expected_counts)
    assert obj.dead_codes().numel() == 0
    assert twin.restart_dead_codes(z_flat, gen(11)).tolist() == [1, 3, 6, 12]
    assert torch.equal(twin.tokenizer.codebook, obj.tokenizer.codebook)  # same generator, same restart
    other = copy.deepcopy(twin)
    other.unused_steps.copy_(counts)
    other.restart_dead_codes(z_flat, gen(12))
    assert not torch.equal(other.tokenizer.codebook, obj.tokenizer.codebook)
    # fewer batch rows than dead codes: drawn with replacement, still batch vectors
    few = torch.randn(2, 4, generator=gen(9))
    obj.unused_steps.copy_(counts)
    obj.restart_dead_codes(few, gen(0))
    assert all(any(torch.equal(obj.tokenizer.codebook[k], r) for r in few) for k in (1, 3, 6, 12))


def test_training_forward_counts_steps_and_restarts_unused_codes():
    tok = tiny()
    obj = VQObjective(tok, VQTrainConfig(dead_after_steps=2)).train()
    x = images(b=1, size=4)  # 4 positions -> at most 4 of the 16 codes used
    with torch.no_grad():
        used = torch.zeros(16, dtype=torch.bool)
        used[tok.encode(x).unique()] = True
    with pytest.raises(ValueError, match="generator"):
        obj(x, step=0)
    obj(x, step=0, generator=gen(0))
    assert torch.equal(obj.unused_steps, (~used).long())
    obj(x, step=0, generator=gen(0))  # a second micro-batch of the same step counts once
    assert torch.equal(obj.unused_steps, (~used).long())
    with torch.no_grad():  # no grad: nothing counted
        obj(x, step=5, generator=gen(0))
    obj.eval()
    obj(x, step=5)  # eval: nothing counted, no generator needed
    obj.train()
    assert torch.equal(obj.unused_steps, (~used).long())
    before = tok.codebook.detach().clone()
    _, logs = obj(x, step=1, generator=gen(0))
    assert logs["dead"].item() == (~used).sum().item()
    assert torch.equal(obj.unused_steps, torch.zeros(16, dtype=torch.long))
    after = tok.codebook.detach()
    assert torch.equal(after[used], before[used])  # live codes untouched
    with torch.no_grad():
        z_flat = tok.encode_latent(x).permute(0, 2, 3, 1).reshape(-1, 4)
    assert all(any(torch.equal(after[k], r) for r in z_flat) for k in torch.nonzero(~used).flatten().tolist())
    off = VQObjective(tiny(), VQTrainConfig(dead_after_steps=1, restart_dead_codes=False)).train()
    book = off.tokenizer.codebook.detach().clone()
    _, logs = off(x, step=0)  # no restart: no generator needed, codebook unchanged, dead codes reported
    assert logs["dead"].item() == (~used).sum().item() and torch.equal(off.tokenizer.codebook, book)


def test_restart_under_torch_distributed_runs_the_collectives(tmp_path):
    """A one-process gloo group: the all_reduce (MAX) of the used flags and the broadcast of the new vectors run
    and give the same result as without a group (with one rank, rank 0's choice is the only one)."""
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group already running")
    x = images(b=1, size=4)
    plain = VQObjective(tiny(), VQTrainConfig(dead_after_steps=1)).train()
    twin = copy.deepcopy(plain)
    plain(x, step=0, generator=gen(3))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        _, logs = twin(x, step=0, generator=gen(3))
    finally:
        dist.destroy_process_group()
    assert logs["dead"].item() > 0
    assert torch.equal(twin.tokenizer.codebook, plain.tokenizer.codebook)
    assert torch.equal(twin.unused_steps, plain.unused_steps)


# ---- shapes, stride, architecture, initialisation --------------------------------------------------------------
def test_fmnist_preset_shapes_and_stride_match_the_kl_preset():
    config = vq_preset("vq_f4_c8_k512", in_channels=1, out_channels=1)
    assert config.stride == kl_vae_preset("kl_f4_c8").stride == 4
    assert vq_preset("vq_f4_c8_k256").codebook_size == 256 and vq_preset("vq16").stride == 16
    tok = VQTokenizer(config, generator=gen(0))
    assert (tok.kind, tok.stride, tok.codebook_size, tok.token_channels, tok.latent_channels) == \
        ("discrete", 4, 512, 512, 8)
    assert tok.token_shape(32, 32) == (8, 8)
    x = images(b=2, size=32)
    with torch.no_grad():
        z = tok.encode_latent(x)
        codes = tok.encode(x)
        out = tok.decode(codes)
    assert z.shape == (2, 8, 8, 8) and codes.shape == (2, 8, 8) and codes.dtype == torch.int64
    assert out.shape == (2, 1, 32, 32)
    assert torch.equal(tok.sample_from_moments(tok.encode_moments(x)), codes)
    # the same encoder/decoder as the KL tokenizer of those widths (the KL encoder emits 2C: mean and logvar)
    kl = KLTokenizer(kl_vae_preset("kl_f4_c8", in_channels=1, out_channels=1))
    kl_shapes = {k: v.shape for k, v in kl.vae.state_dict().items()}
    for k, v in tok.vq.state_dict().items():
        if k.startswith(("encoder.", "decoder.")) and not k.startswith("encoder.conv_out"):
            assert kl_shapes[k] == v.shape, k
    assert tok.vq.state_dict()["encoder.conv_out.weight"].shape[0] == 8
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        tok.encode(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="not divisible by the tokenizer stride 4"):
        tok.encode(torch.zeros(1, 1, 30, 32))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 512\)"):
        tok.decode(torch.full((1, 8, 8), 512))
    with pytest.raises(ValueError, match="integer codes"):
        tok.decode(torch.zeros(1, 8, 8))


def test_initialisation_comes_from_the_generator_only():
    state = torch.get_rng_state()
    a, b, c = tiny(3), tiny(3), tiny(4)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG was not used
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["vq.quantize.embedding.weight"], sc["vq.quantize.embedding.weight"])
    assert a.codebook.abs().max() <= 1 / 16
    w = sa["vq.encoder.conv_in.weight"]  # PyTorch's default bound 1/sqrt(fan_in), fan_in = 1 * 3 * 3
    assert w.abs().max() <= 1 / 3 and w.abs().max() > 0.25
    with torch.random.fork_rng():  # without a generator: the global seed decides, the state is not advanced
        torch.manual_seed(123)
        d = VQTokenizer(TINY)
        torch.rand(3)
        e = VQTokenizer(TINY)
    assert torch.equal(d.codebook, e.codebook)


def test_config_checks_name_the_fix():
    with pytest.raises(ValueError, match="valid keys"):
        VQConfig.from_dict({"codebook": 3})
    assert VQConfig.from_dict(TINY.to_dict()) == TINY
    with pytest.raises(ValueError, match="divisible by norm_num_groups"):
        VQConfig(block_out_channels=(8, 12), norm_num_groups=8)
    with pytest.raises(ValueError, match="codebook_size"):
        VQConfig(codebook_size=1)
    with pytest.raises(ValueError, match="beta"):
        VQConfig(beta=-1.0)
    with pytest.raises(ValueError, match="scaling_factor"):
        VQConfig(scaling_factor=0.0)
    with pytest.raises(ValueError, match="vq_f4_c8_k512"):
        vq_preset("vq_nope")
    with pytest.raises(ValueError, match="recon_loss"):
        VQTrainConfig(recon_loss="l3")
    with pytest.raises(ValueError, match="dead_after_steps"):
        VQTrainConfig(dead_after_steps=0)
    with pytest.raises(ValueError, match="in_channels == out_channels"):
        VQObjective(tiny(config=VQConfig(**{**TINY.to_dict(), "out_channels": 3})))


# ---- files, open_tokenizer, the continuous view, the kind helper -----------------------------------------------
def test_save_load_round_trip_and_open_tokenizer(tmp_path):
    tok = tiny(5)
    path = tmp_path / "vq.safetensors"
    tok.save(path)
    loaded = VQTokenizer.load(path)
    assert loaded.config == TINY and not loaded.training
    ours, theirs = tok.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    x = images()
    tok.eval()  # the same mode as the loaded one (diffusers' attention may take another kernel when training)
    with torch.no_grad():
        codes = tok.encode(x)
        assert torch.equal(codes, loaded.encode(x)) and torch.equal(tok.decode(codes), loaded.decode(codes))
    for preset in ("kl16", "vq_f4_c8_k512"):  # the file's format decides, whatever the preset
        opened = open_tokenizer(path, preset)
        assert isinstance(opened, VQTokenizer) and opened.config == TINY
    assert open_tokenizer(path, scaling_factor=0.5).config.scaling_factor == 0.5
    kl_path = tmp_path / "kl.safetensors"
    KLTokenizer(TINY_KL).save(kl_path)
    assert isinstance(open_tokenizer(kl_path, "vq16"), KLTokenizer)
    fresh = open_tokenizer(None, "vq_f4_c8_k256", in_channels=1)
    assert isinstance(fresh, VQTokenizer) and fresh.codebook_size == 256 and fresh.in_channels == 1
    assert isinstance(open_tokenizer(None, TINY), VQTokenizer)
    # wrong files
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        VQTokenizer.load(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="KL-VAE tokenizer.*KLTokenizer.load"):
        VQTokenizer.load(kl_path)
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(1)}, str(plain))
    with pytest.raises(ValueError, match="no VQTokenizer config.*VQTokenizer.save"):
        VQTokenizer.load(plain)
    with pytest.raises(ValueError, match="not a VQ tokenizer file"):
        open_tokenizer(plain, "vq16")
    junk = tmp_path / "junk.ckpt"
    junk.write_text("x")
    with pytest.raises(ValueError, match="not a VQ tokenizer file"):
        open_tokenizer(junk, "vq16")
    with pytest.raises(ValueError, match="already continuous"):
        open_tokenizer(kl_path, continuous=True)
    with pytest.raises(ValueError, match="already continuous"):
        open_tokenizer(None, TINY_KL, continuous=True)


def test_continuous_view_shares_weights_and_decodes_like_the_codes(tmp_path):
    tok = tiny(6)
    view = tok.as_continuous(0.5)
    assert isinstance(view, VQContinuousTokens)
    assert (view.kind, view.token_channels, view.stride, view.in_channels, view.scaling_factor) == \
        ("continuous", 4, 2, 1, 0.5)
    assert view.token_shape(8, 8) == (4, 4, 4) and view.config == VQConfig(**{**TINY.to_dict(),
                                                                                 "scaling_factor": 0.5})
    assert view.tokenizer is tok and {id(p) for p in view.parameters()} == {id(p) for p in tok.parameters()}
    assert tok.as_continuous().scaling_factor == TINY.scaling_factor
    x = images(b=3)
    with torch.no_grad():
        tokens = view.encode(x)
        assert torch.equal(tokens, tok.encode_latent(x) * 0.5)
        assert torch.equal(view.sample_from_moments(view.encode_moments(x)), tokens)
        assert torch.equal(view.decode(tokens), tok.decode(tok.encode(x)))
        assert torch.equal(tok.decode_latent(tokens / 0.5), tok.decode(tok.encode(x)))
    assert torch.equal(view.to_uint8(torch.tensor([[[[-1.0, 1.0]]]])), torch.tensor([[[[0], [255]]]],
                                                                                   dtype=torch.uint8))
    path = tmp_path / "vq.safetensors"
    tok.save(path)
    opened = open_tokenizer(path, continuous=True, scaling_factor=0.5)
    assert isinstance(opened, VQContinuousTokens) and opened.scaling_factor == 0.5
    with torch.no_grad():
        assert torch.equal(opened.encode(x), tokens)
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\)"):
        view.decode(torch.zeros(1, 3, 4, 4))


def test_tokenizer_kind_helper():
    assert tokenizer_kind("kl16") == "continuous" and tokenizer_kind("kl_f4_c8") == "continuous"
    assert tokenizer_kind("vq16") == "discrete" and tokenizer_kind("vq_f4_c8_k512") == "discrete"
    assert tokenizer_kind("vq_f4_c8_k256", continuous=True) == "continuous"
    with pytest.raises(ValueError, match="already continuous"):
        tokenizer_kind("kl16", continuous=True)
    with pytest.raises(ValueError, match=r"kl16.*vq16"):
        tokenizer_kind("mystery")


# ---- training --------------------------------------------------------------------------------------------------
def test_param_groups_and_a_few_training_steps_reduce_the_loss():
    tok = tiny(7)
    obj = VQObjective(tok, VQTrainConfig(dead_after_steps=2)).train()
    groups = obj.param_groups(lr=3e-3, weight_decay=0.05)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"vq_decay", "vq_no_decay", "codebook"}
    assert by_name["codebook"]["params"] == [tok.codebook] and by_name["codebook"]["weight_decay"] == 0.0
    assert by_name["vq_decay"]["weight_decay"] == 0.05 and all(g["lr_mult"] == 1.0 for g in groups)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(obj.parameters()))
    opt = torch.optim.AdamW(groups)
    x = images(b=4)
    g = gen(0)
    losses = []
    for step in range(12):
        loss, logs = obj(x, step=step, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.8 * losses[0]
