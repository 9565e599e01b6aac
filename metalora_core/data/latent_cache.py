"""Encoded images kept in memory, keyed by content: (encoder identity, pixels) -> latent.

A host app that trains many times on the same crops (a ComfyUI graph where only steps, lr,
rank or seed change) encodes each crop once: the key is the encoder's identity plus the image's
mode, size and pixel bytes, never a position in a list, so different crops, another resolution
or another VAE miss and are encoded, and equal pixels hit whatever run or graph they come from.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from PIL import Image

from ..formats.store import image_digest

Encode = Callable[[list[Image.Image]], list[torch.Tensor]]


def latent_key(encoder_id: str, image: Image.Image) -> str:
    """sha256 of the encoder's identity and the image's pixels (``formats.store.image_digest``)."""
    return hashlib.sha256(f"{encoder_id}|{image_digest([image])}".encode()).hexdigest()


class LatentCache:
    """Least-recently-used store of latents, bounded by their bytes.

    Args:
        max_bytes: total size of the kept latents; the least recently used go first. A set
            larger than this is still encoded, only not all of it is kept.

    Latents come back as stored (shared, CPU): callers must not modify them in place.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def clear(self) -> None:
        self._items.clear()
        self._bytes = 0

    def _put(self, key: str, z: torch.Tensor) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self._bytes -= old.nelement() * old.element_size()
        self._items[key] = z
        self._bytes += z.nelement() * z.element_size()
        while self._bytes > self.max_bytes and self._items:
            _, gone = self._items.popitem(last=False)
            self._bytes -= gone.nelement() * gone.element_size()

    def encode(self, encode: Encode, encoder_id: str, images: Sequence[Image.Image]) -> tuple[list[torch.Tensor], int]:
        """The latents of ``images``: kept ones as they are, the others encoded in one call.

        Args:
            encode: PIL images -> latents, one per image (called once, with the missing images
                in order; not called when every image is kept).
            encoder_id: what identifies the encoder's result (weights, dtype, device); two
                encoders with one id must give the same latents.
            images: the images; sizes may differ.

        Returns:
            (one latent per image in order, how many were encoded now).
        """
        images = list(images)
        keys = [latent_key(encoder_id, im) for im in images]
        out: list[torch.Tensor | None] = []
        for k in keys:
            z = self._items.get(k)
            if z is not None:
                self._items.move_to_end(k)
            out.append(z)
        missing = [i for i, z in enumerate(out) if z is None]
        if missing:
            new = encode([images[i] for i in missing])
            if len(new) != len(missing):
                raise RuntimeError(f"the encoder returned {len(new)} latents for {len(missing)} images")
            for i, z in zip(missing, new):
                z = z.detach().cpu()
                out[i] = z
                self._put(keys[i], z)
        return out, len(missing)  # type: ignore[return-value]


__all__ = ["LatentCache", "latent_key"]
