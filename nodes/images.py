"""ComfyUI IMAGE tensors <-> PIL images (the one conversion the pack uses)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image


def image_to_pils(image: torch.Tensor) -> list[Image.Image]:
    """ComfyUI IMAGE (B, H, W, C) float in [0, 1] -> list of PIL RGB (extra channels dropped)."""
    if image.ndim != 4 or image.shape[-1] < 3:
        raise ValueError(f"IMAGE has shape {tuple(image.shape)}; expected (batch, height, width, 3)")
    a = (image[..., :3].detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return [Image.fromarray(x) for x in a]


def pils_to_image(images: Sequence[Image.Image]) -> torch.Tensor:
    """Same-size PIL images -> ComfyUI IMAGE (B, H, W, 3) float32 in [0, 1].

    Raises:
        ValueError: no images, or their sizes differ (a ComfyUI batch has one size).
    """
    if not images:
        raise ValueError("no images to convert; give at least one")
    sizes = {im.size for im in images}
    if len(sizes) != 1:
        raise ValueError(f"images of different sizes {sorted(sizes)} cannot form one IMAGE batch")
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
    return torch.from_numpy(arr)
