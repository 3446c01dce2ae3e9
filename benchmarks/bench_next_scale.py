"""Next-scale models on CPU at the Fashion-MNIST configurations: training step and sampling time, side by side
in one run (VAR, HART, continuous next-scale; configs/fmnist_var.yaml, fmnist_hart.yaml, fmnist_next_scale.yaml).

Training: one optimizer step (forward, backward, AdamW) on a batch of latents, the tokenizer's encoding
excluded (train.py reads cached latents). Sampling: seconds per image for a batch with guidance, the
tokenizer's decoder excluded (the same for all three). Random weights: the cost does not depend on them.

    OMP_NUM_THREADS=1 python benchmarks/bench_next_scale.py
    OMP_NUM_THREADS=1 python benchmarks/bench_next_scale.py --batch 16 --repeats 1 --models var --model.preset=var_d2
"""
from __future__ import annotations

import argparse

import torch

from common import machine_line, timed

from mar.config import TrainConfig, load_config
from mar.engine.tasks import build_next_scale
from tokenizers import open_tokenizer

CONFIGS = {"var": "configs/fmnist_var.yaml", "hart": "configs/fmnist_hart.yaml",
           "next_scale": "configs/fmnist_next_scale.yaml"}


def build(name: str, overrides: list[str]):
    """(model, tokenizer) of a config with a fresh, random tokenizer of its preset."""
    cfg = load_config(TrainConfig, CONFIGS[name], overrides)
    t = cfg.tokenizer
    torch.manual_seed(0)
    tok = open_tokenizer(None, t.preset, t.in_channels, scaling_factor=None).eval()
    return build_next_scale(cfg, tok).attach(tok), tok, cfg


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(CONFIGS), choices=tuple(CONFIGS))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--sample-batch", type=int, default=64)
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--repeats", type=int, default=3)
    args, overrides = p.parse_known_args(argv)  # the rest: config overrides for every model (--section.key=value)
    bad = [o for o in overrides if not o.startswith("--") or "=" not in o]
    if bad:
        p.error(f"unrecognised arguments {bad}: overrides are written --section.key=value")
    print(machine_line())
    print("model | parameters | train s/step (batch %d) | train images/s | sample s/image (batch %d, cfg %g)"
          % (args.batch, args.sample_batch, args.cfg))
    for name in args.models:
        model, tok, cfg = build(name, overrides)
        side = model.patch_nums[-1]
        channels = tok.config.z_channels if tok.kind == "multiscale" else tok.token_channels
        g = torch.Generator().manual_seed(0)
        latents = torch.randn(args.batch, channels, side, side, generator=g)
        labels = torch.arange(args.batch) % cfg.model.num_classes
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            model.train()
            if tok.kind == "multiscale":
                loss, _ = model.training_loss(tok.quantize, latents, labels, g)
            else:
                loss, _ = model.training_loss(latents, labels, g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        train = timed(step, repeats=args.repeats)
        model.eval()
        sample_labels = torch.arange(args.sample_batch) % cfg.model.num_classes
        gens = lambda: [torch.Generator().manual_seed(i) for i in range(args.sample_batch)]  # noqa: E731
        sample = timed(lambda: model.generate(args.sample_batch, labels=sample_labels, cfg=args.cfg, generator=gens()),
                       repeats=args.repeats) / args.sample_batch
        n = sum(p.numel() for p in model.parameters())
        print(f"{name} | {n / 1e6:.2f} M | {train:.3f} | {args.batch / train:.1f} | {sample:.4f}", flush=True)


if __name__ == "__main__":
    main()
