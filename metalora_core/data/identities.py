"""Identity folders (one subfolder of photos per person) and Stage-1's cached latents.

Layout (read by ``read_identity_folders``, the one reader for training and evaluation)::

    data/
      alice/  001.jpg  001.txt (optional caption)  002.png ...
              reference.txt (optional, eval: which photo is the reference)
              gender.txt (optional, eval: "man" or "woman" for prompt templates)
      bob/    a.jpg ...

For Stage-1 every photo is used once, as it is (``faces.resize_to_bucket``: centre crop to the
closest of the paper's aspect ratios), as Algorithm 1 trains on a dataset of identities; the
Stage-2 crop grid around the detected face (paper Sec. 3, motivated there for the single-image
Stage-2) is an option (``DatasetConfig(crop_grid=True)``). Each training image is VAE-encoded
together with its mirror image (``flip=True``), so the trainer draws a random horizontal flip per
step. The latents of one photo are cached in one file whose name is the content hash of (image
bytes, preparation parameters, encoder identity); the cache never depends on the order images are
read in, so a changed folder can never pair a latent with the wrong image or caption. Images
without a caption file get the domain's class caption.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..formats.files import atomic_save_safetensors, read_safetensors, sha256_tensors
from ..lora.families import DEFAULT_FAMILY
from .latents import Latent, MetaTrainData, encode_flip_pairs

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CACHE_VERSION = 2  # 2: mirrored latents cached with the plain ones


@dataclass(frozen=True)
class IdentityFolder:
    """One person's subfolder."""

    name: str  # subfolder name
    photos: tuple[Path, ...]  # image files, sorted by name, hidden files skipped
    reference: Path  # the photo named in reference.txt, else the first photo
    gender: str | None = None  # from gender.txt ("man" / "woman"), else None
    captions: dict[Path, str] = field(default_factory=dict)  # photo -> text of <stem>.txt, when present

    @property
    def test(self) -> list[Path]:
        """The photos other than the reference (Algorithm 3's held-out set)."""
        return [p for p in self.photos if p != self.reference]


def _read_text(path: Path) -> str | None:
    return (path.read_text(encoding="utf-8").strip() or None) if path.is_file() else None


