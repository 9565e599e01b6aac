"""Safe file handling: atomic writes (no half files, no orphan temp files, umask modes),
deterministic safetensors bytes, the one content hash, confined paths."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import signal
import struct
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)


TEMP_SUFFIX = ".tmp"
STALE_AFTER_S = 3600.0  # a temp file without a pid in its name counts as stale after this long


class Terminated(BaseException):
    """Raised in the main thread when the process receives SIGTERM (see ``terminate_on_sigterm``)."""

    exit_code = 128 + signal.SIGTERM


def _raise_terminated(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    raise Terminated(f"terminated by signal {signum}")


def terminate_on_sigterm() -> None:
    """Makes SIGTERM raise ``Terminated`` in the main thread, so ``finally`` blocks (temp-file
    clean-up among them) run before the process ends. Call it from a program's entry point."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


def temp_name(path: Path) -> Path:
    """The project's temp-file name beside ``path``: ``.NAME.<pid>-<random>.tmp``."""
    return path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Removes temp files of this project's naming pattern left beside ``path`` by a killed writer.

    A file ``.NAME.<pid>-<hex>.tmp`` is stale when no process ``<pid>`` is alive; an older-style
    ``.NAME.<8 chars>.tmp`` (no pid) when it is older than ``STALE_AFTER_S``. Temp files of live
    writers and every other file are left alone. Returns the removed paths.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    pattern = re.compile(r"\." + re.escape(path.name) + r"\.(?:(\d+)-[0-9a-f]{8}|[A-Za-z0-9_]{8})" + re.escape(TEMP_SUFFIX))
    removed = []
    now = time.time()
    for p in path.parent.iterdir():
        m = pattern.fullmatch(p.name)
        if not m or not p.is_file():
            continue
        pid = m.group(1)
        try:
            stale = (not _pid_alive(int(pid))) if pid else now - p.stat().st_mtime > STALE_AFTER_S
            if stale:
                p.unlink()
                removed.append(p)
        except OSError:
            continue
    if removed:
        log.info("removed %d stale temp file(s) beside %s: %s", len(removed), path, ", ".join(p.name for p in removed))
    return removed


@contextlib.contextmanager
def _sigterm_cleanup() -> Iterator[None]:
    """While a temp file exists: SIGTERM raises ``Terminated`` so it is removed, then the process
    dies of SIGTERM as it would have. Only where SIGTERM still has its default action."""
    main = threading.current_thread() is threading.main_thread()
    if not main or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    except Terminated:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        raise
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def atomic_target(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temp path beside ``path``; on success it is synced and renamed onto ``path``.

    On an error, Ctrl-C or SIGTERM the temp file is removed: a reader never sees a half file.
    Temp files a killed writer left beside ``path`` (``remove_stale_temps``) are removed first.
    The file gets the mode the process umask gives (0644 under umask 022), like any other tool's.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    with _sigterm_cleanup():
        tmp = temp_name(path)
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)  # the umask applies
        mode = os.fstat(fd).st_mode & 0o777
        os.close(fd)
        done = False
        try:
            yield tmp
            os.chmod(tmp, mode)  # some writers (safetensors) re-create the file as 0600
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
        save_file(data, str(tmp), metadata=dict(sorted((metadata or {}).items())))
        sort_safetensors_header(tmp)
    return Path(path)


def sort_safetensors_header(path: str | os.PathLike) -> None:
    """Rewrites a safetensors header with sorted keys, so equal content gives equal file bytes.

    The writer emits the metadata in hash-map order, which changes from run to run. The tensor
    data and its offsets are left as they are; the header keeps its length (padded with spaces,
    as the format allows) or, when it must grow, the file is rewritten.
    """
    with open(path, "rb+") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        blob = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(blob) <= n:
            f.seek(8)
            f.write(blob + b" " * (n - len(blob)))
            return
        rest = f.read()
        pad = (-len(blob)) % 8
        f.seek(0)
        f.write(struct.pack("<Q", len(blob) + pad) + blob + b" " * pad + rest)
        f.truncate()


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


def content_sha256(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> str:
    """THE identity of a safetensors file: sha256 over its tensors and its metadata.

    Tensors in name order, each as name, dtype, shape and raw bytes (``sha256_tensors``), then
    the metadata as sorted JSON. It does not depend on the byte layout of the file (header key
    order, padding, tensor placement), so a prior or LoRA has one hash wherever it is named:
    ``metalora inspect`` (``content_sha256``), a LoRA's ``prior_sha256`` metadata, meta-train's
    ``summary.json``, ``Prior.sha256``. A download is checked against its published digest with
    ``sha256_file`` (its bytes).
    """
    h = hashlib.sha256(b"metalora.content.v1\0")
    h.update(sha256_tensors(tensors).encode())
    h.update(json.dumps(dict(metadata or {}), sort_keys=True, separators=(",", ":")).encode())
    return h.hexdigest()


def file_content_sha256(path: str | os.PathLike) -> str:
    """``content_sha256`` of a safetensors file (reads it; never unpickles)."""
    tensors, meta = read_safetensors(path)
    return content_sha256(tensors, meta)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in chunks (a download's published digest is of its bytes)."""
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
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
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
