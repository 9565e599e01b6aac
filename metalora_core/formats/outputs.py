"""Output locations checked before any expensive work: a run never trains and then fails to save.

Each check raises ``ValueError`` (or ``FileExistsError``) naming the flag, the path and the fix.
Nothing is created by a check except a probe file that is removed at once.
"""
from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

from .files import TEMP_SUFFIX, remove_stale_temps

SPACE_MARGIN = 1.1  # free space asked for: expected size x this, plus 1 MiB


def _exists(path: Path) -> bool:
    try:
        os.stat(path)
    except (OSError, ValueError):  # missing, a name too long, a file used as a folder...
        return False
    return True


def _nearest_existing(path: Path) -> Path:
    """The deepest ancestor of ``path`` that exists (``path`` itself if it exists)."""
    p = path
    while not _exists(p) and p != p.parent:
        p = p.parent
    return p


def _name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def _check_parents(path: Path, what: str) -> Path:
    """Refuses a path under a regular file; returns the nearest existing folder."""
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        raise ValueError(f"{what} {path}: {base} is a file, not a folder; choose a path inside a folder")
    return base


def _check_names(path: Path, base: Path, what: str, *, file: bool) -> None:
    """Every component to be created fits the file system's name limit (the file's temp name too)."""
    limit = _name_max(base)
    rel = path.relative_to(base) if path != base and base in path.parents else Path()
    parts = list(rel.parts)
    for i, part in enumerate(parts):
        n = len(os.fsencode(part))
        is_file = file and i == len(parts) - 1
        need = n + len(os.fsencode(f"..{os.getpid()}-00000000{TEMP_SUFFIX}")) if is_file else n
        if need > limit:
            raise ValueError(f"{what} {path}: the name {part[:40]!r}... is {n} bytes long; this file system allows "
                             f"{limit} per name{' (with room for the temp file)' if is_file else ''}; "
                             "choose a shorter name")


def _check_writable(base: Path, path: Path, what: str) -> None:
    """Creates and removes a probe file in ``base``: catches read-only folders and file systems."""
    probe = base / f".metalora-write-probe.{os.getpid()}{TEMP_SUFFIX}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        os.unlink(probe)
    except FileExistsError:
        probe.unlink(missing_ok=True)
    except OSError as e:
        raise ValueError(f"{what} {path}: cannot write in {base} ({e.strerror}); choose a folder you can write to") from e


def _check_space(base: Path, path: Path, what: str, expected_bytes: int | None) -> None:
    if not expected_bytes:
        return
    need = int(expected_bytes * SPACE_MARGIN) + (1 << 20)
    free = shutil.disk_usage(base).free
    if free < need:
        raise ValueError(f"{what} {path}: {free / 2**20:.1f} MiB free in {base}, the output needs about "
                         f"{need / 2**20:.1f} MiB; free some space or choose another disk")


def _same(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def check_output_file(path: str | os.PathLike, *, what: str = "--out", overwrite: bool = False,
                      inputs: Mapping[str, str | os.PathLike | Iterable[str | os.PathLike] | None] | None = None,
                      expected_bytes: int | None = None, suffix: str | None = None) -> Path:
    """Checks that a command may write the file ``path``, before it starts working.

    Refuses: a name not ending in ``suffix`` (when given: what the file is written as); a folder; a path under a regular file; a name too long for the file system; a
    folder it cannot write in; less free space than ``expected_bytes`` needs; one of the
    command's own ``inputs`` (flag -> path or paths), even with ``overwrite``; an existing file
    unless ``overwrite``. Also removes stale temp files a killed earlier run left beside it.

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    if not path.name:
        raise ValueError(f"{what} {str(path)!r} has no file name; give one, e.g. lora.safetensors")
    base = _check_parents(path, what)
    _check_names(path, base, what, file=True)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder; give a file name, e.g. {path / 'lora.safetensors'}")
    for flag, value in (inputs or {}).items():
        if value is None:
            continue
        values = [value] if isinstance(value, (str, os.PathLike)) else list(value)
        for v in values:
            if _same(path, Path(v)):
                raise ValueError(f"{what} {path} is also the {flag} input; writing it would destroy the input, "
                                 "choose another output name")
    if suffix and not path.name.lower().endswith(suffix):
        raise ValueError(f"{what} {path}: the file is written as {suffix.lstrip('.')}, so its name must end in "
                         f"{suffix}; e.g. {path.with_name(path.stem + suffix)}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{what} {path} already exists; pass --overwrite to replace it, or choose another name")
    _check_writable(base, path, what)
    _check_space(base, path, what, expected_bytes)
    remove_stale_temps(path)
    return path


def check_output_folder(path: str | os.PathLike, *, what: str = "--out", expected_bytes: int | None = None) -> Path:
    """Checks that a command may create or write into the folder ``path`` (not a file, writable)."""
    path = Path(path)
    if _exists(path) and not path.is_dir():
        raise ValueError(f"{what} {path} is a file, not a folder; give a folder path")
    base = _check_parents(path / "x", what) if _exists(path) else _check_parents(path, what)
    _check_names(path, base, what, file=False)
    _check_writable(base, path, what)
    _check_space(base, path, what, expected_bytes)
    return path


def check_distinct(what_a: str, a: str | os.PathLike | None, what_b: str, b: str | os.PathLike | None) -> None:
    """Refuses two outputs of one command that name the same file (the second would replace the first)."""
    if a is not None and b is not None and _same(Path(a), Path(b)):
        raise ValueError(f"{what_a} and {what_b} are the same file ({a}); give them different names")


def used_by(folder: str | os.PathLike, names: Iterable[str]) -> list[str]:
    """Which of ``names`` already exist in ``folder`` (sorted)."""
    folder = Path(folder)
    return sorted(n for n in names if (folder / n).exists())


CROP_NAME = re.compile(r"crop_\d{2}_\d+x\d+_s[0-9.e+-]+(?:_flip)?\.png")
CROPS_OWN = ("faces.png", "contact_sheet.png", "crops.json")


def previous_crops(folder: str | os.PathLike) -> list[str]:
    """Files a previous ``crops`` run left in ``folder``: its fixed names and crop PNGs of its pattern."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir()
                  if p.is_file() and (p.name in CROPS_OWN or CROP_NAME.fullmatch(p.name)))


def remove_stale_crops(folder: str | os.PathLike, before: Iterable[str], kept: Iterable[str]) -> list[str]:
    """Removes the previous run's crop files that the new run did not write again; returns them."""
    folder, kept = Path(folder), set(kept)
    gone = sorted(n for n in before if n not in kept and n not in CROPS_OWN)
    for n in gone:
        (folder / n).unlink(missing_ok=True)
    return gone
