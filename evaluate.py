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
from pathlib import Path

import torch

from mar import io
from mar.eval import sample_folders as sampling
from mar.eval.classifier import (ClassifierConfig, FashionClassifier, class_accuracy, fashion_mnist_uint8,
                            save_classifier, train_classifier)
from mar.engine.data import FASHION_MNIST_ROOT
from mar.eval.metrics import compute_reference_stats, score_folder


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


def clip_arg(text: str) -> str:
    """--clip-denoised of a sweep, checked here (one line) and handed to sample.py as given."""
    sampling.parse_clip_denoised(text)
    return text


def feature_kwargs(args: argparse.Namespace) -> dict:
    """The feature options as keyword arguments of mar.eval.metrics functions."""
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    return dict(features=args.features, inception_weights=args.inception_weights, classifier=args.classifier,
                batch_size=args.batch_size, cuda=False if args.cpu else None, verbose=args.verbose,
                fmnist_root=args.fmnist_root)


def write_json(obj: dict, path: str | None) -> None:
    """Print ``obj`` as JSON on stdout and, if ``path``, write it there atomically."""
    print(json.dumps(obj, indent=2))
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        io.write_json(obj, Path(path))


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


def _primary(metrics: dict) -> str:
    """The metric a sweep ranks by: the Frechet distance of the chosen features (lower is better)."""
    return next(k for k in ("fid", "fd_fmnist") if k in metrics)


