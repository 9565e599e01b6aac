"""Pictures of evaluation results, drawn with PIL only: annotated score grids and the
R-FaceSim vs CLIP-T scatter plot (the Meta-LoRA paper's Figure 3, left)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw

from .text import draw_words, label_font, text_width, vertical_label

# Colour-blind-safe palette (Okabe-Ito), one colour per series.
_PALETTE = ((0, 114, 178), (213, 94, 0), (0, 158, 115), (204, 121, 167), (230, 159, 0), (86, 180, 233), (0, 0, 0))


@dataclass(frozen=True)
class ScatterPoint:
    """One point of a scatter plot."""

    x: float
    y: float
    series: str  # legend entry; one colour per series
    label: str = ""  # text drawn next to the point ("" for none)
    size: int = 5  # marker radius in pixels


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (the classic 1-2-5 steps)."""
    span = hi - lo
    raw = span / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step - 1e-9) * step
    ticks = []
    v = start
    while v <= hi + 1e-9 * step:
        ticks.append(round(v, 10))
        v += step
    return ticks


def _limits(values: Sequence[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.12 if hi > lo else max(abs(hi) * 0.05, 0.01)
    return lo - pad, hi + pad


def draw_scatter(
    points: Sequence[ScatterPoint],
    x_label: str,
    y_label: str,
    title: str = "",
    note: str = "",
    size: tuple[int, int] = (900, 640),
    x_ticks: Sequence[tuple[float, str]] | None = None,
) -> Image.Image:
    """Draws a scatter plot with axes, ticks, point labels and a legend.

    Args:
        points: the points; NaN coordinates are not drawn.
        x_label, y_label: axis titles.
        title: drawn on top.
        note: a line drawn under the title (e.g. why an axis is empty).
        size: (width, height) in pixels.
        x_ticks: explicit (position, text) ticks for a categorical x axis; default numeric ticks.

    Returns:
        An RGB image.
    """
    w, h = size
    if w < 200 or h < 150:
        raise ValueError(f"plot size must be at least 200x150, got {size}")
    font = label_font()
    img = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 80, w - 180, 50 if not note else 66, h - 60  # plot area; legend on the right
    draw_words(draw, (left, 10), title, font, (0, 0, 0))
    if note:
        draw_words(draw, (left, 28), note, font, (180, 0, 0))
    draw.rectangle((left, top, right, bottom), outline=(0, 0, 0), width=1)
    good = [p for p in points if math.isfinite(p.x) and math.isfinite(p.y)]
    xs = [p.x for p in good] or [0.0, 1.0]
    ys = [p.y for p in good] or [0.0, 1.0]
    x0, x1 = _limits(xs) if x_ticks is None else (min(t for t, _ in x_ticks) - 0.5, max(t for t, _ in x_ticks) + 0.5)
    y0, y1 = _limits(ys)

    def to_px(x: float, y: float) -> tuple[float, float]:
        return left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top)

    ticks = [(t, f"{t:g}") for t in _nice_ticks(x0, x1)] if x_ticks is None else list(x_ticks)
    for t, text in ticks:
        px, _ = to_px(t, y0)
        draw.line((px, top, px, bottom), fill=(230, 230, 230))
        draw.line((px, bottom, px, bottom + 5), fill=(0, 0, 0))
        draw_words(draw, (px - text_width(text, font) / 2, bottom + 8), text, font, (0, 0, 0))
    for t in _nice_ticks(y0, y1):
        _, py = to_px(x0, t)
        draw.line((left, py, right, py), fill=(230, 230, 230))
        draw.line((left - 5, py, left, py), fill=(0, 0, 0))
        draw_words(draw, (left - 8 - text_width(f"{t:g}", font), py - 6), f"{t:g}", font, (0, 0, 0))
    draw.rectangle((left, top, right, bottom), outline=(0, 0, 0), width=1)
    draw_words(draw, ((left + right - text_width(x_label, font)) / 2, bottom + 30), x_label, font, (0, 0, 0))
    ylab = vertical_label(y_label, font)
    img.paste(ylab, (8, (top + bottom) // 2 - ylab.height // 2))

    series = list(dict.fromkeys(p.series for p in points))
    colour = {s: _PALETTE[i % len(_PALETTE)] for i, s in enumerate(series)}
    for p in good:
        px, py = to_px(p.x, p.y)
        r = p.size
        draw.ellipse((px - r, py - r, px + r, py + r), fill=colour[p.series], outline=(0, 0, 0))
        if p.label:
            draw_words(draw, (px + r + 3, py - 6), p.label, font, (40, 40, 40))
    for i, s in enumerate(series):
        ly = top + 6 + 18 * i
        draw.ellipse((right + 14, ly, right + 24, ly + 10), fill=colour[s], outline=(0, 0, 0))
        draw_words(draw, (right + 30, ly - 1), s[:22], font, (0, 0, 0))
    return img


__all__ = ["ScatterPoint", "draw_scatter"]
