"""A temperature x CFG sweep's results: one row per setting, the CSV / JSON table, a plot per metric, a report.

The best setting is the one with the lowest Frechet distance against the reference statistics: the field's
protocol for choosing CFG (the reference set is then also the one the score is reported on; say so when
reporting it).
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from mar.eval.metrics import score_folder
from mar.eval.plot import line_plot
from mar.io import write_json, write_text

RANKED_BY = ("fid", "fd_fmnist")  # the Frechet distance of the feature space, lower is better
SHOWN = ("class_accuracy", "is_mean", "is_fmnist_mean", "seconds_per_image")


def primary_metric(metrics: dict) -> str:
    return next(k for k in RANKED_BY if k in metrics)


SWEPT = ("cfg", "temperature", "top_k", "top_p")  # the axes a sweep may have (cfg and temperature always)


def score_settings(folders: list[tuple[dict, Path]], ref_stats: str, feature_kwargs: dict) -> list[dict]:
    """One row per (point, folder), point = the swept values ({cfg, temperature} and any of top_k, top_p): its
    metrics (fid or fd_fmnist, IS, class accuracy) and speed."""
    rows = []
    for point, folder in folders:
        result = score_folder(str(folder), ref_stats=ref_stats, metrics=["fid", "isc"], **feature_kwargs)
        speed = json.loads((folder / "settings.json").read_text()).get("seconds_per_image")
        rows.append({**point, **result["metrics"], "seconds_per_image": speed,
                     "num_images": result["meta"].get("num_gen"), "folder": str(folder)})
    return rows


def _line_label(row: dict) -> str:
    """The plot line of a row: its swept values other than cfg ("temperature 1, top_k 900")."""
    return ", ".join(f"{k} {row[k]:g}" for k in SWEPT[1:] if k in row)


def write_sweep(rows: list[dict], out: Path, reference: str) -> dict:
    """sweep.csv, a PNG plot per metric against cfg (a line per temperature, top-k, top-p) and sweep.json;
    returns the summary."""
    key = primary_metric(rows[0])
    best = min(rows, key=lambda r: r[key])
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / "sweep.csv", buffer.getvalue())
    plots = {}
    for metric in [key] + [m for m in ("class_accuracy", "is_mean", "is_fmnist_mean") if m in rows[0]]:
        lines = dict.fromkeys(_line_label(r) for r in rows)
        series = {line: ([r["cfg"] for r in rows if _line_label(r) == line],
                         [r[metric] for r in rows if _line_label(r) == line]) for line in lines}
        plots[metric] = str(out / f"sweep_{metric}.png")
        line_plot(series, plots[metric], title=f"{metric} vs cfg ({rows[0].get('num_images', '')} images per setting)",
                  xlabel="cfg", ylabel=metric + (" (lower is better)" if metric == key else ""))
    summary = {"primary_metric": key, "best": best, "rows": rows, "plots": plots, "reference": reference}
    write_json(summary, out / "sweep.json")
    return summary


def write_report(summary: dict, path: str | os.PathLike) -> None:
    """A short markdown report of a sweep: the table, the best setting's grid and the plots."""
    path = Path(path)
    rel = lambda p: os.path.relpath(p, path.parent.resolve())  # noqa: E731
    rows, key, best = summary["rows"], summary["primary_metric"], summary["best"]
    cols = [c for c in (key, *SHOWN) if c in rows[0]]
    axes = [a for a in SWEPT if a in rows[0]]
    lines = ["# Sweep report", "", f"Ranked by `{key}` (lower is better); reference statistics: "
             f"`{rel(summary['reference'])}`. The best CFG is chosen on the same reference set that scores it "
             "(the field's protocol).", "", "| " + " | ".join(axes + cols) + " |", "|---" * (len(axes) + len(cols)) + "|"]
    for r in rows:
        mark = " **(best)**" if r is best else ""
        lines.append("| " + " | ".join(f"{r[a]:g}" for a in axes) + f"{mark} | "
                     + " | ".join("" if r[c] is None else f"{r[c]:.4g}" for c in cols) + " |")
    lines += ["", "Best: " + ", ".join(f"{a} {best[a]:g}" for a in axes) + ".", "",
              f"![samples at the best setting]({rel(os.path.join(best['folder'], 'grid.png'))})", ""]
    lines += [f"![{m} vs cfg]({rel(p)})" for m, p in summary["plots"].items()]
    write_text(path, "\n".join(lines) + "\n")