def read_identity_folders(root: str | os.PathLike, max_per_identity: int = 0) -> dict[str, IdentityFolder]:
    """Reads ``root/<identity>/`` folders: photos, optional captions, reference and gender.

    Args:
        root: folder with one subfolder of photos per person.
        max_per_identity: 0 = all photos; else the first N (sorted by file name).

    Returns:
        identity name -> ``IdentityFolder``, sorted by name; subfolders without photos are skipped
        with a warning.

    Raises:
        FileNotFoundError: ``root`` is not a folder, or no subfolder holds a photo.
        ValueError: ``reference.txt`` names a photo that is not in the folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no identities folder at {root}; give a folder with one subfolder of photos per person")
    out: dict[str, IdentityFolder] = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        photos = sorted(p for p in sub.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS
                        and not p.name.startswith("."))
        if not photos:
            log.warning("identity folder %s holds no images (%s); skipped", sub, ", ".join(IMAGE_EXTS))
            continue
        reference = photos[0]
        named = _read_text(sub / "reference.txt")
        if named is not None:
            name = named.splitlines()[0].strip()
            hit = [p for p in photos if p.name == name]
            if not hit:
                raise ValueError(f"{sub / 'reference.txt'} names {name!r}, which is not a photo in {sub}; write one of "
                                 f"{[p.name for p in photos]}")
            reference = hit[0]
        if max_per_identity:  # after the reference is found among all photos
            photos = photos[:max_per_identity]
        captions = {p: c for p in photos if (c := _read_text(p.with_suffix(".txt"))) is not None}
        out[sub.name] = IdentityFolder(name=sub.name, photos=tuple(photos), reference=reference,
                                       gender=_read_text(sub / "gender.txt"), captions=captions)
    if not out:
        raise FileNotFoundError(f"{root} has no identity subfolder with photos; expected {root}/<person>/<photo>.jpg "
                                f"(extensions {', '.join(IMAGE_EXTS)})")
    return out


@dataclass(frozen=True)
class DatasetConfig:
    """How photos become Stage-1 training latents."""

    augment: bool = False  # True: the Stage-2 crop grid around the face per photo; False: each photo once
    bucket_area: int = 512 * 512  # pixels per training image (resized to the paper's aspect buckets)
    multiple: int = DEFAULT_FAMILY.pixels_per_token  # image sides are multiples of a token's pixels
    detector: str = "auto"  # face detector backend (faces.get_detector), used by the crop grid only
    seed: int = 0  # kept in the cache key of crop-grid runs (the grid itself is deterministic)
    class_caption: str = "a photo of a person"  # caption of images without a .txt file
    max_images_per_identity: int = 0  # 0 = all; else the first N (sorted by file name)
    flip: bool = True  # also encode each image mirrored: a random horizontal flip per training step

    def __post_init__(self) -> None:
        if not isinstance(self.multiple, int) or self.multiple < 1:
            raise ValueError(f"multiple must be an int >= 1, got {self.multiple!r}")
        if not isinstance(self.bucket_area, int) or self.bucket_area < 4 * self.multiple**2:
            raise ValueError(f"bucket_area must be an int >= {4 * self.multiple ** 2}, got {self.bucket_area!r}")
        if not self.class_caption.strip():
            raise ValueError("class_caption is empty; give e.g. 'a photo of a woman'")
        if self.max_images_per_identity < 0:
            raise ValueError(f"max_images_per_identity must be >= 0, got {self.max_images_per_identity}")


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


def _prepare_images(image: Image.Image, config: DatasetConfig, detector: Any) -> tuple[list[Image.Image], str]:
    """The training images of one photo and the mode that made them."""
    from ..faces import AugmentConfig, resize_to_bucket
    from ..faces.person import person_crops

    if not config.augment:
        return [resize_to_bucket(image, config.bucket_area, config.multiple)], "resize"
    # Stage-2's crop pipeline (other people's faces blurred), unflipped: the flip is drawn per step
    # from the cached (plain, mirrored) pair.
    grid = AugmentConfig(bucket_area=config.bucket_area, multiple=config.multiple, flip_prob=0.0)
    try:
        crops, _ = person_crops([image], detector=detector, augment=grid, seed=0)
    except ValueError as e:  # one photo, other faces blurred: only "no face found" is left
        log.warning("%s; using the whole photo instead of the face grid", e)
        return [resize_to_bucket(image, config.bucket_area, config.multiple)], "resize-no-face"
    return crops.images, "face-grid"


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
        config: crop grid or not, flips, bucket size, class caption.
        cache_dir: where latents are cached (None: no cache).

    Returns:
        MetaTrainData with a ``summary`` (identities, images, items, modes, cache hits).

    Raises:
        FileNotFoundError, ValueError: see ``read_identity_folders``; unreadable images.
    """
    from ..faces import AugmentConfig, get_detector, load_image

    folders = read_identity_folders(root, config.max_images_per_identity)
    names = list(folders)
    detector = get_detector(config.detector) if config.augment else None
    prep: dict[str, Any] = {"version": CACHE_VERSION, "augment": config.augment, "bucket_area": config.bucket_area,
                            "multiple": config.multiple, "flip": config.flip}
    if config.augment:
        prep.update(detector=detector.name, seed=config.seed,
                    grid=AugmentConfig(bucket_area=config.bucket_area, multiple=config.multiple, flip_prob=0.0).to_dict())
    cache = Path(cache_dir) if cache_dir is not None else None
    latents: list[Latent] = []
    item_identity: list[int] = []
    item_caption: list[str] = []
    item_photo: list[int] = []
    modes: dict[str, int] = {}
    hits = misses = n_photos = 0
    for k, folder in enumerate(folders.values()):
        for photo in folder.photos:
            blob = photo.read_bytes()
            img_sha = hashlib.sha256(blob).hexdigest()
            key = hashlib.sha256(json.dumps({"image": img_sha, "prep": prep, "encoder": encoder_id},
                                            sort_keys=True).encode()).hexdigest()
            path = cache / key[:2] / f"{key}.safetensors" if cache is not None else None
            zs: list[Latent] | None = None
            if path is not None and path.is_file():
                try:
                    tensors, meta = read_safetensors(path)
                    count = int(meta["count"])
                    zs = [(tensors[f"latent.{i}"], tensors[f"mirrored.{i}"]) if config.flip else tensors[f"latent.{i}"]
                          for i in range(count)]
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
                    raise ValueError(f"identity {folder.name!r}: {photo} is not a readable image ({e})") from e
                pics, mode = _prepare_images(pic, config, detector)
                zs = _encode(encode, pics, config.flip)
                misses += 1
                if path is not None:
                    atomic_save_safetensors(_cache_tensors(zs), path,
                                            {"count": str(len(zs)), "mode": mode, "image_sha256": img_sha,
                                             "prep": json.dumps(prep, sort_keys=True), "encoder": encoder_id})
            modes[mode] = modes.get(mode, 0) + 1
            caption = folder.captions.get(photo) or config.class_caption
            for z in zs:
                latents.append(z)
                item_identity.append(k)
                item_caption.append(caption)
                item_photo.append(n_photos)
            n_photos += 1
    conds = {c: encode_caption(c) for c in sorted(set(item_caption))}
    summary = {
        "identities": len(names),
        "images": n_photos,
        "items": len(latents),
        "images_per_identity": {n: len(f.photos) for n, f in folders.items()},
        "captions": len(conds),
        "class_caption": config.class_caption,
        "augment": config.augment,
        "flip": config.flip,
        "bucket_area": config.bucket_area,
        "modes": modes,
        "cache_hits": hits,
        "cache_misses": misses,
    }
    if config.augment:
        summary["detector"] = detector.name
    log.info("dataset: %d identities, %d images -> %d latents%s (cache: %d hit, %d new)", len(names), n_photos,
             len(latents), " x 2 orientations" if config.flip else "", hits, misses)
    return MetaTrainData(identities=names, latents=latents, item_identity=item_identity, item_caption=item_caption,
                         conds=conds, summary=summary, item_photo=item_photo)


def _encode(encode: Encoder, images: list[Image.Image], flip: bool) -> list[Latent]:
    def cpu(z: torch.Tensor) -> torch.Tensor:
        return z.detach().to("cpu", torch.float32).contiguous()

    if flip:
        return [(cpu(a), cpu(b)) for a, b in encode_flip_pairs(encode, images)]
    return [cpu(z) for z in encode(images)]


def _cache_tensors(zs: list[Latent]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for i, z in enumerate(zs):
        if isinstance(z, tuple):
            out[f"latent.{i}"], out[f"mirrored.{i}"] = z
        else:
            out[f"latent.{i}"] = z
    return out
