"""What a published training recipe costs: training FLOPs per image counted on the real step, and GPU-hours.

For each setting (benchmarks/common.py SETTINGS) one real training step (MAR forward with diffusion_batch_mul 4
on cached latents, backward) runs under ``torch.utils.flop_counter.FlopCounterMode``, which counts the matrix
products, convolutions and attention by their shapes (what a GPU's tensor cores execute; elementwise work and the
AdamW update are not counted). From the FLOPs per image the recipe's total follows, and from it the wall time on
N GPUs at a stated throughput: either a measured one (``--gpu-images-per-s``, e.g. from benchmarks/gpu_check.sh on
the same model) or an assumed fraction of the GPU's dense bf16 peak (model FLOPs utilisation, MFU).

    OMP_NUM_THREADS=1 python benchmarks/train_cost.py --setting mar_base_256 mar_large_256 mar_huge_256
    python benchmarks/train_cost.py --setting mar_large_256 --gpu-images-per-s 120  # a measured throughput
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from common import build, machine_line

H100_BF16_DENSE = 989e12  # FLOP/s, NVIDIA H100 SXM datasheet (dense, without sparsity)
IMAGENET_TRAIN = 1_281_167


def train_flops_per_image(setting: str, batch: int = 2) -> tuple[float, float]:
    """(training FLOPs per image, parameters) of one forward + backward at ``batch`` on CPU."""
    model = build(setting, "cpu").train()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(batch, model.token_channels, model.seq_h * model.patch_size, model.seq_w * model.patch_size,
                         generator=g)
    labels = torch.randint(0, model.num_classes, (batch,), generator=g)
    counter = FlopCounterMode(display=False)
    with counter:
        model(tokens, labels, generator=g).backward()
    return counter.get_total_flops() / batch, sum(p.numel() for p in model.parameters())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", nargs="+", default=["mar_base_256", "mar_large_256", "mar_huge_256"])
    p.add_argument("--batch", type=int, default=2, help="images in the counted step (FLOPs scale with it)")
    p.add_argument("--epochs", type=float, default=400)
    p.add_argument("--images", type=int, default=IMAGENET_TRAIN, help="training images per epoch (ImageNet-1k)")
    p.add_argument("--gpus", type=int, default=32)
    p.add_argument("--mfu", type=float, nargs="+", default=[0.3, 0.4, 0.5],
                   help="assumed fractions of the bf16 dense peak reached")
    p.add_argument("--peak-flops", type=float, default=H100_BF16_DENSE, help="per GPU (default: H100 bf16 dense)")
    p.add_argument("--gpu-images-per-s", type=float, default=None, help="a measured per-GPU training throughput")
    p.add_argument("--published", nargs="*", default=["mar_large_256=31"], metavar="SETTING=HOURS",
                   help="published wall times of the recipe on --gpus GPUs: prints the MFU each implies (default: "
                        "MAR-L, 400 epochs on 32 H100 in about 31 hours, as the project's issue 15 quotes it)")
    a = p.parse_args(argv)
    published = {k: float(v) for k, v in (item.split("=", 1) for item in a.published)}
    print(machine_line())
    print(f"recipe: {a.epochs:g} epochs x {a.images:,} images on {a.gpus} GPUs; peak {a.peak_flops / 1e12:.0f} TFLOP/s")
    print(f"{'setting':15s} {'params':>8s} {'GFLOP/img':>10s} {'total EFLOP':>12s}  hours at MFU "
          + " ".join(f"{m:.0%}" for m in a.mfu) + ("  (measured img/s)" if a.gpu_images_per_s else ""))
    for setting in a.setting:
        t0 = time.perf_counter()
        per_image, params = train_flops_per_image(setting, a.batch)
        total = per_image * a.epochs * a.images
        hours = [total / (a.gpus * a.peak_flops * m) / 3600 for m in a.mfu]
        line = (f"{setting:15s} {params / 1e6:7.0f}M {per_image / 1e9:10.1f} {total / 1e18:12.1f}  "
                + " ".join(f"{h:6.1f}" for h in hours))
        if a.gpu_images_per_s:
            line += f"  {a.epochs * a.images / (a.gpus * a.gpu_images_per_s) / 3600:8.1f}"
        if setting in published:
            hours_pub = published[setting]
            line += f"  published {hours_pub:g} h -> MFU {total / (a.gpus * a.peak_flops * hours_pub * 3600):.1%}"
        print(line + f"   (counted in {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
