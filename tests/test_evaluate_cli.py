"""evaluate.py: the score / ref-stats / train-classifier commands and their one-line user errors.

The commands run in-process through ``main(argv)`` (one subprocess run checks the real exit status) on
the Fashion-MNIST classifier features, which are cheap; the Inception path is covered by test_metrics.
"""

import gzip
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
from helpers import synthetic_classes, write_pngs
from mar.eval.classifier import ClassifierConfig, FashionClassifier, read_classifier_metadata, save_classifier
from mar.eval.files import load_statistics
from mar.eval.metrics import INCEPTION_WEIGHTS_ENV, INCEPTION_WEIGHTS_FILE, score_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def class_images(n: int, seed: int, size: int = 32):
    """helpers.synthetic_classes as numpy arrays (what write_idx takes)."""
    images, labels = synthetic_classes(n, seed, size)
    return images.numpy(), labels.numpy()


def write_idx(path, array: np.ndarray) -> None:
    """IDX file, gzipped: magic 0x0000080<ndim>, big-endian uint32 sizes, uint8 data."""
    header = struct.pack(">I", 0x800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    clf = str(root / "clf.safetensors")
    save_classifier(FashionClassifier(ClassifierConfig()), clf)  # untrained weights are enough for plumbing
    images, labels = class_images(12, seed=1)
    noise = (np.random.default_rng(2).uniform(0, 255, (12, 32, 32))).astype(np.uint8)
    fm = root / "fmnist"
    fm.mkdir()
    for prefix, n, seed in (("train", 64, 3), ("t10k", 20, 4)):
        x, y = class_images(n, seed, size=28)
        write_idx(fm / f"{prefix}-images-idx3-ubyte.gz", x)
        write_idx(fm / f"{prefix}-labels-idx1-ubyte.gz", y)
    return {"root": root, "clf": clf, "C": write_pngs(root / "C", images, labels), "D": write_pngs(root / "D", noise),
            "fmnist": str(fm)}


def fm_args(s):
    return ["--features", "fmnist", "--classifier", s["clf"], "--cpu"]


def test_score_against_reference_folder_writes_json(setup, capsys):
    out = str(setup["root"] / "res" / "score.json")
    rc = evaluate.main(["score", "--gen", setup["C"], "--ref", setup["D"], "--metrics", "fid,kid", "--out", out,
                        *fm_args(setup)])
    assert rc == 0
    result = json.loads(Path(out).read_text())
    assert json.loads(capsys.readouterr().out) == result
    assert set(result["metrics"]) == {"fd_fmnist", "kd_fmnist_mean", "kd_fmnist_std", "class_accuracy"}
    direct = score_folder(setup["C"], ref=setup["D"], metrics="fid,kid", features="fmnist",
                          classifier=setup["clf"], cuda=False)
    assert result["metrics"] == direct["metrics"]
    assert result["meta"]["kid_subset_size"] == 12 and result["meta"]["num_gen"] == 12


def test_ref_stats_then_score_against_them(setup, capsys):
    stats = str(setup["root"] / "d_stats.safetensors")
    assert evaluate.main(["ref-stats", "--data", setup["D"], "--out", stats, *fm_args(setup)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_images"] == "12" and summary["dim"] == 256 and summary["format"] == "safetensors"
    out = str(setup["root"] / "score_stats.json")
    assert evaluate.main(["score", "--gen", setup["C"], "--ref-stats", stats, "--out", out, *fm_args(setup)]) == 0
    result = json.loads(Path(out).read_text())
    assert set(result["metrics"]) == {"fd_fmnist", "is_fmnist_mean", "is_fmnist_std", "class_accuracy"}
    folder_vs_folder = score_folder(setup["C"], ref=setup["D"], metrics="fid", features="fmnist",
                                    classifier=setup["clf"], cuda=False)
    assert result["metrics"]["fd_fmnist"] == pytest.approx(folder_vs_folder["metrics"]["fd_fmnist"], rel=1e-12)


def test_train_classifier_and_fashion_mnist_reference(setup, capsys):
    clf = str(setup["root"] / "trained.safetensors")
    rc = evaluate.main(["train-classifier", "--data", setup["fmnist"], "--out", clf, "--epochs", "1", "--cpu",
                        "--batch-size", "32"])
    assert rc == 0
    meta = read_classifier_metadata(clf)
    assert (meta["num_train"], meta["num_test"], meta["epochs"]) == (64, 20, 1)
    assert 0.0 <= meta["test_accuracy"] <= 1.0
    capsys.readouterr()
    out = str(setup["root"] / "fm_test.npz")
    assert evaluate.main(["ref-stats", "--data", "fashion_mnist:test", "--fmnist-root", setup["fmnist"], "--out", out,
                          "--features", "fmnist", "--classifier", clf, "--cpu"]) == 0
    # closed form: mu = mean of the classifier features of the 20 test images padded 28 -> 32 with black
    x, _ = class_images(20, 4, size=28)
    padded = torch.nn.functional.pad(torch.from_numpy(x)[:, None].float() / 127.5 - 1, (2, 2, 2, 2), value=-1.0)
    from mar.eval.classifier import load_classifier
    with torch.no_grad():
        feats = load_classifier(clf).features(padded).double()
    stats = load_statistics(out)
    np.testing.assert_allclose(stats.mu, feats.mean(0).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.sigma, np.cov(feats.numpy(), rowvar=False), rtol=1e-4, atol=1e-6)


def one_line_error(capsys, argv) -> str:
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_user_errors_are_one_line_with_exit_status_2(setup, capsys, monkeypatch, tmp_path):
    s, fm = setup, fm_args(setup)
    missing = str(tmp_path / "missing")
    assert "not found" in one_line_error(capsys, ["score", "--gen", missing, "--ref", s["D"], *fm])
    assert "--ref" in one_line_error(capsys, ["score", "--gen", s["C"], *fm])
    assert "not allowed with" in one_line_error(capsys, ["score", "--gen", s["C"], "--ref", s["D"], "--ref-stats",
                                                         "x.npz", *fm])
    assert "invalid choice" in one_line_error(capsys, ["bogus"])
    assert "positive number or 'off'" in one_line_error(capsys, ["sweep", "--cfg", "1", "2", "--ref", s["D"],
                                                                  "--clip-denoised", "0", "--out", missing])
    assert "--classifier" in one_line_error(capsys, ["score", "--gen", s["C"], "--ref", s["D"], "--features",
                                                     "fmnist", "--cpu"])
    assert "need reference images" in one_line_error(capsys, ["score", "--gen", s["C"], "--ref-stats", "x.npz",
                                                              "--metrics", "fid,prc", *fm])
    assert ".safetensors" in one_line_error(capsys, ["ref-stats", "--data", s["D"], "--out", "x.pt", *fm])
    assert "unknown metrics" in one_line_error(capsys, ["score", "--gen", s["C"], "--ref", s["D"], "--metrics",
                                                        "fid,lpips", *fm])
    wrong = str(tmp_path / "wrong.safetensors")
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, wrong)
    assert "not a Fashion-MNIST classifier" in one_line_error(
        capsys, ["score", "--gen", s["C"], "--ref", s["D"], "--features", "fmnist", "--classifier", wrong])
    assert "dataset-fashion-mnist" in one_line_error(capsys, ["train-classifier", "--data", missing, "--out",
                                                              str(tmp_path / "c.safetensors")])
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    err = one_line_error(capsys, ["score", "--gen", s["C"], "--ref", s["D"]])
    assert INCEPTION_WEIGHTS_FILE in err and "--inception-weights" in err and INCEPTION_WEIGHTS_ENV in err


def test_subprocess_exit_status_and_single_line(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "evaluate.py", "score", "--gen", str(tmp_path / "nope"), "--ref",
                           str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "nope" in proc.stderr and "Traceback" not in proc.stderr


def test_kid_subset_size_below_2_exits_2_before_any_work(setup, capsys, tmp_path):
    out = tmp_path / "score.json"
    for metrics in (["--metrics", "kid"], []):  # asked for, or among the defaults with --ref
        err = one_line_error(capsys, ["score", "--gen", setup["C"], "--ref", setup["D"], *metrics,
                                      "--kid-subset-size", "1", "--out", str(out), *fm_args(setup)])
        assert err == ("evaluate.py: error: kid_subset_size (--kid-subset-size) is 1, but KID needs subsets of at "
                       "least 2 images (its unbiased estimate divides by m(m-1)): pass --kid-subset-size 2 or more "
                       "(default 1000; it is capped at the number of images per set)\n")
    assert not out.exists() and capsys.readouterr().out == ""


def test_truncated_png_is_named_in_the_one_line_error(setup, capsys, tmp_path):
    gen = tmp_path / "gen"
    gen.mkdir()
    for name in sorted(os.listdir(setup["C"])):
        (gen / name).write_bytes((Path(setup["C"]) / name).read_bytes())
    cut = gen / sorted(os.listdir(gen))[5]
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    err = one_line_error(capsys, ["score", "--gen", str(gen), "--ref", setup["D"], "--metrics", "fid",
                                  *fm_args(setup)])
    assert err == f"evaluate.py: error: cannot read image {cut}: OSError: image file is truncated; delete or " \
                  "replace the file\n"
