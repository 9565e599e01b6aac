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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..lora.adapter import AdapterSet
from .lora import load_adapter_state, save_adapter_state, save_lora
from .files import confined_path, sha256_tensors

log = logging.getLogger(__name__)


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


def load_cached_adapters(cache_dir: str | os.PathLike, key: str, *,
                         on_ignored: Callable[[str], None] | None = None) -> tuple[AdapterSet, dict[str, str]] | None:
    """The adapters stored under ``key``, or None (missing or unreadable: it is retrained).

    An entry that exists but is ignored is logged, and its one-line reason passed to ``on_ignored``
    (a host app shows it to the user).
    """
    path = cache_path(cache_dir, key)
    if not path.is_file():
        return None
    try:
        adapters, meta = load_adapter_state(path)
    except (ValueError, KeyError, OSError) as e:
        why = f"ignoring unreadable training cache entry {path.name} ({' '.join(str(e).split())}); training again"
    else:
        if meta.get("cache_key") == key:
            return adapters, meta
        why = f"training cache entry {path} holds key {meta.get('cache_key')!r}; training again"
    log.warning("%s", why)
    if on_ignored is not None:
        on_ignored(why)
    return None


def store_cached_adapters(cache_dir: str | os.PathLike, key: str, adapters: AdapterSet, **metadata: object) -> Path:
    """Atomically stores trained adapters under ``key``, with ``metadata`` (their provenance, losses).

    Raises:
        ValueError: ``metadata`` names a different ``cache_key``.
    """
    if metadata.get("cache_key", key) != key:
        raise ValueError(f"metadata cache_key {metadata['cache_key']!r} differs from the entry's key {key!r}")
    metadata["cache_key"] = key
    return save_adapter_state(adapters, cache_path(cache_dir, key), **metadata)


_WINDOWS_FORBIDDEN = '<>:"|?*'
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
_NUMBER_SUFFIX = "_00001.safetensors"


def check_save_name(subfolder: str, prefix: str, *, windows: bool = os.name == "nt") -> tuple[str, str]:
    """Checks a save location given as ``subfolder`` + ``filename_prefix``, before any work.

    Accepts what ComfyUI's Save Image accepts (any letters and spaces; folders in the prefix, as
    ``people/ann``); refuses only an absolute path, a ``.`` or ``..`` part (it would leave the
    folder or name nothing), characters the OS forbids in file names (control characters; on
    Windows also ``<>:"|?*``, reserved names such as ``CON`` and a trailing dot or space), and a
    name too long for a file system. ``\\`` counts as a folder separator.

    Returns:
        (subfolder, prefix) with the prefix's folders moved into the subfolder.

    Raises:
        ValueError: naming the input, the value and the fix (one line).
    """
    parts: list[str] = []
    for what, value in (("subfolder", subfolder), ("filename_prefix", prefix)):
        text = (value or "").strip().replace("\\", "/")
        example = "metalora" if what == "subfolder" else "person"
        if text.startswith("/") or (windows and re.match(r"[A-Za-z]:", text)):
            raise ValueError(f"{what} {value!r} is an absolute path; give a path inside the loras folder, "
                             f"e.g. {example!r}")
        for part in (x.strip() for x in text.split("/")):
            if not part:
                continue
            if part in (".", ".."):
                raise ValueError(f"{what} {value!r}: {part!r} is not a name (it would "
                                 f"{'leave the folder' if part == '..' else 'name no file'}); use a plain name "
                                 f"such as {example!r}")
            bad = sorted({c for c in part if ord(c) < 32 or (windows and c in _WINDOWS_FORBIDDEN)})
            if bad:
                raise ValueError(f"{what} {value!r} holds {', '.join(map(repr, bad))}, which file names cannot "
                                 "contain on this system; remove them")
            if windows and (part.split(".")[0].upper() in _WINDOWS_RESERVED or part[-1] in ". "):
                raise ValueError(f"{what} {value!r}: {part!r} is not a file name Windows allows (a reserved "
                                 "device name, or a trailing dot or space); change it")
            if len(os.fsencode(part + _NUMBER_SUFFIX)) > 240:
                raise ValueError(f"{what} {value!r} is too long for a file name; shorten it")
            parts.append(part)
        if what == "filename_prefix" and (not text.strip("/") or text.endswith("/")):
            raise ValueError(f"filename_prefix {value!r} gives no file name; give one such as 'person'")
    folders, name = parts[:-1], parts[-1]
    return "/".join(folders), name


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
        ValueError: the name is refused by ``check_save_name``, or leaves ``folder`` (a link).
    """
    subfolder, prefix = check_save_name(subfolder, prefix)
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
