"""One person's training crops together with what they were cut from (photos, faces, settings)."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from PIL import Image

from .augment import make_crops, whole_photo_crop

log = logging.getLogger(__name__)


@dataclass
class FaceCrops:
    """What the augmentation made of one or more photos of one person.

    It keeps the source photos, the faces found in them and the crop settings, so the same
    crops (same boxes, same flips) can be cut again at another resolution from the sources:
    one resize from the photo, never a resample of a resampled crop (``at_resolution``).
    """

    crops: list  # list[faces.Crop]
    faces: list  # list[faces.Face], one per source photo
    detector: str
    sources: list = field(default_factory=list)  # list[PIL.Image], the photos as loaded (RGB)
    augment: Any = None  # faces.AugmentConfig the crops were made with
    seed: int = 0  # seed of the random flips
    grid: bool = True  # the paper's crop grid (False: each photo as it is)

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

    def at_resolution(self, side: int) -> "FaceCrops":
        """The same crops at about ``side`` x ``side`` pixels each, cut again from the source photos.

        Returns ``self`` when the crops already have that resolution. The crop boxes and flips do
        not depend on the bucket size, so only the output size changes.
        """
        if side * side == self.augment.bucket_area:
            return self
        if not self.sources:
            raise ValueError("these crops keep no source photos, so they cannot be cut at another resolution; "
                             f"make them at {side} directly")
        config = replace(self.augment, bucket_area=side * side)
        crops = cut_crops(self.sources, self.faces, config, self.seed, self.grid)
        log.info("crops cut again at %dx%d area (they were made at %d)", side, side, self.resolution)
        return FaceCrops(crops=crops, faces=self.faces, detector=self.detector, sources=self.sources,
                         augment=config, seed=self.seed, grid=self.grid)


def cut_crops(sources: list, faces: list, config, seed: int, grid: bool) -> list:
    """The crops of each (photo, face): the paper's grid (``grid``) or the photo itself; seeded flips."""
    gen = torch.Generator().manual_seed(seed)
    crops = []
    for im, face in zip(sources, faces):
        if grid:
            crops.extend(make_crops(im, face, config, gen))
        else:
            crops.append(whole_photo_crop(im, face, config.bucket_area, config.multiple))
    return crops
