"""A small PIL line chart (no plotting library needed) for loss curves."""
from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw


def _ticks(lo: float, hi: float) -> tuple[float, float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return (lo - 1.0, lo + 1.0) if math.isfinite(lo) else (0.0, 1.0)
    pad = 0.05 * (hi - lo)
    return lo - pad, hi + pad


def line_plot(values: Sequence[float], *, title: str = "", size: tuple[int, int] = (640, 360),
              smooth: int = 0) -> Image.Image:
    """A line chart of ``values`` against their index (1-based); ``smooth`` adds a moving average."""
    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 60, w - 15, 30, h - 35
    d.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    d.text((left, 8), title, fill=(0, 0, 0))
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        d.text((left + 10, top + 10), "no data", fill=(200, 0, 0))
        return img
    lo, hi = _ticks(min(finite), max(finite))
    n = len(values)

    def xy(i: int, v: float) -> tuple[float, float]:
        x = left + (right - left) * (i / max(1, n - 1))
        y = bottom - (bottom - top) * ((v - lo) / (hi - lo))
        return x, y

    d.line([xy(i, v) for i, v in enumerate(values) if math.isfinite(v)], fill=(120, 160, 220), width=1)
    if smooth > 1 and n >= smooth:
        avg = [sum(values[max(0, i - smooth + 1): i + 1]) / len(values[max(0, i - smooth + 1): i + 1]) for i in range(n)]
        d.line([xy(i, v) for i, v in enumerate(avg)], fill=(20, 60, 160), width=2)
    for frac in (0.0, 0.5, 1.0):
        v = lo + (hi - lo) * frac
        y = bottom - (bottom - top) * frac
        d.text((4, y - 6), f"{v:.3g}", fill=(0, 0, 0))
    d.text((left, bottom + 8), "1", fill=(0, 0, 0))
    d.text((right - 30, bottom + 8), str(n), fill=(0, 0, 0))
    return img
