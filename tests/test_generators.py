"""The family's generators on CPU at tiny sizes: causal AR (raster / random order, KV cache) and MaskGIT.

Each check compares numbers with an independent path: the causal mask by perturbing a token, the KV cache by
full recomputation, the confidence pick by a sort done by hand, the CFG ramp by its formula.
"""
from __future__ import annotations

import math

import pytest
import torch

from mar.categorical import CategoricalHeadSpec
from mar.causal import CausalAR, block_forward
from mar.config.schema import SamplingOptions
from mar.generate import causal, maskgit, select_confident
from mar.heads import DiffusionHeadSpec
from mar.model import MAR, MaskGIT
from mar.registry import create_model
from mar.schedules import generation_schedule, sample_mask_ratio_cosine

SIZES = dict(img_size=16, vae_stride=4, embed_dim=32, depth=2, num_heads=4, num_classes=3, buffer_size=2,
             attn_dropout=0.0, proj_dropout=0.0)


def causal_model(order: str, head: str = "diffloss", seed: int = 0) -> CausalAR:
    spec = (DiffusionHeadSpec(depth=1, width=32, num_sampling_steps="5") if head == "diffloss"
            else CategoricalHeadSpec(depth=1, width=32))
    channels = 4 if head == "diffloss" else 11
    return CausalAR(token_channels=channels, order=order, head=spec, generator=torch.Generator().manual_seed(seed),
                    **SIZES).eval()


