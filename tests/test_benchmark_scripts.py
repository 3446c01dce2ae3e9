"""Scripts of benchmarks/ that the main job or users rely on: fmnist_bounds.py (the report's "for scale"
rows) and the search of max_batch.py."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import fmnist_bounds  # noqa: E402

from mar.eval.classifier import (ClassifierConfig, FashionClassifier, class_accuracy, fashion_mnist_uint8,  # noqa: E402
                            save_classifier)
from tokenizers import KLTokenizer, kl_vae_preset  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "fashion-mnist"


def test_bounds_score_the_real_images_and_their_reconstructions(tmp_path, capsys):
    torch.manual_seed(0)
    clf_path, tok_path = tmp_path / "clf.safetensors", tmp_path / "tok.safetensors"
    clf = FashionClassifier(ClassifierConfig())
    save_classifier(clf, clf_path, test_accuracy=0.5)
    KLTokenizer(kl_vae_preset("kl_f4_c4", in_channels=1, out_channels=1, scaling_factor=1.5)).save(tok_path)
    out = tmp_path / "bounds"
    argv = ["--tokenizer", str(tok_path), "--classifier", str(clf_path), "--num", "12", "--out", str(out),
            "--data", str(FIXTURE)]
    assert fmnist_bounds.main(argv) == 0
    result = json.loads((out / "bounds.json").read_text())
    images, labels = fashion_mnist_uint8("train", str(FIXTURE))
    files = sorted((out / "real").glob("*.png"))
    assert [f.name for f in files] == [f"{i:06d}_c{int(y):03d}.png" for i, y in enumerate(labels[:12])]
    for f, img in zip(files, images[:12]):
        np.testing.assert_array_equal(np.asarray(Image.open(f)), img.numpy())
    # class accuracy of the real images, computed here directly with the classifier
    assert result["real"]["class_accuracy"] == pytest.approx(class_accuracy(clf.eval(), images[:12, None],
                                                                            labels[:12]))
    # reconstructions: the seeded posterior sample, decoded
    recon = fmnist_bounds.reconstruct(KLTokenizer.load(tok_path).eval(), images[:12], seed=0)
    np.testing.assert_array_equal(np.asarray(Image.open(out / "recon" / files[3].name)), recon[3].numpy())
    assert result["fd_bar"] == pytest.approx(5 * result["real"]["fd_fmnist"])
    assert result["recon"]["fd_fmnist"] > result["real"]["fd_fmnist"]  # random tokenizer: garbage back
    assert result["classifier_test_accuracy"] == 0.5 and result["num_images"] == 12


def test_max_batch_search_finds_the_boundary_with_few_tries():
    """benchmarks/max_batch.py's search (GPU-only script; its search logic is plain Python)."""
    from max_batch import largest_fit

    for limit_fit in [0, 1, 5, 63, 64, 65, 100, 1000, 4096]:
        tried = []

        def fits(b, limit_fit=limit_fit):
            tried.append(b)
            return b <= limit_fit

        assert largest_fit(fits, start=64, limit=1 << 14) == limit_fit
        assert len(tried) <= 2 * 14 + 2 and len(set(tried)) == len(tried)
    assert largest_fit(lambda b: True, start=8, limit=100) == 100  # everything fits up to the limit


def test_next_scale_benchmark_runs_at_tiny_sizes(capsys):
    """benchmarks/bench_next_scale.py: one line per model with finite, positive times."""
    import bench_next_scale

    tiny = ["--model.preset=var_d2", "--model.encoder_embed_dim=32", "--model.encoder_num_heads=2",
            "--model.diffloss_width=32", "--model.diffloss_depth=1", "--model.num_sampling_steps=3"]
    bench_next_scale.main(["--batch", "4", "--sample-batch", "2", "--repeats", "1", *tiny])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("var |", "hart |", "next_scale |"))]
    assert len(lines) == 3
    for line in lines:
        step, rate, per_image = (float(v) for v in line.split("|")[2:5])
        assert step > 0 and rate > 0 and per_image > 0


def test_gpu_check_runs_on_cpu_at_tiny_sizes():
    """benchmarks/gpu_check.sh end to end at tiny sizes: each section runs and prints its figures, and the
    sampling rows' images/s agree with their s/image (one is the inverse of the other, per row)."""
    import os
    import re
    import subprocess

    env = {**os.environ, "GPU_CHECK_SETTING": "tiny", "GPU_CHECK_BATCHES": "2 3", "GPU_CHECK_NUM_ITER": "4",
           "GPU_CHECK_TRAIN_BATCH": "2", "GPU_CHECK_DEVICE": "cpu", "PYTHON": sys.executable,
           "GPU_CHECK_FAST": "sampler=ddim,steps=4,cache=both,refresh=2", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for section in ("== 1. sampling", "== 2. training", "== 3. largest sampling batch", "# gpu_check done"):
        assert section in out
    rows = re.findall(r"^(exact|sampler=\S+) \|\s+(\d+)\s+4\s+\d+ 3\.0 \|\s+([0-9.]+)\s+([0-9.]+) \|", out, re.M)
    assert sorted((name.split(",")[0], int(b)) for name, b, _, _ in rows) == [
        ("exact", 2), ("exact", 3), ("sampler=ddim", 2), ("sampler=ddim", 3)]
    for _, _, s_per_image, images_per_s in rows:
        assert float(images_per_s) == pytest.approx(1 / float(s_per_image), rel=0.02, abs=0.02)
    train = re.findall(r"^tiny bf16 ([01]) 2 \| ([0-9.]+) ([0-9.]+) \| (\d+)", out, re.M)
    assert sorted(ckpt for ckpt, *_ in train) == ["0", "1"]
    assert "skipped: needs CUDA" in out
