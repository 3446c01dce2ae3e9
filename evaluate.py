"""Evaluate generated samples offline: FID / IS / KID / precision-recall through torch-fidelity.

  python evaluate.py score --gen samples/ --ref-stats VIRTUAL_imagenet256_labeled.npz --inception-weights W.pth
  python evaluate.py score --gen samples/ --ref reference_images/ --metrics fid,kid,prc --out results.json
  python evaluate.py train-classifier --data /usr/share/datasets/fashion-mnist --out fmnist_classifier.safetensors
  python evaluate.py ref-stats --data fashion_mnist:test --out fmnist_test.safetensors \\
      --features fmnist --classifier fmnist_classifier.safetensors
  python evaluate.py score --gen samples/ --ref-stats fmnist_test.safetensors --features fmnist \\
      --classifier fmnist_classifier.safetensors

Inception weights are never downloaded: --inception-weights, $MAR_INCEPTION_WEIGHTS or
~/.cache/mar/weights-inception-2015-12-05-6726825d.pth. With --features fmnist the metrics run on the
project's Fashion-MNIST classifier and are named fd_fmnist, is_fmnist_*, kd_fmnist_*, ... (not FID/IS/KID);
class-labelled samples ({index:06d}_c{class:03d}.png) also get class_accuracy.
Every user error is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from mar.classifier import (ClassifierConfig, FashionClassifier, class_accuracy, fashion_mnist_uint8,
                            save_classifier, train_classifier)
from mar.data import FASHION_MNIST_ROOT
from mar.metrics import compute_reference_stats, score_folder


class UsageError(Exception):
    """A command-line mistake: reported as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + message and exits; we want one line
        raise UsageError(f"{self.prog}: {message} (see --help)")


def add_feature_args(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that extracts features (score, ref-stats; later sweep)."""
    p.add_argument("--features", choices=("inception", "fmnist"), default="inception",
                   help="feature network: torch-fidelity's Inception-v3, or the project's Fashion-MNIST classifier")
    p.add_argument("--inception-weights", metavar="PATH",
                   help="local weights-inception-2015-12-05-6726825d.pth (default: $MAR_INCEPTION_WEIGHTS, then "
                        "~/.cache/mar/)")
    p.add_argument("--classifier", metavar="PATH", help="Fashion-MNIST classifier file (from train-classifier)")
    p.add_argument("--fmnist-root", metavar="DIR", help=f"Fashion-MNIST IDX folder for fashion_mnist:SPLIT "
                                                        f"(default {FASHION_MNIST_ROOT})")
    p.add_argument("--batch-size", type=int, default=64, help="images per feature-extraction batch")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is available")
    p.add_argument("--verbose", action="store_true", help="torch-fidelity progress on stderr")


def feature_kwargs(args: argparse.Namespace) -> dict:
    """The feature options as keyword arguments of mar.metrics functions."""
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    return dict(features=args.features, inception_weights=args.inception_weights, classifier=args.classifier,
                batch_size=args.batch_size, cuda=False if args.cpu else None, verbose=args.verbose,
                fmnist_root=args.fmnist_root)


def write_json(obj: dict, path: str | None) -> None:
    """Print ``obj`` as JSON on stdout and, if ``path``, write it there atomically."""
    text = json.dumps(obj, indent=2)
    print(text)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, path)


def cmd_score(args: argparse.Namespace) -> dict:
    result = score_folder(args.gen, ref=args.ref, ref_stats=args.ref_stats, metrics=args.metrics,
                          kid_subset_size=args.kid_subset_size, isc_splits=args.isc_splits, **feature_kwargs(args))
    write_json(result, args.out)
    return result


def cmd_ref_stats(args: argparse.Namespace) -> dict:
    stats = compute_reference_stats(args.data, args.out, format=args.format, **feature_kwargs(args))
    summary = {"out": args.out, "format": args.format or os.path.splitext(args.out)[1].lstrip("."),
               "dim": int(stats.mu.shape[0]), **stats.meta}
    write_json(summary, None)
    return summary


def cmd_train_classifier(args: argparse.Namespace) -> dict:
    if args.epochs < 1 or args.batch_size < 1:
        raise UsageError(f"--epochs and --batch-size must be >= 1, got {args.epochs} and {args.batch_size}")
    if args.threads:
        torch.set_num_threads(args.threads)
    train_x, train_y = fashion_mnist_uint8("train", args.data)  # (N, 32, 32) uint8, (N,)
    test_x, test_y = fashion_mnist_uint8("test", args.data)
    torch.manual_seed(args.seed)  # weight init; the data order uses its own generator
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    model = FashionClassifier(ClassifierConfig()).to(device)
    train_classifier(model, train_x, train_y, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                     generator=torch.Generator().manual_seed(args.seed),
                     log=lambda e, loss: print(f"epoch {e + 1}/{args.epochs}: loss {loss:.4f}", file=sys.stderr))
    acc = class_accuracy(model, test_x, test_y)
    info = {"test_accuracy": acc, "epochs": args.epochs, "seed": args.seed, "num_train": len(train_x),
            "num_test": len(test_x)}
    save_classifier(model, args.out, **info)
    summary = {"out": args.out, **info}
    write_json(summary, None)
    return summary


def build_parser() -> Parser:
    parser = Parser(prog="evaluate.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("score", help="metrics of generated samples against reference images or statistics")
    p.add_argument("--gen", required=True, metavar="DIR", help="generated samples: a folder of PNGs or an ADM npz")
    ref = p.add_mutually_exclusive_group(required=True)
    ref.add_argument("--ref", metavar="DIR", help="reference images: folder, ADM npz or fashion_mnist:SPLIT")
    ref.add_argument("--ref-stats", metavar="FILE", help="reference statistics: ADM .npz or ours .safetensors")
    p.add_argument("--metrics", help="comma list of fid,isc,kid,prc (default: all with --ref, fid,isc with "
                                     "--ref-stats)")
    p.add_argument("--kid-subset-size", type=int, default=1000, help="KID subset size (capped at the set sizes)")
    p.add_argument("--isc-splits", type=int, default=10, help="IS splits (capped at the number of samples)")
    p.add_argument("--out", metavar="FILE", help="also write the JSON result here")
    add_feature_args(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("ref-stats", help="reference statistics (mu, sigma) of a folder or dataset")
    p.add_argument("--data", required=True, metavar="SOURCE", help="folder, ADM npz, or fashion_mnist:train|test")
    p.add_argument("--out", required=True, metavar="FILE", help="output: .npz (ADM) or .safetensors (ours)")
    p.add_argument("--format", choices=("npz", "ours"), help="default: from the extension of --out")
    add_feature_args(p)
    p.set_defaults(func=cmd_ref_stats)

    p = sub.add_parser("train-classifier", help="train the Fashion-MNIST feature classifier (~1-2 min on CPU)")
    p.add_argument("--data", default=FASHION_MNIST_ROOT, metavar="DIR", help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--out", required=True, metavar="FILE", help="output .safetensors")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu", action="store_true", help="train on the CPU even when CUDA is available")
    p.add_argument("--threads", type=int, help="CPU threads (on a busy machine 1 can be several times faster)")
    p.set_defaults(func=cmd_train_classifier)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; user errors (bad arguments, missing or wrong files) -> one stderr line, return 2."""
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
    except (UsageError, ValueError, OSError) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(message if isinstance(e, UsageError) else f"evaluate.py: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
