"""The parts' interfaces: a categorical head plugs into the generator unchanged, orders, registry, run loader."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mar.generate import masked
from mar.model import MAR
from mar.orders import known_first, make_orders, random_orders, raster_orders


class ToyCategoricalHead(nn.Module):
    """Cross-entropy over K codes from z, with CFG on the logits and sampling by inverse CDF from uniforms drawn
    with the generator(s): the smallest head of the other kind the Head interface must take."""

    kind, token_shape, token_dtype = "discrete", (), torch.long

    def __init__(self, num_codes: int, z_channels: int):
        super().__init__()
        self.logits = nn.Linear(z_channels, num_codes)

    def loss(self, target, z, mask=None, generator=None):
        per_row = F.cross_entropy(self.logits(z), target, reduction="none")
        return per_row.mean() if mask is None else (per_row * mask).sum() / mask.sum()

    def sample(self, z, *, temperature, cfg, generator, options, num_steps=None):
        logits = self.logits(z)
        if cfg != 1.0:
            cond, uncond = logits.chunk(2)
            logits = uncond + cfg * (cond - uncond)
        probs = F.softmax(logits / temperature, dim=-1)
        n = len(probs)
        if isinstance(generator, list):
            u = torch.cat([torch.rand(n // len(generator), 1, generator=g) for g in generator])
        else:
            u = torch.rand(n, 1, generator=generator)
        return (probs.cumsum(-1) < u).sum(-1).clamp(max=probs.shape[-1] - 1)


@dataclass(frozen=True)
class ToyCategoricalSpec:
    num_codes: int = 7
    module_name: str = "categorical"

    def build(self, token_dim, z_channels, generator=None):
        return ToyCategoricalHead(self.num_codes, z_channels)

    def input_embedding(self, token_dim, width):
        return nn.Embedding(self.num_codes, width)


def toy_generator():
    return MAR(img_size=16, vae_stride=4, token_channels=1, encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2,
               decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, num_classes=3, buffer_size=2,
               head=ToyCategoricalSpec(), generator=torch.Generator().manual_seed(0))


def test_a_categorical_head_trains_and_samples_with_the_generator_unchanged():
    model = toy_generator()
    assert set(k.split(".")[0] for k in model.state_dict()) >= {"categorical", "z_proj"} and model.head.kind == "discrete"
    codes = torch.randint(0, 7, (4, 4, 4), generator=torch.Generator().manual_seed(1))  # (B, h, w) code indices
    loss = model(codes, torch.tensor([0, 1, 2, 0]), generator=torch.Generator().manual_seed(2))
    loss.backward()
    assert torch.isfinite(loss) and model.z_proj.weight.grad.abs().sum() > 0
    known = torch.zeros(2, 16, dtype=torch.bool)
    known[:, :5] = True
    given = torch.randint(0, 7, (2, 16), generator=torch.Generator().manual_seed(3))
    gens = [torch.Generator().manual_seed(s) for s in (4, 5)]
    with torch.no_grad():
        out = masked(model.eval(), 2, labels=torch.tensor([1, 2]), num_iter=4, cfg=2.0, generator=gens,
                     known_tokens=given, known_mask=known)
    assert out.dtype == torch.long and out.shape == (2, 16) and ((0 <= out) & (out < 7)).all()
    assert torch.equal(out[known], given[known])
    assert model.unpatchify(out).shape == (2, 4, 4)


def test_orders():
    g = torch.Generator().manual_seed(0)
    o = random_orders(3, 10, g)
    assert torch.equal(o.sort(-1).values, torch.arange(10).expand(3, 10))
    assert torch.equal(raster_orders(2, 5), torch.tensor([[4, 3, 2, 1, 0]] * 2))  # read from the back: 0 first
    known = torch.zeros(3, 10, dtype=torch.bool)
    known[0, [1, 4]], known[2, :] = True, True
    moved = known_first(o, known)
    assert torch.equal(moved[1], o[1])  # nothing known: unchanged
    assert set(moved[0, -2:].tolist()) == {1, 4}  # the known positions at the back (visible first) ...
    assert moved[0, :-2].tolist() == [p for p in o[0].tolist() if p not in (1, 4)]  # ... the rest in order
    with pytest.raises(ValueError, match="unknown order policy"):
        make_orders("spiral", 1, 4)


def _imports(path):
    import ast

    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_the_dependency_rules_of_the_layout():
    """Data flows one way: no command-line script imports another; diffloss and tokenizers import nothing of the
    project; below the entry points nothing imports accelerate or argparse-parses (mar/cli.py is the scripts')."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    scripts = {"train", "sample", "evaluate"}
    for script in scripts:
        assert not _imports(root / f"{script}.py") & scripts, script
    for package in ("diffloss", "tokenizers"):
        for f in (root / package).glob("*.py"):
            assert not _imports(f) & {"mar", *scripts}, f
    for f in (root / "mar").rglob("*.py"):
        assert "accelerate" not in _imports(f), f
        if f.name != "cli.py":
            assert "argparse" not in _imports(f) or f.name == "checkpoint.py", f  # (allow-listed unpickling only)
