"""Keeps the trained-adapter cache (``models/meta_lora/cache``) under a size limit.

Only cache entries are ever touched: files named ``<sha256 hex>.safetensors`` (what
``formats.store.cache_path`` writes) and leftover ``.<name>.*.tmp`` files of interrupted writes.
The oldest entries go first (by modification time: when they were stored).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

_ENTRY = re.compile(r"[0-9a-f]{64}\.safetensors")
_TMP = re.compile(r"\.[0-9a-f]{64}\.safetensors\..*\.tmp")
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "m": 2**20, "mb": 2**20, "g": 2**30, "gb": 2**30, "t": 2**40, "tb": 2**40}


def parse_size(text: str) -> int:
    """'500M', '2G', '1.5gb', '0' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text or "")
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"size {text!r}: write a number with an optional unit K, M, G or T, e.g. 2G")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass(frozen=True)
class PruneResult:
    kept: list[Path]
    removed: list[Path]
    bytes_before: int
    bytes_after: int


def prune_cache(folder: str | os.PathLike, max_bytes: int, *, dry_run: bool = False) -> PruneResult:
    """Removes the oldest cache entries until the rest takes at most ``max_bytes``; temp leftovers always go.

    Raises:
        FileNotFoundError: no such folder.
        ValueError: negative limit.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no cache folder at {folder}")
    if max_bytes < 0:
        raise ValueError(f"max size must be >= 0, got {max_bytes}")
    entries = sorted((p for p in folder.iterdir() if p.is_file() and _ENTRY.fullmatch(p.name)),
                     key=lambda p: (p.stat().st_mtime, p.name))
    temps = [p for p in folder.iterdir() if p.is_file() and _TMP.fullmatch(p.name)]
    sizes = {p: p.stat().st_size for p in entries}
    before = sum(sizes.values()) + sum(p.stat().st_size for p in temps)
    total = sum(sizes.values())
    removed = list(temps)
    kept = list(entries)
    while kept and total > max_bytes:
        oldest = kept.pop(0)
        total -= sizes[oldest]
        removed.append(oldest)
    if not dry_run:
        for p in removed:
            p.unlink(missing_ok=True)
    return PruneResult(kept=kept, removed=removed, bytes_before=before, bytes_after=total)
