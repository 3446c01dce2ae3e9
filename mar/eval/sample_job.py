"""Fill sample and edit folders: one folder per setting, resumable, sharded over the processes of a launch.

Glossary: N images of a setting, i an image index, K classes sampled.

For each setting: refuse a folder made with other settings, keep the images already there, split the missing
indices over the processes (process p makes indices p, p + P, ...), write each PNG atomically, then the grid,
the optional ``samples.npz`` and ``settings.json`` (the key the images depend on, the runs that made them and
their speed). Image i is ``mar.pipeline.sample_images`` of index i, so it is the same on any process count or
batch size, and after any interruption.

The launch is passed in as an accelerator-like object (``process_index``, ``num_processes``,
``is_main_process``, ``device``, ``wait_for_everyone``); gathering goes through ``mar.engine.dist``.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from mar.config.schema import SamplingOptions
from mar.edit import edit_images, mask_preview
from mar.engine.dist import gather_objects
from mar.eval import sample_folders as S
from mar.io import remove_stale_temps, save_png, write_grid, write_json
from mar.pipeline import sample_images
from mar.run import Run


@dataclass(frozen=True)
class Setting:
    """One point of a sweep: guidance, temperature, steps, and the sampler options."""

    cfg: float
    temperature: float
    num_iter: int
    cfg_schedule: str = "linear"
    options: SamplingOptions = field(default_factory=SamplingOptions)

    def folder_name(self, with_iter: bool = False) -> str:
        return S.setting_folder_name(self.cfg, self.temperature, self.num_iter if with_iter else None)


def tokenizer_state(tokenizer) -> dict:
    """The tensors a folder's key fingerprints: a KL tokenizer's VAE (the keys folders made before the VQ
    tokenizer hold), any other tokenizer's own state dict."""
    return getattr(tokenizer, "vae", tokenizer).state_dict()


def settings_key(run: Run, setting: Setting, seed: int, classes) -> dict:
    """What the images of a folder depend on (a folder made with another key is refused). The layout of the
    earlier sample.py is kept, so folders it made stay resumable: options at their defaults add no key."""
    o = setting.options
    key = {"mar_weights_sha256": S.fingerprint(run.state_dict), "ema": run.ema,
           "model": {"preset": run.preset, **run.model_kwargs},
           "tokenizer_sha256": S.fingerprint(tokenizer_state(run.tokenizer), run.tokenizer.config.to_dict()),
           "num_sampling_steps": getattr(run.model.head, "num_sampling_steps", None), "precision": o.precision,
           "sampler": o.sampler,
           "eta": o.eta, "diffusion_steps": list(o.diffusion_steps_schedule) if o.diffusion_steps_schedule else None,
           "seed": seed, "classes": ",".join(map(str, classes)), "cfg_schedule": setting.cfg_schedule}
    if o.diffusion_steps_schedule and o.diffusion_steps_shape != "linear":
        key["diffusion_steps_shape"] = o.diffusion_steps_shape
    if o.clip_denoised is not None:  # absent = the reference sampler
        key["clip_denoised"] = o.clip_denoised
    if o.feature_cache != "off":  # the cached loop makes other images; absent = the reference loop
        key["feature_cache"], key["cache_refresh"] = o.feature_cache, o.cache_refresh
    if o.row_bucket is not None:  # padded rows: the same images to float rounding, recorded as made
        key["row_bucket"] = o.row_bucket
    for name in ("top_k", "top_p", "choice_temperature", "more_smooth"):  # categorical / VAR; at defaults no key
        if getattr(o, name) != getattr(SamplingOptions, name):
            key[name] = getattr(o, name)
    distilled = getattr(run.model.head, "distilled_head", None)
    if o.distilled_steps is not None:  # the distilled head samples: its steps and weights (absent = the head's sampler)
        key["distilled_steps"] = o.distilled_steps
        key["distilled_head_sha256"] = S.fingerprint(distilled.state_dict()) if distilled is not None else None
    return {**key, "cfg": setting.cfg, "temperature": setting.temperature, "num_iter": setting.num_iter}


