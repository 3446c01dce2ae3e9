"""The main job's report (``bash .ci/main``): its own figures, read from the files the job wrote.

    python benchmarks/main_report.py --out runs/fmnist > runs/fmnist/report.md

Reads ``OUT/sweep/sweep.json`` (the cfg sweep), ``OUT/best.json`` (the best setting at N images),
``OUT/bounds/bounds.json`` (real training images and tokenizer reconstructions at the same N, PSNR / SSIM) and
``OUT/timing.tsv`` (wall seconds per stage), and prints markdown: the stage times, the sweep table, the best
setting beside real images and reconstructions, the issue's bars and the class grid. A missing file is named.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository (common imports mar)
from common import cpu_model_name  # noqa: E402

# The main job's bars (issue 13): at its best setting, scored on >= 1,000 samples.
FD_BAR, ACC_BAR, MIN_N = 15.0, 0.85, 1000


def _load(path: Path) -> dict:
    if not path.is_file():
        sys.exit(f"main_report: {path} is missing: run bash .ci/main (it writes it) before the report")
    return json.loads(path.read_text())


def report(out: Path, threads: int) -> str:
    sweep = _load(out / "sweep" / "sweep.json")
    best = _load(out / "best.json")["metrics"]
    bounds = _load(out / "bounds" / "bounds.json")
    timing = [line.split("\t") for line in (out / "timing.tsv").read_text().splitlines() if line.strip()] \
        if (out / "timing.tsv").is_file() else []
    n = bounds["num_images"]
    cfg = sweep["best"]["cfg"]
    lines = ["# The main job on Fashion-MNIST (bash .ci/main)", "",
             f"Machine: {cpu_model_name()}, {threads} cores, {platform.system()}; everything trained from scratch by this run.", ""]
    if timing:
        lines += ["## Wall time", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {name} | {int(sec)} |" for name, sec in timing]
        lines += ["", "A stage whose output existed from an earlier run was skipped and shows about 0 s.", ""]
    per = sweep["rows"][0].get("num_images", "?")
    lines += [f"## cfg sweep ({per} images per setting; Frechet distances at this N are biased upward, "
              "so the table ranks settings only roughly)", "",
              "| cfg | temperature | fd_fmnist | class accuracy |", "|---|---|---|---|"]
    for row in sweep["rows"]:
        lines.append(f"| {row['cfg']:g} | {row['temperature']:g} | {row['fd_fmnist']:.2f} | "
                     f"{100 * row['class_accuracy']:.1f} % |")
    fd, acc = best["fd_fmnist"], best["class_accuracy"]
    lines += ["", f"## The best setting (cfg {cfg:g}, lowest fd_fmnist in the sweep; chosen on the test set's "
              "statistics, the field's protocol) at the same N as the rows below", "",
              f"| {n:,} images, against the 10,000 test images | fd_fmnist | class accuracy |", "|---|---|---|",
              f"| real training images | {bounds['real']['fd_fmnist']:.2f} | "
              f"{100 * bounds['real']['class_accuracy']:.1f} % |",
              f"| tokenizer reconstructions of them | {bounds['recon']['fd_fmnist']:.2f} | "
              f"{100 * bounds['recon']['class_accuracy']:.1f} % |",
              f"| **MAR samples, cfg {cfg:g}** | **{fd:.2f}** | **{100 * acc:.1f} %** |", ""]
    fid = bounds.get("test_fidelity")
    if fid:
        lines += [f"Tokenizer on {fid['num_images']:,} test images ({fid['region']}): PSNR "
                  f"{fid['psnr_db']['mean']:.2f} dB, SSIM {fid['ssim']['mean']:.3f}. The classifier's test accuracy: "
                  f"{100 * bounds['classifier_test_accuracy']:.2f} %.", ""]
    met = fd <= FD_BAR and acc >= ACC_BAR and n >= MIN_N
    lines += [f"The job's bars (fd_fmnist <= {FD_BAR:g}, class accuracy >= {100 * ACC_BAR:g} % at >= {MIN_N:,} "
              f"samples): {'met' if met else 'not met'}.", "",
              f"## Class grid (cfg {cfg:g}, one row per class)", "", "![class grid](grid/grid.png)", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the main job's output folder (MAR_OUT, default runs/fmnist)")
    p.add_argument("--threads", type=int, default=2, help="cores the job ran on")
    args = p.parse_args(argv)
    print(report(Path(args.out), args.threads))


if __name__ == "__main__":
    main()
