"""Image input hygiene and drawing on photos (PIL only); grids come from ``draw.sheets``."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageOps

if TYPE_CHECKING:
    from .augment import Crop
    from .detect import Face

_log = logging.getLogger(__name__)

_HIGH_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def _to_8bit_grey(img: Image.Image) -> Image.Image:
    """Maps 16-bit / 32-bit / float single-channel images to 8-bit L."""
    arr = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        peak = 1.0 if arr.size and float(arr.max()) <= 1.0 else 255.0
    elif img.mode.startswith("I;16") or (arr.size and float(arr.max()) > 255.0):
        peak = 65535.0  # 16-bit data (PNG loads 16-bit grey as I;16 or I)
    else:
        peak = 255.0
    out = np.clip(np.rint(arr * (255.0 / peak)), 0, 255).astype(np.uint8)
    return Image.fromarray(out, mode="L")


def load_image(path_or_pil: str | os.PathLike | Image.Image) -> Image.Image:
    """Loads a photo as an 8-bit RGB PIL image, upright.

    Applies the EXIF orientation, composites transparency (RGBA, LA, P with transparency) over
    white, expands greyscale, and maps 16-bit or float images to 8 bits.

    Args:
        path_or_pil: a file path or an already opened PIL image (not modified).

    Returns:
        A new RGB ``PIL.Image.Image``.

    Raises:
        FileNotFoundError: no file at the path.
        ValueError: the file is not an image PIL can read.
    """
    if isinstance(path_or_pil, Image.Image):
        img = ImageOps.exif_transpose(path_or_pil)
    else:
        path = os.fspath(path_or_pil)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no image file at {path}")
        try:
            with Image.open(path) as src:
                src.load()
                frames = int(getattr(src, "n_frames", 1) or 1)
                if frames > 1:
                    _log.warning("%s has %d frames (animated or multi-page); only the first frame is used", path, frames)
                img = ImageOps.exif_transpose(src)
        except (OSError, Image.DecompressionBombError, SyntaxError) as e:
            raise ValueError(f"{path} is not a readable image ({e}); pass a JPEG or PNG photo") from e
    if img.mode in _HIGH_BIT_MODES:
        img = _to_8bit_grey(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img.copy() if img is path_or_pil else img


def _line_width(size: tuple[int, int]) -> int:
    return max(2, round(max(size) / 300))


def draw_faces(
    image: Image.Image, faces_or_boxes: Sequence[Face | Sequence[float]], color: str = "lime"
) -> Image.Image:
    """Returns a copy of ``image`` with face boxes (and landmarks of ``Face`` objects) drawn."""
    out = load_image(image)
    draw = ImageDraw.Draw(out)
    width = _line_width(out.size)
    for item in faces_or_boxes:
        box = tuple(float(v) for v in getattr(item, "box", item))
        if len(box) != 4:
            raise ValueError(f"a face box needs 4 numbers (x0, y0, x1, y1), got {box!r}")
        draw.rectangle(box, outline=color, width=width)
        for i, (x, y) in enumerate(getattr(item, "landmarks", ())):
            r = width * 1.5
            draw.ellipse((x - r, y - r, x + r, y + r), fill="red" if i < 2 else "yellow")
    return out


def contact_sheet(crops: Sequence[Crop], tile: int = 256, columns: int = 5) -> Image.Image:
    """The crops in a grid, each with its face box drawn and a ratio/scale/flip label."""
    from ..draw.sheets import labelled_sheet

    labels = [f"{c.ratio[0]}:{c.ratio[1]} x{c.scale:.2f}{' flip' if c.flipped else ''}" for c in crops]
    return labelled_sheet([c.image for c in crops], labels, [c.face_box for c in crops], tile, columns)
