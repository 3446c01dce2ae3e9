"""Generate class-conditional samples with MAR: PNG folders, a grid, the ADM evaluator npz; resumable, sharded.

    python sample.py --run runs/fmnist                                  # a train.py run (its EMA weights)
    python sample.py --checkpoint checkpoint-last.pth --model mar_base --tokenizer kl16.ckpt \\
        --per-class 50 --num-iter 256 --cfg 2.9 --npz                  # the published MAR-B, ImageNet protocol
    python sample.py --run runs/fmnist --cfg 1.0 2.0 3.0 --temperature 0.9 1.0   # a sweep: a folder per setting
    accelerate launch sample.py ...                                     # shard the missing images over processes

Image i has class classes[i % K] and its own generator seeded from (seed, i) (mar/sampling.py): it is the
same whatever the number of processes or interruptions, and on CPU whatever the batch size (GPU kernels are
picked by shape: keep --batch-size to get the same bytes there). Rerunning a command keeps the complete images
and makes only the missing ones; a folder made with other settings is refused. Per setting:
{i:06d}_c{class:03d}.png, grid.png, settings.json (settings, weights, seconds per image), samples.npz (--npz).
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from mar.eval import sample_folders as S
from mar.engine.checkpoint import (CheckpointError, find_latest_checkpoint, load_checkpoint,
                            load_reference_mar_state_dict, read_safetensors)
from mar.config import SampleConfig
from mar.io import remove_stale_temps, save_png, write_grid, write_json
from mar.registry import PRESETS, create_model, load_state_dict_strict
from mar.engine.loop import check_launch
from tokenizers import KLTokenizer, KLVAEConfig, kl_vae_preset

DEFAULT_RUN = Path(__file__).resolve().parent / "pretrained" / "fmnist"  # shipped Fashion-MNIST weights


def resolve_weights(args) -> tuple[Path, Path | None]:
    """(MAR weights file, run folder or None) from --checkpoint, --run, or the shipped default run."""
    if args.checkpoint:
        if not Path(args.checkpoint).is_file():
            raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
        return Path(args.checkpoint), None
    run = Path(args.run) if args.run else DEFAULT_RUN if (DEFAULT_RUN / "mar_ema.safetensors").is_file() else None
    if run is None:
        raise ValueError("no weights given: pass --run RUN_DIR (a train.py output folder), or --checkpoint FILE "
                         "--model PRESET --tokenizer FILE (published: checkpoint-last.pth, mar_base, kl16.ckpt)")
    if not run.is_dir():
        raise FileNotFoundError(f"run folder not found: {run}")
    if args.ema and (run / "mar_ema.safetensors").is_file():
        return run / "mar_ema.safetensors", run
    latest = find_latest_checkpoint(run)  # a run still training, or --no-ema (the export holds EMA weights only)
    if latest is None:
        raise FileNotFoundError(f"{run} has no {'mar_ema.safetensors or ' if args.ema else ''}checkpoints/step-*.pt"
                                f"{'' if args.ema else ' (--no-ema needs a training checkpoint)'}")
    return latest, run


def read_weights(path: Path, ema: bool) -> tuple[dict, dict | None, dict | None]:
    """(MAR state dict, training config or None, tokenizer config or None) of .safetensors/.pt/.pth weights."""
    if path.suffix == ".safetensors":
        state, meta = read_safetensors(path)
        want = "ema" if ema else "model"
        if meta.get("weights", want) != want:
            raise CheckpointError(f"{path} holds the '{meta['weights']}' weights only: "
                                  f"pass {'--no-ema' if ema else '--ema'}")
        load = (lambda k: json.loads(meta[k]) if k in meta else None)
        return state, load("config"), load("tokenizer")
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        unsafe = []
    if unsafe:  # a published reference file (pickled argparse args): no config of ours
        return load_reference_mar_state_dict(path, ema=ema), None, None
    ckpt = load_checkpoint(path)
    names = ("model_ema", "ema") if ema else ("model",)
    state = next((ckpt[n] for n in names if isinstance(ckpt.get(n), dict)), None)
    if state is None:
        raise CheckpointError(f"{path} has no {' or '.join(names)} weights (keys: {', '.join(map(str, ckpt))}); "
                              f"try {'--no-ema' if ema else '--ema'}")
    return state, ckpt.get("config"), None


def find_tokenizer(args, run: Path | None, config: dict | None, weights: Path) -> Path:
    if args.tokenizer:
        return Path(args.tokenizer)
    if run is not None and (run / "tokenizer.safetensors").is_file():
        return run / "tokenizer.safetensors"
    path = ((config or {}).get("tokenizer") or {}).get("checkpoint")
    if path:
        for cand in (Path(path), weights.parent / path, (run or weights.parent) / Path(path).name):
            if cand.is_file():
                return cand
        raise FileNotFoundError(f"tokenizer {path} (from the training config) not found: pass --tokenizer FILE")
    raise ValueError("no tokenizer: pass --tokenizer FILE (kl16.ckpt for the published models, or your run's "
                     "tokenizer .safetensors)")


def load_tokenizer(path: Path, expected: KLVAEConfig | None, config: dict | None, preset: str) -> KLTokenizer:
    """A project tokenizer .safetensors, or an LDM-format VAE (kl16.ckpt) with `expected` / the preset's config."""
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer not found: {path}")
    t = (config or {}).get("tokenizer") or {}
    tok = None
    if path.suffix == ".safetensors":
        try:
            tok = KLTokenizer.load(path)
        except ValueError as e:
            if "no KLTokenizer config" not in str(e):
                raise
    if tok is None:
        chans = {"in_channels": t["in_channels"], "out_channels": t["in_channels"]} if t.get("in_channels") else {}
        tok = KLTokenizer.from_ldm_checkpoint(path, expected or kl_vae_preset(t.get("preset", preset), **chans))
    if expected is not None:  # the model was trained with this tokenizer config (incl. its scaling factor)
        if dataclasses.replace(tok.config, scaling_factor=expected.scaling_factor) != expected:
            raise ValueError(f"tokenizer {path} is not the one the model was trained with ({tok.config} vs {expected})")
        tok.config = expected
    elif t.get("scaling_factor") is not None:
        tok.config = dataclasses.replace(tok.config, scaling_factor=t["scaling_factor"])
    return tok


