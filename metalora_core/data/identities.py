"""Stage-1 training data: a folder with one subfolder per identity, turned into cached latents.

Layout::

    data/
      alice/  001.jpg  001.txt (optional caption)  002.png ...
      bob/    a.jpg ...

Every image is augmented on its own (the faces package's crop grid around the detected face,
paper Sec. 3; or, with ``augment=False``, one centre crop to the nearest aspect bucket), the
crops are VAE-encoded, and the latents of one image are cached in one file whose name is the
content hash of (image bytes, preparation parameters, encoder identity). The cache never depends
on the order images are read in, so a changed folder can never pair a latent with the wrong
image or caption. Images without a caption file get the domain's class caption.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..formats.files import atomic_save_safetensors, read_safetensors, sha256_tensors
from ..train.stage1 import MetaTrainData

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CACHE_VERSION = 1
_RATIOS = ((16, 9), (4, 3), (1, 1), (3, 4), (9, 16))  # the paper's aspect ratios (width:height)


@dataclass(frozen=True)
class IdentityImage:
    """One training photo."""

    identity: str  # subfolder name
    path: Path
    caption: str | None  # from <stem>.txt next to the image, else None (class caption)


@dataclass(frozen=True)
class DatasetConfig:
    """How photos become training latents."""

    augment: bool = True  # the paper's face-centred crop grid per image; False: one centre crop
    bucket_area: int = 512 * 512  # pixels per training image (crops are resized to aspect buckets)
    multiple: int = 16  # image sides are multiples of this (FLUX: VAE 8 x patch 2)
    detector: str = "auto"  # face detector backend (faces.get_detector)
    seed: int = 0  # drives the random flips of the crop grid (per image, order independent)
    class_caption: str = "a photo of a person"  # caption of images without a .txt file
    max_images_per_identity: int = 0  # 0 = all; else the first N (sorted by file name)

    def __post_init__(self) -> None:
        if not isinstance(self.multiple, int) or self.multiple < 1:
            raise ValueError(f"multiple must be an int >= 1, got {self.multiple!r}")
        if not isinstance(self.bucket_area, int) or self.bucket_area < 4 * self.multiple**2:
            raise ValueError(f"bucket_area must be an int >= {4 * self.multiple ** 2}, got {self.bucket_area!r}")
        if not self.class_caption.strip():
            raise ValueError("class_caption is empty; give e.g. 'a photo of a woman'")
        if self.max_images_per_identity < 0:
            raise ValueError(f"max_images_per_identity must be >= 0, got {self.max_images_per_identity}")


def scan_identity_folder(root: str | os.PathLike, max_per_identity: int = 0) -> list[IdentityImage]:
    """Lists the images of every identity subfolder (sorted; hidden files skipped).

    Raises:
        FileNotFoundError: ``root`` is not a folder.
        ValueError: no subfolder holds an image.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no data folder at {root}; give a folder with one subfolder of photos per person")
    out: list[IdentityImage] = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in sub.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS
                       and not p.name.startswith("."))
        if max_per_identity:
            files = files[:max_per_identity]
        if not files:
            log.warning("identity folder %s holds no images (%s); skipped", sub, ", ".join(IMAGE_EXTS))
            continue
        for f in files:
            txt = f.with_suffix(".txt")
            caption = txt.read_text(encoding="utf-8").strip() if txt.is_file() else None
            out.append(IdentityImage(identity=sub.name, path=f, caption=caption or None))
    if not out:
        raise ValueError(
            f"{root} has no identity subfolders with images; expected {root}/<person>/<photo>.jpg "
            f"(extensions {', '.join(IMAGE_EXTS)})"
        )
    return out


def _bucket_size(ratio: tuple[int, int], area: int, multiple: int) -> tuple[int, int]:
    a, b = ratio
    w, h = math.sqrt(area * a / b), math.sqrt(area * b / a)
    return max(multiple, round(w / multiple) * multiple), max(multiple, round(h / multiple) * multiple)


def plain_resize(image: Image.Image, area: int, multiple: int = 16,
                 ratios: Sequence[tuple[int, int]] = _RATIOS) -> Image.Image:
    """Centre-crops to the closest of ``ratios`` and resizes to that aspect bucket (no face needed)."""
    w, h = image.size
    ratio = min(ratios, key=lambda r: abs(math.log((r[0] / r[1]) / (w / h))))
    a, b = ratio
    cw, ch = (w, round(w * b / a)) if w / h < a / b else (round(h * a / b), h)
    cw, ch = min(cw, w), min(ch, h)
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    return image.resize(_bucket_size(ratio, area, multiple), Image.Resampling.LANCZOS, box=(x0, y0, x0 + cw, y0 + ch))


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """Identity of a VAE for cache keys: its class, config and weights (dtype included)."""
    h = hashlib.sha256(type(vae).__name__.encode())
    cfg = getattr(vae, "config", None)
    if cfg is not None:
        # Private keys ("_use_default_values", ...) vary in order between processes: leave them out.
        public = {k: v for k, v in dict(cfg).items() if not k.startswith("_")}
        h.update(json.dumps(public, sort_keys=True, default=str).encode())
    h.update(sha256_tensors(vae.state_dict()).encode())
    return h.hexdigest()


Encoder = Callable[[list[Image.Image]], list[torch.Tensor]]


