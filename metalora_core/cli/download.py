"""``metalora download`` (fetch a prior from a Hugging Face Hub repository, only when asked) and
``metalora cache-prune`` (keep the trained-adapter cache under a size limit)."""
from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("download", help="download a prior (or a LoRA usable as one) from a Hugging Face Hub repository",
                       description="Downloads REPO_ID/FILENAME, checks it is a usable prior and only then places it "
                                   "in --dest, with its repo, revision, commit and sha256 in its metadata. Honours "
                                   "HF_TOKEN, HF_ENDPOINT and HF_HUB_OFFLINE.")
    p.add_argument("repo_id", metavar="REPO_ID", help="Hub model repository, e.g. owner/name")
    p.add_argument("filename", metavar="FILENAME", help="file in the repository (.safetensors)")
    p.add_argument("--revision", default="main", help="branch, tag or commit (default main)")
    p.add_argument("--dest", default=".", help="folder to place the file in (default: the current folder; "
                                               "for ComfyUI use ComfyUI/models/meta_lora)")
    p.add_argument("--name", help="file name to place it under (default: the file's own name)")
    p.add_argument("--force", action="store_true", help="replace a file of that name from another source")
    p.set_defaults(func=_download)

    p = sub.add_parser("cache-prune", help="keep the trained-adapter cache under a size limit (oldest entries go first)")
    p.add_argument("folder", help="the cache folder, e.g. ComfyUI/models/meta_lora/cache")
    p.add_argument("--max-size", default="2G", help="size to keep, e.g. 500M, 2G (default 2G; 0 empties it)")
    p.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    p.set_defaults(func=_cache_prune)


def _download(args: argparse.Namespace) -> dict:
    from ..formats.hub import HubFile, download_prior

    result = download_prior(HubFile(args.repo_id, args.filename, args.revision), args.dest, name=args.name,
                            force=args.force)
    return {"path": str(result.path), "reused": result.reused, "r1": result.prior.r1,
            "layers": len(result.prior.downs), "source": result.prior.source, **result.provenance}


def _cache_prune(args: argparse.Namespace) -> dict:
    from ..formats.cache_prune import parse_size, prune_cache

    r = prune_cache(args.folder, parse_size(args.max_size), dry_run=args.dry_run)
    return {"removed" if not args.dry_run else "would_remove": [p.name for p in r.removed],
            "kept": len(r.kept), "bytes_before": r.bytes_before, "bytes_after": r.bytes_after}
