"""VAR weights in sample.py, evaluate.py sweep and sample.py edit, as MAR weights are used; the published file
layout (bare state dicts of var_d*.pth and vae_ch160v4096z32.pth) through mar.run.load_run. Tiny sizes."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
import sample
from mar.edit import edit_tokens, load_inputs, region_mask, token_unknown
from mar.next_scale_generator import scale_known_mask
from mar.registry import create_next_scale
from mar.run import load_run
from tokenizers.multiscale import MultiScaleVQVAE, multiscale_preset

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "fashion-mnist"


@pytest.fixture(scope="module")
def var_run(tmp_path_factory):
    """A VAR run folder from train.py (3 steps of configs/fmnist_var.yaml at tiny sizes, random tokenizer)."""
    d = tmp_path_factory.mktemp("var_cli")
    config = multiscale_preset("msvq_f4", in_channels=1, out_channels=1, hybrid=True)
    MultiScaleVQVAE(config, generator=torch.Generator().manual_seed(0)).save(d / "msvq.safetensors")
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "fmnist_var.yaml"),
           "--model.preset=var_d2", "--model.encoder_embed_dim=32", "--model.encoder_num_heads=2",
           f"--tokenizer.checkpoint={d / 'msvq.safetensors'}", "--data.kind=fashion_mnist", f"--data.path={FIXTURE}",
           "--optim.batch_size=4", f"--train.output_dir={d / 'run'}", "--train.max_steps=3"]
    env = {"OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "PATH": "/usr/bin:/bin", "HOME": str(d)}
    proc = subprocess.run(cmd, cwd=d, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return d / "run"


def test_sample_py_makes_var_images_with_top_k_top_p_and_more_smooth(var_run, tmp_path, capsys):
    out, smooth = tmp_path / "plain", tmp_path / "smooth"
    base = ["--run", str(var_run), "--num-images", "10", "--batch-size", "4", "--cfg", "1.5", "--top-k", "50",
            "--top-p", "0.9"]
    assert sample.main([*base, "--out", str(out)]) == 0, capsys.readouterr().err
    assert sample.main([*base, "--out", str(smooth), "--more-smooth"]) == 0, capsys.readouterr().err
    key = json.loads((out / "settings.json").read_text())["key"]
    assert key["top_k"] == 50 and key["top_p"] == 0.9 and key["num_iter"] == 6 and "more_smooth" not in key
    assert json.loads((smooth / "settings.json").read_text())["key"]["more_smooth"] is True
    names = sorted(p.name for p in out.glob("0*.png"))
    assert len(names) == 10 and (out / "grid.png").is_file()
    from PIL import Image

    a = [np.asarray(Image.open(out / n)) for n in names]
    b = [np.asarray(Image.open(smooth / n)) for n in names]
    assert any(not np.array_equal(x, y) for x, y in zip(a, b))  # the option reaches the sampler
    assert sample.main([*base, "--out", str(tmp_path / "bad"), "--num-iter", "16"]) == 2
    assert "num_iter must be its 6 scales" in capsys.readouterr().err


def test_evaluate_sweep_over_cfg_and_top_k(var_run, tmp_path, capsys):
    from mar.eval.classifier import ClassifierConfig, FashionClassifier, save_classifier

    torch.manual_seed(0)
    clf = tmp_path / "clf.safetensors"
    save_classifier(FashionClassifier(ClassifierConfig()), clf)
    out = tmp_path / "sweep"
    code = evaluate.main(["sweep", "--run", str(var_run), "--cfg", "0", "2", "--top-k", "5", "500", "--num-images", "10",
                          "--ref", "fashion_mnist:test", "--out", str(out), "--features", "fmnist", "--classifier",
                          str(clf), "--fmnist-root", str(FIXTURE), "--cpu", "--sample-batch-size", "5"])
    assert code == 0, capsys.readouterr().err
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [(float(r["cfg"]), int(r["top_k"])) for r in rows] == [(0, 5), (0, 500), (2, 5), (2, 500)]
    assert (out / "cfg2.0_temp1.0_topk5" / "grid.png").is_file()
    key = json.loads((out / "cfg2.0_temp1.0_topk5" / "settings.json").read_text())["key"]
    assert key["top_k"] == 5 and key["cfg"] == 2.0
    assert len({r["fd_fmnist"] for r in rows}) == 4  # every point made other images


def test_edit_keeps_the_known_codes_at_every_scale(var_run, tmp_path, capsys):
    run = load_run(var_run)
    images, labels, _ = load_inputs(["fashion_mnist:test:0-2"], 32, 1, str(FIXTURE))
    regenerate = region_mask("lower-half", 32, 32).expand(2, -1, -1)
    codes, known = edit_tokens(run.model, run.tokenizer, images, regenerate, torch.tensor(labels), indices=[0, 1],
                               seed=0, num_iter=6, cfg=1.5)
    model = run.model
    full = scale_known_mask(known, model.patch_nums)
    assert full.shape == (2, model.L) and full[:, :1].all()  # the 1x1 scale is always the image's
    assert full[:, -64:].equal(known) and not known.all() and known.any()
    # the known codes come back exactly: re-encode f_hat's known positions through the last scale's codes
    truth = run.tokenizer.encode(images)
    _, generated = __import__("mar.generate_scales", fromlist=["next_scale"]).next_scale(
        model, run.tokenizer.quantize, 2, labels=torch.tensor(labels), cfg=1.5, known_codes=truth, known_mask=full,
        return_codes=True, generator=[torch.Generator().manual_seed(i) for i in range(2)])
    assert torch.equal(generated[full], truth[full]) and not torch.equal(generated, truth)
    out = tmp_path / "edit"
    assert sample.main(["edit", "--run", str(var_run), "--input", "fashion_mnist:test:0-2", "--fmnist-root",
                        str(FIXTURE), "--mask", "lower-half", "--variations", "2", "--out", str(out)]) == 0, \
        capsys.readouterr().err
    assert (out / "grid.png").is_file() and len(list(out.glob("0*.png"))) == 4


def test_published_layout_loads_strictly_and_wrong_files_are_refused(tmp_path):
    """Random weights saved as the published files are (bare state dicts) load through load_run and give the
    same logits; the tokenizer file given as the transformer is refused with one message."""
    tok = MultiScaleVQVAE(multiscale_preset("msvq_f4"), generator=torch.Generator().manual_seed(0))
    torch.save(tok.state_dict(), tmp_path / "vae.pth")
    model = create_next_scale("var_d2", "categorical", token_channels=512, token_dim=16, num_classes=1000,
                              patch_nums=tok.patch_nums, generator=torch.Generator().manual_seed(1)).eval()
    torch.save(model.state_dict(), tmp_path / "var_d2.pth")
    run = load_run(tmp_path / "var_d2.pth", model="var_d2", tokenizer=tmp_path / "vae.pth", tokenizer_preset="msvq_f4")
    assert run.model.num_classes == 1000 and run.model.img_size == 32
    idx = tok.quantize.encode_indices(torch.randn(2, 16, 8, 8))
    x = tok.quantize.teacher_inputs(idx)
    labels = torch.tensor([3, 999])
    assert torch.equal(run.model(labels, x), model(labels, x))
    with pytest.raises(ValueError, match="var_d2"):
        load_run(tmp_path / "var_d2.pth", tokenizer=tmp_path / "vae.pth", tokenizer_preset="msvq_f4")
    with pytest.raises(Exception, match="tokenizer|VQVAE|not a"):
        load_run(tmp_path / "vae.pth", model="var_d2", tokenizer=tmp_path / "vae.pth", tokenizer_preset="msvq_f4")
    assert token_unknown(torch.zeros(1, 32, 32, dtype=torch.bool), run.model.vae_stride).shape == (1, 64)
