"""Causal generation with and without the KV cache: seconds per image, side by side in one run.

With the cache every step computes one new position through the blocks (keys and values of the prefix are
kept); without it the whole prefix is recomputed at every step, so the transformer's cost grows from O(L) to
O(L^2) positions per image. The head's cost (one token per step) is the same in both. Random weights (the cost
does not depend on them); the two paths are also checked to give the same tokens.

    OMP_NUM_THREADS=1 python benchmarks/bench_kv_cache.py
    OMP_NUM_THREADS=1 python benchmarks/bench_kv_cache.py --setting causal_256 --batch 4 --repeats 1
"""
from __future__ import annotations

import argparse

import torch

from common import machine_line, timed

from mar import create_model

# name: (preset, head, create_model keyword arguments)
SETTINGS = {
    # the ablation table's causal cells on Fashion-MNIST (8x8 = 64 tokens)
    "fmnist_ce": ("mar_mini", "categorical", dict(img_size=32, vae_stride=4, token_channels=512)),
    "fmnist_diff": ("mar_mini", "diffloss", dict(img_size=32, vae_stride=4, token_channels=8,
                                                 num_sampling_steps="50")),
    # a longer sequence: 16x16 = 256 tokens (ImageNet 256 on 16-stride tokens), categorical head
    "causal_256": ("mar_small", "categorical", dict(img_size=256, vae_stride=16, token_channels=1024)),
}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", nargs="+", default=["fmnist_ce", "fmnist_diff"], choices=tuple(SETTINGS))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    print(machine_line())
    print("setting | tokens | cached s/image | uncached s/image | speed-up | same tokens")
    for name in args.setting:
        preset, head, kwargs = SETTINGS[name]
        model = create_model(preset, "causal", head, num_classes=10, order="random", attn_dropout=0.0,
                             proj_dropout=0.0, generator=torch.Generator().manual_seed(0), **kwargs).eval()
        labels = torch.arange(args.batch) % 10
        out = {}

        def run(cached):
            out[cached] = model.sample_tokens(args.batch, cfg=args.cfg, labels=labels, kv_cache=cached,
                                              generator=torch.Generator().manual_seed(0))

        t = {c: timed(lambda: run(c), repeats=args.repeats) / args.batch for c in (True, False)}
        a, b = out[True], out[False]
        same = torch.equal(a, b) if not a.is_floating_point() else f"max diff {float((a - b).abs().max()):.1e}"
        print(f"{name} | {model.seq_len} | {t[True]:.4f} | {t[False]:.4f} | {t[False] / t[True]:.2f}x | {same}",
              flush=True)


if __name__ == "__main__":
    main()
