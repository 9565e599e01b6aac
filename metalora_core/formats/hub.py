"""Prior files from a Hugging Face Hub repository, fetched only when a user asks for one.

:func:`download_prior` resolves the revision to a commit (``huggingface_hub``'s metadata
request), transfers the file pinned to that commit into a hidden partial file beside the
destination (``.NAME.<etag>.part``: no loader lists it, its extension is not ``.safetensors``),
checks it (sha256 against the Hub's LFS ETag when there is one; readable as a prior or as a LoRA
usable as one, finite values) and only then writes it under its final name, atomically, with its
provenance (repo, filename, revision, commit, sha256 of the downloaded bytes) added to the
safetensors metadata.

An interrupted transfer (dropped connection, Ctrl-C, SIGKILL) keeps its partial file; the next
download of the same file at the same ETag continues it with an HTTP ``Range`` request instead of
starting again. A bad download (corrupt, not a prior) removes its partial file. Each download
first removes stale leftovers in the destination: partial files of this name for another ETag,
partial files nobody touched for ``PARTIAL_KEEP_S``, and the temporary folders older versions
left (``.metalora-download-*``). A partial file being written by a live process is locked and
never removed.

``HF_TOKEN``, ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` are read when the function is called (not
when ``huggingface_hub`` was imported), so a caller can set them at any time. Nothing here
runs at import.
"""
from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch

from .files import atomic_save_safetensors, read_safetensors, sha256_file
from .prior import Prior, load_prior

log = logging.getLogger(__name__)

_REPO_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_TRUE = {"1", "on", "yes", "true"}
PARTIAL_SUFFIX = ".part"
PARTIAL_KEEP_S = 7 * 24 * 3600.0  # a partial file untouched this long is removed by the next download
_LEGACY_TEMP_PREFIX = ".metalora-download-"  # temporary folders of older versions (hf_hub_download into them)
RETRIES = 4  # a dropped connection is resumed this many times within one download
_CHUNK = 1 << 20


@dataclass(frozen=True)
class HubFile:
    """One file in a Hub model repository at a revision (branch, tag or commit)."""

    repo_id: str
    filename: str
    revision: str = "main"

    def __post_init__(self) -> None:
        if not _REPO_RE.fullmatch(self.repo_id or ""):
            raise ValueError(f"repo id {self.repo_id!r} is not a Hub repository id; write it as 'owner/name'")
        parts = PurePosixPath(self.filename or "").parts
        if not parts or ".." in parts or self.filename.startswith("/") or "\\" in self.filename:
            raise ValueError(f"filename {self.filename!r} must be a path inside the repository, e.g. 'prior.safetensors'")
        if not self.filename.endswith(".safetensors"):
            raise ValueError(f"filename {self.filename!r}: only .safetensors priors are read (never pickles)")
        if not (self.revision or "").strip() or any(c.isspace() for c in self.revision):
            raise ValueError(f"revision {self.revision!r} must be a branch, tag or commit hash, e.g. 'main'")

    def url(self, endpoint: str | None = None) -> str:
        base = (endpoint or "https://huggingface.co").rstrip("/")
        return f"{base}/{self.repo_id}/resolve/{self.revision}/{self.filename}"


@dataclass(frozen=True)
class Downloaded:
    """Where a downloaded prior was placed, the prior itself and its provenance."""

    path: Path
    prior: Prior
    provenance: dict[str, str]
    reused: bool  # True: the file was already there from the same source and commit (or the Hub was unreachable)

    def summary(self) -> str:
        p = self.provenance
        how = "already present" if self.reused else "downloaded"
        return (f"prior {how}: {self.path.name} from {p.get('source_repo')}/{p.get('source_filename')} "
                f"@ {p.get('source_revision')} (commit {p.get('source_commit', '')[:12]}, "
                f"sha256 {p.get('source_sha256', '')[:12]}), r1 {self.prior.r1}, {len(self.prior.downs)} layers")


def _endpoint() -> str | None:
    return (os.environ.get("HF_ENDPOINT") or "").strip().rstrip("/") or None


