"""Files a host app keeps for the user: content-keyed training cache and never-overwriting saves.

Framework-agnostic (torch, pillow, safetensors only); the ComfyUI nodes call it with ComfyUI's
folders.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..lora.adapter import AdapterSet
from .lora import load_adapter_state, save_adapter_state, save_lora
from .files import confined_path, sha256_tensors

log = logging.getLogger(__name__)

_SAFE_PART = re.compile(r"[^A-Za-z0-9._ -]")


def image_digest(images: Sequence[Image.Image]) -> str:
    """sha256 over the pixels (mode, size, bytes) of each image, in order."""
    h = hashlib.sha256()
    for im in images:
        h.update(f"{im.mode}:{im.size[0]}x{im.size[1]};".encode())
        h.update(im.tobytes())
    return h.hexdigest()


def weights_identity(state: Mapping[str, torch.Tensor], *, samples: int = 4, extra: str = "") -> str:
    """Cheap content identity of a model's weights: every name, shape and dtype, a few tensors' bytes.

    Hashing all of FLUX.1-dev (24 GB) would take longer than a short training run; the names,
    shapes and dtypes tell architectures and precisions apart, and ``samples`` evenly spaced
    tensors plus the last one tell fine-tunes of one architecture apart (a fine-tune changes
    nearly every tensor). ``extra`` adds what else identifies the model (its config, patches).
    """
    keys = sorted(state)
    h = hashlib.sha256()
    for k in keys:
        h.update(f"{k}{tuple(state[k].shape)}{state[k].dtype};".encode())
    step = max(1, len(keys) // max(1, samples))
    picked = {k: state[k] for k in keys[::step][:samples] + keys[-1:]}
    h.update(sha256_tensors(picked).encode())
    h.update(extra.encode())
    return h.hexdigest()


def content_key(parts: Mapping[str, Any]) -> str:
    """sha256 of a JSON-serialisable description of everything a result depends on.

    Caches are keyed by content, never by a loader step: an index into a loader pairs cached
    latents with the wrong captions as soon as the data order changes.
    """
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_path(cache_dir: str | os.PathLike, key: str) -> Path:
    if not re.fullmatch(r"[0-9a-f]{64}", key):
        raise ValueError(f"cache key must be a sha256 hex digest, got {key!r}")
    return Path(cache_dir) / f"{key}.safetensors"


def load_cached_adapters(cache_dir: str | os.PathLike, key: str) -> tuple[AdapterSet, dict[str, str]] | None:
    """The adapters stored under ``key``, or None (missing or unreadable: it is retrained)."""
    path = cache_path(cache_dir, key)
    if not path.is_file():
        return None
    try:
        adapters, meta = load_adapter_state(path)
    except (ValueError, KeyError, OSError) as e:
        log.warning("ignoring unreadable training cache entry %s (%s); training again", path, e)
        return None
    if meta.get("cache_key") != key:
        log.warning("training cache entry %s holds key %r; training again", path, meta.get("cache_key"))
        return None
    return adapters, meta


def store_cached_adapters(cache_dir: str | os.PathLike, key: str, adapters: AdapterSet, **metadata: object) -> Path:
    """Atomically stores trained adapters under ``key``, with ``metadata`` (their provenance, losses).

    Raises:
        ValueError: ``metadata`` names a different ``cache_key``.
    """
    if metadata.get("cache_key", key) != key:
        raise ValueError(f"metadata cache_key {metadata['cache_key']!r} differs from the entry's key {key!r}")
    metadata["cache_key"] = key
    return save_adapter_state(adapters, cache_path(cache_dir, key), **metadata)


def _clean(part: str, what: str) -> str:
    part = part.strip().replace("\\", "/")
    if _SAFE_PART.search(part.replace("/", "")):
        bad = sorted(set(_SAFE_PART.findall(part.replace("/", ""))))
        raise ValueError(f"{what} {part!r} has characters {bad} that are not allowed in a file name")
    return part


def _publish_exclusive(tmp: Path, target: Path) -> None:
    """Gives ``tmp`` the name ``target`` unless that name exists (FileExistsError)."""
    try:
        os.link(tmp, target)  # atomic and never replaces
    except FileExistsError:
        raise
    except OSError:  # a filesystem without hard links: reserve the name, then swap the file in
        fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        os.close(fd)
        os.replace(tmp, target)


def save_lora_new(adapters: AdapterSet, folder: str | os.PathLike, subfolder: str, prefix: str,
                  *, max_tries: int = 100000, **metadata: object) -> Path:
    """Writes the merged LoRA as ``folder/subfolder/prefix_NNNNN.safetensors``, never overwriting.

    The number is the first free one; the file appears atomically (written to a temp file, then
    hard-linked to the final name, which fails instead of replacing an existing file).

    Raises:
        ValueError: the subfolder or prefix is empty, absolute, or leaves ``folder``.
    """
    prefix = _clean(prefix, "filename prefix")
    if not prefix or "/" in prefix:
        raise ValueError(f"filename prefix {prefix!r} must be a plain name; put folders in 'subfolder'")
    subfolder = _clean(subfolder, "subfolder")
    if subfolder.startswith("/") or (len(subfolder) > 1 and subfolder[1] == ":"):
        raise ValueError(f"subfolder {subfolder!r} is absolute; give a folder inside {folder} (or '' for the top)")
    subfolder = subfolder.strip("/")
    target_dir = confined_path(folder, subfolder) if subfolder else Path(folder).resolve()
    confined_path(folder, os.path.join(subfolder, prefix) if subfolder else prefix)
    target_dir.mkdir(parents=True, exist_ok=True)
    tmp = target_dir / f".{prefix}.{os.getpid()}.partial.safetensors"
    save_lora(adapters, tmp, **metadata)
    try:
        existing = {p.name for p in target_dir.iterdir()}
        for n in range(1, max_tries + 1):
            name = f"{prefix}_{n:05d}.safetensors"
            if name in existing:
                continue
            try:
                _publish_exclusive(tmp, target_dir / name)
            except FileExistsError:
                continue
            return target_dir / name
        raise RuntimeError(f"no free file name {prefix}_NNNNN.safetensors left in {target_dir}")
    finally:
        tmp.unlink(missing_ok=True)
