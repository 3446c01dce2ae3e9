"""The MAR transformer: state-dict format, masking statistics, the generation schedule, CFG,
class/fake embeddings, determinism, and an independent boolean-mask ("reference-style") path."""
import argparse
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch

from mar import create_model, load_pretrained
from mar import orders as order_policies
from mar import schedules

MANIFEST = Path(__file__).resolve().parent / "fixtures" / "manifests" / "mar_base_state_dict.tsv"


def tiny(**kw):
    args = dict(img_size=16, vae_stride=4, token_channels=4, num_classes=10, buffer_size=4,
                num_sampling_steps="5", generator=torch.Generator().manual_seed(0))
    args.update(kw)
    return create_model("mar_tiny", **args)


def count(model):
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------ published format
def test_mar_base_state_dict_matches_manifest():
    if not MANIFEST.exists():
        pytest.fail(f"manifest not found at {MANIFEST}")
    rows = [line.split("\t") for line in MANIFEST.read_text().splitlines()[1:] if line.strip()]
    expected = {k: tuple(int(s) for s in shape.split("x")) for k, shape, _ in rows}
    with torch.device("meta"):
        model = create_model("mar_base")
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected
    assert len(got) == 364
    assert count(model) == 207_924_768


@pytest.mark.parametrize("name,params", [("mar_large", 478_326_304), ("mar_huge", 942_403_104)])
def test_large_presets_param_counts(name, params):
    with torch.device("meta"):
        assert count(create_model(name)) == params


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="valid presets: mar_base, mar_large, mar_huge"):
        create_model("mar_gigantic")


def test_sizes_that_do_not_divide_are_rejected():
    with pytest.raises(ValueError, match="not divisible"):
        tiny(img_size=18)


# ------------------------------------------------------------------ masking
def test_mask_ratio_is_truncated_normal():
    g = torch.Generator().manual_seed(1)
    r = np.array([schedules.sample_mask_ratio(g, 0.7) for _ in range(4000)])
    assert r.min() >= 0.7 and r.max() <= 1.0
    ref = scipy.stats.truncnorm((0.7 - 1.0) / 0.25, 0.0, loc=1.0, scale=0.25)
    assert abs(r.mean() - ref.mean()) < 4 * ref.std() / math.sqrt(len(r))
    assert scipy.stats.kstest(r, ref.cdf).pvalue > 1e-3
    # a plain (untruncated) normal would fail the same test
    assert scipy.stats.kstest(r, scipy.stats.norm(1.0, 0.25).cdf).pvalue < 1e-6


def test_orders_masks_and_positions():
    g = torch.Generator().manual_seed(2)
    orders = order_policies.random_orders(5, 64, g)
    assert torch.equal(orders.sort(-1).values, torch.arange(64).expand(5, 64))
    m = schedules.num_masked_tokens(64, 0.71)
    assert m == math.ceil(64 * 0.71) == 46
    mask = schedules.mask_from_orders(orders, m)
    assert (mask.sum(-1) == m).all()
    masked, visible = schedules.split_by_order(orders, m)
    for b in range(5):
        assert torch.equal(masked[b], mask[b].nonzero().flatten())
        assert torch.equal(visible[b], (~mask[b]).nonzero().flatten())


def _reference_schedule(seq_len, num_iter):
    """The reference loop's arithmetic (numpy floor/cos, clamp against the mask count)."""
    masked, counts, mask_lens = seq_len, [], []
    for step in range(num_iter):
        mask_len = np.floor(seq_len * np.cos(math.pi / 2.0 * (step + 1) / num_iter))
        mask_len = max(1, min(masked - 1, mask_len))
        nxt = 0 if step >= num_iter - 1 else mask_len
        counts.append(int(masked - nxt))
        mask_lens.append(int(mask_len))
        masked = nxt
    return counts, mask_lens


@pytest.mark.parametrize("num_iter", [16, 64, 256])
def test_generation_schedule_formula(num_iter):
    counts, _ = _reference_schedule(256, num_iter)
    after = schedules.generation_schedule(256, num_iter)
    before = [256] + after[:-1]
    assert [b - a for b, a in zip(before, after)] == counts
    assert sum(counts) == 256 and after[-1] == 0