def _prepare_images(image: Image.Image, img_sha: str, config: DatasetConfig, detector: Any) -> tuple[list[Image.Image], str]:
    """The training images of one photo and the mode that made them."""
    if not config.augment:
        return [plain_resize(image, config.bucket_area, config.multiple)], "resize"
    from ..faces import AugmentConfig, make_crops, select_face

    try:
        face = select_face(image, detector)
    except ValueError as e:
        log.warning("%s; using one centre crop of this image instead of the face grid", e)
        return [plain_resize(image, config.bucket_area, config.multiple)], "resize-no-face"
    # One flip generator per image, seeded by its content: the crops do not depend on read order.
    gen = torch.Generator().manual_seed((int(img_sha[:15], 16) ^ config.seed) % (2**63))
    crops = make_crops(image, face, AugmentConfig(bucket_area=config.bucket_area, multiple=config.multiple), gen)
    return [c.image for c in crops], "face-grid"


def prepare_dataset(
    root: str | os.PathLike,
    *,
    encode: Encoder,
    encoder_id: str,
    encode_caption: Callable[[str], Any],
    config: DatasetConfig = DatasetConfig(),
    cache_dir: str | os.PathLike | None = None,
) -> MetaTrainData:
    """Scans, augments, encodes (with an on-disk latent cache) and captions a Stage-1 dataset.

    Args:
        root: folder with one subfolder per identity.
        encode: PIL images -> (C, h, w) latents (e.g. ``diffusers_host.encode_images`` bound to a VAE).
        encoder_id: identity of the encoder for the cache key (e.g. ``vae_fingerprint(vae)``).
        encode_caption: caption -> the host's conditioning (called once per distinct caption).
        config: augmentation, bucket size, class caption.
        cache_dir: where latents are cached (None: no cache).

    Returns:
        MetaTrainData with a ``summary`` (identities, images, items, modes, cache hits).

    Raises:
        FileNotFoundError, ValueError: see ``scan_identity_folder``; unreadable images.
    """
    from ..faces import get_detector, load_image

    images = scan_identity_folder(root, config.max_images_per_identity)
    names = sorted({im.identity for im in images})
    index = {n: i for i, n in enumerate(names)}
    detector = get_detector(config.detector) if config.augment else None
    prep = {"version": CACHE_VERSION, "augment": config.augment, "bucket_area": config.bucket_area,
            "multiple": config.multiple}
    if config.augment:
        from ..faces import AugmentConfig

        prep.update(detector=detector.name, seed=config.seed,
                    grid=AugmentConfig(bucket_area=config.bucket_area, multiple=config.multiple).to_dict())
    cache = Path(cache_dir) if cache_dir is not None else None
    latents: list[torch.Tensor] = []
    item_identity: list[int] = []
    item_caption: list[str] = []
    modes: dict[str, int] = {}
    hits = misses = 0
    for im in images:
        blob = im.path.read_bytes()
        img_sha = hashlib.sha256(blob).hexdigest()
        key = hashlib.sha256(json.dumps({"image": img_sha, "prep": prep, "encoder": encoder_id},
                                        sort_keys=True).encode()).hexdigest()
        path = cache / key[:2] / f"{key}.safetensors" if cache is not None else None
        zs: list[torch.Tensor] | None = None
        if path is not None and path.is_file():
            try:
                tensors, meta = read_safetensors(path)
                zs = [tensors[f"latent.{i}"] for i in range(int(meta["count"]))]
                mode = meta["mode"]
                hits += 1
            except (ValueError, KeyError) as e:
                log.warning("latent cache file %s is unusable (%s); re-encoding", path, e)
                zs = None
        if zs is None:
            try:  # decode the hashed bytes themselves, not a second read of the file
                with Image.open(io.BytesIO(blob)) as src:
                    src.load()
                    pic = load_image(src)
            except (OSError, Image.DecompressionBombError, SyntaxError) as e:
                raise ValueError(f"identity {im.identity!r}: {im.path} is not a readable image ({e})") from e
            pics, mode = _prepare_images(pic, img_sha, config, detector)
            zs = [z.detach().to("cpu", torch.float32).contiguous() for z in encode(pics)]
            misses += 1
            if path is not None:
                atomic_save_safetensors({f"latent.{i}": z for i, z in enumerate(zs)}, path,
                                        {"count": str(len(zs)), "mode": mode, "image_sha256": img_sha,
                                         "prep": json.dumps(prep, sort_keys=True), "encoder": encoder_id})
        modes[mode] = modes.get(mode, 0) + 1
        caption = im.caption or config.class_caption
        for z in zs:
            latents.append(z)
            item_identity.append(index[im.identity])
            item_caption.append(caption)
    conds = {c: encode_caption(c) for c in sorted(set(item_caption))}
    per_id = {n: sum(1 for im in images if im.identity == n) for n in names}
    summary = {
        "identities": len(names),
        "images": len(images),
        "items": len(latents),
        "images_per_identity": per_id,
        "captions": len(conds),
        "class_caption": config.class_caption,
        "augment": config.augment,
        "bucket_area": config.bucket_area,
        "modes": modes,
        "cache_hits": hits,
        "cache_misses": misses,
    }
    if config.augment:
        summary["detector"] = detector.name
    log.info("dataset: %d identities, %d images -> %d latents (cache: %d hit, %d new)",
             len(names), len(images), len(latents), hits, misses)
    return MetaTrainData(identities=names, latents=latents, item_identity=item_identity,
                         item_caption=item_caption, conds=conds, summary=summary)