def build_model(state: dict, config: dict | None, preset: str | None, tok: KLTokenizer, path: Path, steps):
    """(MAR with the weights loaded, preset, kwargs): sizes from our config, or from --model and the shapes."""
    if config is not None:
        kwargs = dict(config["model"])
        own = kwargs.pop("preset")
        if preset and preset != own:
            raise ValueError(f"{path} holds a {own} model (from its config) but --model says {preset}: drop --model")
        for key, value in (("vae_stride", tok.stride), ("token_channels", tok.latent_channels)):
            if kwargs.pop(key) != value:
                raise ValueError(f"the model was trained with {key}={config['model'][key]}, the tokenizer has {value}: "
                                 "pass the tokenizer of the run with --tokenizer")
        preset = own
    elif not preset:
        raise ValueError(f"{path} has no config: pass --model PRESET ({S.guess_preset(state)})")
    else:
        kwargs = S.infer_kwargs(state, tok.latent_channels, tok.stride, str(path))
    if steps is not None:
        kwargs["num_sampling_steps"] = str(steps)
    model = create_model(preset, vae_stride=tok.stride, token_channels=tok.latent_channels, **kwargs)
    try:
        load_state_dict_strict(model, state, source=str(path))
    except ValueError as e:
        raise ValueError(f"--model {preset}: {e} ({S.guess_preset(state)})") from None
    return model.eval(), preset, kwargs


