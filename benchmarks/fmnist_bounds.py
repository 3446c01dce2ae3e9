"""What the Fashion-MNIST scores can reach: real training images and tokenizer reconstructions, scored
like samples (fd_fmnist against the test set, class accuracy from the file names).

    python benchmarks/fmnist_bounds.py --tokenizer pretrained/fmnist/tokenizer.safetensors \\
        --classifier pretrained/fmnist/classifier.safetensors --num 10000 --out runs/fmnist/bounds

The first N training images (their true classes in the names, ``{i:06d}_c{class:03d}.png``) go to
``OUT/real``; their reconstructions decode(tokens), tokens drawn from the tokenizer's posterior as in
MAR training (one seeded generator), go to ``OUT/recon`` (a multi-scale VQ: decode of its codes; a hybrid one also
decode of the unquantized latent in ``OUT/recon_continuous``). Pixel fidelity on the test set: PSNR and SSIM
(``mar.eval.fidelity``) of the reconstructions of the first ``--fidelity-num`` test images (default all 10,000),
on the 28x28 image inside the 32x32 padding (the black border would flatter both). Prints and writes
``OUT/bounds.json``. The issue's bar: samples' fd_fmnist <= 5x the real training images' (same N).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mar.eval.classifier import fashion_mnist_uint8, read_classifier_metadata  # noqa: E402
from mar.eval.fidelity import psnr, ssim, summary  # noqa: E402
from mar.eval.metrics import compute_reference_stats, score_folder  # noqa: E402
from mar.io import save_png, write_json  # noqa: E402
from tokenizers import open_tokenizer  # noqa: E402


def complete(folder: Path, num: int) -> bool:
    """Whether `folder` already holds the `num` labelled PNGs of a set (a rerun keeps them)."""
    return len(list(folder.glob("*_c*.png"))) == num


def write_set(images: torch.Tensor, labels: torch.Tensor, folder: Path, desc: str) -> None:
    """uint8 (N, H, W) images as {i:06d}_c{label:03d}.png (kept if all already there)."""
    folder.mkdir(parents=True, exist_ok=True)
    if complete(folder, len(images)):
        return
    for i, (img, y) in enumerate(tqdm(list(zip(images.numpy(), labels.tolist())), desc=desc, unit="img")):
        save_png(img, folder / f"{i:06d}_c{y:03d}.png")


@torch.no_grad()
def reconstruct(tok, images: torch.Tensor, seed: int, batch: int = 250, continuous: bool = False) -> torch.Tensor:
    """decode(posterior sample of encode(x)) as uint8 (N, H, W); x uint8 (N, H, W). ``continuous``: a hybrid
    multi-scale tokenizer's continuous path, decode(f) of the unquantized latent (HART's f_hat + residual)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in tqdm(range(0, len(images), batch), desc="reconstruct", unit="batch"):
        x = images[s:s + batch, None].float() / 127.5 - 1.0
        tokens = tok.encode_latent(x) if continuous else tok.encode(x, generator=g)
        out.append(tok.to_uint8(tok.decode(tokens))[..., 0])
    return torch.cat(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="project tokenizer .safetensors")
    p.add_argument("--classifier", required=True, help="evaluation classifier .safetensors")
    p.add_argument("--num", type=int, default=10000, help="training images (the number of samples scored)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--data", default=None, help="Fashion-MNIST folder (default: the Debian package's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fidelity-num", type=int, default=10000, help="test images for PSNR / SSIM (0: skip)")
    args = p.parse_args(argv)
    out = Path(args.out)
    t0 = time.perf_counter()
    images, labels = fashion_mnist_uint8("train", args.data)
    if not 1 <= args.num <= len(images):
        p.error(f"--num must be in [1, {len(images)}]")
    images, labels = images[:args.num], labels[:args.num]
    tok = open_tokenizer(args.tokenizer).eval()
    write_set(images, labels, out / "real", "real")
    if not complete(out / "recon", args.num):  # reconstructing is the slow part
        write_set(reconstruct(tok, images, args.seed), labels, out / "recon", "recon")
    sets = ["real", "recon"]
    if getattr(tok, "kind", None) == "multiscale" and tok.config.hybrid:  # HART's tokenizer: both decoder inputs
        sets.append("recon_continuous")
        if not complete(out / "recon_continuous", args.num):
            write_set(reconstruct(tok, images, args.seed, continuous=True), labels, out / "recon_continuous",
                      "recon_continuous")
    feats = dict(features="fmnist", classifier=args.classifier, fmnist_root=args.data)
    stats = out / "fmnist_test_stats.safetensors"
    if not stats.exists():
        compute_reference_stats("fashion_mnist:test", str(stats), format="ours", **feats)
    result = {"num_images": args.num, "reference": "fashion_mnist:test",
              "classifier_test_accuracy": read_classifier_metadata(args.classifier).get("test_accuracy")}
    for name in sets:
        scores = score_folder(str(out / name), ref_stats=str(stats), metrics=["fid"], **feats)["metrics"]
        result[name] = {k: scores[k] for k in ("fd_fmnist", "class_accuracy") if k in scores}
    result["fd_bar"] = 5 * result["real"]["fd_fmnist"]
    if args.fidelity_num:
        test, _ = fashion_mnist_uint8("test", args.data)
        test = test[:args.fidelity_num]
        rec = reconstruct(tok, test, args.seed + 1)
        inner = (slice(None), slice(2, 30), slice(2, 30))  # the 28x28 image inside the 32x32 padding
        result["test_fidelity"] = {"num_images": len(test), "region": "28x28 (padding excluded)",
                                   "psnr_db": summary(psnr(test[inner], rec[inner])),
                                   "ssim": summary(ssim(test[inner], rec[inner]))}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(result, out / "bounds.json")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
