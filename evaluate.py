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
import dataclasses
import itertools
import json
import os
import sys
from pathlib import Path

import torch

from accelerate import Accelerator

from mar import cli, io
from mar.engine.dist import lock_folder, shutdown
from mar.engine.loop import check_launch
from mar.eval.classifier import (ClassifierConfig, FashionClassifier, class_accuracy, fashion_mnist_uint8,
                            save_classifier, train_classifier)
from mar.engine.data import FASHION_MNIST_ROOT
from mar.eval import ablations
from mar.eval.metrics import compute_reference_stats, score_folder
from mar.eval.sample_folders import SETTINGS_FORMAT, default_num_images
from mar.eval.sample_job import Setting, fill_folder
from mar.eval.sweep import score_settings, write_report, write_sweep
from mar.io import FolderBusy, describe_os_error
from mar.schedules import check_guidance


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


def cmd_sweep(args: argparse.Namespace) -> dict:
    """Sample every cfg x temperature setting (mar.eval.sample_job), score each folder, tabulate, plot, pick the best."""
    if (args.ref is None) == (args.ref_stats is None):
        raise UsageError("sweep needs exactly one of --ref (images or fashion_mnist:SPLIT) and --ref-stats (file)")
    if len(args.cfg) * len(args.temperature) * len(args.top_k or [0]) * len(args.top_p or [0]) < 2:
        raise UsageError("a sweep needs at least two settings: give several --cfg, --temperature, --top-k and/or "
                         "--top-p values")
    if min(v for v in (args.sample_batch_size, args.num_images, args.per_class) if v is not None) < 1:
        raise UsageError("--sample-batch-size, --num-images and --per-class must be >= 1")
    features = feature_kwargs(args)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    check_launch(acc.num_processes)
    run = cli.run_from_args(args).to(acc.device)
    classes = list(range(run.model.num_classes))
    n = args.per_class * len(classes) if args.per_class else args.num_images or default_num_images(len(classes))
    defaults = run.sample_defaults
    options = cli.options_from_args(args, defaults, swept=("top_k", "top_p"))
    num_iter = args.num_iter or min(defaults.num_iter, run.model.seq_len)
    for cfg in args.cfg:
        for temperature in args.temperature:
            check_guidance(cfg, temperature)
    points = sweep_points(args, options)  # every check before anything is written
    out = Path(args.out).resolve()
    record = {"format": SETTINGS_FORMAT, "num_images": n, "label_rule": "label(i) = classes[i % len(classes)]",
              "weights": {"mar": str(run.weights.resolve()), "tokenizer": str(run.tokenizer_path.resolve())}}
    folders = []
    with lock_folder(out, acc, what="evaluate.py sweep"):
        for point, point_options in points:
            setting = Setting(point["cfg"], point["temperature"], num_iter, args.cfg_schedule or defaults.cfg_schedule,
                              point_options)
            folder = out / (setting.folder_name() + top_suffix(point))
            fill_folder(acc, run, folder, setting, classes, n, args.seed, args.sample_batch_size, record,
                        command=["evaluate.py", "sweep", *args.argv])
            folders.append((point, folder))
        if not acc.is_main_process:
            return {}
        ref_stats = args.ref_stats
        if ref_stats is None:  # reference statistics once, reused by every setting
            ref_stats = str(out / f"reference_{args.features}.safetensors")
            if not os.path.exists(ref_stats):
                compute_reference_stats(args.ref, ref_stats, format="ours", **features)
        features.pop("fmnist_root", None)
        summary = write_sweep(score_settings(folders, ref_stats, features), out, ref_stats)
    print(json.dumps(summary, indent=2))
    best, key = summary["best"], summary["primary_metric"]
    tops = "".join(f", {k.replace('_', '-')} {best[k]}" for k in ("top_k", "top_p") if k in best)
    print(f"best setting by {key}: cfg {best['cfg']}, temperature {best['temperature']}{tops} -> {best[key]:.4g}",
          file=sys.stderr)
    if args.report:
        write_report(summary, args.report)
        print(f"wrote {args.report}", file=sys.stderr)
    return summary


def sweep_points(args: argparse.Namespace, options) -> list[tuple[dict, object]]:
    """The settings of a sweep, cfg x temperature (x top-k x top-p when those are given as lists): (the swept
    values, the sampler options of that point); each point's options are checked here, before any folder."""
    axes = {"cfg": args.cfg, "temperature": args.temperature}
    for name in ("top_k", "top_p"):
        if getattr(args, name):
            axes[name] = getattr(args, name)
    points = []
    for values in itertools.product(*axes.values()):
        point = dict(zip(axes, values))
        tops = {k: point[k] for k in ("top_k", "top_p") if k in point}
        try:
            points.append((point, dataclasses.replace(options, **tops)))
        except ValueError as e:
            raise UsageError(f"evaluate.py sweep: {e}") from None
    return points


def top_suffix(point: dict) -> str:
    """``_topk900_topp0.96`` for the swept top-k / top-p values of a point ('' when they are not swept)."""
    return "".join(f"_{k.replace('_', '')}{point[k]}" for k in ("top_k", "top_p") if k in point)


