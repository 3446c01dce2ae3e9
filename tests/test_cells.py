"""Every cell of the ablation table (configs/ablations/*.yaml) trains a few steps through train.py, resumes
exactly (bit for bit against an uninterrupted run) and samples on CPU, at tiny sizes (mar_tiny, random small
tokenizers, the Fashion-MNIST fixture)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mar.eval.ablations import uses_vq
from mar.pipeline import sample_images
from mar.run import load_run

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "fashion-mnist"
CELLS = ["ar_raster_ce", "ar_raster_diff", "mar_causal_ce", "mar_causal_diff", "mar_ce", "mar_diff", "maskgit",
         "vq_diff"]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """Random grey tokenizers of the cells' presets (KL kl_f4_c8 and VQ vq_f4_c8_k512)."""
    from tokenizers import KLTokenizer, VQTokenizer, kl_vae_preset, vq_preset

    folder = tmp_path_factory.mktemp("cell_tokenizers")
    torch.manual_seed(0)
    KLTokenizer(kl_vae_preset("kl_f4_c8", in_channels=1, out_channels=1, scaling_factor=1.2)).save(folder / "kl.safetensors")
    VQTokenizer(vq_preset("vq_f4_c8_k512", in_channels=1, out_channels=1, scaling_factor=0.8),
                generator=torch.Generator().manual_seed(0)).save(folder / "vq.safetensors")
    return folder


def train(cell: str, out: Path, tokenizers: Path, steps: int, *extra: str) -> subprocess.CompletedProcess:
    cfg = ROOT / "configs" / "ablations" / f"{cell}.yaml"
    vq = uses_vq(cell)
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(cfg), "--model.preset=mar_tiny",
           f"--tokenizer.checkpoint={tokenizers / ('vq' if vq else 'kl')}.safetensors",
           "--data.kind=fashion_mnist", f"--data.path={FIXTURE}", "--optim.batch_size=4",
           "--model.num_sampling_steps=3", f"--train.output_dir={out}", f"--train.max_steps={steps}",
           "--train.save_every_steps=2", "--train.log_every_steps=1", "--model.attn_dropout=0.1", *extra]
    env = {"OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "PATH": "/usr/bin:/bin",
           "HOME": str(out.parent)}
    proc = subprocess.run(cmd, cwd=out.parent, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"train.py {cell} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.mark.parametrize("cell", CELLS)
def test_cell_trains_resumes_exactly_and_samples(cell, tokenizers, tmp_path):
    train(cell, tmp_path / "straight", tokenizers, 4)
    train(cell, tmp_path / "resumed", tokenizers, 4, "--train.stop_at_step=2")
    second = train(cell, tmp_path / "resumed", tokenizers, 4)
    assert "resumed from" in second.stdout + second.stderr
    a = torch.load(tmp_path / "straight" / "checkpoints" / "step-00000004.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "step-00000004.pt", weights_only=True)
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{cell}: {part}.{k} differs after the resume"
    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in rows) and len(rows) == 4

    run = load_run(tmp_path / "straight")
    d = run.sample_defaults
    kind = run.model.head.kind
    assert kind == ("discrete" if cell.endswith("_ce") or cell == "maskgit" else "continuous")
    images = sample_images(run.model, run.tokenizer, [0, 1], list(range(10)), seed=0,
                           num_iter=min(d.num_iter, run.model.seq_len), cfg=2.0, cfg_schedule="linear",
                           temperature=1.0, options=d.sampling_options())
    assert images.shape == (2, 32, 32, 1) and images.dtype == np.uint8 and images.std() > 0
    again = sample_images(run.model, run.tokenizer, [1], list(range(10)), seed=0,
                          num_iter=min(d.num_iter, run.model.seq_len), cfg=2.0, cfg_schedule="linear",
                          temperature=1.0, options=d.sampling_options())
    assert np.array_equal(again[0], images[1])  # image i depends on (seed, i) only