def _offline() -> bool:
    return any((os.environ.get(k) or "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def manual_hint(src: HubFile, dest: str | os.PathLike) -> str:
    """How to place the file by hand (one line)."""
    return (f"to place it by hand, download {src.url(_endpoint())} (in a browser, or 'hf download {src.repo_id} "
            f"{src.filename} --revision {src.revision} --local-dir DIR' where the Hub is reachable) and copy the "
            f"file into {os.fspath(dest)}")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


class _Unreachable(RuntimeError):
    pass


def _hub_errors(src: HubFile, dest: Path, e: BaseException) -> Exception:
    """A huggingface_hub / transport error -> one clear error naming the fix.

    Anything that is not an HTTP answer from the Hub (connection refused, DNS, timeout, proxy) is
    "unreachable"; the transport's own exception classes differ between huggingface_hub versions.
    """
    from huggingface_hub import errors as hf_errors

    where = f"{src.repo_id}/{src.filename} @ {src.revision}"
    if isinstance(e, getattr(hf_errors, "RemoteEntryNotFoundError", hf_errors.EntryNotFoundError)):
        return FileNotFoundError(f"{where}: the repository has no such file at this revision; check the filename "
                                 f"(names are case-sensitive) and the revision")
    if isinstance(e, hf_errors.RevisionNotFoundError):
        return ValueError(f"{where}: revision {src.revision!r} does not exist in {src.repo_id}; use a branch, tag or commit of it")
    if isinstance(e, hf_errors.GatedRepoError):
        return RuntimeError(f"{where}: the repository is gated; accept its terms on the Hub and set HF_TOKEN to a token of that account")
    if isinstance(e, hf_errors.RepositoryNotFoundError):
        return ValueError(f"{where}: repository {src.repo_id!r} not found, or private (set HF_TOKEN to a token that can read it)")
    if isinstance(e, hf_errors.HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", "?")
        return RuntimeError(f"{where}: the Hub answered HTTP {status} ({_one_line(e)[:200]}); nothing was placed; "
                            f"try again later, or {manual_hint(src, dest)}")
    return _Unreachable(f"{where}: the Hub at {_endpoint() or 'https://huggingface.co'} is unreachable "
                        f"({_one_line(e)[:200]}); {manual_hint(src, dest)}")


def _head(src: HubFile, dest: Path):
    """Metadata (commit, etag, size) of the file at ``src.revision``; raises one clear error."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    url = hf_hub_url(src.repo_id, src.filename, revision=src.revision, endpoint=_endpoint())
    try:
        meta = get_hf_file_metadata(url, endpoint=_endpoint())
    except Exception as e:  # noqa: BLE001 - every Hub or transport failure becomes one clear error
        raise _hub_errors(src, dest, e) from e
    if not meta.commit_hash:
        raise _Unreachable(f"{url} answered without an X-Repo-Commit header, so it is not a Hub endpoint "
                           f"(check HF_ENDPOINT); {manual_hint(src, dest)}")
    return meta


def _matches(prov: dict[str, str], src: HubFile) -> bool:
    return (prov.get("source_repo") == src.repo_id and prov.get("source_filename") == src.filename
            and src.revision in (prov.get("source_revision"), prov.get("source_commit")))


def download_prior(src: HubFile, dest_dir: str | os.PathLike, *, name: str | None = None,
                   force: bool = False) -> Downloaded:
    """Downloads a prior (or a LoRA usable as one) from the Hub into ``dest_dir``.

    An existing file of the same name that came from the same repository, file and revision is
    kept when the Hub reports the same commit, or when the Hub cannot be reached; a file of that
    name from elsewhere is never overwritten unless ``force``.

    Raises:
        ValueError: bad repo id / filename / name, not a usable prior, sha256 mismatch, name taken.
        FileNotFoundError: no such file in the repository.
        RuntimeError: gated repository without access, offline mode, Hub unreachable, interrupted transfer (each with how to place it by hand).
    """
    dest = Path(dest_dir)
    final_name = name or PurePosixPath(src.filename).name
    if "/" in final_name or "\\" in final_name or not final_name.endswith(".safetensors") or final_name.startswith("."):
        raise ValueError(f"name {final_name!r} must be a plain file name ending in .safetensors")
    final = dest / final_name

    if final.exists() and not force:
        try:
            existing = load_prior(final)
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"{final} exists and is not a readable prior ({e}); remove it, or choose another name") from e
        if not _matches(existing.provenance, src):
            came = existing.provenance.get("source_repo")
            raise ValueError(f"{final} already exists ({'from ' + came if came else 'placed by hand'}); "
                             "choose another name, or force to replace it")
        if _offline():
            log.warning("offline mode: using %s as downloaded before (commit %s)", final,
                        existing.provenance.get("source_commit"))
            return Downloaded(final, existing, dict(existing.provenance), reused=True)
        try:
            meta = _head(src, dest)
        except _Unreachable as e:
            log.warning("%s; using %s as downloaded before", e, final)
            return Downloaded(final, existing, dict(existing.provenance), reused=True)
        if meta.commit_hash == existing.provenance.get("source_commit"):
            log.info("%s is up to date (commit %s)", final, meta.commit_hash)
            return Downloaded(final, existing, dict(existing.provenance), reused=True)

    if _offline():
        raise RuntimeError(f"{src.repo_id}/{src.filename}: HF_HUB_OFFLINE is set, so nothing is downloaded; "
                           f"unset it to download, or {manual_hint(src, dest)}")
    meta = _head(src, dest)
    commit = meta.commit_hash
    etag = (meta.etag or "").strip('"').lower()
    dest.mkdir(parents=True, exist_ok=True)
    part = partial_path(dest, final_name, src, etag or commit)
    remove_stale_downloads(dest, final_name, keep=part)
    where = f"{src.repo_id}/{src.filename} @ {commit[:12]}"
    _transfer(_file_url(src, commit), part, meta.size, where, src, dest)
    try:
        sha = sha256_file(part)
        if _SHA256_RE.fullmatch(etag) and sha != etag:
            raise ValueError(f"{where}: downloaded bytes have sha256 {sha[:12]}..., the Hub says {etag[:12]}...; "
                             "the transfer was corrupted; nothing was placed, try again")
        try:
            prior = load_prior(part)
        except ValueError as e:
            raise ValueError(f"{where} is not a usable prior: {_one_line(e)}; nothing was placed") from e
        bad = next((k for k, t in prior.downs.items() if not torch.isfinite(t).all()), None)
        if bad is not None:
            raise ValueError(f"{where}: layer {bad!r} holds NaN or inf values; nothing was placed")
    except ValueError:
        part.unlink(missing_ok=True)  # bad bytes are never resumed
        raise
    provenance = {"source_repo": src.repo_id, "source_filename": src.filename, "source_revision": src.revision,
                  "source_commit": commit, "source_sha256": sha,
                  "source_url": HubFile(src.repo_id, src.filename, commit).url(_endpoint())}
    tensors, file_meta = read_safetensors(part)
    atomic_save_safetensors(tensors, final, {**file_meta, **provenance})
    part.unlink(missing_ok=True)
    result = Downloaded(final, load_prior(final), provenance, reused=False)
    log.info("%s", result.summary())
    return result


def partial_path(dest: str | os.PathLike, final_name: str, src: HubFile, etag: str) -> Path:
    """Where the transfer of ``src`` (at ``etag``, or the commit when there is none) keeps its bytes
    until they are checked: hidden, beside ``final_name``, not ending in ``.safetensors``."""
    tag = hashlib.sha256(f"{src.repo_id}/{src.filename}@{etag}".encode()).hexdigest()[:16]
    return Path(dest) / f".{final_name}.{tag}{PARTIAL_SUFFIX}"


_PARTIAL_RE = re.compile(r"\.(.+)\.[0-9a-f]{16}" + re.escape(PARTIAL_SUFFIX))


def _locked_by_another(path: Path) -> bool:
    """True while another process holds the transfer lock of ``path`` (see ``_open_partial``)."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): partial files are told apart by name and age only
        return False
    try:
        with open(path, "ab") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


def remove_stale_downloads(dest: str | os.PathLike, final_name: str, *, keep: Path | None = None) -> list[Path]:
    """Removes what earlier downloads into ``dest`` left and nobody will continue: partial files of
    ``final_name`` other than ``keep`` (another file or ETag), any partial file untouched for
    ``PARTIAL_KEEP_S``, and older versions' temporary folders. Locked (live) partials stay."""
    dest = Path(dest)
    removed: list[Path] = []
    if not dest.is_dir():
        return removed
    now = time.time()
    for p in dest.iterdir():
        try:
            if p.name.startswith(_LEGACY_TEMP_PREFIX) and p.is_dir():
                shutil.rmtree(p)
                removed.append(p)
                continue
            m = _PARTIAL_RE.fullmatch(p.name)
            if not m or p == keep or not p.is_file():
                continue
            if (m.group(1) == final_name or now - p.stat().st_mtime > PARTIAL_KEEP_S) and not _locked_by_another(p):
                p.unlink()
                removed.append(p)
        except OSError:
            continue
    if removed:
        log.info("removed %d stale download leftover(s) in %s: %s", len(removed), dest,
                 ", ".join(p.name for p in removed))
    return removed


@contextmanager
def _open_partial(part: Path, where: str):
    """The partial file opened for appending, locked against a second download of the same file."""
    f = open(part, "ab")
    try:
        try:
            import fcntl
        except ImportError:
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RuntimeError(f"{where}: another download of this file into {part.parent} is running; "
                                   "wait for it to finish, then run this again") from None
        yield f
    finally:
        f.close()


class _NoAuthAcrossHosts(urllib.request.HTTPRedirectHandler):
    """Follows redirects (the Hub sends LFS files to a CDN) without sending the token to another host."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(newurl).netloc != urllib.parse.urlsplit(req.full_url).netloc:
            new.remove_header("Authorization")
        return new


def _file_url(src: HubFile, commit: str) -> str:
    from huggingface_hub import hf_hub_url

    return hf_hub_url(src.repo_id, src.filename, revision=commit, endpoint=_endpoint())


def _transfer(url: str, part: Path, size: int | None, where: str, src: HubFile, dest: Path) -> None:
    """Fetches ``url`` into ``part``, continuing the bytes already there with HTTP ``Range``.

    A dropped connection, a timeout or a 5xx / 408 / 429 answer is resumed up to ``RETRIES``
    times; then the error says how many bytes are kept for the next run to continue.
    """
    from huggingface_hub.utils import build_hf_headers

    headers = build_hf_headers()
    opener = urllib.request.build_opener(_NoAuthAcrossHosts)
    timeout = float(os.environ.get("HF_HUB_DOWNLOAD_TIMEOUT") or 30)
    last: BaseException | None = None
    with _open_partial(part, where) as f:
        for attempt in range(RETRIES + 1):
            have = f.seek(0, os.SEEK_END)
            if size is not None and have > size:  # not this file's bytes: start again
                f.truncate(0)
                have = 0
            if size is not None and have == size:
                return
            if have:
                log.info("%s: resuming the transfer at byte %d of %s", where, have, size)
            req = urllib.request.Request(url, headers={**headers, **({"Range": f"bytes={have}-"} if have else {})})
            try:
                with opener.open(req, timeout=timeout) as r:
                    if have and (r.status != 206 or not (r.headers.get("Content-Range") or "").startswith(f"bytes {have}-")):
                        f.truncate(0)  # the server sent the whole file instead of the rest
                        have = 0
                        if r.status == 206:
                            raise RuntimeError(f"{where}: the server answered a resumed transfer with the wrong range "
                                               f"({r.headers.get('Content-Range')}); run it again")
                    while chunk := r.read1(_CHUNK):  # what has arrived: a kill loses nothing received
                        f.write(chunk)
                        f.flush()
                f.flush()
                if size is None or f.tell() == size:
                    return
                last = RuntimeError(f"the body ended at byte {f.tell()} of {size}")
            except urllib.error.HTTPError as e:
                f.flush()
                if e.code == 416 and have:  # nothing left after ``have``: the bytes kept are another file's
                    f.truncate(0)
                    last = e
                elif e.code in (408, 429) or e.code >= 500:
                    last = e
                else:
                    raise RuntimeError(f"{where}: the Hub answered HTTP {e.code} to the transfer; nothing was "
                                       f"placed; {manual_hint(src, dest)}") from e
            except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
                f.flush()
                last = e
            if attempt < RETRIES:
                log.warning("%s: the transfer stopped at byte %d (%s); resuming", where, f.tell(), _one_line(last))
                time.sleep(0.1 * 2 ** attempt)
        kept = f.tell()
    raise RuntimeError(f"{where}: the transfer was interrupted ({_one_line(last)[:160]}); nothing was placed; "
                       f"{kept} of {size if size is not None else '?'} bytes are kept in {part.name} and the next "
                       f"download continues them; run it again, or {manual_hint(src, dest)}")
