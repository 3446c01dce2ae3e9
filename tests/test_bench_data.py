"""benchmarks/bench_data.py: the loader's rate on a synthetic JPEG folder and the verdict against a step time."""
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_data  # noqa: E402

from mar.engine.data import ImageFolderDataset, train_batches  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return bench_data.make_folder(tmp_path_factory.mktemp("jpegs") / "images", 24, classes=3)


def test_the_synthetic_folder_is_an_imagenet_like_image_folder(folder):
    ds = ImageFolderDataset(folder, image_size=64)
    assert len(ds) == 24 and ds.classes == ["class000", "class001", "class002"]
    x, y = ds[0]
    assert x.shape == (3, 64, 64) and x.std() > 0.05  # decoded, cropped, not blank


def test_rates_and_verdict(folder, capsys):
    r = bench_data.loader_rate(folder, 64, 4, 2, 1, False)
    assert r["workers"] == 1 and r["images_per_s"] > 0
    for step_s, verdict in ((1e6, "model"), (1e-6, "loader")):
        assert bench_data.main(["--folder", str(folder), "--image-size", "64", "--batch", "4", "--batches", "2",
                                "--workers", "0", "1", "--step-s", str(step_s)]) == 0
        out = capsys.readouterr().out
        rows = re.findall(r"^\s+(\d+) \|\s+([\d.]+) \|\s+[\d.]+ \| (\w+)$", out, re.M)
        assert [w for w, _, _ in rows] == ["0", "1"] and {v for _, _, v in rows} == {verdict}
        assert re.search(r"keeps? up", out) and (("no worker count" in out) == (verdict == "loader"))


def test_workers_do_not_change_the_batches(folder):
    """What the benchmark times is what training draws: the same batches with and without workers."""
    ds = ImageFolderDataset(folder, image_size=32, hflip=True, seed=3)
    a = train_batches(ds, 3, 4, 1, 0, 0, 1, num_workers=0)
    b = train_batches(ds, 3, 4, 1, 0, 0, 1, num_workers=2)
    for _ in range(8):  # past an epoch: the flips and the permutation of epoch 1 too
        (xa, ya), (xb, yb) = next(a), next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_pin_needs_cuda(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        bench_data.main(["--make", "4", "--pin"])
    assert "--pin needs CUDA" in capsys.readouterr().err