def cmd_sweep(args: argparse.Namespace) -> dict:
    """Sample every cfg x temperature setting with sample.py, score each folder, tabulate, plot, pick the best."""
    import csv

    import sample
    from mar.eval.plot import line_plot

    if (args.ref is None) == (args.ref_stats is None):
        raise UsageError("sweep needs exactly one of --ref (images or fashion_mnist:SPLIT) and --ref-stats (file)")
    out = os.path.abspath(args.out)
    argv = ["--out", out, "--cfg", *map(str, args.cfg), "--temperature", *map(str, args.temperature),
            "--batch-size", str(args.sample_batch_size), "--seed", str(args.seed)]
    for flag in ("run", "checkpoint", "model", "tokenizer", "num_images", "per_class", "num_iter", "num_sampling_steps",
                 "cfg_schedule", "precision", "sampler", "eta", "clip_denoised"):
        value = getattr(args, flag)
        if value is not None:
            argv += [f"--{flag.replace('_', '-')}", str(value)]
    if args.diffusion_steps:
        argv += ["--diffusion-steps", *map(str, args.diffusion_steps)]
    if len(args.cfg) * len(args.temperature) < 2:
        raise UsageError("a sweep needs at least two settings: give several --cfg and/or --temperature values")
    if sample.main(argv) != 0:
        raise UsageError("sampling failed (see the message above)")
    ref_stats = args.ref_stats
    if ref_stats is None:  # reference statistics once, reused by every setting
        ref_stats = os.path.join(out, f"reference_{args.features}.safetensors")
        if not os.path.exists(ref_stats):
            compute_reference_stats(args.ref, ref_stats, format="ours", **feature_kwargs(args))
    rows = []
    for cfg in args.cfg:
        for temperature in args.temperature:
            folder = os.path.join(out, f"cfg{float(cfg)}_temp{float(temperature)}")
            result = score_folder(folder, ref_stats=ref_stats, metrics=["fid", "isc"], **feature_kwargs(args))
            with open(os.path.join(folder, "settings.json")) as f:
                speed = json.load(f).get("seconds_per_image")
            rows.append({"cfg": cfg, "temperature": temperature, **result["metrics"], "seconds_per_image": speed,
                         "num_images": result["meta"].get("num_gen"), "folder": folder})
    key = _primary(rows[0])
    best = min(rows, key=lambda r: r[key])
    with open(os.path.join(out, "sweep.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plots = {}
    for metric in [key] + [m for m in ("class_accuracy", "is_mean", "is_fmnist_mean") if m in rows[0]]:
        series = {f"temperature {t:g}": ([r["cfg"] for r in rows if r["temperature"] == t],
                                         [r[metric] for r in rows if r["temperature"] == t]) for t in args.temperature}
        plots[metric] = os.path.join(out, f"sweep_{metric}.png")
        line_plot(series, plots[metric], title=f"{metric} vs cfg ({rows[0].get('num_images', '')} images per setting)",
                  xlabel="cfg", ylabel=metric + (" (lower is better)" if metric == key else ""))
    summary = {"primary_metric": key, "best": best, "rows": rows, "plots": plots, "reference": ref_stats}
    write_json(summary, os.path.join(out, "sweep.json"))
    print(f"best setting by {key}: cfg {best['cfg']}, temperature {best['temperature']} -> {best[key]:.4g}",
          file=sys.stderr)
    if args.report:
        write_report(summary, args.report)
    return summary


def write_report(summary: dict, path: str) -> None:
    """A short markdown report of a sweep: the table, the best setting's grid and the plots."""
    rel = lambda p: os.path.relpath(p, os.path.dirname(os.path.abspath(path)))  # noqa: E731
    rows, key, best = summary["rows"], summary["primary_metric"], summary["best"]
    cols = [c for c in (key, "class_accuracy", "is_mean", "is_fmnist_mean", "seconds_per_image") if c in rows[0]]
    lines = ["# Sweep report", "", f"Ranked by `{key}` (lower is better); reference statistics: "
             f"`{rel(summary['reference'])}`.", "", "| cfg | temperature | " + " | ".join(cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for r in rows:
        mark = " **(best)**" if r is best else ""
        lines.append(f"| {r['cfg']:g} | {r['temperature']:g}{mark} | "
                     + " | ".join("" if r[c] is None else f"{r[c]:.4g}" for c in cols) + " |")
    lines += ["", f"Best: cfg {best['cfg']:g}, temperature {best['temperature']:g}.", "",
              f"![samples at the best setting]({rel(os.path.join(best['folder'], 'grid.png'))})", ""]
    lines += [f"![{m} vs cfg]({rel(p)})" for m, p in summary["plots"].items()]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {path}", file=sys.stderr)


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

    p = sub.add_parser("sweep", help="sample + score a grid of cfg x temperature; table, plot and best setting")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--run", help="train.py output folder (default: sample.py's default weights)")
    src.add_argument("--checkpoint", help="MAR weights (ours or the published checkpoint-last.pth)")
    p.add_argument("--model", help="MAR preset for published checkpoints")
    p.add_argument("--tokenizer", help="KL-VAE file (kl16.ckpt or a project .safetensors)")
    p.add_argument("--cfg", type=float, nargs="+", required=True)
    p.add_argument("--temperature", type=float, nargs="+", default=[1.0])
    n = p.add_mutually_exclusive_group()
    n.add_argument("--num-images", type=int, help="images per setting")
    n.add_argument("--per-class", type=int, help="images per class and setting")
    p.add_argument("--num-iter", type=int)
    p.add_argument("--num-sampling-steps", type=int)
    p.add_argument("--cfg-schedule", choices=("linear", "constant"))
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--sampler", choices=("ddpm", "ddim"), help="fast path: diffusion sampler of the head")
    p.add_argument("--eta", type=float, help="fast path: DDIM noise")
    p.add_argument("--diffusion-steps", type=int, nargs=2, metavar=("FIRST", "LAST"),
                   help="fast path: diffusion steps annealed over the MAR iterations")
    p.add_argument("--clip-denoised", metavar="R|off", type=clip_arg,
                   help="guard: clamp the predicted x0 to [-R, R] ('off' = reference; default: the run's config)")
    p.add_argument("--sample-batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    ref = p.add_mutually_exclusive_group()
    ref.add_argument("--ref", metavar="SOURCE", help="reference images: folder, ADM npz or fashion_mnist:SPLIT")
    ref.add_argument("--ref-stats", metavar="FILE", help="reference statistics: ADM .npz or ours .safetensors")
    p.add_argument("--out", required=True, metavar="DIR", help="one sub-folder per setting + sweep.csv/json/png")
    p.add_argument("--report", metavar="FILE", help="also write a markdown report here")
    add_feature_args(p)
    p.set_defaults(func=cmd_sweep)
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
