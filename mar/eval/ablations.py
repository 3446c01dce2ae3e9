"""The MAR paper's Tables 1 and 2 on Fashion-MNIST: train every cell for the same budget, sample, score, tabulate.

Glossary: a *cell* is one trained model (a config in configs/ablations/); a *row* of the table is a cell sampled
one way (the bidirectional cells give two rows: one token per step, and several). N images per row and CFG
setting; the scores are ``evaluate.py``'s (the project's Fashion-MNIST classifier features: fd_fmnist, the
class accuracy, is_fmnist) against the Fashion-MNIST test set.

The steps, each skipped when its output exists (so a rerun continues; a changed budget is refused):
1. latent caches of both tokenizers (``train.py --cache-latents``);
2. every cell trained by ``train.py`` for ``steps`` steps of ``batch`` images (the same budget for all), and
   extra seeds of one cell for the seed-to-seed spread;
3. every row sampled without CFG and with CFG ``cfg`` (``mar.eval.sample_job``: one PNG per image, a grid);
4. the KV-cache comparison of the causal cells (cached vs uncached seconds per image on the same samples);
5. the scores, ``table.md`` / ``table.csv`` / ``table.json`` in the paper's layout beside the paper's ImageNet
   numbers, and a bar plot per metric.

CFG is one fixed scale for every row (not tuned per row: tuning it on the reference statistics is the field's
protocol, and the table says it was not done). Training runs as a subprocess of this interpreter so that a cell
is exactly what ``python train.py --config configs/ablations/<cell>.yaml`` trains.
"""
from __future__ import annotations

import csv
import io
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mar.config.loader import load_config
from mar.config.schema import TrainConfig
from mar.eval.metrics import compute_reference_stats, score_folder
from mar.eval.plot import bar_plot
from mar.eval.sample_folders import SETTINGS_FORMAT
from mar.eval.sample_job import Setting, fill_folder
from mar.io import write_json, write_text
from mar.run import load_run
from tokenizers import tokenizer_kind

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "ablations"


@dataclass(frozen=True)
class Row:
    """One line of the table: a cell sampled with ``num_iter`` steps, and the paper's ImageNet FIDs (MAR-L,
    400 epochs; Table 1, and Table 2 for the VQ tokenizer with Diffusion Loss)."""

    name: str
    cell: str
    variant: str
    order: str
    attention: str
    per_step: str
    loss: str
    num_iter: int | None  # None: one token per step (a causal cell; L steps)
    paper: tuple[float | None, float | None] = (None, None)
    short: str = ""


ROWS = [
    Row("ar_raster_ce", "ar_raster_ce", "AR", "raster", "causal", "1", "CrossEnt (VQ)", None, (19.58, 4.92), "AR raster CE"),
    Row("ar_raster_diff", "ar_raster_diff", "AR", "raster", "causal", "1", "Diff Loss (KL)", None, (19.23, 4.69),
        "AR raster Diff"),
    Row("mar_causal_ce", "mar_causal_ce", "MAR", "random", "causal", "1", "CrossEnt (VQ)", None, (16.22, 4.36),
        "MAR causal CE"),
    Row("mar_causal_diff", "mar_causal_diff", "MAR", "random", "causal", "1", "Diff Loss (KL)", None, (13.07, 4.07),
        "MAR causal Diff"),
    Row("mar_ce_1", "mar_ce", "MAR", "random", "bidirectional", "1", "CrossEnt (VQ)", 64, (8.75, 3.50), "MAR bidir CE 1"),
    Row("mar_diff_1", "mar_diff", "MAR", "random", "bidirectional", "1", "Diff Loss (KL)", 64, (3.43, 1.84),
        "MAR bidir Diff 1"),
    Row("mar_ce_k", "mar_ce", "MAR", "random", "bidirectional", ">1 (16 steps)", "CrossEnt (VQ)", 16, (8.79, 3.69),
        "MAR bidir CE 16"),
    Row("mar_diff_k", "mar_diff", "MAR", "random", "bidirectional", ">1 (16 steps)", "Diff Loss (KL)", 16,
        (3.50, 1.98), "MAR bidir Diff 16"),
    Row("maskgit", "maskgit", "MaskGIT", "confidence", "bidirectional", ">1 (8 steps)", "CrossEnt (VQ)", 8,
        (None, None), "MaskGIT 8"),
    Row("vq_diff", "vq_diff", "MAR (Table 2)", "random", "bidirectional", ">1 (16 steps)", "Diff Loss (VQ latent)", 16,
        (7.82, 3.64), "MAR VQ-latent Diff 16"),
    # not in the MAR paper: VAR's next-scale generation over the KL latent's residual pyramid, Diffusion Loss per token
    Row("next_scale_diff", "next_scale_diff", "Next-scale", "coarse to fine", "block-causal", "a scale (6 steps)",
        "Diff Loss (KL)", 6, (None, None), "Next-scale Diff"),
]
SPREAD_ROW = "mar_diff_k"  # the row whose cell is also trained with other seeds
METRICS = ("fd_fmnist", "class_accuracy", "is_fmnist_mean")


