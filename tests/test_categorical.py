"""The categorical (cross-entropy) head: each number against an independent computation."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mar.categorical import (CategoricalHead, CategoricalHeadSpec, check_top, filter_top_k, filter_top_p,
                             guided_logits, process_logits, sample_codes)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def kept(logits):
    return torch.isfinite(logits).tolist()


# ------------------------------------------------------------------ guidance, temperature, filters
@pytest.mark.parametrize("cfg", [0.0, 0.5, 1.0, 2.0, 4.0])
def test_guidance_on_logits_matches_numpy(cfg):
    rng = np.random.default_rng(0)
    cond, uncond = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    both = torch.tensor(np.concatenate([cond, uncond]), dtype=torch.float64)  # [cond; uncond]
    out = guided_logits(both, cfg)
    if cfg == 1.0:
        assert out is both  # unchanged, all 2N rows
    else:
        assert out.shape == (3, 5)
        np.testing.assert_allclose(out.numpy(), uncond + cfg * (cond - uncond), rtol=0, atol=1e-12)
    guided = process_logits(both.float(), temperature=1.0, cfg=cfg)
    expected = both.float().numpy() if cfg == 1.0 else uncond + cfg * (cond - uncond)
    assert guided.dtype == torch.float32
    np.testing.assert_allclose(guided.numpy(), expected, rtol=0, atol=1e-5)


def test_guidance_needs_both_halves():
    with pytest.raises(ValueError, match="cond; uncond"):
        guided_logits(torch.zeros(3, 4), 2.0)


def test_top_k_keeps_the_k_largest_and_the_boundary_ties():
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0],   # k=2: the 2nd largest is 3, tied three times
                           [0.5, 4.0, 2.0, 2.0, 1.0],   # k=2: 4 and both 2s
                           [5.0, 4.0, 3.0, 2.0, 1.0]])  # k=2: exactly two
    assert kept(filter_top_k(logits, 2)) == [[False, True, True, False, True],
                                             [False, True, True, True, False],
                                             [True, True, False, False, False]]
    assert kept(filter_top_k(logits, 1)) == [[False, True, True, False, True],
                                             [False, True, False, False, False],
                                             [True, False, False, False, False]]
    out = filter_top_k(logits, 2)
    assert torch.equal(out[torch.isfinite(out)], logits[torch.isfinite(out)])  # kept values untouched
    for k in (5, 9):
        assert torch.equal(filter_top_k(logits, k), logits)


def test_top_p_keeps_the_nucleus_and_its_ties():
    logits = torch.tensor([[0.5, 0.3, 0.1, 0.1]]).log()
    assert kept(filter_top_p(logits, 0.8)) == [[True, True, False, False]]  # 0.5 + 0.3 reaches 0.8
    assert kept(filter_top_p(logits, 0.85)) == [[True, True, True, True]]  # needs a 0.1: both tied 0.1s
    assert kept(filter_top_p(logits, 0.5)) == [[True, False, False, False]]
    assert kept(filter_top_p(logits, 0.5001)) == [[True, True, False, False]]
    assert kept(filter_top_p(logits, 0.3)) == [[True, False, False, False]]
    assert torch.equal(filter_top_p(logits, 1.0), logits)
    shuffled = torch.tensor([[0.1, 0.3, 0.1, 0.5], [0.25, 0.25, 0.25, 0.25]]).log()  # order does not matter
    assert kept(filter_top_p(shuffled, 0.8)) == [[False, True, False, True], [True] * 4]
    # through process_logits (float32), the same sets
    assert kept(process_logits(logits, temperature=1.0, cfg=1.0, top_p=0.8)) == [[True, True, False, False]]
    assert kept(process_logits(logits, temperature=1.0, cfg=1.0, top_p=0.85)) == [[True] * 4]


def test_top_p_is_taken_after_top_k_on_the_renormalised_probabilities():
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    # top-2 renormalises to [4/7, 3/7]: p = 0.55 needs both of them (0.4 alone would not reach 0.55 after top-k
    # either), p = 0.5 only the first (4/7 > 0.5, whereas 0.4 < 0.5 before top-k)
    assert kept(process_logits(logits, temperature=1.0, cfg=1.0, top_k=2, top_p=0.5)) == [[True, False, False, False]]
    assert kept(process_logits(logits, temperature=1.0, cfg=1.0, top_p=0.5)) == [[True, True, False, False]]


def test_temperature_divides_the_logits():
    logits = torch.randn(4, 6, generator=gen(0))
    for t in (0.25, 1.0, 3.0):
        assert torch.equal(process_logits(logits, temperature=t, cfg=1.0), logits / t)
    both = torch.randn(4, 6, generator=gen(1))
    assert torch.allclose(process_logits(both, temperature=2.0, cfg=3.0), guided_logits(both, 3.0) / 2.0)


# ------------------------------------------------------------------ sampling
def test_sampling_frequencies_match_softmax():
    probs = torch.tensor([0.4, 0.25, 0.2, 0.1, 0.05])
    draws = 40_000
    codes = sample_codes(probs.log().expand(draws, -1), gen(0))
    assert codes.dtype == torch.int64 and codes.shape == (draws,)
    counts = torch.bincount(codes, minlength=5).double()
    expected = draws * probs.double()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 18.47  # chi-square, 4 degrees of freedom, p = 0.001


def test_filtered_codes_are_never_drawn_and_the_rest_keep_their_ratio():
    probs = torch.tensor([0.3, 0.05, 0.4, 0.05, 0.2])
    draws = 30_000
    logits = process_logits(probs.log().expand(draws, -1), temperature=1.0, cfg=1.0, top_k=3)
    counts = torch.bincount(sample_codes(logits, gen(1)), minlength=5).double()
    assert counts[1] == 0 and counts[3] == 0
    expected = draws * torch.tensor([0.3, 0.0, 0.4, 0.0, 0.2], dtype=torch.float64) / 0.9
    keep = expected > 0
    chi2 = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    assert chi2 < 13.82  # 2 degrees of freedom, p = 0.001


def test_a_low_temperature_samples_the_argmax():
    logits = torch.stack([torch.randperm(10, generator=gen(s)).float() * 0.1 for s in range(50)])
    codes = sample_codes(process_logits(logits, temperature=1e-4, cfg=1.0), gen(2))
    assert torch.equal(codes, logits.argmax(-1))


def test_the_same_generator_gives_the_same_codes():
    logits = torch.randn(64, 9, generator=gen(3))
    a, b, c = (sample_codes(logits, gen(s)) for s in (7, 7, 8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_per_sample_generators_own_their_rows():
    logits = torch.randn(6, 50, generator=gen(4))  # B = 3 samples, n = 2 rows each
    first = sample_codes(logits, [gen(1), gen(2), gen(3)])
    other = sample_codes(logits, [gen(1), gen(20), gen(3)])
    assert torch.equal(first[:2], other[:2]) and torch.equal(first[4:], other[4:])
    assert not torch.equal(first[2:4], other[2:4])  # 50 codes: a change of generator shows
    for b, seed in enumerate((1, 2, 3)):  # each group drawn by itself: the same codes
        assert torch.equal(sample_codes(logits[2 * b:2 * b + 2], [gen(seed)]), first[2 * b:2 * b + 2])


@pytest.mark.parametrize("bad", [dict(top_k=0), dict(top_k=True), dict(top_k=2.0), dict(top_p=0.0),
                                 dict(top_p=1.5), dict(top_p=-0.1)])
def test_bad_filters_raise(bad):
    with pytest.raises(ValueError, match="top_"):
        check_top(bad.get("top_k"), bad.get("top_p"))
    with pytest.raises(ValueError, match="top_"):
        process_logits(torch.zeros(2, 3), temperature=1.0, cfg=1.0, **bad)


def test_bad_sampling_arguments_raise():
    with pytest.raises(ValueError, match="generators for 5 rows"):
        sample_codes(torch.zeros(5, 3), [gen(0), gen(1)])
    with pytest.raises(ValueError, match="temperature"):
        process_logits(torch.zeros(2, 3), temperature=0.0, cfg=1.0)
    with pytest.raises(ValueError, match="top_k"):
        CategoricalHead(5, 4).sample(torch.zeros(2, 4), generator=gen(0), options=SimpleNamespace(top_k=0))
    check_top(None, None), check_top(1, 1.0), check_top(3, 0.5)  # fine


# ------------------------------------------------------------------ the head
def test_loss_is_the_masked_mean_of_cross_entropy_and_trains_the_mlp():
    head = CategoricalHead(num_codes=7, z_channels=8, depth=2, width=16, generator=gen(0))
    z, target = torch.randn(10, 8, generator=gen(1)), torch.randint(0, 7, (10,), generator=gen(2))
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1, 1], dtype=torch.float32)
    logits = head.logits(z).detach()
    ce = [F.cross_entropy(logits[i:i + 1], target[i:i + 1]).item() for i in range(10)]
    by_hand = sum(c for c, m in zip(ce, mask.tolist()) if m) / mask.sum().item()
    loss = head.loss(target, z, mask)
    assert loss.dtype == torch.float32 and math.isclose(loss.item(), by_hand, rel_tol=1e-6)
    assert math.isclose(head.loss(target, z).item(), sum(ce) / 10, rel_tol=1e-6)
    loss.backward()
    grads = [p.grad for p in head.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_loss_is_float32_under_autocast():
    head = CategoricalHead(num_codes=5, z_channels=4, width=8, generator=gen(0))
    z, target = torch.randn(6, 4, generator=gen(1)), torch.randint(0, 5, (6,), generator=gen(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert head.logits(z).dtype == torch.bfloat16
        loss = head.loss(target, z, torch.ones(6))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_head_sample_reads_the_options_and_guides():
    head = CategoricalHead(num_codes=6, z_channels=4, width=8, generator=gen(0))
    z = torch.randn(8, 4, generator=gen(1))  # [cond; uncond], N = 4
    argmax = guided_logits(head.logits(z), 3.0).argmax(-1)
    codes = head.sample(z, temperature=1.0, cfg=3.0, generator=gen(2), options=SimpleNamespace(top_k=1))
    assert codes.dtype == torch.int64 and torch.equal(codes, argmax)
    plain = head.sample(z[:4], temperature=1.0, cfg=1.0, generator=gen(3), options=None, num_steps=5)
    assert torch.equal(plain, sample_codes(head.logits(z[:4]).float(), gen(3)))
    gens = [gen(4), gen(5)]  # 2 samples, 2 rows each, in each half
    assert head.sample(z, cfg=2.0, generator=gens, options=object()).shape == (4,)


def test_confidence_is_the_log_softmax_of_the_processed_logits_at_the_codes():
    head = CategoricalHead(num_codes=6, z_channels=4, width=8, generator=gen(0))
    z = torch.randn(10, 4, generator=gen(1))
    options = SimpleNamespace(top_k=4, top_p=0.9)
    codes, logprob = head.sample_with_confidence(z, temperature=0.7, cfg=2.0, generator=gen(2), options=options)
    processed = process_logits(head.logits(z), temperature=0.7, cfg=2.0, top_k=4, top_p=0.9)
    expected = torch.log_softmax(processed.double(), -1)[torch.arange(5), codes]
    assert logprob.dtype == torch.float32 and torch.allclose(logprob.double(), expected, atol=1e-6)
    assert torch.isfinite(logprob).all()  # filtered codes are never the chosen ones
    assert torch.equal(codes, head.sample(z, temperature=0.7, cfg=2.0, generator=gen(2), options=options))


# ------------------------------------------------------------------ the spec
def test_the_spec_builds_from_the_generator_alone():
    spec = CategoricalHeadSpec(depth=2, width=16)
    assert spec.module_name == "categorical" and CategoricalHeadSpec().width == 256
    state = torch.random.get_rng_state()
    a, b, c = spec.build(11, 8, gen(0)), spec.build(11, 8, gen(0)), spec.build(11, 8, gen(1))
    embedding = spec.input_embedding(11, 32)
    assert torch.equal(torch.random.get_rng_state(), state)  # no draw from the global RNG
    assert isinstance(embedding, nn.Embedding) and embedding.weight.shape == (11, 32)
    assert torch.isfinite(embedding.weight).all()
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and not torch.equal(sa["net.1.weight"], sc["net.1.weight"])
    assert a.kind == "discrete" and a.token_shape == () and a.token_dtype == torch.int64 and a.num_codes == 11
    # layout and initialisation, by hand: xavier-uniform from the generator in layer order, biases 0
    linears = [m for m in a.net if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(8, 16), (16, 16), (16, 11)]
    assert isinstance(a.net[0], nn.LayerNorm) and sum(isinstance(m, nn.GELU) for m in a.net) == 2
    g = gen(0)
    for m in linears:
        bound = math.sqrt(6.0 / (m.in_features + m.out_features))
        expected = torch.empty(m.out_features, m.in_features).uniform_(-bound, bound, generator=g)
        assert torch.allclose(m.weight, expected) and not m.bias.any()