@pytest.mark.parametrize("num_iter", [16, 64, 256])
def test_every_token_predicted_exactly_once(num_iter):
    """Run the real loop on seq_len 256 with a recording head: each position is written once,
    at the step the schedule says, with the linear CFG scale of the formula."""
    model = tiny(img_size=16, vae_stride=1).eval()
    calls = []

    def record(z, *, temperature, cfg, generator, options, num_steps=None):  # the Head interface's sample
        assert options.clip_denoised is None and num_steps is None  # the default path: no guard, fixed steps
        calls.append((z.shape[0], cfg))
        step = len(calls)
        return torch.full((z.shape[0] // 2, model.token_embed_dim), float(step))

    model.diffloss.sample = record
    tokens = model.sample_tokens(2, num_iter=num_iter, cfg=3.0, labels=torch.tensor([1, 2]),
                                 generator=torch.Generator().manual_seed(0))
    filled = model.patchify(tokens)[..., 0]  # (B, L): the step (1-based call index) that wrote it
    counts, mask_lens = _reference_schedule(256, num_iter)
    nonzero_steps = [k for k, c in enumerate(counts) if c > 0]
    assert len(calls) == len(nonzero_steps)
    for call, k in enumerate(nonzero_steps, start=1):
        assert (filled == call).sum(-1).tolist() == [counts[k]] * 2
        rows, scale = calls[call - 1]
        assert rows == 2 * 2 * counts[k]  # [cond; uncond] rows for 2 samples
        assert scale == pytest.approx(1 + (3.0 - 1) * (256 - mask_lens[k]) / 256)
    assert (filled > 0).all()


def test_constant_cfg_and_unknown_schedule():
    after = schedules.generation_schedule(64, 8)
    assert schedules.cfg_scales(2.5, "constant", 64, after) == [2.5] * 8
    with pytest.raises(ValueError, match="linear"):
        schedules.cfg_scales(2.5, "cosine", 64, after)


# ------------------------------------------------------------------ class embedding and label drop
def _block_input(model, tokens, labels, generator):
    seen = {}
    h = model.encoder_blocks[0].register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].detach()))
    model(tokens, labels, generator=generator)
    h.remove()
    return seen["x"]


@pytest.mark.parametrize("drop,use_fake", [(0.0, False), (1.0, True)])
def test_buffer_positions_carry_class_or_fake_embedding(drop, use_fake):
    model = tiny(label_drop_prob=drop, attn_dropout=0.0, proj_dropout=0.0).train()
    labels = torch.tensor([3, 7])
    tokens = torch.randn(2, 4, 4, 4)
    x = _block_input(model, tokens, labels, torch.Generator().manual_seed(0))
    P = model.buffer_size
    emb = model.fake_latent.expand(2, -1) if use_fake else model.class_emb(labels)
    expected = torch.nn.functional.layer_norm(
        emb[:, None, :] + model.encoder_pos_embed_learned[:, :P], (emb.shape[-1],),
        model.z_proj_ln.weight, model.z_proj_ln.bias, eps=1e-6)
    torch.testing.assert_close(x[:, :P], expected)


def test_label_drop_rate():
    model = tiny(label_drop_prob=0.3).train()
    g = torch.Generator().manual_seed(0)
    drops = (order_policies.rand((20000,), g) < model.label_drop_prob).float().mean()
    assert abs(drops - 0.3) < 0.015


def test_out_of_range_labels_are_rejected():
    model = tiny()
    with pytest.raises(ValueError, match=r"class labels must be in \[0, 9\]"):
        model(torch.randn(1, 4, 4, 4), torch.tensor([10]))


# ------------------------------------------------------------------ independent reference-style path
def _reference_z(model, x, mask, class_embedding):
    """Encoder/decoder written the reference way: boolean masks, nonzero() dropping, in-place scatter."""
    b, L, _ = x.shape
    P = model.buffer_size
    h = model.z_proj(x)
    h = torch.cat([torch.zeros(b, P, h.shape[-1]), h], 1)
    mwb = torch.cat([torch.zeros(b, P), mask], 1)
    h[:, :P] = class_embedding.unsqueeze(1)
    h = model.z_proj_ln(h + model.encoder_pos_embed_learned)
    h = h[(1 - mwb).nonzero(as_tuple=True)].reshape(b, -1, h.shape[-1])
    for blk in model.encoder_blocks:
        h = blk(h)
    h = model.decoder_embed(model.encoder_norm(h))
    pad = model.mask_token.repeat(b, L + P, 1).clone()
    pad[(1 - mwb).nonzero(as_tuple=True)] = h.reshape(-1, h.shape[-1])
    h = pad + model.decoder_pos_embed_learned
    for blk in model.decoder_blocks:
        h = blk(h)
    return model.decoder_norm(h)[:, P:] + model.diffusion_pos_embed_learned


def test_encoder_decoder_match_reference_style_path():
    model = tiny().eval()
    x = torch.randn(3, model.seq_len, model.token_embed_dim)
    orders = order_policies.random_orders(3, model.seq_len, torch.Generator().manual_seed(5))
    m = 11
    _, visible = schedules.split_by_order(orders, m)
    ce = model.class_emb(torch.tensor([0, 4, 9]))
    z = model.forward_mae_decoder(model.forward_mae_encoder(x, visible, ce), visible)
    z_ref = _reference_z(model, x, schedules.mask_from_orders(orders, m).float(), ce)
    torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-5)


