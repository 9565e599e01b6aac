"""The personalization recipe shared by the CLI, the demo and the ComfyUI nodes.

photo -> face -> augmented crops (paper Sec. 3) ; prior (or none) -> adapters.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from PIL import Image

from ..lora.adapter import AdapterSet
from ..lora.layers import DEFAULT_PRESET, FluxDims, resolve_targets
from ..formats.prior import Prior, validate_prior

log = logging.getLogger(__name__)

CLASS_CAPTIONS = {"woman": "a photo of a woman", "man": "a photo of a man", "person": "a photo of a person"}
_INIT_SALT = 0x5EED  # keeps the adapter-init stream apart from the training stream of the same seed


def class_caption(noun: str) -> str:
    """A training caption made of the class noun alone, no trigger word (the paper states no caption)."""
    return CLASS_CAPTIONS.get(noun, f"a photo of a {noun}")


@dataclass
class FaceCrops:
    """What the augmentation made of one or more photos of one person."""

    crops: list  # list[faces.Crop]
    faces: list  # list[faces.Face], one per source photo
    detector: str

    @property
    def images(self) -> list[Image.Image]:
        return [c.image for c in self.crops]


def face_crops(
    images: list[Image.Image],
    *,
    detector: str = "auto",
    face_index: int | None = None,
    augment=None,
    seed: int = 0,
    insightface_root: str | None = None,
    grid: bool = True,
) -> FaceCrops:
    """Detects the face in each photo and makes the paper's crop grid around it.

    Args:
        images: one photo, or a few of the same person.
        detector: face detector backend name ("auto" picks the best available).
        face_index: which face when a photo has several (None: the largest).
        augment: ``faces.AugmentConfig`` (None: the paper's grid at 512x512 area).
        seed: drives the random flips.
        grid: False trains on each photo as it is (one crop per photo, no flips): the paper's
            un-augmented LoRA baseline.
    """
    from ..faces import AugmentConfig, get_detector, load_image, make_crops, select_face, whole_photo_crop

    if not images:
        raise ValueError("no photo given; pass one photo of the person (or a few)")
    det = get_detector(detector, insightface_root=insightface_root)
    config = augment or AugmentConfig()
    gen = torch.Generator().manual_seed(seed)
    crops, faces = [], []
    for i, im in enumerate(images):
        im = load_image(im)
        try:
            face = select_face(im, det, index=face_index)
        except ValueError as e:
            raise ValueError(f"photo {i + 1} of {len(images)}: {e}") from e
        faces.append(face)
        if grid:
            crops.extend(make_crops(im, face, config, gen))
        else:
            crops.append(whole_photo_crop(im, face, config.bucket_area, config.multiple))
    log.info("augmentation: %d crops from %d photo(s), detector %s", len(crops), len(images), det.name)
    return FaceCrops(crops=crops, faces=faces, detector=det.name)


def build_adapters(
    dims: FluxDims,
    prior: Prior | None,
    *,
    rank: int,
    preset: str = DEFAULT_PRESET,
    seed: int = 0,
    source: str = "prior",
) -> AdapterSet:
    """Meta-LoRA adapters on a validated prior, or plain LoRA adapters when ``prior`` is None."""
    gen = torch.Generator().manual_seed(seed ^ _INIT_SALT)
    if prior is None:
        return AdapterSet.plain(resolve_targets(preset, dims), rank=rank, preset=preset, generator=gen)
    shapes = validate_prior(prior, dims, source=source)
    return AdapterSet.from_downs(prior.downs, shapes, r2=rank, preset=prior.preset, generator=gen)