def fill_folder(acc, run: Run, folder: Path, setting: Setting, classes, n: int, seed: int, batch_size: int,
                record: dict, grid_only: bool = False, npz: bool = False, command=()) -> dict:
    """Make the missing images of one setting in ``folder`` (see the module docstring); returns this run's
    record (images generated and kept, seconds, speed). With ``grid_only`` only ``grid.png`` is written."""
    key = settings_key(run, setting, seed, classes)
    old = S.check_folder(folder, key, n, classes)
    acc.wait_for_everyone()
    grid_idx, nrow = S.grid_layout(n, classes)
    runs = (old or {}).get("runs", [])
    if acc.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(folder, any_pid=True)  # the caller holds the folder's lock
        if not grid_only:
            write_json({**record, "key": key, "complete": False, "runs": runs}, folder / "settings.json")
    acc.wait_for_everyone()
    done = set() if grid_only else S.existing_samples(folder, n, classes)
    todo = grid_idx if grid_only else [i for i in range(n) if i not in done]
    mine = todo[acc.process_index::acc.num_processes]
    print_main = print if acc.is_main_process else (lambda *a, **k: None)
    print_main(f"{folder}: " + ("grid only" if grid_only else f"{len(done)} of {n} images exist") +
               f", generating {len(todo)} on {acc.num_processes} process(es), batch {batch_size}")
    made, t0 = [], time.perf_counter()
    with tqdm(total=len(todo), disable=not acc.is_main_process, desc=folder.name, unit="img") as bar:
        for s in range(0, len(mine), batch_size):
            batch = mine[s:s + batch_size]
            images = sample_images(run.model, run.tokenizer, batch, classes, seed, setting.num_iter, setting.cfg,
                                   setting.cfg_schedule, setting.temperature, setting.options, pad_to=batch_size)
            for i, img in zip(batch, images):
                if grid_only:
                    made.append((i, img))
                else:
                    save_png(img, folder / S.sample_name(i, classes))
            bar.update(min(len(batch) * acc.num_processes, len(todo) - bar.n))
    acc.wait_for_everyone()
    seconds = time.perf_counter() - t0
    per_process = gather_objects(len(mine))
    made = [m for part in gather_objects(made) for m in part] if grid_only else made
    speed = S.rate(len(todo), seconds)
    device = str(acc.device) + (f" ({torch.cuda.get_device_name(acc.device)})" if acc.device.type == "cuda" else "")
    this_run = {"generated": len(todo), "kept": len(done), "per_process": per_process, "batch_size": batch_size,
                "num_processes": acc.num_processes, "device": device, "seconds": seconds, **speed,
                "grid_only": grid_only, "command": list(command), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if acc.is_main_process:
        _write_outputs(folder, key, record, runs, this_run, made, grid_idx, nrow, classes, n, grid_only, npz, old)
    acc.wait_for_everyone()
    return this_run


def _write_outputs(folder, key, record, runs, this_run, made, grid_idx, nrow, classes, n, grid_only, npz, old):
    """Grid, npz and settings.json of a finished setting (main process)."""
    if grid_only:
        images = dict(made)
        write_grid(np.stack([images[i] for i in grid_idx]), nrow, folder / "grid.png")
    else:
        write_grid(S.read_samples(folder, grid_idx, classes, rgb=False), nrow, folder / "grid.png")
        if npz:
            S.write_npz(folder / "samples.npz", folder, n, classes)
    if not grid_only or old is None:
        complete = not grid_only and len(S.existing_samples(folder, n, classes)) == n
        made_by = [r for r in runs + [this_run] if r.get("generated") and not r.get("grid_only")]
        overall = S.rate(sum(r["generated"] for r in made_by), sum(r["seconds"] for r in made_by))  # all runs
        write_json({**record, "key": key, "complete": complete, **overall, "runs": runs + [this_run]},
                   folder / "settings.json")
    speed = this_run
    if speed["seconds_per_image"] is None:
        print(f"{folder}: all {n} images already exist; nothing generated")
    else:
        print(f"{folder}: {this_run['generated']} images in {this_run['seconds']:.1f} s: "
              f"{speed['seconds_per_image']:.4f} s/image, {speed['images_per_second']:.2f} images/s")


def fill_edit_folder(acc, run: Run, out: Path, images: torch.Tensor, masks: torch.Tensor, labels: list[int],
                     names: list[str], setting: Setting, variations: int, seed: int, batch_size: int,
                     command=(), composite: bool = False) -> None:
    """Edits of ``images`` (n, C, H, W) in [-1, 1] under ``masks`` (n, H, W) (True = regenerate) and ``labels``:
    result r = i * variations + v of input i, seeded from (seed, r), as ``{r:06d}_c{label:03d}.png``; the inputs
    in ``inputs/``, ``grid.png`` (one row per input: input | mask | results) and ``settings.json``. A rerun with
    the same key makes only the missing results; a folder of other edits is refused."""
    v, total = variations, len(images) * variations
    key = {"weights": S.fingerprint(run.state_dict), "tokenizer": S.fingerprint(tokenizer_state(run.tokenizer)),
           "inputs": names, "inputs_sha256": S.fingerprint({"x": images.cpu(), "m": masks.cpu()}), "labels": labels,
           "variations": v, "seed": seed, "cfg": setting.cfg, "temperature": setting.temperature,
           "num_iter": setting.num_iter, "cfg_schedule": setting.cfg_schedule, "options": vars(setting.options),
           **({"composite": True} if composite else {})}
    key = json.loads(json.dumps(key))  # as settings.json holds it (tuples become lists)
    result_labels = [labels[r // v] for r in range(total)]
    name = [f"{r:06d}_c{result_labels[r]:03d}.png" for r in range(total)]
    old = S.read_settings(out)
    if old is not None and old["key"] != key and any(S.SAMPLE_NAME.match(p.name) for p in out.iterdir()):
        raise S.SettingsMismatch(f"{out} holds edits made with other inputs or settings: pass another --out")
    todo = [r for r in range(total) if not (out / name[r]).is_file()]
    record = {"format": S.SETTINGS_FORMAT, "kind": "edit", "key": key, "command": list(command),
              "seed_rule": "result r = input * variations + v: torch.Generator seeded with item_seed(seed, r)"}
    tok = run.tokenizer
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out, any_pid=True)
        write_json({**record, "complete": False}, out / "settings.json")
        for i, x in enumerate(tok.to_uint8(images).cpu().numpy()):
            save_png(x, out / "inputs" / f"{i:03d}.png")
    acc.wait_for_everyone()
    mine, t0 = todo[acc.process_index::acc.num_processes], time.perf_counter()
    with tqdm(total=len(todo), disable=not acc.is_main_process, desc=out.name, unit="img") as bar:
        for s in range(0, len(mine), batch_size):
            rows = mine[s:s + batch_size]
            src = [r // v for r in rows]
            made = edit_images(run.model, tok, images[src], masks[src], torch.tensor([result_labels[r] for r in rows]),
                               indices=rows, seed=seed, num_iter=setting.num_iter, cfg=setting.cfg,
                               cfg_schedule=setting.cfg_schedule, temperature=setting.temperature,
                               options=setting.options, composite=composite)
            for r, img in zip(rows, made):
                save_png(img, out / name[r])
            bar.update(min(len(rows) * acc.num_processes, len(todo) - bar.n))
    acc.wait_for_everyone()
    if acc.is_main_process:
        inputs = tok.to_uint8(images).cpu().numpy()
        results = [_read_png(out / name[r]) for r in range(total)]
        grid = [np.concatenate([inputs[i:i + 1], mask_preview(inputs[i:i + 1], masks[i:i + 1].cpu().numpy()),
                                np.stack(results[i * v:(i + 1) * v])]) for i in range(len(images))]
        write_grid(np.concatenate(grid), v + 2, out / "grid.png")
        speed = S.rate(len(todo), time.perf_counter() - t0)
        write_json({**record, "complete": True, **speed}, out / "settings.json")
        print(f"{out}: {total} edits of {len(images)} inputs ({len(todo)} made now); grid {out / 'grid.png'}")
    acc.wait_for_everyone()


def _read_png(path: Path) -> np.ndarray:
    """(H, W, C) uint8 (grey as one channel)."""
    with Image.open(path) as im:
        arr = np.asarray(im)
    return arr[..., None] if arr.ndim == 2 else arr
