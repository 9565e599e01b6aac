"""Crop latents encoded once per ComfyUI process: a run that changes only training settings
(steps, lr, rank, seed, layers, memory) finds the VAE latents of its crops already made.

The key of each latent is the VAE's identity (``vae_identity``) and the crop's pixels
(``metalora_core.data.latent_cache``), so old graphs (crops + VAE straight into Train) reuse
them as well. Latents are kept as the VAE gives them (raw, float32, CPU); the host turns them
into the FLUX model's latent space (``process_latent_in``) when it trains.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

from ..metalora_core.data.latent_cache import LatentCache
from ..metalora_core.formats.store import content_key
from .images import pils_to_image

# FLUX latents of 25 crops and their mirror images at 1024 px take about 52 MB (float32).
LATENT_CACHE_BYTES = 1 << 30
CACHE = LatentCache(LATENT_CACHE_BYTES)


def vae_identity(vae: Any) -> str:
    """Content identity of a ComfyUI VAE: its weights as loaded, its patches, dtype and device.

    Reads the weights through the patcher's ``backup`` (``comfy_host.model_identity``), not the
    live tensors, which ComfyUI may patch in place.
    """
    from .comfy_host import model_identity

    weights = model_identity(vae.patcher, prefix="")
    return content_key({"vae": weights, "dtype": str(vae.vae_dtype), "device": str(vae.device),
                        "class": type(vae).__name__})


class VaeEncoder:
    """Raw VAE latents of PIL images through ``CACHE``: (C, h, w) float32 CPU each.

    Counts what it did (``encoded``, ``reused`` images, ``seconds`` spent encoding) for the
    node's message; ``before_encode(n)``, if set, is called before ``n`` images are encoded.
    """

    def __init__(self, vae: Any) -> None:
        self.vae = vae
        self.identity = vae_identity(vae)
        self.encoded = self.reused = 0
        self.seconds = 0.0
        self.before_encode: Callable[[int], None] | None = None

    def _encode(self, images: list[Image.Image]) -> list[torch.Tensor]:
        """VAE-encodes images, one batch per size."""
        if self.before_encode is not None:
            self.before_encode(len(images))
        t0 = time.perf_counter()
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            by_size.setdefault(im.size, []).append(i)
        out: list[torch.Tensor | None] = [None] * len(images)
        for idx in by_size.values():
            with torch.no_grad():  # no autograd here: VAE weights may be inference tensors
                z = self.vae.encode(pils_to_image([images[i] for i in idx])).float().cpu()  # (n, C, h, w)
            for j, i in enumerate(idx):
                out[i] = z[j].clone()  # clone(): a normal tensor, not a view into the batch
        self.seconds += time.perf_counter() - t0
        return out  # type: ignore[return-value]

    def __call__(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        latents, new = CACHE.encode(self._encode, self.identity, images)
        self.encoded += new
        self.reused += len(latents) - new
        return latents

    def summary(self, crops: int, *, mirrored: bool = True) -> str:
        """One line on what encoding ``crops`` crops (and their mirror images) took."""
        what = f"{crops} crops and their mirror images" if mirrored else f"{crops} crops"
        if self.encoded == 0:
            return f"crop latents reused: {what} were encoded before (no VAE work)"
        part = "" if self.reused == 0 else f" ({self.reused} of {self.encoded + self.reused} images reused)"
        return f"encoded {what} in {self.seconds:.1f} s{part}; kept for runs that change only training settings"


__all__ = ["CACHE", "LATENT_CACHE_BYTES", "VaeEncoder", "vae_identity"]
