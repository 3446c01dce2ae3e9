"""The next-scale family through train.py, as users run it: VAR's multi-scale VQVAE, HART's hybrid tokenizer,
VAR, HART and continuous next-scale each train a few steps, resume exactly (bit for bit against an
uninterrupted run) and sample on CPU; the trained files load through mar.run.load_run and sample.py. Tiny sizes
(var_d2 at width 32, the configs' tokenizers with random weights, the Fashion-MNIST fixture)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mar.pipeline import sample_images
from mar.run import load_run

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "fashion-mnist"
TINY_VAR = ["--model.preset=var_d2", "--model.encoder_embed_dim=32", "--model.encoder_num_heads=2",
            "--model.diffloss_width=32", "--model.diffloss_depth=1"]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """Random grey tokenizers: the hybrid multi-scale VQ of configs/fmnist_hart_tokenizer.yaml, and a KL one."""
    from tokenizers import KLTokenizer, kl_vae_preset
    from tokenizers.multiscale import MultiScaleVQVAE, multiscale_preset

    folder = tmp_path_factory.mktemp("next_scale_tokenizers")
    config = multiscale_preset("msvq_f4", in_channels=1, out_channels=1, hybrid=True)
    MultiScaleVQVAE(config, generator=torch.Generator().manual_seed(0)).save(folder / "msvq.safetensors")
    torch.manual_seed(0)
    KLTokenizer(kl_vae_preset("kl_f4_c8", in_channels=1, out_channels=1, scaling_factor=1.2)).save(folder / "kl.safetensors")
    return folder


def train(config: str, out: Path, steps: int, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / config),
           "--data.kind=fashion_mnist", f"--data.path={FIXTURE}", "--optim.batch_size=4", f"--train.output_dir={out}",
           f"--train.max_steps={steps}", "--train.save_every_steps=2", "--train.log_every_steps=1", *extra]
    env = {"OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "PATH": "/usr/bin:/bin", "HOME": str(out.parent)}
    proc = subprocess.run(cmd, cwd=out.parent, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"train.py {config} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc


def check_resume_is_exact(config: str, tmp_path: Path, *extra: str) -> Path:
    """4 steps straight vs 2 + 2 resumed: the same weights, EMA and losses."""
    train(config, tmp_path / "straight", 4, *extra)
    train(config, tmp_path / "resumed", 4, "--train.stop_at_step=2", *extra)
    second = train(config, tmp_path / "resumed", 4, *extra)
    assert "resumed from" in second.stdout + second.stderr
    a = torch.load(tmp_path / "straight" / "checkpoints" / "step-00000004.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "step-00000004.pt", weights_only=True)
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{config}: {part}.{k} differs after the resume"
    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(np.isfinite(r["loss"]) for r in rows)
    return tmp_path / "straight"


@pytest.mark.parametrize("config", ["fmnist_msvq.yaml", "fmnist_hart_tokenizer.yaml"])
def test_multiscale_tokenizers_train_resume_and_reconstruct(config, tmp_path):
    from tokenizers import open_tokenizer

    run = check_resume_is_exact(config, tmp_path)
    tok = open_tokenizer(run / "tokenizer.safetensors", "msvq_f4")
    assert tok.kind == "multiscale" and tok.config.hybrid == (config == "fmnist_hart_tokenizer.yaml")
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    codes = tok.encode(x)
    assert codes.shape == (2, 130) and tok.decode(codes).shape == (2, 1, 32, 32)


@pytest.mark.parametrize("config,head", [("fmnist_var.yaml", "categorical"), ("fmnist_hart.yaml", "hybrid"),
                                         ("fmnist_next_scale.yaml", "diffloss")])
def test_next_scale_generators_train_resume_and_sample(config, head, tokenizers, tmp_path):
    kl = head == "diffloss"
    extra = [*TINY_VAR, f"--tokenizer.checkpoint={tokenizers / ('kl' if kl else 'msvq')}.safetensors",
             "--model.num_sampling_steps=3"]
    run_dir = check_resume_is_exact(config, tmp_path, *extra)
    run = load_run(run_dir)
    assert run.model.num_scales == 6 and run.sample_defaults.num_iter == 6
    state = run.model.state_dict()
    assert ("head.weight" in state) == (head != "diffloss") and ("diffloss.net.input_proj.weight" in state) == (head != "categorical")
    images = sample_images(run.model, run.tokenizer, [0, 1, 2], list(range(10)), seed=0, num_iter=6, cfg=1.5,
                           cfg_schedule="linear", temperature=1.0, options=run.sample_defaults.sampling_options())
    assert images.shape == (3, 32, 32, 1) and images.dtype == np.uint8 and images.std() > 0
    again = sample_images(run.model, run.tokenizer, [2], list(range(10)), seed=0, num_iter=6, cfg=1.5,
                          cfg_schedule="linear", temperature=1.0, options=run.sample_defaults.sampling_options())
    diff = np.abs(again[0].astype(int) - images[2].astype(int))
    # image i depends on (seed, i) only, not on the batch: the same tokens, so at most one grey level on a few
    # pixels from batch-shape-dependent rounding (MKL / oneDNN: HART's guarded residual head's matmuls, and with one
    # thread the tokenizer decoder's convolutions too, as seen for VAR at OMP_NUM_THREADS=1; sample.py pins MKL
    # with MKL_CBWR, this in-process test does not)
    assert diff.max() <= 1 and diff.mean() < 0.05, (diff.max(), diff.mean())
    with pytest.raises(ValueError, match="num_iter must be its 6 scales"):
        run.model.generate(1, num_iter=16)
