"""What storing the cached moments in float16 does to training: the rounding of the moments, and the MAR training
loss on the same batches and the same random draws, float32 cache against float16 cache, beside the loss's own
spread over random draws (so a difference can be read as large or small).

The shipped Fashion-MNIST tokenizer and MAR weights (pretrained/fmnist) by default; ``--run`` takes any run folder
and ``--data``/``--split`` its images. The loss is ``MAR.forward`` (orders, mask ratio, diffusion t and noise from
one generator per batch and draw), in eval mode (no dropout), so both caches see the same draws.

    OMP_NUM_THREADS=1 python benchmarks/latent_cache_dtype.py --images 2000 --draws 4
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import machine_line  # noqa: E402
from mar.engine.data import FashionMNISTDataset  # noqa: E402
from mar.run import load_run  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=None, help="MAR run folder or weights (default: the shipped pretrained/fmnist)")
    p.add_argument("--data", default=None, help="Fashion-MNIST folder (default: the Debian package's)")
    p.add_argument("--split", default="train[:2000]")
    p.add_argument("--images", type=int, default=2000, help="images (the first of the split)")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--draws", type=int, default=4, help="random draws (orders, masks, t, noise) per batch")
    a = p.parse_args(argv)
    torch.set_grad_enabled(False)
    run = load_run(a.run)
    tok, mar = run.tokenizer, run.model.eval()
    data = FashionMNISTDataset(a.data, split=a.split, pad_to=tok.stride * mar.seq_h)
    n = min(a.images, len(data))
    images = torch.stack([data[i][0] for i in range(n)])
    labels = torch.tensor([data[i][1] for i in range(n)])
    moments = torch.cat([tok.encode_moments(images[i:i + a.batch]) for i in range(0, n, a.batch)])
    half = moments.half().float()
    c = moments.shape[1] // 2
    err = (half - moments).abs()
    print(machine_line())
    print(f"{n} images, moments {tuple(moments.shape[1:])}: float16 rounding |error| max {err.max():.3e}, "
          f"mean {err.mean():.3e} (mean {err[:, :c].mean():.3e}, logvar {err[:, c:].mean():.3e}); "
          f"|moments| mean {moments.abs().mean():.3e}")
    diffs, losses = [], {"float32": [], "float16": []}
    for d in range(a.draws):
        for name, m in (("float32", moments), ("float16", half)):
            total = 0.0
            for i in range(0, n, a.batch):
                g = torch.Generator().manual_seed(1000 * d + i)  # the same draws for both caches
                tokens = tok.sample_from_moments(m[i:i + a.batch], generator=g)
                total += float(mar(tokens, labels[i:i + a.batch], generator=g)) * len(tokens)
            losses[name].append(total / n)
        diffs.append(losses["float16"][-1] - losses["float32"][-1])
    spread = statistics.stdev(losses["float32"]) if a.draws > 1 else float("nan")
    print(f"{'cache':8s} {'mean loss':>10s}   per draw")
    for name, values in losses.items():
        print(f"{name:8s} {statistics.mean(values):10.6f}   " + " ".join(f"{v:.6f}" for v in values))
    print(f"float16 - float32 on the same draws: mean {statistics.mean(diffs):+.2e}, max |.| "
          f"{max(abs(x) for x in diffs):.2e}; draw-to-draw std of the float32 loss {spread:.2e} "
          f"(ratio {max(abs(x) for x in diffs) / spread:.3f})")


if __name__ == "__main__":
    main()