def sample_setting(acc, model, tok, folder: Path, key: dict, record: dict, classes, n: int, args) -> None:
    """One setting into `folder`: check, keep what exists, shard the missing indices, then grid/npz/JSON."""
    old = S.check_folder(folder, key, n, classes)
    acc.wait_for_everyone()
    grid_idx, nrow = S.grid_layout(n, classes)
    runs = (old or {}).get("runs", [])
    if acc.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(folder)
        if not args.grid_only:
            write_json({**record, "key": key, "complete": False, "runs": runs}, folder / "settings.json")
    acc.wait_for_everyone()
    done = set() if args.grid_only else S.existing_samples(folder, n, classes)
    todo = grid_idx if args.grid_only else [i for i in range(n) if i not in done]
    mine, bs = todo[acc.process_index::acc.num_processes], args.batch_size
    acc.print(f"{folder}: " + ("grid only" if args.grid_only else f"{len(done)} of {n} images exist") +
              f", generating {len(todo)} on {acc.num_processes} process(es), batch {bs}")
    made, t0 = [], time.perf_counter()
    with tqdm(total=len(todo), disable=not acc.is_main_process, desc=folder.name, unit="img") as bar:
        for s in range(0, len(mine), bs):
            batch = mine[s:s + bs]
            images = S.generate_images(model, tok, batch, classes, args.seed, key["num_iter"], key["cfg"],
                                       key["cfg_schedule"], key["temperature"], args.precision, pad_to=bs,
                                       sampler=args.sampler, eta=args.eta, diffusion_steps=args.diffusion_steps,
                                       clip_denoised=key.get("clip_denoised"))
            for i, img in zip(batch, images):
                if args.grid_only:
                    made.append((i, img))
                else:
                    save_png(img, folder / S.sample_name(i, classes))
            bar.update(min(len(batch) * acc.num_processes, len(todo) - bar.n))
    acc.wait_for_everyone()
    seconds = time.perf_counter() - t0
    per_process = gather_object([len(mine)])
    made = gather_object(made) if args.grid_only else made
    if not acc.is_main_process:
        return
    if args.grid_only:
        images = dict(made)
        write_grid(np.stack([images[i] for i in grid_idx]), nrow, folder / "grid.png")
    else:
        write_grid(S.read_samples(folder, grid_idx, classes, rgb=False), nrow, folder / "grid.png")
        if args.npz:
            S.write_npz(folder / "samples.npz", folder, n, classes)
    speed = S.rate(len(todo), seconds)
    device = str(acc.device) + (f" ({torch.cuda.get_device_name(acc.device)})" if acc.device.type == "cuda" else "")
    this_run = {"generated": len(todo), "kept": len(done), "per_process": per_process, "batch_size": bs,
                "num_processes": acc.num_processes, "device": device, "seconds": seconds, **speed,
                "grid_only": args.grid_only, "command": args.command, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if not args.grid_only or old is None:
        complete = not args.grid_only and len(S.existing_samples(folder, n, classes)) == n
        made_by = [r for r in runs + [this_run] if r.get("generated") and not r.get("grid_only")]
        overall = S.rate(sum(r["generated"] for r in made_by), sum(r["seconds"] for r in made_by))  # all runs
        write_json({**record, "key": key, "complete": complete, **overall, "runs": runs + [this_run]},
                     folder / "settings.json")
    if speed["seconds_per_image"] is None:
        print(f"{folder}: all {n} images already exist; nothing generated")
    else:
        print(f"{folder}: {len(todo)} images in {seconds:.1f} s: {speed['seconds_per_image']:.4f} s/image, "
              f"{speed['images_per_second']:.2f} images/s")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--run", help=f"train.py output folder (default: {DEFAULT_RUN} if it exists)")
    src.add_argument("--checkpoint", help="MAR weights: ours (.pt/.safetensors) or the published checkpoint-last.pth")
    p.add_argument("--model", help="MAR preset, needed for published checkpoints: " + ", ".join(PRESETS))
    p.add_argument("--tokenizer", help="KL-VAE: published kl16.ckpt (LDM format) or a project .safetensors")
    p.add_argument("--tokenizer-preset", default="kl16", help="architecture of an LDM-format tokenizer file")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="EMA weights (default)")
    n = p.add_mutually_exclusive_group()
    n.add_argument("--num-images", type=int, help="images per setting (default: one grid's worth)")
    n.add_argument("--per-class", type=int, help="images per class (ImageNet protocol: 50)")
    p.add_argument("--classes", help="comma-separated class indices (default: all classes)")
    p.add_argument("--num-iter", type=int, nargs="+", help="MAR generation steps (default: the run's, else 64)")
    p.add_argument("--cfg", type=float, nargs="+", help="guidance scale(s) (default: the run's, else 1)")
    p.add_argument("--cfg-schedule", choices=("linear", "constant"))
    p.add_argument("--temperature", type=float, nargs="+", help="diffusion noise temperature(s)")
    p.add_argument("--num-sampling-steps", type=int, help="diffusion steps per token (default: the model's, 100)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch and process")
    p.add_argument("--precision", choices=tuple(S.PRECISIONS), default="fp32", help="autocast dtype of MAR")
    fast = p.add_argument_group("fast path (opt-in; the defaults are the exact reference sampler)")
    fast.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm", help="diffusion sampler of the head")
    fast.add_argument("--eta", type=float, default=0.0, help="DDIM noise (0 = deterministic)")
    fast.add_argument("--diffusion-steps", type=int, nargs=2, metavar=("FIRST", "LAST"),
                      help="diffusion steps annealed from the first to the last MAR iteration (e.g. 50 10)")
    guard = p.add_argument_group("guard (opt-in; a run's config may set it, sample.clip_denoised)")
    guard.add_argument("--clip-denoised", type=S.parse_clip_denoised, metavar="R|off",
                       help="clamp the head's predicted x0 to [-R, R] at every diffusion step (token units); "
                            "'off' = the reference sampler (default: the run's sample.clip_denoised, else off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output folder (default: samples/<run>/<setting>)")
    p.add_argument("--npz", action="store_true", help="also write samples.npz (arr_0: uint8 N x H x W x 3)")
    p.add_argument("--grid-only", action="store_true", help="write only grid.png (no per-image files)")
    return p.parse_args(argv)