def test_training_loss_equals_reference_style_computation():
    """forward() = DiffLoss over the masked tokens of the reference-style z, repeated diffusion_batch_mul
    times, with the generator's draws taken in order: orders, mask ratio, then the diffusion draws."""
    model = tiny().eval()  # eval: no dropout and no label drop, so the draws are only the ones below
    with torch.no_grad():  # an untrained head outputs exactly 0 and would hide z; give it random weights
        gw = torch.Generator().manual_seed(3)
        for p in model.diffloss.parameters():
            p.copy_(torch.randn(p.shape, generator=gw) * 0.05)
    tokens, labels = torch.randn(2, 4, 4, 4), torch.tensor([1, 8])
    loss = model(tokens, labels, generator=torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    orders = order_policies.random_orders(2, model.seq_len, g)
    m = math.ceil(model.seq_len * schedules.sample_mask_ratio(g, 0.7))
    mask = schedules.mask_from_orders(orders, m).float()
    x = model.patchify(tokens)
    z = _reference_z(model, x, mask, model.class_emb(labels))
    n = model.diffusion_batch_mul
    expected = model.diffloss(x.reshape(-1, 4).repeat(n, 1), z.reshape(-1, z.shape[-1]).repeat(n, 1),
                              mask.reshape(-1).repeat(n), generator=g)
    torch.testing.assert_close(loss, expected)
    # and the loss ignores the targets of visible tokens
    x2 = x.clone()
    x2[mask == 0] += 100.0
    again = model(model.unpatchify(x2), labels, generator=torch.Generator().manual_seed(9))
    assert not torch.allclose(again, loss)  # visible tokens are inputs, so z changes...
    g2 = torch.Generator().manual_seed(9)
    order_policies.random_orders(2, model.seq_len, g2), schedules.sample_mask_ratio(g2, 0.7)
    only_targets = model.diffloss(x2.reshape(-1, 4).repeat(n, 1), z.reshape(-1, z.shape[-1]).repeat(n, 1),
                                  mask.reshape(-1).repeat(n), generator=g2)
    torch.testing.assert_close(only_targets, loss)  # ...but their targets never enter the loss


def test_patchify_layout_and_inverse():
    model = tiny(img_size=16, vae_stride=2, patch_size=2, token_channels=3)
    x = torch.randn(2, 3, 8, 8)
    t = model.patchify(x)
    assert t.shape == (2, 16, 12)
    torch.testing.assert_close(t[1, 1 * 4 + 2], x[1, :, 2:4, 4:6].reshape(-1))
    torch.testing.assert_close(model.unpatchify(t), x)


# ------------------------------------------------------------------ determinism and per-sample seeds
def test_same_seed_same_tokens_other_seed_differs():
    model = tiny().eval()
    run = lambda s: model.sample_tokens(2, num_iter=4, cfg=2.0, labels=torch.tensor([0, 1]),
                                        generator=torch.Generator().manual_seed(s))
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_per_sample_generators_independent_of_batch():
    model = tiny().eval()
    labels = torch.tensor([2, 5, 7])
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(3)]
    batch = model.sample_tokens(3, num_iter=4, cfg=1.5, labels=labels, generator=gens())
    for i in range(3):
        one = model.sample_tokens(1, num_iter=4, cfg=1.5, labels=labels[i:i + 1], generator=[gens()[i]])
        torch.testing.assert_close(one[0], batch[i], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ loading published checkpoints
def test_load_published_checkpoint_format(tmp_path):
    src = tiny()
    raw = {k: torch.randn_like(v) for k, v in src.state_dict().items()}
    ema = {k: torch.randn_like(v) for k, v in src.state_dict().items()}
    path = tmp_path / "checkpoint-last.pth"
    torch.save({"model": raw, "model_ema": ema, "epoch": 399, "args": argparse.Namespace(model="mar_tiny", lr=1e-4)}, path)
    kw = dict(img_size=16, vae_stride=4, token_channels=4, num_classes=10, buffer_size=4, num_sampling_steps="5")
    for use_ema, want in [(True, ema), (False, raw)]:
        model = load_pretrained("mar_tiny", path, ema=use_ema, **kw)
        for k, v in model.state_dict().items():
            assert torch.equal(v, want[k]), k
    with pytest.raises(ValueError, match="does not fit this model"):
        load_pretrained("mar_tiny", path, **{**kw, "num_classes": 11})
