"""Cached training latents: single latents or (plain, mirrored) pairs, and Stage-1's dataset.

The paper applies "random horizontal flips to each image" (Sec. 3, Stage-2). A flip baked into
a cached latent is seen one way for the whole run, so both orientations are cached and one is
drawn per step from the run's seeded generator (``pick_orientation``). The mirrored latent is the
VAE encoding of the mirrored image, not a flip of the plain latent: a VAE is not equivariant to
mirroring, so ``torch.flip(encode(x))`` is not ``encode(flip(x))``.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from PIL import Image, ImageOps

# One training item: a (C, h, w) latent, or the (plain, mirrored) latents of one image.
Latent = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]
FLIP_PROB = 0.5  # probability of the mirrored latent per draw


def latent_shape(z: Latent) -> tuple[int, ...]:
    """The (C, h, w) shape of an item (both orientations of a pair share it)."""
    return tuple((z[0] if isinstance(z, tuple) else z).shape)


def pick_orientation(z: Latent, generator: torch.Generator) -> tuple[torch.Tensor, bool]:
    """One orientation of an item for this step.

    Args:
        z: a single latent (returned as is, no random draw) or a (plain, mirrored) pair.
        generator: the run's CPU generator; a pair consumes one uniform draw.

    Returns:
        (latent (C, h, w), whether the mirrored one was picked).
    """
    if not isinstance(z, tuple):
        return z, False
    mirrored = bool(torch.rand((), generator=generator).item() < FLIP_PROB)
    return z[1 if mirrored else 0], mirrored


def encode_flip_pairs(encode: Callable[[list[Image.Image]], list[torch.Tensor]],
                      images: Sequence[Image.Image]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Encodes every image and its left-right mirror image: the items of per-step flips.

    Args:
        encode: PIL images -> (C, h, w) latents (e.g. a VAE encoder bound to its model).
        images: the training images (crops); sizes may differ.

    Returns:
        One (plain, mirrored) pair per image, in order.
    """
    images = list(images)
    plain = encode(images)
    mirrored = encode([ImageOps.mirror(im) for im in images])
    return list(zip(plain, mirrored, strict=True))


def check_latents(latents: Sequence[Latent]) -> None:
    """Validates training items: (C, h, w), finite; a pair's two latents share one shape.

    Raises:
        ValueError: naming the first bad item.
    """
    if not latents:
        raise ValueError("no training latents; give at least one image crop")
    for i, item in enumerate(latents):
        parts = item if isinstance(item, tuple) else (item,)
        if isinstance(item, tuple) and (len(item) != 2 or item[0].shape != item[1].shape):
            raise ValueError(f"latent pair {i} must be (plain, mirrored) of one shape, got "
                             f"{[tuple(t.shape) for t in item]}")
        for z in parts:
            if z.ndim != 3:
                raise ValueError(f"latent {i} has shape {tuple(z.shape)}; expected (C, h, w)")
            if not torch.isfinite(z).all():
                raise ValueError(f"latent {i} holds NaN or inf; check the VAE and the input image")


@dataclass
class MetaTrainData:
    """Cached training items of many identities (see ``identities.prepare_dataset``).

    ``latents[i]`` (C, h, w), or a (plain, mirrored) pair, belongs to identity
    ``item_identity[i]`` (an index into ``identities``) and is trained with the conditioning
    ``conds[item_caption[i]]``. ``item_photo[i]`` names the source photo of an item (several
    crops of one photo share it); None: every item is its own photo.
    """

    identities: list[str]  # identity names (folder names)
    latents: list[Latent]  # (C, h, w) each, or (plain, mirrored); sizes may differ (aspect buckets)
    item_identity: list[int]  # per item: index into identities
    item_caption: list[str]  # per item: key into conds
    conds: dict[str, Any]  # caption -> the host's cached conditioning
    summary: dict[str, Any] = field(default_factory=dict)  # what the data is (for the prior's metadata)
    item_photo: list[int] | None = None  # per item: index of its source photo (None: one photo per item)

    def validate(self) -> None:
        check_latents(self.latents)
        n = len(self.latents)
        if len(self.item_identity) != n or len(self.item_caption) != n:
            raise ValueError(
                f"MetaTrainData has {n} latents but {len(self.item_identity)} identity labels and "
                f"{len(self.item_caption)} captions; they must match one to one"
            )
        if self.item_photo is not None and len(self.item_photo) != n:
            raise ValueError(f"MetaTrainData has {n} latents but {len(self.item_photo)} photo indices")
        if len(self.identities) < 1:
            raise ValueError("MetaTrainData has no identities; give a folder with one subfolder per person")
        for i, k in enumerate(self.item_identity):
            if not 0 <= k < len(self.identities):
                raise ValueError(f"item {i} has identity index {k}, outside 0..{len(self.identities) - 1}")
        missing = sorted(set(self.item_caption) - set(self.conds))
        if missing:
            raise ValueError(f"caption {missing[0]!r} has no encoded conditioning in MetaTrainData.conds")
        present = set(self.item_identity)
        empty = [self.identities[k] for k in range(len(self.identities)) if k not in present]
        if empty:
            raise ValueError(f"identity {empty[0]!r} has no training items; remove it or add images")

    def photos_per_identity(self) -> list[int]:
        """Distinct source photos of each identity (the examples Algorithm 1's buckets count)."""
        photos = self.item_photo if self.item_photo is not None else range(len(self.latents))
        seen: list[set[int]] = [set() for _ in self.identities]
        for k, p in zip(self.item_identity, photos):
            seen[k].add(p)
        return [len(s) for s in seen]

    def fingerprint(self) -> str:
        """Content hash of identities, captions, photos and latents (a resume must see the same data)."""
        h = hashlib.sha256()
        h.update(json.dumps(self.identities).encode())
        if self.item_photo is not None:
            h.update(json.dumps(self.item_photo).encode())
        for z, k, c in zip(self.latents, self.item_identity, self.item_caption):
            parts = z if isinstance(z, tuple) else (z,)
            h.update(f"{k}|{c}|{len(parts)}|{latent_shape(z)}".encode())
            for t in parts:
                h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()


__all__ = ["FLIP_PROB", "Latent", "MetaTrainData", "check_latents", "encode_flip_pairs", "latent_shape",
           "pick_orientation"]