def run(args) -> int:
    if min(v for v in (args.batch_size, args.num_images, args.per_class) if v is not None) < 1:
        raise ValueError("--batch-size, --num-images and --per-class must be >= 1")
    if args.grid_only and args.npz:
        raise ValueError("--grid-only writes no per-image files, so no npz: drop --npz or --grid-only")
    acc = Accelerator(cpu=not torch.cuda.is_available())
    check_launch(acc.num_processes)
    weights, run_dir = resolve_weights(args)
    state, config, tok_meta = read_weights(weights, args.ema)
    tok_path = find_tokenizer(args, run_dir, config, weights)
    expected = KLVAEConfig.from_dict(tok_meta) if tok_meta else None
    tok = load_tokenizer(tok_path, expected, config, args.tokenizer_preset)
    model, preset, kwargs = build_model(state, config, args.model, tok, weights, args.num_sampling_steps)
    model, tok = model.to(acc.device), tok.to(acc.device).eval()
    classes = S.parse_classes(args.classes, model.num_classes)
    n = (args.per_class * len(classes) if args.per_class is not None else args.num_images if args.num_images is not None
         else S.default_num_images(len(classes)))
    defaults = SampleConfig(**(config or {}).get("sample", {}))
    iters = args.num_iter or [min(defaults.num_iter, model.seq_len)]
    clip = S.effective_clip_denoised(args.clip_denoised, defaults.clip_denoised)
    if not all(1 <= k <= model.seq_len for k in iters):
        raise ValueError(f"--num-iter must be in [1, {model.seq_len}] (the number of tokens), got {iters}")
    # what the images depend on (a folder made with another key is refused) ...
    base = {"mar_weights_sha256": S.fingerprint(state), "ema": args.ema, "model": {"preset": preset, **kwargs},
            "tokenizer_sha256": S.fingerprint(tok.vae.state_dict(), tok.config.to_dict()),
            "num_sampling_steps": model.diffloss.num_sampling_steps, "precision": args.precision,
            "sampler": args.sampler, "eta": args.eta,
            "diffusion_steps": list(args.diffusion_steps) if args.diffusion_steps else None, "seed": args.seed,
            "classes": ",".join(map(str, classes)), "cfg_schedule": args.cfg_schedule or defaults.cfg_schedule,
            **({"clip_denoised": clip} if clip is not None else {})}  # absent = the reference sampler
    # ... and what is recorded beside it
    paths = {"mar": weights, "tokenizer": tok_path, "run": run_dir}
    record = {"format": S.SETTINGS_FORMAT, "num_images": n, "label_rule": "label(i) = classes[i % len(classes)]",
              "seed_rule": "image i: torch.Generator seeded with mar.engine.data.item_seed(seed, i)",
              "files": "{index:06d}_c{class:03d}.png",
              "weights": {**{k: str(v.resolve()) if v else None for k, v in paths.items()}, "ema": args.ema}}
    grid = list(dict.fromkeys(itertools.product(args.cfg or [defaults.cfg], args.temperature or [defaults.temperature],
                                                iters)))  # (cfg, temperature, num_iter) settings, duplicates dropped
    root = Path(args.out) if args.out else Path("samples") / (run_dir.name if run_dir else f"{preset}_{weights.stem}")
    for cfg, temperature, num_iter in grid:
        name = S.setting_folder_name(cfg, temperature, num_iter if len(iters) > 1 else None)
        folder = root / name if (len(grid) > 1 or not args.out) else root
        key = {**base, "cfg": cfg, "temperature": temperature, "num_iter": num_iter}
        sample_setting(acc, model, tok, folder, key, record, classes, n, args)
    acc.wait_for_everyone()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.command = ["sample.py", *(sys.argv[1:] if argv is None else argv)]
    try:
        return run(args)
    except (ValueError, OSError) as e:  # bad input: one clear line (SettingsMismatch, CheckpointError, ...)
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # MKL reads this at its first call: its "conditional numerical reproducibility" makes CPU matmul results
    # independent of batch shape and thread count (the few-step sampler amplifies 1e-7 differences to pixels).
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    sys.exit(main())
