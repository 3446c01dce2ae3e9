"""Small plots drawn with PIL: a line plot (sweeps: a metric against cfg, one line per temperature) and grouped
bars (the ablation table: a metric per cell, with and without CFG).

The project draws its few plots itself rather than depending on a plotting library.
"""
from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127)]


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values covering [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(int(math.ceil((hi - start) / step)) + 1)]


def line_plot(series: dict[str, tuple[list[float], list[float]]], path: str | Path, title: str = "",
              xlabel: str = "", ylabel: str = "", size: tuple[int, int] = (720, 460)) -> None:
    """Write a PNG with one polyline (and markers) per series ``label -> (xs, ys)``; NaNs are skipped."""
    w, h = size
    left, right, top, bottom = 80, 170, 40, 60
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=14)
    pts = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys) if math.isfinite(y)]
    if not pts:
        raise ValueError("nothing to plot: every value is missing or not finite")
    x_ticks = _ticks(min(p[0] for p in pts), max(p[0] for p in pts))
    y_ticks = _ticks(min(p[1] for p in pts), max(p[1] for p in pts))
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]

    def to_px(x: float, y: float) -> tuple[float, float]:
        px = left + (x - x0) / ((x1 - x0) or 1) * (w - left - right)
        py = h - bottom - (y - y0) / ((y1 - y0) or 1) * (h - top - bottom)
        return px, py

    for t in x_ticks:
        px, _ = to_px(t, y0)
        d.line([px, h - bottom, px, h - bottom + 5], fill="black")
        d.text((px, h - bottom + 8), f"{t:g}", fill="black", font=font, anchor="mt")
    for t in y_ticks:
        _, py = to_px(x0, t)
        d.line([left - 5, py, left, py], fill="black")
        d.line([left, py, w - right, py], fill=(230, 230, 230))
        d.text((left - 8, py), f"{t:.4g}", fill="black", font=font, anchor="rm")
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    d.text(((left + w - right) / 2, h - 20), xlabel, fill="black", font=font, anchor="mm")
    d.text((10, top - 22), ylabel, fill="black", font=font)
    d.text(((left + w - right) / 2, 14), title, fill="black", font=font, anchor="mm")
    for i, (label, (xs, ys)) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        line = [to_px(x, y) for x, y in zip(xs, ys) if math.isfinite(y)]
        if len(line) > 1:
            d.line(line, fill=color, width=3)
        for px, py in line:
            d.ellipse([px - 4, py - 4, px + 4, py + 4], fill=color)
        ly = top + 10 + 22 * i
        d.line([w - right + 15, ly, w - right + 40, ly], fill=color, width=3)
        d.text((w - right + 46, ly), label, fill="black", font=font, anchor="lm")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def bar_plot(groups: list[str], series: dict[str, list[float]], path: str | Path, title: str = "",
             ylabel: str = "", size: tuple[int, int] | None = None) -> None:
    """Write a PNG of grouped bars: one group per label in ``groups``, one bar per series ``label -> values``
    (a value per group; NaNs leave a gap). Group labels are written under the bars, two lines if long."""
    n_groups, n_series = len(groups), len(series)
    w, h = size or (max(720, 90 * n_groups + 200), 480)
    left, right, top, bottom = 80, 150, 40, 80
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=13)
    values = [v for vs in series.values() for v in vs if math.isfinite(v)]
    if not values:
        raise ValueError("nothing to plot: every value is missing or not finite")
    y_ticks = _ticks(min(0.0, min(values)), max(values))
    y0, y1 = y_ticks[0], y_ticks[-1]
    to_py = lambda y: h - bottom - (y - y0) / ((y1 - y0) or 1) * (h - top - bottom)  # noqa: E731
    for t in y_ticks:
        d.line([left - 5, to_py(t), w - right, to_py(t)], fill=(230, 230, 230))
        d.text((left - 8, to_py(t)), f"{t:.4g}", fill="black", font=font, anchor="rm")
    slot = (w - left - right) / max(n_groups, 1)
    bar = slot * 0.8 / max(n_series, 1)
    for g, label in enumerate(groups):
        x = left + g * slot + slot * 0.1
        for s, vs in enumerate(series.values()):
            v = vs[g]
            if math.isfinite(v):
                d.rectangle([x + s * bar, to_py(v), x + (s + 1) * bar - 2, to_py(y0)], fill=COLORS[s % len(COLORS)])
        words, lines = label.split(), [""]
        for word in words:  # wrap into lines that fit the slot
            if lines[-1] and d.textlength(lines[-1] + " " + word, font=font) > slot - 4:
                lines.append(word)
            else:
                lines[-1] = (lines[-1] + " " + word).strip()
        for i, line in enumerate(lines[:4]):
            d.text((left + (g + 0.5) * slot, h - bottom + 8 + 15 * i), line, fill="black", font=font, anchor="mt")
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    d.text((10, top - 22), ylabel, fill="black", font=font)
    d.text(((left + w - right) / 2, 14), title, fill="black", font=font, anchor="mm")
    for s, label in enumerate(series):
        ly = top + 10 + 22 * s
        d.rectangle([w - right + 15, ly - 6, w - right + 35, ly + 6], fill=COLORS[s % len(COLORS)])
        d.text((w - right + 42, ly), label, fill="black", font=font, anchor="lm")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
