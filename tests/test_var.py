"""VAR (mar/next_scale.py) and its sampling loop (mar/generate_scales.py): against the reference, formulas and
independent paths.

The golden file tests/fixtures/var_golden.pt was produced by the reference code (FoundationVision/VAR at commit
78b9539) on CPU (see tests/fixtures/README.md). Tolerances: integer codes and the initialisation must be equal
exactly (the same draws from the same generator); float outputs (logits, loss, f_hat) to atol 1e-5, since a
different BLAS or thread count may round a matrix product differently.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mar.generate_scales import (cfg_ramp, filter_logits, guide, next_scale, random_labels)
from mar.next_scale import VAR, VAR_PRESETS, create_var, load_var_checkpoint
from tokenizers.multiscale import MultiScaleQuantizer, MultiScaleVQConfig

FIXTURES = Path(__file__).parent / "fixtures"
ATOL = 1e-5


@pytest.fixture(scope="module")
def golden():
    return torch.load(FIXTURES / "var_golden.pt", weights_only=True)


def _model_from(spec: dict, state_dict: dict | None = None, **extra) -> VAR:
    kw = dict(spec, **extra)
    kw["patch_nums"] = tuple(kw["patch_nums"])
    model = VAR(**kw)
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def ref_model(golden):
    return _model_from(golden["model"], golden["state_dict"])


@pytest.fixture(scope="module")
def quantizer(golden):
    spec = golden["model"]
    q = MultiScaleQuantizer(MultiScaleVQConfig(z_channels=spec["token_dim"], vocab_size=spec["vocab_size"],
                                               patch_nums=tuple(spec["patch_nums"])))
    q.load_state_dict(golden["quantizer"], strict=True)
    return q.eval()


def _split(model, codes):
    return [codes[:, b:e] for b, e in model.begin_ends]


def tiny(seed=0, **kw) -> VAR:
    args = dict(depth=2, embed_dim=32, num_heads=4, vocab_size=64, token_dim=8, num_classes=10, patch_nums=(1, 2, 3, 4),
                init_adaln_gamma=0.5, init_head=1.0, generator=torch.Generator().manual_seed(seed))
    return VAR(**{**args, **kw}).eval()


# ---------------------------------------------------------------- layout, sizes, presets
def test_state_dict_matches_published_manifest():
    rows = (FIXTURES / "manifests" / "var_d16_state_dict.tsv").read_text().splitlines()[1:]
    manifest = [tuple(r.split("\t")) for r in rows]
    sd = create_var("var_d16", device="meta").state_dict()
    ours = [(k, "x".join(map(str, v.shape)), str(v.dtype).replace("torch.", "")) for k, v in sd.items()]
    assert sorted(ours) == sorted(manifest) and len(ours) == 220


# d(18C^2 + 14C + d) + 2C^2 + 5823C + 4096 without shared AdaLN (SPEC-VAR 2), and the README's totals
@pytest.mark.parametrize("name,expected", [("var_d16", 310_283_520), ("var_d20", 600_917_136),
                                           ("var_d24", 1_033_399_360), ("var_d30", 2_010_020_356),
                                           ("var_d36", 2_353_893_904)])
def test_parameter_counts(name, expected):
    model = create_var(name, device="meta")
    d, c = model.depth, model.embed_dim
    if not model.shared_aln:
        assert expected == d * (18 * c * c + 14 * c + d) + 2 * c * c + 5823 * c + 4096
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model.drop_path_rates[-1] == pytest.approx(0.1 * d / 24) and model.num_heads == d and c == 64 * d


def test_presets_and_bad_arguments():
    assert {"var_d16", "var_d20", "var_d24", "var_d30", "var_d2", "var_d4", "var_d6"} <= set(VAR_PRESETS)
    with pytest.raises(ValueError, match="valid presets"):
        create_var("var_d17")
    with pytest.raises(ValueError, match="valid arguments"):
        create_var("var_d2", widht=3)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        VAR(depth=1, embed_dim=30, num_heads=4, device="meta")
    with pytest.raises(ValueError, match="patch_nums"):
        VAR(depth=1, embed_dim=8, num_heads=2, patch_nums=(2, 1), device="meta")
    model = tiny()
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\]"):
        model(torch.tensor([11]), torch.zeros(1, 29, 8))
    with pytest.raises(ValueError, match="x_inputs must be"):
        model(torch.tensor([1]), torch.zeros(1, 30, 8))


# ---------------------------------------------------------------- against the reference
def test_init_equals_reference(golden):
    init = golden["init"]
    spec = {k: v for k, v in init["model"].items()}
    model = _model_from(spec, generator=torch.Generator().manual_seed(init["seed"]))
    for k, v in init["state_dict"].items():
        assert torch.equal(model.state_dict()[k], v), k
    assert list(model.state_dict()) == list(init["state_dict"])
    with torch.no_grad():  # shared AdaLN forward of the reference
        torch.testing.assert_close(model(init["labels"], init["x"]), init["logits"], atol=ATOL, rtol=0)


def test_forward_and_loss_equal_reference(golden, ref_model, quantizer):
    with torch.no_grad():
        logits = ref_model(golden["labels"], golden["teacher_input"])
    torch.testing.assert_close(logits, golden["logits"], atol=ATOL, rtol=0)
    loss = ref_model.loss(logits, golden["gt_codes"])
    torch.testing.assert_close(loss, golden["loss"], atol=ATOL, rtol=0)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), golden["gt_codes"].reshape(-1))  # plain mean = same
    torch.testing.assert_close(loss, ce, atol=1e-6, rtol=0)
    # our quantizer gives the reference's codes and teacher inputs
    codes = quantizer.encode_indices(golden["f"])
    assert torch.equal(torch.cat(codes, 1), golden["gt_codes"])
    torch.testing.assert_close(quantizer.teacher_inputs(codes), golden["teacher_input"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("run", ["cfg0", "cfg2_topkp", "cfg2_smooth", "random_labels"])
def test_sampling_equals_reference(golden, ref_model, quantizer, run):
    s = golden["samples"][run]
    g = torch.Generator().manual_seed(s["seed"])
    b = len(s["labels"])
    labels = s["labels"] if s["labels_given"] else random_labels(b, ref_model.num_classes, g)
    assert torch.equal(labels, s["labels"])
    f_hat, codes = next_scale(ref_model, quantizer, b, labels=labels, cfg=s["cfg"], top_k=s["top_k"],
                              top_p=s["top_p"], more_smooth=s["more_smooth"], generator=g, return_codes=True)
    assert torch.equal(codes, s["codes"])
    # more_smooth mixes the codebook by a Gumbel softmax at tau down to 0.0135, which magnifies the 1e-7 rounding
    # of other thread counts' matmuls (seen: 1.4e-5 with 2 threads); the codes above are exact either way
    torch.testing.assert_close(f_hat, s["f_hat"], atol=1e-4 if "smooth" in run else ATOL, rtol=0)


# ---------------------------------------------------------------- the trunk
def test_block_causal_mask_no_leak():
    model = tiny()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, model.L - 1, 8, generator=g)
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        base = model(labels, x)
        for k in (1, 2, 3):  # perturb scale k's inputs; scales < k must not move, scale k must
            b, e = model.begin_ends[k]
            y = x.clone()
            y[:, b - 1:e - 1] += 3.0
            out = model(labels, y)
            torch.testing.assert_close(out[:, :b], base[:, :b], atol=1e-6, rtol=0)
            assert (out[:, b:e] - base[:, b:e]).abs().max() > 1e-3


def test_kv_cache_steps_equal_masked_forward():
    model = tiny(shared_aln=True)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, model.L - 1, 8, generator=g)
    labels = torch.tensor([0, 4, 10])
    with torch.no_grad():
        h_full, cond = model.hidden(labels, x)
        cache, steps = model.start_cache(), []
        inp = model.first_input(cond)
        for k in range(len(model.patch_nums)):
            steps.append(model.step(inp, cond, cache))
            if k + 1 < len(model.patch_nums):
                b, e = model.begin_ends[k + 1]
                inp = model.scale_input(k + 1, x[:, b - 1:e - 1])
        h_steps = torch.cat(steps, dim=1)
    torch.testing.assert_close(h_steps, h_full, atol=ATOL, rtol=0)
    torch.testing.assert_close(model.logits(h_steps, cond), model.logits(h_full, cond), atol=ATOL, rtol=0)
    assert cache[0]["k"].shape == (3, model.num_heads, model.L, model.embed_dim // model.num_heads)


def test_label_drop_only_in_training_and_backward():
    model = tiny(cond_drop_rate=0.5)
    x = torch.randn(8, model.L - 1, 8, generator=torch.Generator().manual_seed(3))
    labels = torch.arange(8)
    with torch.no_grad():
        eval_out = model(labels, x, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(eval_out, model(labels, x), atol=0, rtol=0)  # eval: no drop, no draws
    model.train()
    g = torch.Generator().manual_seed(4)
    drop = torch.rand(8, generator=torch.Generator().manual_seed(4)) < 0.5  # the draw the model makes
    out = model(labels, x, generator=g)
    with torch.no_grad():
        expect = model.eval()(torch.where(drop, 10, labels), x)
    torch.testing.assert_close(out, expect, atol=ATOL, rtol=0)
    model.train()
    loss = model.loss(model(labels, x, generator=g), torch.randint(0, 64, (8, model.L)))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    groups = model.param_groups(0.05)
    no_decay = {id(p) for p in groups[1]["params"]}
    assert id(model.pos_1LC) in no_decay and id(model.blocks[0].attn.scale_mul_1H11) in no_decay
    assert id(model.head.weight) not in no_decay and id(model.class_emb.weight) not in no_decay


# ---------------------------------------------------------------- the sampler's pieces
def test_cfg_ramp_and_guidance_formula():
    assert [cfg_ramp(2.0, k, 5) for k in range(5)] == [0.0, 0.5, 1.0, 1.5, 2.0]
    lc, lu = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    t = cfg_ramp(1.5, 3, 10)
    torch.testing.assert_close(guide(torch.cat([lc, lu]), t, 2), lu + (1 + t) * (lc - lu), atol=1e-6, rtol=0)
    assert guide(lc, 0.0, 2) is lc  # cfg 0: no uncond rows are run


def _top_k_top_p_per_row(row: torch.Tensor, k: int, p: float) -> torch.Tensor:
    """The reference's filters written out for one row: keep logits >= the k-th largest; then, in ascending
    order, drop every code whose cumulative probability (itself included) is <= 1 - p, except the largest."""
    row = row.clone()
    if k:
        row[row < sorted(row.tolist(), reverse=True)[k - 1]] = float("-inf")
    if p:
        probs = torch.softmax(row, -1)
        order = torch.argsort(row, stable=True)
        total = 0.0
        for j, i in enumerate(order.tolist()):
            total += float(probs[i])
            if total <= 1 - p + 1e-6 and j < len(order) - 1:  # 1e-6: float32 cumsum in the reference
                row[i] = float("-inf")
    return row


def test_top_k_top_p_filters():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 6, 40, generator=g) * 2  # no ties: top-p splits ties by torch.sort's order
    for k, p in [(3, 0.0), (0, 0.8), (10, 0.5), (40, 1.0), (0, 0.01)]:
        out = filter_logits(logits.clone(), k, p)
        for row_in, row_out in zip(logits.reshape(-1, 40), out.reshape(-1, 40)):
            assert torch.equal(torch.isinf(row_out), torch.isinf(_top_k_top_p_per_row(row_in, k, p)))
            assert torch.equal(row_out[torch.isfinite(row_out)], row_in[torch.isfinite(row_out)])
    assert torch.isfinite(filter_logits(logits.clone(), 0, 0.01)).sum(-1).eq(1).all()  # only the most probable
    logits[0, 0, :5] = 9.0  # a tie at the top-k boundary: all five kept
    assert torch.isfinite(filter_logits(logits.clone(), 3, 0.0)[0, 0]).sum() == 5


def test_one_generator_draw_is_exponential_argmax():
    """SPEC-VAR 4: on CPU, multinomial(p, 1, replacement) with a generator = argmax(p / E), E ~ Exp(1) (N, V)."""
    p = torch.softmax(torch.randn(50, 64, generator=torch.Generator().manual_seed(6)), -1)
    a = torch.multinomial(p, 1, replacement=True, generator=torch.Generator().manual_seed(7))[:, 0]
    e = torch.empty(50, 64).exponential_(generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, (p / e).argmax(-1))


# ---------------------------------------------------------------- the loop
@pytest.mark.parametrize("more_smooth", [False, True])
def test_per_image_generators_independent_of_batch(ref_model, quantizer, more_smooth):
    labels, seeds = torch.tensor([3, 1, 10]), [21, 22, 23]
    kw = dict(cfg=1.5, top_k=20, top_p=0.9, more_smooth=more_smooth, return_codes=True)
    f_all, c_all = next_scale(ref_model, quantizer, 3, labels=labels,
                              generator=[torch.Generator().manual_seed(s) for s in seeds], **kw)
    for i, s in enumerate(seeds):
        f_one, c_one = next_scale(ref_model, quantizer, 1, labels=labels[i:i + 1],
                                  generator=[torch.Generator().manual_seed(s)], **kw)
        assert torch.equal(c_one[0], c_all[i])
        # a matrix product may round differently at another batch size; more_smooth's Gumbel softmax at
        # tau down to 0.0135 multiplies such logit differences by up to 1 / tau
        torch.testing.assert_close(f_one[0], f_all[i], atol=2e-4 if more_smooth else ATOL, rtol=0)
    # one generator for a batch of one draws the same numbers as a list of one
    f_g, c_g = next_scale(ref_model, quantizer, 1, labels=labels[:1], generator=torch.Generator().manual_seed(21), **kw)
    assert torch.equal(c_g[0], c_all[0])


def test_editing_keeps_known_codes(ref_model, quantizer):
    b, L = 2, ref_model.L
    def g():
        return torch.Generator().manual_seed(31)

    f_free, c_free = next_scale(ref_model, quantizer, b, labels=torch.tensor([2, 6]), cfg=1.0, generator=g(),
                                return_codes=True)
    known = torch.randint(0, 64, (b, L), generator=torch.Generator().manual_seed(32))
    mask = torch.zeros(b, L, dtype=torch.bool)
    mask[:, ref_model.begin_ends[-1][0]:] = True  # the last scale known
    mask[0, 0] = False
    f_ed, c_ed = next_scale(ref_model, quantizer, b, labels=torch.tensor([2, 6]), cfg=1.0, generator=g(),
                            known_codes=known, known_mask=mask, return_codes=True)
    assert torch.equal(c_ed[mask], known[mask])
    last = ref_model.begin_ends[-1][0]
    assert torch.equal(c_ed[:, :last], c_free[:, :last])  # same draws before the edited scale
    torch.testing.assert_close(f_ed, quantizer.indices_to_fhat(_split(ref_model, c_ed)), atol=ATOL, rtol=0)
    full = torch.ones(b, L, dtype=torch.bool)
    _, c_all = next_scale(ref_model, quantizer, b, labels=torch.tensor([2, 6]), generator=g(), known_codes=known,
                          known_mask=full, return_codes=True)
    assert torch.equal(c_all, known)


def test_sampler_bad_arguments(ref_model, quantizer):
    with pytest.raises(ValueError, match="generators for a batch of 2"):
        next_scale(ref_model, quantizer, 2, generator=[torch.Generator()])
    with pytest.raises(ValueError, match="top_k"):
        next_scale(ref_model, quantizer, 1, top_k=-1)
    with pytest.raises(ValueError, match="cfg"):
        next_scale(ref_model, quantizer, 1, cfg=-1.0)
    with pytest.raises(ValueError, match="known_codes and known_mask together"):
        next_scale(ref_model, quantizer, 1, known_codes=torch.zeros(1, 30, dtype=torch.long))
    other = MultiScaleQuantizer(MultiScaleVQConfig(z_channels=8, vocab_size=32, patch_nums=(1, 2, 3, 4)))
    with pytest.raises(ValueError, match="does not fit the model"):
        next_scale(ref_model, other, 1)


# ---------------------------------------------------------------- checkpoints
def test_load_var_checkpoint(tmp_path, golden):
    sizes = {k: v for k, v in golden["model"].items() if k not in ("depth", "drop_path_rate")}
    sizes["patch_nums"] = tuple(sizes["patch_nums"])  # the golden model is var_d2 at width 32, 4 heads
    sd = golden["state_dict"]
    torch.save(sd, tmp_path / "var_d2.pth")  # a published file is a bare state dict
    loaded = load_var_checkpoint(tmp_path / "var_d2.pth", "var_d2", **sizes)
    assert not loaded.training and all(torch.equal(loaded.state_dict()[k], v) for k, v in sd.items())
    torch.save({"epoch": 1, "trainer": {"var_wo_ddp": sd, "config": {"depth": 2}}, "args": {"tblr": 1e-4}},
               tmp_path / "ar-ckpt-last.pth")  # a reference training checkpoint
    loaded = load_var_checkpoint(tmp_path / "ar-ckpt-last.pth", "var_d2", **sizes)
    assert torch.equal(loaded.head.weight, sd["head.weight"])
    wrong = {"vqvae.pth": ({"quantize.embedding.weight": torch.zeros(2, 2), "encoder.conv_in.weight": torch.zeros(1)},
                           "MultiScaleVQVAE.from_var_checkpoint"),
             "mar.pth": ({"model": {"diffloss.net.x": torch.zeros(1)}, "model_ema": {}}, "load_pretrained"),
             "d4.pth": ({**sd, "blocks.3.attn.q_bias": torch.zeros(32)}, "depth-4 VAR .* pass name='var_d4'")}
    for fname, (obj, message) in wrong.items():
        torch.save(obj, tmp_path / fname)
        with pytest.raises(ValueError, match=message):
            load_var_checkpoint(tmp_path / fname, "var_d2", **sizes)
    with pytest.raises(FileNotFoundError):
        load_var_checkpoint(tmp_path / "missing.pth", "var_d2", **sizes)

def test_sampling_ignores_training_mode():
    """Sampling never drops labels or paths, whatever the mode (both would draw outside the given generator)."""
    model = tiny(cond_drop_rate=0.5, drop_path_rate=0.5)
    q = MultiScaleQuantizer(MultiScaleVQConfig(z_channels=8, vocab_size=64, patch_nums=(1, 2, 3, 4)))
    kw = dict(labels=torch.tensor([1, 2]), cfg=1.0, return_codes=True)
    _, eval_codes = next_scale(model.eval(), q, 2, generator=torch.Generator().manual_seed(41), **kw)
    _, train_codes = next_scale(model.train(), q, 2, generator=torch.Generator().manual_seed(41), **kw)
    assert torch.equal(eval_codes, train_codes)
