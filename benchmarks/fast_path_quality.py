"""The fast sampling paths' speed-up and quality cost side by side, on a trained Fashion-MNIST model.

For every variant (see ``common.parse_variant``; "exact" is the reference path) the script samples the
same N images (label i % 10, the same seeds), times the generation (transformer + head; the decode is
timed apart), writes ``{i:06d}_c{label:03d}.png`` files and scores them with the project's Fashion-MNIST
classifier features (``mar.eval.metrics.score_folder(features="fmnist")``: fd_fmnist, is_fmnist, kd_fmnist,
precision/recall) and its class accuracy. Numbers compare only runs scored with the same classifier file.

    python evaluate.py train-classifier --data /usr/share/datasets/fashion-mnist --out fmnist_classifier.safetensors
    OMP_NUM_THREADS=1 python benchmarks/fast_path_quality.py --weights runs/fmnist/mar/mar_ema.safetensors \
        --classifier fmnist_classifier.safetensors --num-images 2000 --num-iter 16 --cfg 3.0 \
        --variant exact "precision=bf16" "sampler=ddim,steps=25" "anneal=100-10" \
                  "sampler=ddim,anneal=50-10,precision=bf16" --out runs/fast_path_quality

The weights are read by ``mar.run.load_run`` (any run folder or weights file); the tokenizer comes from the
run (``tokenizer.checkpoint`` of its config) unless ``--tokenizer`` is given; so does the sampler guard (``sample.clip_denoised``, applied to every variant)
unless ``--clip-denoised R|off`` is given. Results are printed as a table and written to <out>/results.json.
"""
from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import torch

from common import machine_line, parse_variant, split_cfg, split_num_iter
from mar.cli import parse_clip_denoised
from mar.engine.data import item_seed
from mar.eval.metrics import score_folder
from mar.io import save_grid, save_png, write_json
from mar.run import load_run


def folder_name(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", spec) or "exact"


@torch.no_grad()
def generate(model, tok, variant: dict, out: Path, num_images: int, batch: int, num_iter: int, cfg: float,
             temperature: float, seed: int) -> dict:
    """Write the variant's images; returns seconds spent sampling tokens and decoding."""
    out.mkdir(parents=True, exist_ok=True)
    variant, num_iter = split_num_iter(variant, num_iter)
    variant, cfg = split_cfg(variant, cfg)
    sample_s = decode_s = 0.0
    grid = []
    for start in range(0, num_images, batch):
        idx = list(range(start, min(start + batch, num_images)))
        labels = torch.tensor([i % model.num_classes for i in idx])
        g = torch.Generator().manual_seed(item_seed(seed, start))
        t0 = time.perf_counter()
        tokens = model.sample_tokens(len(idx), num_iter=num_iter, cfg=cfg, labels=labels, temperature=temperature,
                                     generator=g, **variant)
        t1 = time.perf_counter()
        images = tok.to_uint8(tok.decode(tokens)).numpy()  # (B, H, W, C)
        decode_s += time.perf_counter() - t1
        sample_s += t1 - t0
        for i, img, c in zip(idx, images, labels.tolist()):
            save_png(img, out / f"{i:06d}_c{c:03d}.png")
        grid.extend(images[: max(0, 80 - len(grid))])
    save_grid(grid, out.parent / f"grid_{out.name}.png", nrow=10, upscale=2)
    return {"sample_s": sample_s, "decode_s": decode_s}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="a run folder or mar_ema.safetensors of a task=mar run")
    p.add_argument("--tokenizer", help="tokenizer file (default: the run config's tokenizer.checkpoint)")
    p.add_argument("--distilled-head", help="a distilled head (train.py task=distill_head) for distilled=S variants")
    p.add_argument("--classifier", required=True, help="Fashion-MNIST classifier (evaluate.py train-classifier)")
    p.add_argument("--ref", default="fashion_mnist:test", help="reference images (a folder, .npz, fashion_mnist:SPLIT)")
    p.add_argument("--ref-stats", help="a statistics file instead of --ref (fid and isc only)")
    p.add_argument("--fmnist-root", help="Fashion-MNIST IDX folder for fashion_mnist:SPLIT")
    p.add_argument("--metrics", default=None, help="e.g. fid,isc,kid,prc (default: all the reference allows)")
    p.add_argument("--variant", nargs="+", default=["exact", "sampler=ddim,anneal=50-10,precision=bf16"])
    p.add_argument("--num-images", type=int, default=1000)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--num-iter", type=int, default=16)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/fast_path_quality")
    p.add_argument("--clip-denoised", metavar="R|off", type=parse_clip_denoised,
                   help="sampler guard for every variant (default: the run's sample.clip_denoised)")
    a = p.parse_args(argv)
    run = load_run(a.weights, tokenizer=a.tokenizer, distilled_head=a.distilled_head)
    model, tok = run.model, run.tokenizer
    clip = run.sample_defaults.clip_denoised if a.clip_denoised is None else (a.clip_denoised or None)
    out = Path(a.out)
    print(machine_line())
    print(f"# {a.weights}: {a.num_images} images per variant, batch {a.batch}, num_iter {a.num_iter}, cfg {a.cfg}, "
          f"temperature {a.temperature}, diffusion steps {model.head.num_sampling_steps} on the exact path, "
          f"clip_denoised {clip}")
    results = {}
    for spec in a.variant:
        folder = out / folder_name(spec)
        times = generate(model, tok, {**parse_variant(spec), "clip_denoised": clip}, folder, a.num_images, a.batch,
                         a.num_iter, a.cfg, a.temperature, a.seed)
        scores = score_folder(str(folder), ref=None if a.ref_stats else a.ref, ref_stats=a.ref_stats,
                              metrics=a.metrics, features="fmnist", classifier=a.classifier,
                              kid_subset_size=min(1000, a.num_images), fmnist_root=a.fmnist_root)
        results[spec] = {**times, "s_per_image": times["sample_s"] / a.num_images, **scores["metrics"]}
        write_json(results, out / "results.json")
    base = results[a.variant[0]]["s_per_image"]
    names = [k for k in ("fd_fmnist", "class_accuracy", "is_fmnist_mean", "kd_fmnist_mean", "precision_fmnist",
                         "recall_fmnist") if any(k in r for r in results.values())]
    print("variant | s/image speed-up | " + " ".join(names))
    for spec, r in results.items():
        print(f"{spec} | {r['s_per_image']:.4f} {base / r['s_per_image']:5.2f}x | "
              + " ".join(f"{r[k]:.4f}" if k in r else "-" for k in names))
    print(f"# decode (not in s/image): {results[a.variant[0]]['decode_s'] / a.num_images:.4f} s/image; "
          f"images and grids under {out}, numbers in {out / 'results.json'}")


if __name__ == "__main__":
    main()
