"""Feature caching across MAR steps (``mar.feature_cache``, ``SamplingOptions.feature_cache``).

- off is the reference loop, bit for bit (the golden tests pin that loop; here: off == the default options);
- the token cache's slot forward is the model's forward: a refresh gives ``model.conditions`` at every position,
  and a cached step over an up-to-date cache gives the full forward's conditions of the predicted positions;
- with a full forward at every step (cache_refresh 1) every mode is the exact loop up to float rounding;
- between refreshes the cache is an approximation: the tokens differ from the exact loop, but each cached step is
  computed exactly as documented (checked against an independent recomputation with masked attention by hand).
"""
from __future__ import annotations

import math

import pytest
import torch

from mar.config.schema import SamplingOptions
from mar.feature_cache import CachedConditions, TokenCache
from test_fast_path import tiny_model


@pytest.fixture(scope="module")
def model():
    m = tiny_model(num_sampling_steps="5")
    with torch.no_grad():  # non-zero embeddings and positions, so that every input path matters
        g = torch.Generator().manual_seed(5)
        for p in (m.mask_token, m.encoder_pos_embed_learned, m.decoder_pos_embed_learned,
                  m.diffusion_pos_embed_learned, m.fake_latent):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _sample(model, options, cfg=3.0, seed=0, num_iter=6, b=3):
    return model.sample_tokens(b, num_iter=num_iter, cfg=cfg, labels=torch.arange(b), generator=_gen(seed),
                               options=options)


def test_off_is_the_reference_loop_bit_for_bit(model):
    ref = _sample(model, SamplingOptions())
    off = _sample(model, SamplingOptions(feature_cache="off", cache_refresh=3))
    assert torch.equal(ref, off)


def test_refresh_gives_the_models_conditions(model):
    g = _gen(1)
    b, L = 2, model.seq_len
    tokens = torch.randn(b, L, model.token_embed_dim, generator=g)
    visible = torch.stack([torch.randperm(L, generator=g)[:7].sort().values for _ in range(b)])
    emb = model.embed_labels(torch.tensor([3, 5]), b)
    with torch.no_grad():
        want = model.conditions(tokens, visible, emb)
        got = TokenCache(model, b, "cpu", torch.float32).refresh(tokens, visible, emb)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_cached_step_over_an_up_to_date_cache_is_the_full_forward(model):
    """Refresh on the visible set V, then a cached step that writes W and predicts Q: its conditions equal an
    independent recomputation of the documented step (W's and Q's slots recomputed over the refresh's cached keys and
    values of every other slot), and differ from the full forward on V + W (the cached slots have not seen W)."""
    g = _gen(2)
    b, L = 2, model.seq_len
    tokens = torch.randn(b, L, model.token_embed_dim, generator=g)
    perm = torch.stack([torch.randperm(L, generator=g) for _ in range(b)])
    visible, written, predict = perm[:, :6].sort(1).values, perm[:, 6:9].sort(1).values, perm[:, 9:12].sort(1).values
    emb = model.embed_labels(torch.tensor([1, 8]), b)
    with torch.no_grad():
        cache = TokenCache(model, b, "cpu", torch.float32)
        cache.refresh(tokens, visible, emb)
        got = cache.step(tokens, written, predict)
        want = _independent_step(model, tokens, visible, written, predict, emb)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the cached step is an approximation: the full forward over V + W differs (old slots now see W)
    with torch.no_grad():
        full = model.conditions(tokens, torch.cat([visible, written], 1).sort(1).values, emb)
    full = torch.gather(full, 1, predict.unsqueeze(-1).expand(-1, -1, full.shape[-1]))
    assert (full - got).abs().max() > 1e-4


def _block_rows(blk, x_all, active_rows, key_rows):
    """Block output at ``active_rows`` of x_all (S', D) when those rows attend to ``key_rows`` (keys/values from
    x_all's rows), written with explicit softmax attention (a second path to ``_attend``)."""
    attn = blk.attn
    h = blk.norm1(x_all)
    qkv = attn.qkv(h).reshape(len(x_all), 3, attn.num_heads, attn.head_dim)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # (S', H, hd)
    q, k, v = q[active_rows], k[key_rows], v[key_rows]
    w = torch.einsum("ahd,khd->hak", q, k) / math.sqrt(attn.head_dim)
    o = torch.einsum("hak,khd->ahd", w.softmax(-1), v).reshape(len(active_rows), -1)
    x = x_all[active_rows] + attn.proj(o)
    return x + blk.mlp(blk.norm2(x))


