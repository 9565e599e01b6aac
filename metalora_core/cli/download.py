"""``metalora download``: fetch a prior from a Hugging Face Hub repository (only when asked)."""
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


def _download(args: argparse.Namespace) -> dict:
    from ..formats.hub import HubFile, download_prior

    result = download_prior(HubFile(args.repo_id, args.filename, args.revision), args.dest, name=args.name,
                            force=args.force)
    return {"path": str(result.path), "reused": result.reused, "r1": result.prior.r1,
            "layers": len(result.prior.downs), "source": result.prior.source, **result.provenance}