@dataclass(frozen=True)
class Budget:
    steps: int = 300
    batch: int = 64
    num_images: int = 100
    cfg: float = 3.0
    spread_seeds: tuple[int, ...] = (1, 2)

    def check(self) -> None:
        for name in ("steps", "batch", "num_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.cfg) and self.cfg > 0 and self.cfg != 1):
            raise ValueError(f"cfg must be a finite number > 0 other than 1 (the with-CFG setting), got {self.cfg}")
        if 0 in self.spread_seeds or len(set(self.spread_seeds)) != len(self.spread_seeds):
            raise ValueError(f"spread seeds must be distinct and not 0 (seed 0 is the main run), got "
                             f"{list(self.spread_seeds)}")


def log(message: str) -> None:
    print(f"[ablations] {message}", file=sys.stderr, flush=True)


def uses_vq(cell: str) -> bool:
    """Whether a cell's tokenizer is the VQ one (its codes, or its latent as continuous tokens)."""
    preset = load_config(TrainConfig, CONFIGS / f"{cell}.yaml").tokenizer.preset
    return tokenizer_kind(preset) == "discrete"


def train_cmd(cell: str, out: Path, tokenizer: Path, cache: Path, budget: Budget, seed: int) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "--config", str(CONFIGS / f"{cell}.yaml"),
            f"--tokenizer.checkpoint={tokenizer}", f"--data.path={cache}", f"--train.output_dir={out}",
            f"--train.max_steps={budget.steps}", f"--optim.batch_size={budget.batch}", f"--train.seed={seed}"]


def run_step(cmd: list[str], what: str) -> float:
    """Run a command (its output goes to ours), fail with its name; returns the wall seconds."""
    log(what)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}")
    return time.perf_counter() - t0


def ensure_cache(out: Path, tokenizer: Path, vq: bool, fmnist_root: str) -> Path:
    cache = out / f"latents_{'vq' if vq else 'kl'}.safetensors"
    if not cache.exists():
        cell = "mar_ce" if vq else "mar_diff"
        run_step([sys.executable, str(ROOT / "train.py"), "--config", str(CONFIGS / f"{cell}.yaml"),
                  f"--tokenizer.checkpoint={tokenizer}", "--data.kind=fashion_mnist", f"--data.path={fmnist_root}",
                  "--cache-latents", str(cache)], f"latent cache of the {'VQ' if vq else 'KL'} tokenizer -> {cache}")
    return cache


