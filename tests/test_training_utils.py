"""Pure pieces of the recipe: LR schedule, weight-decay groups, EMA, data order per micro-batch slot."""
import math

import pytest
import torch

from mar import create_model
from mar.engine.data import batch_indices
from mar.engine.loop import ema_decay, ema_update, lr_at, param_groups


def test_lr_schedule_formulas():
    assert lr_at(0, 8e-4, 100, 400) == 0.0
    assert lr_at(50, 8e-4, 100, 400) == pytest.approx(4e-4)  # linear warmup
    assert lr_at(250, 8e-4, 100, 400, "constant") == 8e-4
    cos = lambda e: 1e-5 + (8e-4 - 1e-5) * 0.5 * (1 + math.cos(math.pi * (e - 100) / 300))  # noqa: E731
    for e in (100, 175.5, 399, 400):
        assert lr_at(e, 8e-4, 100, 400, "cosine", 1e-5) == pytest.approx(cos(e))
    assert lr_at(500, 8e-4, 100, 400, "cosine", 1e-5) == pytest.approx(1e-5)  # stays at min_lr after the end
    with pytest.raises(ValueError, match="constant"):
        lr_at(200, 1e-3, 1, 2, "step")


def test_no_weight_decay_for_1d_biases_and_diffloss():
    model = create_model("mar_tiny", img_size=16, vae_stride=4, token_channels=4, num_classes=10, buffer_size=4)
    no_decay, decay = param_groups(model, 0.02)
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.02
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert nd | d == set(names.values()) and not nd & d
    assert all("diffloss" in n or n.endswith(".bias") or model.get_parameter(n).ndim == 1 for n in nd)
    assert {"fake_latent", "mask_token", "class_emb.weight", "encoder_pos_embed_learned", "z_proj.weight"} <= d
    assert "diffloss.net.input_proj.weight" in nd and "encoder_blocks.0.norm1.weight" in nd


def test_ema_decay_and_update():
    assert ema_decay(0.9999, 0) == 0.9999
    assert ema_decay(0.999, 0, warmup=True) == pytest.approx(0.1)
    assert ema_decay(0.999, 90, warmup=True) == pytest.approx(91 / 100)
    assert ema_decay(0.999, 10**6, warmup=True) == 0.999
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = a.weight.detach().clone()
    ema_update(a, b, 0.9)
    torch.testing.assert_close(a.weight, 0.9 * before + 0.1 * b.weight)


def test_slots_of_a_step_partition_the_global_batch_and_epochs_permute():
    n, g, b = 100, 8, 2  # 4 slots of 2: ranks x accumulation steps
    seen = []
    for step in range(n // g):  # one epoch
        slots = [batch_indices(n, 0, step, g, j, b) for j in range(g // b)]
        assert all(epoch == 0 for epoch, _ in slots)
        seen += [int(i) for _, idx in slots for i in idx]
    assert len(seen) == len(set(seen)) == (n // g) * g  # no repeats; the partial last batch is dropped
    e1, first = batch_indices(n, 0, n // g, g, 0, b)
    assert e1 == 1 and not torch.equal(first, batch_indices(n, 0, 0, g, 0, b)[1])
    assert torch.equal(batch_indices(n, 3, 5, g, 1, b)[1], batch_indices(n, 3, 5, g, 1, b)[1])
    with pytest.raises(ValueError, match="fewer than one global batch"):
        batch_indices(4, 0, 0, 8, 0, 2)


def test_launch_trap_is_refused(monkeypatch):
    from mar.engine.loop import check_launch

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu"):
        check_launch(1)
    check_launch(2)
    monkeypatch.delenv("WORLD_SIZE")
    check_launch(1)