def cmd_ablations(args: argparse.Namespace) -> dict:
    """The MAR paper's Tables 1 and 2 on Fashion-MNIST (mar.eval.ablations): train, sample, score, tabulate."""
    rows = ablations.ROWS
    if args.rows:
        unknown = sorted(set(args.rows) - {r.name for r in rows})
        if unknown:
            raise UsageError(f"unknown rows {unknown}: choose from {', '.join(r.name for r in rows)}")
        rows = [r for r in rows if r.name in args.rows]
    budget = ablations.Budget(args.steps, args.batch, args.num_images, args.cfg, tuple(args.spread_seeds))
    try:
        budget.check()
    except ValueError as e:
        raise UsageError(f"evaluate.py ablations: {e}") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    if acc.num_processes != 1:
        raise UsageError("evaluate.py ablations runs in one process (its training steps launch train.py): "
                         "run it with python, not accelerate launch")
    out = Path(args.out).resolve()
    with lock_folder(out, acc, what="evaluate.py ablations"):
        text = ablations.run_ablations(acc, out, kl_tokenizer=Path(args.kl_tokenizer), vq_tokenizer=Path(args.vq_tokenizer),
                                       classifier=Path(args.classifier), fmnist_root=args.fmnist_root, budget=budget,
                                       rows=rows, sample_batch=args.sample_batch_size)
    print(text)
    print(f"wrote {out / 'table.md'}", file=sys.stderr)
    return {"out": str(out)}


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

    p = sub.add_parser("sweep", help="sample + score a grid of cfg x temperature (x top-k x top-p); table, plot "
                                      "and best setting")
    cli.add_weights_args(p, "sample.py's default weights")
    p.add_argument("--cfg", type=float, nargs="+", required=True)
    p.add_argument("--temperature", type=float, nargs="+", default=[1.0])
    n = p.add_mutually_exclusive_group()
    n.add_argument("--num-images", type=int, help="images per setting")
    n.add_argument("--per-class", type=int, help="images per class and setting")
    p.add_argument("--num-iter", type=int)
    p.add_argument("--cfg-schedule", choices=("linear", "constant"))
    fast = p.add_argument_group("sampler options (opt-in; the defaults are the run's, else the exact reference); "
                                "--top-k and --top-p take several values to sweep them")
    cli.add_option_args(fast, lists=True)
    p.add_argument("--sample-batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    ref = p.add_mutually_exclusive_group()
    ref.add_argument("--ref", metavar="SOURCE", help="reference images: folder, ADM npz or fashion_mnist:SPLIT")
    ref.add_argument("--ref-stats", metavar="FILE", help="reference statistics: ADM .npz or ours .safetensors")
    p.add_argument("--out", required=True, metavar="DIR", help="one sub-folder per setting + sweep.csv/json/png")
    p.add_argument("--report", metavar="FILE", help="also write a markdown report here")
    add_feature_args(p)
    p.set_defaults(func=cmd_sweep)

    shipped = Path(__file__).resolve().parent / "pretrained" / "fmnist"
    p = sub.add_parser("ablations", help="the MAR paper's Tables 1 and 2 on Fashion-MNIST: every cell trained for "
                                         "the same budget, sampled, scored and tabulated (about 55 min on 2 CPU cores)")
    p.add_argument("--out", default="runs/ablations", metavar="DIR", help="one folder per cell and row, table.md/csv/"
                                                                         "json and plots (a rerun continues)")
    p.add_argument("--kl-tokenizer", default=str(shipped / "tokenizer.safetensors"), metavar="FILE")
    p.add_argument("--vq-tokenizer", default=str(shipped / "vq_tokenizer.safetensors"), metavar="FILE")
    p.add_argument("--classifier", default=str(shipped / "classifier.safetensors"), metavar="FILE",
                   help="the Fashion-MNIST feature classifier of the scores")
    p.add_argument("--fmnist-root", default=FASHION_MNIST_ROOT, metavar="DIR")
    p.add_argument("--steps", type=int, default=300, help="training steps of every cell (default 300: the CPU budget)")
    p.add_argument("--batch", type=int, default=64, help="images per training step")
    p.add_argument("--num-images", type=int, default=100, help="images per row and CFG setting")
    p.add_argument("--cfg", type=float, default=3.0, help="the with-CFG scale of every row (linear schedule)")
    p.add_argument("--spread-seeds", type=int, nargs="*", default=[1, 2],
                   help=f"extra seeds of the {ablations.SPREAD_ROW} cell for the seed-to-seed spread (none: no spread)")
    p.add_argument("--rows", nargs="+", metavar="ROW", help="only these rows: " +
                   ", ".join(r.name for r in ablations.ROWS))
    p.add_argument("--sample-batch-size", type=int, default=50)
    p.add_argument("--threads", type=int, help="CPU threads of this process (train.py takes OMP_NUM_THREADS)")
    p.set_defaults(func=cmd_ablations)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; user errors (bad arguments, missing or wrong files) -> one stderr line, return 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        args.argv = argv[1:]
        args.func(args)
    except (UsageError, ValueError, OSError, FolderBusy) as e:
        text = describe_os_error(e) if isinstance(e, OSError) and e.errno else str(e)
        message = " ".join(text.split()) or type(e).__name__
        print(message if isinstance(e, UsageError) else f"evaluate.py: error: {message}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
