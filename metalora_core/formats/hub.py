"""Prior files from a Hugging Face Hub repository, fetched only when a user asks for one.

:func:`download_prior` resolves the revision to a commit, downloads the file with
``huggingface_hub.hf_hub_download`` into a temporary folder beside the destination, checks it
(sha256 against the Hub's LFS ETag when there is one; readable as a prior or as a LoRA usable as
one, finite values) and only then writes it under its final name, atomically, with its
provenance (repo, filename, revision, commit, sha256 of the downloaded bytes) added to the
safetensors metadata. A bad, partial or interrupted download leaves nothing behind.

``HF_TOKEN``, ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` are read when the function is called (not
when ``huggingface_hub`` was imported), so a caller can set them at any time. Nothing here
runs at import.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import torch

from .files import atomic_save_safetensors, read_safetensors, sha256_file
from .prior import Prior, load_prior

log = logging.getLogger(__name__)

_REPO_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_TRUE = {"1", "on", "yes", "true"}


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
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".metalora-download-", dir=dest))
    try:
        got = _fetch(src, commit, tmp, dest)
        sha = sha256_file(got)
        etag = (meta.etag or "").strip('"').lower()
        if _SHA256_RE.fullmatch(etag) and sha != etag:
            raise ValueError(f"{src.repo_id}/{src.filename} @ {commit[:12]}: downloaded bytes have sha256 {sha[:12]}..., "
                             f"the Hub says {etag[:12]}...; the transfer was corrupted; nothing was placed, try again")
        where = f"{src.repo_id}/{src.filename} @ {commit[:12]}"
        try:
            prior = load_prior(got)
        except ValueError as e:
            raise ValueError(f"{where} is not a usable prior: {_one_line(e)}; nothing was placed") from e
        bad = next((k for k, t in prior.downs.items() if not torch.isfinite(t).all()), None)
        if bad is not None:
            raise ValueError(f"{where}: layer {bad!r} holds NaN or inf values; nothing was placed")
        provenance = {"source_repo": src.repo_id, "source_filename": src.filename, "source_revision": src.revision,
                      "source_commit": commit, "source_sha256": sha,
                      "source_url": HubFile(src.repo_id, src.filename, commit).url(_endpoint())}
        tensors, file_meta = read_safetensors(got)
        atomic_save_safetensors(tensors, final, {**file_meta, **provenance})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    prior = replace(prior, provenance=provenance)
    result = Downloaded(final, prior, provenance, reused=False)
    log.info("%s", result.summary())
    return result


def _fetch(src: HubFile, commit: str, tmp: Path, dest: Path) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return Path(hf_hub_download(src.repo_id, src.filename, revision=commit, local_dir=tmp, endpoint=_endpoint()))
    except Exception as e:  # noqa: BLE001 - see _hub_errors
        if "Consistency check failed" in str(e) or not isinstance(e, HfHubHTTPError):
            raise RuntimeError(f"{src.repo_id}/{src.filename}: the transfer was interrupted ({_one_line(e)[:160]}); "
                               f"nothing was placed; run it again, or {manual_hint(src, dest)}") from e
        raise _hub_errors(src, dest, e) from e