def ensure_trained(out: Path, cell: str, seed: int, tokenizers: dict, caches: dict, budget: Budget) -> dict:
    """Train a cell (or resume it) unless its export exists; returns {"run": dir, "train_seconds": s}."""
    folder = out / (cell if seed == 0 else f"{cell}_seed{seed}")
    run_dir, record_path = folder / "run", folder / "train.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {"seconds": 0.0}
    want = {"steps": budget.steps, "batch": budget.batch, "seed": seed}
    if record.get("budget", want) != want:
        raise ValueError(f"{folder} was trained with {record['budget']}, not {want}: use another --out, or delete "
                         f"{folder} to retrain it")
    if not (run_dir / "mar_ema.safetensors").exists():
        vq = uses_vq(cell)
        key = "vq" if vq else "kl"
        seconds = run_step(train_cmd(cell, run_dir, tokenizers[key], caches[key], budget, seed),
                           f"train {folder.name} ({budget.steps} steps x {budget.batch} images)")
        record = {"budget": want, "seconds": record["seconds"] + seconds}  # a resumed run adds its part
        write_json(record, record_path)
    return {"run": run_dir, "train_seconds": record["seconds"]}


def sample_row(acc, run, row: Row, out: Path, budget: Budget, sample_batch: int) -> dict:
    """Fill the row's folders without and with CFG; returns {cfg: folder}."""
    defaults = run.sample_defaults
    options = defaults.sampling_options()
    num_iter = row.num_iter or run.model.seq_len
    classes = list(range(run.model.num_classes))
    folders = {}
    next_scale = hasattr(run.model, "num_scales")
    for cfg in (1.0, budget.cfg):
        folder = out / f"cfg{cfg:g}"
        # a next-scale model's guidance is VAR's t (0 = none, last-scale weight 1 + t): t = cfg - 1 gives its last
        # scale the weight cfg that MAR's linear schedule reaches at its last step
        setting = Setting(cfg - 1.0 if next_scale else cfg, 1.0, num_iter, "linear", options)
        record = {"format": SETTINGS_FORMAT, "num_images": budget.num_images, "row": row.name,
                  "label_rule": "label(i) = classes[i % len(classes)]", "weights": {"mar": str(run.weights)}}
        log(f"sample {row.name} cfg {cfg:g}: {budget.num_images} images, {num_iter} steps")
        fill_folder(acc, run, folder, setting, classes, budget.num_images, 0, sample_batch, record,
                    command=["evaluate.py", "ablations"])
        folders[cfg] = folder
    return folders


@torch.no_grad()
def kv_cache_speed(run, cfg: float, n: int = 16) -> dict:
    """Seconds per image of a causal cell with and without the KV cache (the same n samples, one batch), and
    whether the tokens agree (codes exactly; continuous tokens to float rounding)."""
    model = run.model
    labels = torch.arange(n, device=model.fake_latent.device) % model.num_classes
    times, tokens = {}, {}
    options = run.sample_defaults.sampling_options()
    for cached in (True, False):
        g = torch.Generator(model.fake_latent.device).manual_seed(0)
        t0 = time.perf_counter()
        tokens[cached] = model.sample_tokens(n, cfg=cfg, labels=labels, generator=g, options=options, kv_cache=cached)
        times[cached] = (time.perf_counter() - t0) / n
    a, b = tokens[True], tokens[False]
    same = bool(torch.equal(a, b)) if not a.is_floating_point() else float((a - b).abs().max())
    return {"cached_s_per_image": times[True], "uncached_s_per_image": times[False],
            "speedup": times[False] / times[True], "tokens_agree": same, "images": n, "cfg": cfg}


def score(folder: Path, ref_stats: str, classifier: str) -> dict:
    result = score_folder(str(folder), ref_stats=ref_stats, metrics=["fid", "isc"], features="fmnist",
                          classifier=classifier)["metrics"]
    speed = json.loads((folder / "settings.json").read_text()).get("seconds_per_image")
    return {m: result.get(m) for m in METRICS} | {"seconds_per_image": speed}


def seed_spread(per_seed: list[dict]) -> dict:
    """{metric: {mean, std (sample standard deviation, n - 1), values}} over the seeds' scores."""
    if len(per_seed) < 2:
        raise ValueError("a seed spread needs at least two seeds")
    return {m: {"mean": statistics.mean(v[m] for v in per_seed), "std": statistics.stdev(v[m] for v in per_seed),
                "values": [v[m] for v in per_seed]} for m in METRICS}


def fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def write_table(rows: list[dict], spread: dict, kv: dict, out: Path, budget: Budget, wall: float) -> str:
    """table.md (the paper's layout + our columns), table.csv, table.json and the plots; returns the markdown."""
    c = f"{budget.cfg:g}"
    head = ("| variant | order | attention | per step | loss | paper FID w/o CFG | paper FID w/ CFG | fd_fmnist w/o | "
            f"fd_fmnist w/ CFG {c} | class acc w/o | class acc w/ | is_fmnist w/o | is_fmnist w/ | s/image w/o | "
            "s/image w/ | parameters | training time |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        a, b = r["scores"]["1"], r["scores"][c]
        lines.append(
            f"| {r['variant']} | {r['order']} | {r['attention']} | {r['per_step']} | {r['loss']} | "
            f"{fmt(r['paper'][0], 4)} | {fmt(r['paper'][1], 3)} | {fmt(a['fd_fmnist'])} | {fmt(b['fd_fmnist'])} | "
            f"{a['class_accuracy']:.1%} | {b['class_accuracy']:.1%} | {fmt(a['is_fmnist_mean'])} | "
            f"{fmt(b['is_fmnist_mean'])} | {fmt(a['seconds_per_image'], 2)} | {fmt(b['seconds_per_image'], 2)} | "
            f"{r['parameters'] / 1e6:.2f} M | {r['train_seconds'] / 60:.1f} min |")
    md = ["# Tables 1 and 2 of the MAR paper on Fashion-MNIST", "",
          f"Every cell: `configs/ablations/<cell>.yaml`, {budget.steps} steps x {budget.batch} images "
          f"({budget.steps * budget.batch / 60000:.2f} epoch), the same for all; {budget.num_images} images per row and "
          f"setting, scored against the Fashion-MNIST test set with the project's classifier (fd_fmnist: Frechet "
          f"distance of its features, lower is better). CFG {c} (linear schedule) for every row, not tuned per row. "
          f"Temperature 1. Diffusion Loss cells: 50 diffusion steps, the sampler guard of the fmnist config "
          f"(clip_denoised 5). The paper's columns are ImageNet 256 FIDs (MAR-L, 400 epochs): a different data set "
          f"and scale, for the ordering only. Whole run: {wall / 60:.1f} min.", "", *lines, ""]
    if spread:
        md += [f"Seed-to-seed spread of `{SPREAD_ROW}` (seeds {', '.join(map(str, spread['seeds']))}; each seed trains "
               "the cell anew and samples the same image indices): " + "; ".join(
                   f"{k} {v['mean']:.4g} ± {v['std']:.2g}" for k, v in spread["metrics"].items()), ""]
    if kv:
        md += ["KV cache (causal cells, the same 16 samples with CFG, one batch): cached vs uncached seconds per image",
               "", "| cell | cached s/image | uncached s/image | speed-up | tokens agree |", "|---|---|---|---|---|"]
        for k, v in kv.items():
            agree = v["tokens_agree"]
            agree = ("yes, bit for bit" if agree else "NO") if isinstance(agree, bool) else f"max diff {agree:.1e}"
            md.append(f"| {k} | {v['cached_s_per_image']:.3f} | {v['uncached_s_per_image']:.3f} | "
                      f"{v['speedup']:.2f}x | {agree} |")
        md.append("")
    md += ["![fd_fmnist per row](plot_fd_fmnist.png)", "", "![class accuracy per row](plot_class_accuracy.png)", ""]
    md += ["Grids (with CFG): " + ", ".join(f"[{r['name']}]({r['name']}/cfg{c}/grid.png)" for r in rows), ""]
    text = "\n".join(md)
    write_text(out / "table.md", text)
    buffer = io.StringIO()
    flat = [{"row": r["name"], "variant": r["variant"], "order": r["order"], "attention": r["attention"],
             "per_step": r["per_step"], "loss": r["loss"], "paper_fid": r["paper"][0], "paper_fid_cfg": r["paper"][1],
             **{f"{m}_{tag}": r["scores"][key][m] for tag, key in (("nocfg", "1"), ("cfg", c))
                for m in (*METRICS, "seconds_per_image")},
             "parameters": r["parameters"], "train_seconds": r["train_seconds"]} for r in rows]
    writer = csv.DictWriter(buffer, fieldnames=list(flat[0]))
    writer.writeheader()
    writer.writerows(flat)
    write_text(out / "table.csv", buffer.getvalue())
    write_json({"budget": budget.__dict__ | {"spread_seeds": list(budget.spread_seeds)}, "rows": rows,
                "spread": spread, "kv_cache": kv, "wall_seconds": wall}, out / "table.json")
    labels = [r["short"] for r in rows]
    for metric, title in (("fd_fmnist", "fd_fmnist (lower is better)"), ("class_accuracy", "class accuracy")):
        bar_plot(labels, {"w/o CFG": [r["scores"]["1"][metric] for r in rows],
                          f"CFG {c}": [r["scores"][c][metric] for r in rows]}, out / f"plot_{metric}.png",
                 title=f"{title}, {budget.num_images} images per bar", ylabel=metric)
    return text


def run_ablations(acc, out: Path, *, kl_tokenizer: Path, vq_tokenizer: Path, classifier: Path, fmnist_root: str,
                  budget: Budget, rows: list[Row] = ROWS, sample_batch: int = 50) -> str:
    """The whole comparison into ``out`` (see the module docstring); returns the markdown table."""
    budget.check()
    for path, what in ((kl_tokenizer, "KL tokenizer"), (vq_tokenizer, "VQ tokenizer"), (classifier, "classifier")):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{what} not found: {path}")
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    tokenizers = {"kl": Path(kl_tokenizer).resolve(), "vq": Path(vq_tokenizer).resolve()}
    need = {uses_vq(r.cell) for r in rows}
    caches = {("vq" if vq else "kl"): ensure_cache(out, tokenizers["vq" if vq else "kl"], vq, fmnist_root)
              for vq in sorted(need)}
    trained = {cell: ensure_trained(out, cell, 0, tokenizers, caches, budget)
               for cell in dict.fromkeys(r.cell for r in rows)}
    spread_row = next((r for r in rows if r.name == SPREAD_ROW), None)
    seeds = [] if spread_row is None else list(budget.spread_seeds)
    extra = {s: ensure_trained(out, spread_row.cell, s, tokenizers, caches, budget) for s in seeds}

    ref_stats = out / "reference_fmnist_test.safetensors"
    if not ref_stats.exists():
        log("reference statistics of the Fashion-MNIST test set")
        compute_reference_stats("fashion_mnist:test", str(ref_stats), format="ours", features="fmnist",
                                classifier=str(classifier), fmnist_root=fmnist_root)
    c = f"{budget.cfg:g}"
    results, kv = [], {}
    for row in rows:
        run = load_run(trained[row.cell]["run"]).to(acc.device)
        folders = sample_row(acc, run, row, out / row.name, budget, sample_batch)
        if row.num_iter is None and row.cell not in kv:
            kv[row.cell] = kv_cache_speed(run, budget.cfg)
        results.append({**row.__dict__, "paper": list(row.paper),
                        "parameters": sum(p.numel() for p in run.model.parameters()),
                        "train_seconds": trained[row.cell]["train_seconds"],
                        "scores": {f"{cfg:g}": score(f, str(ref_stats), str(classifier)) for cfg, f in folders.items()}})
    spread = {}
    if seeds:
        per_seed = [next(r for r in results if r["name"] == SPREAD_ROW)["scores"][c]]
        for s in seeds:
            run = load_run(extra[s]["run"]).to(acc.device)
            folders = sample_row(acc, run, spread_row, out / f"{SPREAD_ROW}_seed{s}", budget, sample_batch)
            per_seed.append(score(folders[budget.cfg], str(ref_stats), str(classifier)))
        spread = {"seeds": [0, *seeds], "cfg": budget.cfg, "metrics": seed_spread(per_seed)}
    return write_table(results, spread, kv, out, budget, time.perf_counter() - t0)
