"""A small PIL line chart (no plotting library needed) for loss curves."""
from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw

from .text import LINE, draw_words, label_font, text_width, vertical_label

_RAW = (180, 200, 235)  # the per-step values, light: the eye follows the smoothed line
_LINE = (20, 60, 160)  # the smoothed values (or the values themselves when not smoothed)
_INK = (0, 0, 0)


def _ticks(lo: float, hi: float) -> tuple[float, float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return (lo - 1.0, lo + 1.0) if math.isfinite(lo) else (0.0, 1.0)
    pad = 0.05 * (hi - lo)
    return lo - pad, hi + pad


def smoothing_window(n: int) -> int:
    """``line_plot``'s default moving-average window for ``n`` values: a tenth of them, 2 to 50;
    0 (no smoothing) below 10 values."""
    return 0 if n < 10 else max(2, min(50, n // 10))


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` values (fewer at the start), non-finite values left
    out (NaN where a window has none)."""
    out = []
    for i in range(len(values)):
        seen = [v for v in values[max(0, i - window + 1): i + 1] if math.isfinite(v)]
        out.append(sum(seen) / len(seen) if seen else math.nan)
    return out


def line_plot(values: Sequence[float], *, title: str = "", size: tuple[int, int] = (640, 360),
              smooth: int | None = None, x_label: str = "step", y_label: str = "loss") -> Image.Image:
    """A line chart of ``values`` against their index (1-based), with axis titles.

    ``smooth``: moving-average window drawn over the values (None: ``smoothing_window``; 0 or 1:
    none); the per-step values are then drawn lighter under it.
    """
    w, h = size
    font = label_font()
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 70, w - 15, 30, h - 45  # room for the y title and ticks, x ticks and title
    d.rectangle([left, top, right, bottom], outline=_INK)
    draw_words(d, (left, 8), title, font, _INK)
    draw_words(d, ((left + right - text_width(x_label, font)) / 2, bottom + 8 + LINE + 4), x_label, font, _INK)
    ylab = vertical_label(y_label, font)
    img.paste(ylab, (4, (top + bottom - ylab.height) // 2))
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        draw_words(d, (left + 10, top + 10), "no data", font, (200, 0, 0))
        return img
    lo, hi = _ticks(min(finite), max(finite))
    n = len(values)

    def xy(i: int, v: float) -> tuple[float, float]:
        x = left + (right - left) * (i / max(1, n - 1))
        y = bottom - (bottom - top) * ((v - lo) / (hi - lo))
        return x, y

    window = smoothing_window(n) if smooth is None else smooth
    smoothed = moving_average(values, window) if window > 1 and n >= window else None
    d.line([xy(i, v) for i, v in enumerate(values) if math.isfinite(v)],
           fill=_RAW if smoothed is not None else _LINE, width=1)
    if smoothed is not None:
        d.line([xy(i, v) for i, v in enumerate(smoothed) if math.isfinite(v)], fill=_LINE, width=2)
    for frac in (0.0, 0.5, 1.0):
        text = f"{lo + (hi - lo) * frac:.3g}"
        y = bottom - (bottom - top) * frac
        d.line([(left - 4, y), (left, y)], fill=_INK)
        draw_words(d, (left - 6 - text_width(text, font), y - 6), text, font, _INK)
    draw_words(d, (left, bottom + 6), "1", font, _INK)
    draw_words(d, (right - text_width(str(n), font), bottom + 6), str(n), font, _INK)
    return img


__all__ = ["line_plot", "moving_average", "smoothing_window"]
