"""The paper's face-aware augmentation grid (section 3, "Stage-2").

``f_long`` = longer side of the face box. For each aspect ratio (16:9, 4:3, 1:1, 3:4, 9:16) and
each scale (1.5, 2, 2.5, 3.5, 4.5) the crop's shorter side is ``f_long * scale`` and the face is
centred. A crop that runs off the image is shifted inside it; a crop larger than the image is
shrunk (same ratio) to the closest size that fits, and crops that end up identical collapse
("up to 25 images"). Each crop gets a random horizontal flip drawn from an explicit generator
and is resized to a training bucket (area about ``bucket_area``, sides multiples of
``multiple``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from ..lora.families import DEFAULT_FAMILY
from .detect import Face
from .image import load_image

logger = logging.getLogger(__name__)

PAPER_RATIOS: tuple[tuple[int, int], ...] = ((16, 9), (4, 3), (1, 1), (3, 4), (9, 16))  # width:height (Sec. 3)
_TOKEN_PIXELS = DEFAULT_FAMILY.pixels_per_token  # image pixels per token side (FLUX.1: VAE 8 x patch 2)


def check_resolution(side: int, what: str = "resolution", multiple: int = 16) -> None:
    """A training resolution (crops of about ``side`` x ``side`` pixels) must give a bucket of at
    least 2 x 2 patches of ``multiple`` pixels (``AugmentConfig.bucket_area``'s lower bound).
    ``what`` names the setting in the error (``--resolution``, ``resolution``)."""
    if side < 2 * multiple:
        raise ValueError(f"{what} {side} is too small: a crop needs at least {2 * multiple}x{2 * multiple} pixels "
                         f"(FLUX works in {multiple}-pixel patches); the paper trains at 512, e.g. {what} 512")


@dataclass(frozen=True)
class AugmentConfig:
    """Crop grid and bucket settings (defaults: the paper's table, 512x512-area buckets)."""

    ratios: tuple[tuple[int, int], ...] = PAPER_RATIOS  # width:height
    scales: tuple[float, ...] = (1.5, 2.0, 2.5, 3.5, 4.5)  # shorter crop side / f_long
    flip_prob: float = 0.5  # probability of a horizontal flip per crop
    bucket_area: int = 512 * 512  # output pixels per crop (1024*1024 for full-size FLUX training)
    multiple: int = _TOKEN_PIXELS  # output sides are multiples of this (a token's pixels)

    def __post_init__(self) -> None:
        if not self.ratios:
            raise ValueError("ratios must not be empty; e.g. ((16, 9), (4, 3), (1, 1), (3, 4), (9, 16))")
        for r in self.ratios:
            if len(r) != 2 or not all(isinstance(v, int) and v > 0 for v in r):
                raise ValueError(f"each ratio must be two positive ints (width, height), got {r!r}")
        if not self.scales:
            raise ValueError("scales must not be empty; e.g. (1.5, 2, 2.5, 3.5, 4.5)")
        for s in self.scales:
            if not (isinstance(s, (int, float)) and math.isfinite(s) and s >= 1.0):
                raise ValueError(f"each scale must be a number >= 1 (the crop must hold the face), got {s!r}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob}")
        if not isinstance(self.multiple, int) or self.multiple < 1:
            raise ValueError(f"multiple must be a positive int, got {self.multiple!r}")
        if not isinstance(self.bucket_area, int) or self.bucket_area < 4 * self.multiple**2:
            raise ValueError(
                f"bucket_area must be an int >= {4 * self.multiple**2} (4 x multiple^2), got {self.bucket_area!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "ratios": [list(r) for r in self.ratios],
            "scales": list(self.scales),
            "flip_prob": self.flip_prob,
            "bucket_area": self.bucket_area,
            "multiple": self.multiple,
        }


@dataclass(frozen=True)
class Crop:
    """One augmented training image and where it came from."""

    image: Image.Image  # RGB, resized to the bucket, flipped if ``flipped``
    ratio: tuple[int, int]  # width:height of the grid cell
    scale: float  # effective shorter side / f_long (below the requested one when shrunk to fit)
    box: tuple[int, int, int, int]  # crop rectangle x0, y0, x1, y1 in source pixels
    face_box: tuple[float, float, float, float]  # face box in output-crop pixels (after resize/flip)
    flipped: bool  # mirrored left-right
    size: tuple[int, int]  # output (width, height)
    requested_scale: float = field(default=0.0)  # the grid's scale before any shrink-to-fit

    def to_dict(self) -> dict[str, Any]:
        return {
            "ratio": list(self.ratio),
            "scale": round(self.scale, 4),
            "requested_scale": self.requested_scale,
            "box": list(self.box),
            "face_box": [round(v, 2) for v in self.face_box],
            "flipped": self.flipped,
            "size": list(self.size),
        }


def bucket_size(ratio: tuple[int, int], area: int, multiple: int) -> tuple[int, int]:
    """Output (width, height) for a ratio: area about ``area``, sides rounded to ``multiple``."""
    a, b = ratio
    w = math.sqrt(area * a / b)
    h = math.sqrt(area * b / a)
    return max(multiple, round(w / multiple) * multiple), max(multiple, round(h / multiple) * multiple)


def _place(centre: float, length: int, lo: float, hi: float, limit: int) -> int:
    """Start of a [start, start+length) window centred on ``centre``, holding [lo, hi], inside [0, limit)."""
    start = round(centre - length / 2)
    start = min(start, math.floor(lo))  # keep the face's near edge
    start = max(start, math.ceil(hi) - length)  # keep the face's far edge
    return max(0, min(start, limit - length))


def grid_boxes(
    image_size: tuple[int, int], face_box: tuple[float, float, float, float], config: AugmentConfig
) -> list[tuple[tuple[int, int], float, float, tuple[int, int, int, int]]]:
    """The crop rectangles of the grid, before resizing (pure geometry).

    Returns:
        (ratio, requested scale, effective scale, (x0, y0, x1, y1)) per distinct crop, in grid order.
    """
    img_w, img_h = image_size
    f_long = max(face_box[2] - face_box[0], face_box[3] - face_box[1])
    # The detector's box may poke out of the frame; the part inside is what a crop must hold.
    fx0, fy0 = max(0.0, face_box[0]), max(0.0, face_box[1])
    fx1, fy1 = min(float(img_w), face_box[2]), min(float(img_h), face_box[3])
    if fx1 <= fx0 or fy1 <= fy0:
        raise ValueError(f"face box {face_box} lies outside the image ({img_w}x{img_h})")
    cx, cy = (fx0 + fx1) / 2, (fy0 + fy1) / 2
    need_w, need_h = math.ceil(fx1) - math.floor(fx0), math.ceil(fy1) - math.floor(fy0)
    out = []
    seen: set[tuple[int, ...]] = set()
    for a, b in config.ratios:
        for s in config.scales:
            short = f_long * s
            w, h = (short * a / b, short) if a >= b else (short, short * b / a)
            fit = min(1.0, img_w / w, img_h / h)  # closest size (same ratio) the image holds
            cw, ch = min(img_w, round(w * fit)), min(img_h, round(h * fit))
            if cw < need_w or ch < need_h:
                logger.debug("ratio %d:%d cannot hold the face in a %dx%d image; skipped", a, b, img_w, img_h)
                continue
            x0 = _place(cx, cw, fx0, fx1, img_w)
            y0 = _place(cy, ch, fy0, fy1, img_h)
            key = (a, b, x0, y0, cw, ch)
            if key in seen:
                continue
            seen.add(key)
            out.append(((a, b), float(s), min(cw, ch) / f_long, (x0, y0, x0 + cw, y0 + ch)))
    return out


def make_crops(
    image: Image.Image, face: Face, config: AugmentConfig | None = None, generator: torch.Generator | None = None
) -> list[Crop]:
    """Builds the augmented crops of one photo around one face (paper section 3, Stage-2).

    Args:
        image: the source photo (full resolution).
        face: the face to centre, in source pixels.
        config: grid and bucket settings (default ``AugmentConfig()``).
        generator: CPU ``torch.Generator`` for the flips (required: runs must be repeatable).

    Returns:
        Up to len(ratios) * len(scales) crops, in grid order (ratio-major).

    Raises:
        ValueError: no generator, or the face lies outside the image.
    """
    if generator is None:
        raise ValueError("make_crops needs a torch.Generator for the flips, e.g. torch.Generator().manual_seed(0)")
    config = config or AugmentConfig()
    image = load_image(image)
    crops = []
    for ratio, requested, scale, box in grid_boxes(image.size, face.box, config):
        out_w, out_h = bucket_size(ratio, config.bucket_area, config.multiple)
        flipped = bool(torch.rand((), generator=generator).item() < config.flip_prob)
        x0, y0, x1, y1 = box
        pic = image.resize((out_w, out_h), Image.Resampling.LANCZOS, box=box)
        sx, sy = out_w / (x1 - x0), out_h / (y1 - y0)
        fb = [(face.box[0] - x0) * sx, (face.box[1] - y0) * sy, (face.box[2] - x0) * sx, (face.box[3] - y0) * sy]
        fb = [
            min(max(fb[0], 0.0), out_w),
            min(max(fb[1], 0.0), out_h),
            min(max(fb[2], 0.0), out_w),
            min(max(fb[3], 0.0), out_h),
        ]
        if flipped:
            pic = pic.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            fb = [out_w - fb[2], fb[1], out_w - fb[0], fb[3]]
        crops.append(
            Crop(
                image=pic,
                ratio=ratio,
                scale=scale,
                box=box,
                face_box=(fb[0], fb[1], fb[2], fb[3]),
                flipped=flipped,
                size=(out_w, out_h),
                requested_scale=requested,
            )
        )
    if not crops:
        raise ValueError(
            f"no crop of the grid fits the image ({image.size[0]}x{image.size[1]}) around face box "
            f"{tuple(round(v) for v in face.box)}; the face fills the photo: use a wider shot"
        )
    logger.info("made %d crops (grid %d x %d)", len(crops), len(config.ratios), len(config.scales))
    return crops


def fit_to_ratio(size: tuple[int, int], ratios: Sequence[tuple[int, int]] = PAPER_RATIOS
                 ) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """The ratio closest to a photo's (in log space) and the centred box of that ratio inside it.

    Returns:
        (ratio (width, height), box (x0, y0, x1, y1) in source pixels).
    """
    w, h = size
    ratio = min(ratios, key=lambda r: abs(math.log((r[0] / r[1]) / (w / h))))
    a, b = ratio
    cw, ch = (w, round(w * b / a)) if w / h < a / b else (round(h * a / b), h)
    cw, ch = min(cw, w), min(ch, h)
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    return ratio, (x0, y0, x0 + cw, y0 + ch)


def resize_to_bucket(image: Image.Image, area: int = 512 * 512, multiple: int = _TOKEN_PIXELS,
                     ratios: Sequence[tuple[int, int]] = PAPER_RATIOS) -> Image.Image:
    """A whole photo (no face grid, no flip) as one training image: the one "no augmentation" rule.

    The photo is centre-cropped to the closest of ``ratios`` (``fit_to_ratio``) and resized to that
    ratio's bucket (``bucket_size``), so un-augmented photos share the crop grid's bucket sizes and
    batch together.
    """
    if area < 4 * multiple**2 or multiple < 1:
        raise ValueError(f"area must be >= 4 * multiple^2 and multiple >= 1, got area={area}, multiple={multiple}")
    image = load_image(image)
    ratio, box = fit_to_ratio(image.size, ratios)
    return image.resize(bucket_size(ratio, area, multiple), Image.Resampling.LANCZOS, box=box)


def whole_photo_crop(image: Image.Image, face: Face, area: int = 512 * 512, multiple: int = _TOKEN_PIXELS) -> Crop:
    """The photo itself as one training image (no grid, no flip): the paper's plain-LoRA input.

    The photo becomes ``resize_to_bucket``'s image; the face box is carried into its pixels.
    """
    image = load_image(image)
    out = resize_to_bucket(image, area, multiple)
    ratio, (x0, y0, x1, y1) = fit_to_ratio(image.size)
    ow, oh = out.size
    sx, sy = ow / (x1 - x0), oh / (y1 - y0)
    fx0, fy0, fx1, fy1 = face.box
    return Crop(
        image=out, ratio=ratio, scale=0.0, box=(x0, y0, x1, y1),
        face_box=((fx0 - x0) * sx, (fy0 - y0) * sy, (fx1 - x0) * sx, (fy1 - y0) * sy),
        flipped=False, size=(ow, oh),
    )
