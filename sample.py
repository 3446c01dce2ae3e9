"""Sample class-conditional images, or edit images (inpainting, outpainting, class editing), with MAR weights
or any generator of the family (MaskGIT, causal AR, VAR, HART, continuous next-scale).

    python sample.py                                                    # the shipped Fashion-MNIST weights
    python sample.py --run runs/fmnist/mar                              # a train.py run (its EMA weights)
    python sample.py --checkpoint checkpoint-last.pth --model mar_base --tokenizer kl16.ckpt \\
        --per-class 50 --num-iter 256 --cfg 2.9 --npz                  # the published MAR-B, ImageNet protocol
    python sample.py --checkpoint var_d16.pth --model var_d16 --tokenizer vae_ch160v4096z32.pth \
        --tokenizer-preset var_vqvae --per-class 50 --cfg 1.5 --top-p 0.96 --top-k 900 --npz   # published VAR
    python sample.py --cfg 1.0 2.0 3.0 --temperature 0.9 1.0           # a sweep: a folder per setting
    accelerate launch sample.py ...                                     # shard the missing images over processes

    python sample.py edit --input fashion_mnist:test:0-8 --mask lower-half --out edits/lower   # inpainting
    python sample.py edit --input photo.png --keep center:128 --class 207 --run ... --out edits/uncrop
    python sample.py edit --input fashion_mnist:test:0-8 --mask upper-half --class 8    # regenerate as a bag

Sampling: image i has class classes[i % K] and its own generator seeded from (seed, i) (mar/pipeline.py): it is
the same whatever the number of processes or interruptions, and on CPU whatever the batch size (GPU kernels
are picked by shape: keep --batch-size to get the same bytes there). Rerunning a command keeps the complete
images and makes only the missing ones; a folder made with other settings is refused, and so is a second run
into a folder in use. Per setting: {i:06d}_c{class:03d}.png, grid.png, settings.json, samples.npz (--npz).

Editing (mar/edit.py): --mask (PNG, white = regenerate; or a region: lower-half, upper-half, left-half,
right-half, center:S, box:X0,Y0,X1,Y1) regenerates that region; --keep keeps it and regenerates the rest.
Known tokens are the tokenizer's posterior mean and stay exactly; a token is regenerated if any pixel of its
patch is masked. Result r = input * variations + v is seeded from (seed, r). Writes {r:06d}_c{class:03d}.png,
inputs/, grid.png (input | mask | results, one row per input) and settings.json.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from mar import cli
from mar.edit import REGIONS, load_inputs, load_masks
from mar.engine.dist import lock_folder, shutdown
from mar.engine.loop import check_launch
from mar.eval import sample_folders as S
from mar.eval.sample_job import Setting, fill_edit_folder, fill_folder
from mar.io import FolderBusy, describe_os_error
from mar.run import SHIPPED_RUN
from mar.schedules import check_guidance

DEFAULT_RUN = SHIPPED_RUN  # shipped Fashion-MNIST weights


def parse_args(argv: list[str]):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_weights_args(p, f"{DEFAULT_RUN} if it exists")
    n = p.add_mutually_exclusive_group()
    n.add_argument("--num-images", type=int, help="images per setting (default: one grid's worth)")
    n.add_argument("--per-class", type=int, help="images per class (ImageNet protocol: 50)")
    p.add_argument("--classes", help="comma-separated class indices (default: all classes)")
    cli.add_generation_args(p, lists=True)
    p.add_argument("--batch-size", type=int, default=32, help="images per batch and process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output folder (default: samples/<run>/<setting>)")
    p.add_argument("--npz", action="store_true", help="also write samples.npz (arr_0: uint8 N x H x W x 3)")
    p.add_argument("--grid-only", action="store_true", help="write only grid.png (no per-image files)")
    return p.parse_args(argv)


def parse_edit_args(argv: list[str]):
    p = argparse.ArgumentParser(prog="sample.py edit", description="Edit images zero-shot (see sample.py --help).")
    cli.add_weights_args(p, f"{DEFAULT_RUN} if it exists")
    p.add_argument("--input", nargs="+", required=True, metavar="SOURCE",
                   help="image files, or fashion_mnist:SPLIT[:I-J] (test records I..J-1, with their labels)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--mask", nargs="+", metavar="SPEC", help=f"what to regenerate: a PNG (white) or {REGIONS}")
    what.add_argument("--keep", nargs="+", metavar="SPEC", help="what to keep (outpainting): the same specs")
    p.add_argument("--class", dest="label", type=int, help="class to generate under (default: the input's label)")
    p.add_argument("--variations", type=int, default=4, help="results per input")
    p.add_argument("--composite", action="store_true",
                   help="paste the input's pixels back where the mask keeps them (the decoder otherwise shifts them "
                        "a little with their new surroundings; a seam may show)")
    p.add_argument("--fmnist-root", help="Fashion-MNIST IDX folder for fashion_mnist:SPLIT inputs")
    cli.add_generation_args(p, lists=False)
    p.add_argument("--batch-size", type=int, default=32, help="images per batch and process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output folder (default: samples/<run>/edit)")
    return p.parse_args(argv)


def launch() -> Accelerator:
    acc = Accelerator(cpu=not torch.cuda.is_available())
    check_launch(acc.num_processes)
    return acc


def sample(args, command: list[str]) -> int:
    if min(v for v in (args.batch_size, args.num_images, args.per_class) if v is not None) < 1:
        raise ValueError("--batch-size, --num-images and --per-class must be >= 1")
    if args.grid_only and args.npz:
        raise ValueError("--grid-only writes no per-image files, so no npz: drop --npz or --grid-only")
    acc = launch()
    run = cli.run_from_args(args, DEFAULT_RUN).to(acc.device)
    classes = S.parse_classes(args.classes, run.model.num_classes)
    n = (args.per_class * len(classes) if args.per_class is not None else args.num_images if args.num_images is not None
         else S.default_num_images(len(classes)))
    defaults = run.sample_defaults
    options = cli.options_from_args(args, defaults)  # every check before anything is written
    iters = args.num_iter or [min(defaults.num_iter, run.model.seq_len)]
    if not all(1 <= k <= run.model.seq_len for k in iters):
        raise ValueError(f"--num-iter must be in [1, {run.model.seq_len}] (the number of tokens), got {iters}")
    points = list(dict.fromkeys(itertools.product(args.cfg or [defaults.cfg], args.temperature or [defaults.temperature],
                                                  iters)))  # (cfg, temperature, num_iter), duplicates dropped
    for cfg, temperature, _ in points:
        check_guidance(cfg, temperature)
    settings = [Setting(cfg, t, k, args.cfg_schedule or defaults.cfg_schedule, options) for cfg, t, k in points]
    paths = {"mar": run.weights, "tokenizer": run.tokenizer_path, "run": run.run_dir}
    record = {"format": S.SETTINGS_FORMAT, "num_images": n, "label_rule": "label(i) = classes[i % len(classes)]",
              "seed_rule": "image i: torch.Generator seeded with mar.engine.data.item_seed(seed, i)",
              "files": "{index:06d}_c{class:03d}.png",
              "weights": {**{k: str(v.resolve()) if v else None for k, v in paths.items()}, "ema": run.ema}}
    root = Path(args.out) if args.out else Path("samples") / run.name
    with lock_folder(root, acc, what="sample.py run"):
        for s in settings:
            folder = root / s.folder_name(len(iters) > 1) if (len(settings) > 1 or not args.out) else root
            fill_folder(acc, run, folder, s, classes, n, args.seed, args.batch_size, record, args.grid_only,
                        args.npz, command)
    return 0


def edit(args, command: list[str]) -> int:
    if min(args.batch_size, args.variations) < 1:
        raise ValueError("--batch-size and --variations must be >= 1")
    acc = launch()
    run = cli.run_from_args(args, DEFAULT_RUN).to(acc.device)
    model, tok = run.model, run.tokenizer
    defaults = run.sample_defaults
    options = cli.options_from_args(args, defaults)
    setting = Setting(defaults.cfg if args.cfg is None else args.cfg,
                      defaults.temperature if args.temperature is None else args.temperature,
                      args.num_iter or min(defaults.num_iter, model.seq_len), args.cfg_schedule or defaults.cfg_schedule,
                      options)
    check_guidance(setting.cfg, setting.temperature)
    images, labels, names = load_inputs(args.input, model.img_size, tok.in_channels, args.fmnist_root)
    masks = load_masks(args.mask or args.keep, len(images), model.img_size, keep=args.keep is not None)
    if args.label is not None:
        labels = [args.label] * len(images)
    if any(y is None for y in labels):
        raise ValueError("image files carry no class: pass --class K (the class to generate under)")
    model.check_labels(torch.tensor(labels))
    out = Path(args.out) if args.out else Path("samples") / run.name / "edit"
    with lock_folder(out, acc, what="sample.py edit"):
        fill_edit_folder(acc, run, out, images, masks, labels, names, setting, args.variations, args.seed,
                         args.batch_size, command, composite=args.composite)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    editing = bool(argv) and argv[0] == "edit"
    args = parse_edit_args(argv[1:]) if editing else parse_args(argv)
    try:
        return (edit if editing else sample)(args, ["sample.py", *argv])
    except (ValueError, FolderBusy) as e:  # bad input: one clear line (SettingsMismatch, CheckpointError, ...)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {describe_os_error(e) if e.errno else e}", file=sys.stderr)
        return 2
    finally:
        shutdown()


if __name__ == "__main__":
    # MKL reads this at its first call: its "conditional numerical reproducibility" makes CPU matmul results
    # independent of batch shape and thread count (the few-step sampler amplifies 1e-7 differences to pixels).
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    sys.exit(main())
