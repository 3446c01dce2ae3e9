"""Does the data loader keep up with the model? Loader images/s (the training loader itself: ImageFolder of
JPEGs, ADM center crop, seeded flips, ``mar.engine.data.train_batches`` with persistent workers and, with --pin,
pinned memory) for each worker count, beside the model's step time at the same batch; prints which one bounds
the run.

The images: ``--folder`` (an ImageFolder, e.g. ImageNet's train/), or a synthetic folder of ``--make N`` JPEGs
of ImageNet's typical size (500 x 375, quality 90; random smooth colour fields, so decoding costs what a photo
costs). The model's step: ``--step-s`` (measured elsewhere, e.g. by bench_training.py on the GPU), or measured
here with bench_training's real step for ``--setting`` (a latent-cache run skips the tokenizer; an image run
also encodes each batch: add that with ``--encode``).

    OMP_NUM_THREADS=1 python benchmarks/bench_data.py --make 512 --batch 64 --workers 0 1 2 --setting mar_base_256 --model-batch 2
    python benchmarks/bench_data.py --folder /data/imagenet/train --batch 64 --workers 4 8 16 --pin --step-s 0.21
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import machine_line  # noqa: E402

from mar.engine.data import ImageFolderDataset, train_batches  # noqa: E402


def make_folder(root: Path, n: int, classes: int = 8, size=(500, 375), seed: int = 0) -> Path:
    """``n`` JPEGs in ``classes`` class folders: smooth random colour fields (upsampled noise), photo-like to
    decode."""
    g = np.random.default_rng(seed)
    for i in range(n):
        folder = root / f"class{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = g.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        im = Image.fromarray(coarse).resize(size, Image.BICUBIC)
        im.save(folder / f"img{i:06d}.JPEG", quality=90)
    return root


def loader_rate(folder: Path, image_size: int, batch: int, batches: int, workers: int, pin: bool) -> dict:
    """Images/s of the training loader, after one warm-up batch (the workers' start-up is reported apart)."""
    ds = ImageFolderDataset(folder, image_size=image_size, hflip=True, seed=0)
    t0 = time.perf_counter()
    it = train_batches(ds, seed=0, batch_size=batch, grad_accum=1, start_step=0, rank=0, world=1,
                       num_workers=workers, pin_memory=pin)
    x, _ = next(it)
    first = time.perf_counter() - t0
    assert x.shape == (batch, 3, image_size, image_size)
    t0 = time.perf_counter()
    for _ in range(batches):
        x, y = next(it)
    seconds = time.perf_counter() - t0
    return {"workers": workers, "pin": pin, "images_per_s": batch * batches / seconds, "first_batch_s": first,
            "pinned": bool(x.is_pinned()) if pin else False}


def model_step_s(setting: str, batch: int, steps: int) -> float:
    """bench_training's real step (forward, backward, AdamW), fp32, in a fresh process."""
    here = Path(__file__).resolve().parent
    proc = subprocess.run([sys.executable, str(here / "bench_training.py"), "--child", "--setting", setting, "--batch",
                           str(batch), "--steps", str(steps), "--precision", "fp32", "--grad-ckpt", "0"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench_training failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["s_per_step"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--folder", type=Path, help="an ImageFolder (class sub-folders of images)")
    src.add_argument("--make", type=int, help="make a synthetic folder of this many 500x375 JPEGs")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch", type=int, default=64, help="per-process batch (the published recipe: 2048 / 32 = 64)")
    p.add_argument("--batches", type=int, default=4, help="timed batches per worker count")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--pin", action="store_true", help="pinned memory (what a CUDA run uses)")
    step = p.add_mutually_exclusive_group()
    step.add_argument("--step-s", type=float, help="the model's seconds per step at --batch, measured elsewhere")
    step.add_argument("--setting", help="measure the step here with bench_training.py's setting of this name")
    p.add_argument("--model-batch", type=int, help="batch for the measured step (default --batch); the step time is "
                                                   "scaled linearly to --batch")
    p.add_argument("--model-steps", type=int, default=1)
    a = p.parse_args(argv)
    if a.pin and not torch.cuda.is_available():
        p.error("--pin needs CUDA (pinned memory is page-locked for GPU copies): drop it on this machine")
    if any(w < 0 for w in a.workers) or a.batch < 1 or a.batches < 1:
        p.error("--workers must be >= 0, --batch and --batches >= 1")
    print(machine_line("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        folder = a.folder
        if folder is None:
            t0 = time.perf_counter()
            folder = make_folder(Path(tmp) / "images", a.make)
            print(f"made {a.make} synthetic 500x375 JPEGs in {time.perf_counter() - t0:.1f} s")
        if a.batch * (a.batches + 1) > len(ImageFolderDataset(folder, image_size=a.image_size)):
            print("note: fewer images than the timed batches: the loader wraps into the next epoch (still decodes)")
        rows = [loader_rate(folder, a.image_size, a.batch, a.batches, w, a.pin) for w in a.workers]
    step = a.step_s
    if a.setting:
        mb = a.model_batch or a.batch
        step = model_step_s(a.setting, mb, a.model_steps) * a.batch / mb
        print(f"model step ({a.setting}, fp32, measured at batch {mb}{', scaled to ' + str(a.batch) if mb != a.batch else ''}):"
              f" {step:.2f} s = {a.batch / step:.1f} images/s")
    print(f"batch {a.batch} at {a.image_size} px | workers | loader images/s | first batch s | bound")
    for r in rows:
        bound = "" if step is None else ("loader" if r["images_per_s"] < a.batch / step else "model")
        print(f"  {r['workers']:>2} | {r['images_per_s']:8.1f} | {r['first_batch_s']:6.2f} | {bound}")
    if step is not None:
        need = a.batch / step
        enough = [r["workers"] for r in rows if r["images_per_s"] >= need]
        print(f"the model consumes {need:.1f} images/s per process: " +
              (f"{min(enough)} worker(s) keep up" if enough else "no worker count tried keeps up: add workers "
               "(data.num_workers), or cache the latents (train.py --cache-latents DIR)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
