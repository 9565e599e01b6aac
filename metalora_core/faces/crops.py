"""One person's training crops: the paper's grid (or each photo as it is) around the chosen face,
other people's faces blurred, dropped or kept, together with what they were cut from.

This is the one place that cuts crops for training (``person.person_crops`` calls it for the CLI
and the nodes alike) and the one place that turns a crop side ("resolution", 512) into the
grid's bucket area (512 x 512 pixels) and back.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace

import torch
from PIL import Image, ImageFilter

from .augment import AugmentConfig, Crop, check_resolution, make_crops, whole_photo_crop

log = logging.getLogger(__name__)

_OVERLAP = 1e-3  # an other face counts when any of its box (above rounding) lies inside the crop
_GROW = 0.35  # blur a box this much larger than the detector's (hair, ears, chin)


def bucket_config(resolution: int | None, augment: AugmentConfig | None = None) -> AugmentConfig:
    """The grid settings (``augment``, default the paper's) with crops of about ``resolution`` x
    ``resolution`` pixels; None keeps ``augment``'s own bucket."""
    config = augment or AugmentConfig()
    if resolution is None:
        return config
    check_resolution(resolution, "resolution", config.multiple)
    return replace(config, bucket_area=resolution * resolution)


@dataclass
class FaceCrops:
    """What the augmentation made of one or more photos of one person.

    It keeps the source photos, the faces found in them, the other people's face boxes and the
    crop settings, so the same crops (same boxes, same flips, the same faces hidden) can be cut
    again at another resolution from the sources: one resize from the photo, never a resample
    of a resampled crop (``at_resolution``).
    """

    crops: list  # list[faces.Crop]
    faces: list  # list[faces.Face], one per source photo
    detector: str
    sources: list = field(default_factory=list)  # list[PIL.Image], the photos as loaded (RGB)
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # grid and bucket the crops were made with
    seed: int = 0  # seed of the random flips
    grid: bool = True  # the paper's crop grid (False: each photo as it is, never flipped)
    others: str = "keep"  # what was done to other people's faces: one of faces.names.OTHER_FACES
    other_boxes: list = field(default_factory=list)  # per source photo: the other faces' boxes (source px)

    @property
    def images(self) -> list[Image.Image]:
        return [c.image for c in self.crops]

    @property
    def resolution(self) -> int:
        """Side of the crops' bucket area (512: about 512x512 pixels per crop)."""
        return round(math.sqrt(self.augment.bucket_area))

    @property
    def augmentation(self) -> str:
        return "paper_grid" if self.grid else "none"

    @property
    def flips(self) -> bool:
        """Whether training draws each crop plain or mirrored per step (the grid's random flips);
        each photo as it is (no grid) is never flipped."""
        return self.grid

    def at_resolution(self, side: int) -> "FaceCrops":
        """The same crops at about ``side`` x ``side`` pixels each, cut again from the source photos.

        Returns ``self`` when the crops already have that resolution. The crop boxes, the flips and
        which crops show other faces do not depend on the bucket size, so only the output size changes.
        """
        config = bucket_config(side, self.augment)
        if config == self.augment:
            return self
        if not self.sources:
            raise ValueError("these crops keep no source photos, so they cannot be cut at another resolution; "
                             f"make them at {side} directly")
        crops, _ = cut_crops(self.sources, self.faces, self.other_boxes, config, self.seed, self.grid, self.others)
        log.info("crops cut again at %dx%d area (they were made at %d), other faces %s as before",
                 side, side, self.resolution, self.others)
        return replace(self, crops=crops, augment=config)


def box_in_crop(crop: Crop, box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    """A source-pixel box in the crop's output pixels (resize, then the flip), not clipped."""
    x0, y0, x1, y1 = crop.box
    w, h = crop.size
    sx, sy = w / (x1 - x0), h / (y1 - y0)
    bx0, by0, bx1, by1 = (box[0] - x0) * sx, (box[1] - y0) * sy, (box[2] - x0) * sx, (box[3] - y0) * sy
    if crop.flipped:
        bx0, bx1 = w - bx1, w - bx0
    return bx0, by0, bx1, by1


def inside_share(crop: Crop, box: tuple[float, float, float, float]) -> float:
    """The share of a source-pixel box that lies inside the crop's rectangle."""
    x0, y0, x1, y1 = crop.box
    ix = max(0.0, min(x1, box[2]) - max(x0, box[0]))
    iy = max(0.0, min(y1, box[3]) - max(y0, box[1]))
    area = max(1e-6, (box[2] - box[0]) * (box[3] - box[1]))
    return ix * iy / area


def blur_faces(crop: Crop, boxes: list[tuple[float, float, float, float]]) -> Crop:
    """The crop with each (source-pixel) box blurred beyond recognition."""
    img = crop.image.copy()
    w, h = img.size
    for box in boxes:
        bx0, by0, bx1, by1 = box_in_crop(crop, box)
        gw, gh = (bx1 - bx0) * _GROW / 2, (by1 - by0) * _GROW / 2
        r = (max(0, int(bx0 - gw)), max(0, int(by0 - gh)), min(w, int(bx1 + gw) + 1), min(h, int(by1 + gh) + 1))
        if r[2] <= r[0] or r[3] <= r[1]:
            continue
        region = img.crop(r)
        # down to 3x3 colours and smoothly back up: the colours stay, no face structure does
        smooth = region.resize((3, 3), Image.Resampling.BOX).resize(region.size, Image.Resampling.BILINEAR)
        img.paste(smooth.filter(ImageFilter.GaussianBlur(max(2.0, min(region.size) / 8))), r[:2])
    return replace(crop, image=img)


def cut_crops(sources: list, faces: list, other_boxes: list, config: AugmentConfig, seed: int, grid: bool,
              others: str) -> tuple[list[Crop], list[tuple[int, int, int]]]:
    """The crops of every photo with other faces blurred, dropped or kept; per photo (made, blurred, dropped).

    Each (photo, face) gives the paper's grid with seeded flips (``grid``) or the photo itself.
    Which crops show another face depends only on the crop boxes (not on the bucket size), so
    cutting again at another resolution blurs and drops the same crops.
    """
    gen = torch.Generator().manual_seed(seed)
    crops: list[Crop] = []
    counts = []
    for im, face, rest in zip(sources, faces, other_boxes, strict=True):
        made = make_crops(im, face, config, gen) if grid else [whole_photo_crop(im, face, config.bucket_area,
                                                                                config.multiple)]
        blurred = dropped = 0
        for c in made:
            near = [b for b in rest if inside_share(c, b) >= _OVERLAP]
            if not near or others == "keep":
                crops.append(c)
            elif others == "drop":
                dropped += 1
            else:
                crops.append(blur_faces(c, near))
                blurred += 1
        counts.append((len(made), blurred, dropped))
    return crops, counts
