"""Safe file handling: atomic safetensors writes, content hashes, confined paths."""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


@contextlib.contextmanager
def atomic_target(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temp path beside ``path``; on success it is synced and renamed onto ``path``.

    On an error or an interrupt the temp file is removed: a reader never sees a half file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp, done = Path(name), False
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        done = True
    finally:
        if not done:
            tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Writes ``data`` to ``path`` atomically (temp file in the same folder + rename)."""
    with atomic_target(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_save_png(image, path: str | os.PathLike) -> Path:
    """Saves a PIL image as PNG atomically."""
    with atomic_target(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


def atomic_save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> Path:
    """Saves tensors as safetensors atomically: a reader never sees a half file."""
    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_target(path) as tmp:
        save_file(data, str(tmp), metadata=dict(metadata or {}))
    return Path(path)


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Loads tensors and metadata from a safetensors file (never unpickles).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a readable safetensors file (corrupt, truncated).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(
            f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupt, "
            "re-download or re-create it"
        ) from e
    return tensors, metadata


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tensors(tensors: Mapping[str, torch.Tensor]) -> str:
    """Content hash of named tensors, independent of file layout and metadata."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().to("cpu").contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def confined_path(folder: str | os.PathLike, name: str) -> Path:
    """Joins a user-given relative ``name`` onto ``folder`` and refuses escapes.

    Raises:
        ValueError: ``name`` is empty, absolute, or resolves outside ``folder``.
    """
    if not name or not name.strip():
        raise ValueError("file name is empty; give a name such as 'metalora/person'")
    if os.path.isabs(name) or name.startswith(("\\", "/")) or (len(name) > 1 and name[1] == ":"):
        raise ValueError(f"file name {name!r} is absolute; give a path relative to {folder}")
    base = Path(folder).resolve()
    target = (base / name).resolve()
    if target != base and base not in target.parents:
        raise ValueError(f"file name {name!r} leaves the folder {base}; remove '..' from it")
    return target
