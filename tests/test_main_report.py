"""The main job's report (benchmarks/main_report.py) states the job's own figures and checks them against the bars."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import main_report  # noqa: E402


def _write(out: Path, fd: float, acc: float, n: int = 1000) -> None:
    (out / "sweep").mkdir(parents=True)
    (out / "bounds").mkdir()
    rows = [{"cfg": c, "temperature": 1.0, "num_images": 150, "fd_fmnist": f, "class_accuracy": a}
            for c, f, a in ((2.0, 30.5, 0.80), (3.0, 21.25, 0.86), (4.0, 24.0, 0.88))]
    (out / "sweep" / "sweep.json").write_text(json.dumps({"best": rows[1], "rows": rows}))
    (out / "best.json").write_text(json.dumps({"metrics": {"fd_fmnist": fd, "class_accuracy": acc}}))
    (out / "bounds" / "bounds.json").write_text(json.dumps({
        "num_images": n, "classifier_test_accuracy": 0.9093,
        "real": {"fd_fmnist": 4.56, "class_accuracy": 0.934}, "recon": {"fd_fmnist": 7.89, "class_accuracy": 0.91},
        "test_fidelity": {"num_images": 1000, "region": "28x28 (padding excluded)",
                          "psnr_db": {"mean": 25.5}, "ssim": {"mean": 0.876}}}))
    (out / "timing.tsv").write_text("tokenizer (300 steps)\t301\nMAR (350 steps)\t402\ntotal\t1190\n")


def test_report_carries_the_figures_and_the_verdict(tmp_path):
    _write(tmp_path, fd=12.34, acc=0.871)
    text = main_report.report(tmp_path, threads=2)
    for piece in ("| real training images | 4.56 | 93.4 % |", "| tokenizer reconstructions of them | 7.89 | 91.0 % |",
                  "**12.34** | **87.1 %**", "| 3 | 1 | 21.25 | 86.0 % |", "| total | 1190 |", "PSNR 25.50 dB",
                  "SSIM 0.876", "cfg 3", "1,000 images", "): met."):
        assert piece in text, piece


@pytest.mark.parametrize("fd, acc, n", [(15.01, 0.90, 1000), (10.0, 0.849, 1000), (10.0, 0.90, 999)])
def test_a_missed_bar_is_reported_as_not_met(tmp_path, fd, acc, n):
    _write(tmp_path, fd=fd, acc=acc, n=n)
    assert "): not met." in main_report.report(tmp_path, threads=2)


def test_a_missing_file_is_named(tmp_path):
    _write(tmp_path, fd=1.0, acc=1.0)
    (tmp_path / "best.json").unlink()
    with pytest.raises(SystemExit, match="best.json is missing"):
        main_report.report(tmp_path, threads=2)