def tokens_for(model, b: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if model.head.kind == "discrete":
        return torch.randint(0, model.token_channels, (b, model.seq_h, model.seq_w), generator=g)
    return torch.randn(b, model.token_channels, model.seq_h, model.seq_w, generator=g)


@pytest.mark.parametrize("order", ["raster", "random"])
@pytest.mark.parametrize("head", ["diffloss", "categorical"])
def test_causal_mask_leaks_nothing(order, head):
    """Changing the token generated at step j leaves z_0..z_j (the conditions of steps <= j) bit for bit."""
    model = causal_model(order, head)
    x = model.patchify(tokens_for(model, 2))
    o = model.make_orders(2, torch.Generator().manual_seed(5))
    ce = model.class_emb(torch.tensor([0, 2]))
    z = model.conditions(x, o, ce)
    for j in (0, 5, model.seq_len - 2):
        x2 = x.clone()
        rows = torch.arange(2)
        x2[rows, o[:, j]] = (x2[rows, o[:, j]] + 1) % model.token_channels if head == "categorical" \
            else x2[rows, o[:, j]] + 1.0
        z2 = model.conditions(x2, o, ce)
        assert torch.equal(z[:, :j + 1], z2[:, :j + 1])
        assert (z[:, j + 1:] - z2[:, j + 1:]).abs().amax() > 1e-4  # the change does reach the later steps


def test_raster_order_is_positions_in_order_and_random_is_a_permutation():
    assert torch.equal(causal_model("raster").make_orders(2), torch.arange(16).expand(2, 16))
    o = causal_model("random").make_orders(3, torch.Generator().manual_seed(0))
    assert torch.equal(o.sort(1).values, torch.arange(16).expand(3, 16))
    assert not torch.equal(o[0], o[1])


def test_block_forward_equals_timm_block_causal():
    """Our forward of a timm Block equals Block.forward(is_causal=True) on the whole sequence, and the cached
    forward of a suffix equals the matching rows of the full one."""
    model = causal_model("raster")
    blk = model.blocks[0]
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(block_forward(blk, x), blk(x, is_causal=True), rtol=0, atol=1e-6)
    cache: dict = {}
    first = block_forward(blk, x[:, :4], cache)
    rest = block_forward(blk, x[:, 4:], cache)
    torch.testing.assert_close(torch.cat([first, rest], 1), block_forward(blk, x), rtol=0, atol=1e-5)
    assert cache["k"].shape[2] == 7


@pytest.mark.parametrize("order", ["raster", "random"])
def test_kv_cache_equals_full_recomputation_token_for_token(order):
    model = causal_model(order, "categorical")
    labels = torch.tensor([0, 1, 2])
    for cfg in (1.0, 2.5):
        a = model.sample_tokens(3, cfg=cfg, labels=labels, generator=torch.Generator().manual_seed(3), kv_cache=True)
        b = model.sample_tokens(3, cfg=cfg, labels=labels, generator=torch.Generator().manual_seed(3), kv_cache=False)
        assert a.dtype == torch.int64 and torch.equal(a, b)
    cont = causal_model(order, "diffloss")
    a = cont.sample_tokens(2, cfg=2.0, labels=labels[:2], generator=torch.Generator().manual_seed(4), kv_cache=True)
    b = cont.sample_tokens(2, cfg=2.0, labels=labels[:2], generator=torch.Generator().manual_seed(4), kv_cache=False)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_causal_generation_follows_the_order_and_per_sample_generators():
    """With a fake head that returns the step index, position o_i holds i; a row depends only on its generator."""
    model = causal_model("random", "categorical")

    class StepHead(torch.nn.Module):
        kind, token_shape, token_dtype = "discrete", (), torch.int64

        def __init__(self):
            super().__init__()
            self.step, self.scales = 0, []

        def sample(self, z, *, temperature, cfg, generator, options, num_steps=None):
            self.scales.append(cfg)
            n = z.shape[0] // (2 if cfg != 1.0 else 1)
            out = torch.full((n,), self.step % 11, dtype=torch.int64)
            self.step += 1
            return out

    head = StepHead()
    model._modules[model._head_name] = head
    gens = [torch.Generator().manual_seed(s) for s in (7, 8)]
    codes = causal(model, 2, labels=torch.tensor([0, 1]), cfg=3.0, generator=gens)
    order = model.make_orders(2, [torch.Generator().manual_seed(s) for s in (7, 8)])
    L = model.seq_len
    for row in range(2):
        assert codes[row, order[row]].tolist() == [i % 11 for i in range(L)]
    expected = [1 + 2.0 * (i + 1) / L for i in range(L - 1)] + [1 + 2.0 * (L - 1) / L]  # linear ramp, K = U = L
    assert head.scales == pytest.approx(expected)


def test_causal_trains_in_its_order_on_every_token():
    model = causal_model("random", "categorical").train()
    x, y = tokens_for(model, 4), torch.tensor([0, 1, 2, 0])
    loss = model(x, y, generator=torch.Generator().manual_seed(0))
    # the same draws: labels drop first (4 uniforms), then the order; check against a hand computation of the CE
    g = torch.Generator().manual_seed(0)
    drop = torch.rand(4, generator=g) < model.label_drop_prob
    order = model.make_orders(4, g)
    ce = torch.where(drop.unsqueeze(-1), model.fake_latent, model.class_emb(y))
    z = model.conditions(model.patchify(x), order, ce)
    target = torch.gather(model.patchify(x), 1, order)
    expected = torch.nn.functional.cross_entropy(model.head.logits(z.reshape(-1, z.shape[-1])), target.reshape(-1))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert model.query_pos_embed_learned.grad.abs().sum() > 0


def test_select_confident_picks_the_top_confidences():
    conf = torch.tensor([[0.1, 0.9, 0.5, 0.9], [3.0, -1.0, 2.0, 0.0]])
    cand = torch.tensor([[4, 7, 9, 12], [0, 1, 2, 3]])
    idx, pos = select_confident(conf, cand, 2)
    assert idx.tolist() == [[1, 3], [0, 2]] and pos.tolist() == [[7, 12], [0, 2]]
    with pytest.raises(ValueError, match="keep must be"):
        select_confident(conf, cand, 5)


def maskgit_model(seed=0) -> MaskGIT:
    return MaskGIT(img_size=16, vae_stride=4, token_channels=11, encoder_embed_dim=32, encoder_depth=1,
                   encoder_num_heads=4, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4, num_classes=3,
                   buffer_size=2, head=CategoricalHeadSpec(depth=1, width=32),
                   generator=torch.Generator().manual_seed(seed)).eval()


def test_maskgit_keeps_the_most_confident_with_the_cosine_schedule():
    """With no pick noise, each step fixes exactly the schedule's count of the highest-logprob unknown tokens
    (checked by replaying each step's confidences by hand)."""
    model = maskgit_model()
    head = model.head
    seen = []
    real = head.sample_with_confidence

    def spy(z, **kw):
        codes, logprob = real(z, **kw)
        seen.append((codes.clone(), logprob.clone()))
        return codes, logprob

    head.sample_with_confidence = spy
    K = 5
    opts = SamplingOptions(choice_temperature=0.0)
    tokens = maskgit(model, 2, labels=torch.tensor([0, 1]), num_iter=K, generator=torch.Generator().manual_seed(0),
                     options=opts)
    after = generation_schedule(16, K)
    fixed = torch.zeros(2, 16, dtype=torch.bool)
    expect = torch.zeros(2, 16, dtype=torch.int64)
    now = 16
    for k, (codes, logprob) in enumerate(seen):
        unknown = torch.stack([torch.nonzero(~fixed[r]).flatten() for r in range(2)])
        assert unknown.shape[1] == now
        codes, logprob = codes.view(2, now), logprob.view(2, now)
        for r in range(2):
            order = sorted(range(now), key=lambda i: (-float(logprob[r, i]), i))[:now - after[k]]
            for i in order:
                expect[r, unknown[r, i]] = codes[r, i]
                fixed[r, unknown[r, i]] = True
        now = after[k]
    assert fixed.all() and torch.equal(tokens, expect)


def test_maskgit_keeps_known_codes_and_is_reproducible():
    model = maskgit_model()
    known = torch.randint(0, 11, (2, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, :10] = True
    mask[1, 4:] = True
    a = maskgit(model, 2, labels=torch.tensor([0, 1]), num_iter=4, cfg=2.0, known_tokens=known, known_mask=mask,
                generator=[torch.Generator().manual_seed(s) for s in (1, 2)])
    assert torch.equal(a[mask], known[mask])
    b = maskgit(model, 2, labels=torch.tensor([0, 1]), num_iter=4, cfg=2.0, known_tokens=known, known_mask=mask,
                generator=[torch.Generator().manual_seed(s) for s in (1, 2)])
    assert torch.equal(a, b)


def test_maskgit_trains_with_the_cosine_mask_ratio():
    g = torch.Generator().manual_seed(0)
    u = torch.rand(1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert sample_mask_ratio_cosine(g) == pytest.approx(math.cos(math.pi / 2 * float(u)))
    model = maskgit_model().train()
    assert model.mask_ratio_schedule == "cosine"
    loss = model(torch.randint(0, 11, (3, 4, 4), generator=torch.Generator().manual_seed(2)), torch.tensor([0, 1, 2]),
                 generator=torch.Generator().manual_seed(0))
    assert math.isfinite(loss.item()) and loss.item() > 0


def test_discrete_mar_embeds_codes_from_the_generator():
    """The code embedding table is drawn from the init generator: two builds under different global seeds agree."""
    torch.manual_seed(1)
    a = maskgit_model(3)
    torch.manual_seed(2)
    b = maskgit_model(3)
    assert isinstance(a.z_proj, torch.nn.Embedding) and torch.equal(a.z_proj.weight, b.z_proj.weight)
    assert not torch.equal(a.z_proj.weight, maskgit_model(4).z_proj.weight)  # drawn from the init generator
    assert a.z_proj.weight.std().item() == pytest.approx(0.02, rel=0.3)


def test_registry_builds_every_cell():
    common = dict(img_size=16, vae_stride=4, num_classes=3)
    cells = [("mar", "diffloss", 4, None), ("mar", "categorical", 11, None), ("maskgit", "categorical", 11, None),
             ("causal", "diffloss", 4, "raster"), ("causal", "categorical", 11, "random")]
    for gen, head, ch, order in cells:
        m = create_model("mar_tiny", gen, head, token_channels=ch, order=order, **common)
        assert m.head.kind == ("discrete" if head == "categorical" else "continuous")
        if gen == "causal":
            assert m.order == order and len(m.blocks) == 4  # encoder + decoder depth of mar_tiny
    with pytest.raises(ValueError, match="kv_cache needs causal"):
        create_model("mar_tiny", "mar", kv_cache=True, token_channels=4, **common)
    assert isinstance(create_model("mar_tiny", token_channels=4, **common), MAR)
    with pytest.raises(ValueError, match="num_iter must be 16"):
        create_model("mar_tiny", "causal", token_channels=4, **common).sample_tokens(1, num_iter=4)