def _independent_step(model, tokens, visible, written, predict, emb):
    """The documented cached step, recomputed slot by slot: per layer, the slot states of the refresh (on V), the
    written slots' new states computed against [refresh states of V; new states of W], and the predicted slots'."""
    p, L = model.buffer_size, model.seq_len
    out = []
    for r in range(tokens.shape[0]):
        # encoder inputs of every slot (buffer, all tokens)
        x_tok = model.z_proj(tokens[r]) + model.encoder_pos_embed_learned[0, p:]
        x_buf = emb[r].expand(p, -1) + model.encoder_pos_embed_learned[0, :p]
        x = model.z_proj_ln(torch.cat([x_buf, x_tok]))  # (S, D)
        v_slots = torch.cat([torch.arange(p), visible[r] + p])
        w_slots = written[r] + p
        keys = torch.cat([v_slots, w_slots])
        for blk in model.encoder_blocks:  # refresh state of V; W's new state attends to V's cached and W's own
            new = x.clone()
            new[v_slots] = _block_rows(blk, x, v_slots, v_slots)
            new[w_slots] = _block_rows(blk, x, w_slots, keys)
            x = new
        enc = model.decoder_embed(model.encoder_norm(x))
        # decoder: refresh pass over all slots with V visible, then the step's active slots
        y0 = model.mask_token[0, 0].expand(p + L, -1).clone()
        y0[v_slots] = enc[v_slots]
        y0 = y0 + model.decoder_pos_embed_learned[0]
        y1 = y0.clone()
        y1[w_slots] = enc[w_slots] + model.decoder_pos_embed_learned[0, w_slots]
        every = torch.arange(p + L)
        active = torch.cat([w_slots, predict[r] + p])
        for blk in model.decoder_blocks:
            # the cache holds, per slot, the keys/values from the refresh pass except the active slots' (this step)
            mixed = y0.clone()
            mixed[active] = y1[active]
            k_src = mixed  # keys/values of each slot's latest state
            new0 = _block_rows(blk, y0, every, every)  # the refresh pass's next layer
            new1 = y1.clone()
            new1[active] = _block_rows(blk, k_src, active, every)
            y0, y1 = new0, new1
        z = model.decoder_norm(y1[predict[r] + p]) + model.diffusion_pos_embed_learned[0, predict[r]]
        out.append(z)
    return torch.stack(out)


@pytest.mark.parametrize("mode", ["cfg", "tokens", "both"])
def test_refresh_every_step_is_the_exact_loop_up_to_rounding(model, mode):
    ref = _sample(model, SamplingOptions())
    got = _sample(model, SamplingOptions(feature_cache=mode, cache_refresh=1))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["cfg", "tokens", "both"])
def test_caching_changes_the_tokens_but_keeps_draws_and_rows(model, mode):
    ref = _sample(model, SamplingOptions())
    got = _sample(model, SamplingOptions(feature_cache=mode, cache_refresh=2))
    assert got.shape == ref.shape and torch.isfinite(got).all()
    assert not torch.allclose(got, ref, atol=1e-4)  # the cached steps are an approximation
    # per-sample generators: a row does not depend on its batch
    gens = lambda: [_gen(40 + i) for i in range(3)]
    opts = SamplingOptions(feature_cache=mode, cache_refresh=2)
    batch = model.sample_tokens(3, num_iter=6, cfg=2.0, labels=torch.tensor([0, 4, 8]), generator=gens(), options=opts)
    alone = model.sample_tokens(1, num_iter=6, cfg=2.0, labels=torch.tensor([4]), generator=[_gen(41)], options=opts)
    torch.testing.assert_close(batch[1:2], alone, rtol=1e-5, atol=1e-5)


def test_cfg_cache_reuses_the_residual_between_refreshes(model):
    """With the cfg cache the unconditional rows at a cached step are z_cond + (z_uncond - z_cond) of the last
    refresh: checked on two calls of CachedConditions against model.conditions."""
    g = _gen(3)
    b, L = 2, model.seq_len
    tokens = torch.randn(b, L, model.token_embed_dim, generator=g)
    perm = torch.stack([torch.randperm(L, generator=g) for _ in range(b)])
    vis1, pred1 = perm[:, :5].sort(1).values, perm[:, 5:8].sort(1).values
    vis2, pred2 = perm[:, :8].sort(1).values, perm[:, 8:11].sort(1).values
    emb = torch.cat([model.embed_labels(torch.tensor([2, 6]), b), model.embed_labels(None, b)])
    cc = CachedConditions(model, "cfg", 2, b, True, "cpu", torch.float32)
    with torch.no_grad():
        cc(tokens, vis1, pred1, None, emb)
        z = cc(tokens, vis2, pred2, pred1, emb)
        full1 = model.conditions(torch.cat([tokens, tokens]), torch.cat([vis1, vis1]), emb)
        cond2 = model.conditions(tokens, vis2, emb[:b])
    take = lambda t, pos: torch.gather(t, 1, pos.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
    residual = take(full1[b:] - full1[:b], pred2)
    torch.testing.assert_close(z[:b], take(cond2, pred2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z[b:], take(cond2, pred2) + residual, rtol=1e-5, atol=1e-5)


def test_editing_with_the_cache_keeps_known_tokens(model):
    g = _gen(7)
    b, L = 2, model.seq_len
    known = torch.randn(b, L, model.token_embed_dim, generator=g)
    mask = torch.zeros(b, L, dtype=torch.bool)
    mask[:, : L // 2] = True
    out = model.generate(b, labels=torch.tensor([1, 2]), num_iter=4, cfg=2.0, generator=_gen(8),
                         options=SamplingOptions(feature_cache="both"), known_tokens=known, known_mask=mask)
    assert torch.equal(out[mask], known[mask])


def test_bad_settings_get_one_clear_message(model):
    with pytest.raises(ValueError, match="feature_cache must be one of"):
        SamplingOptions(feature_cache="lazy")
    with pytest.raises(ValueError, match="cache_refresh must be an int >= 1"):
        SamplingOptions(feature_cache="cfg", cache_refresh=0)
