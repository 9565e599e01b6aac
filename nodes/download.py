"""The prior download node: fetches a prior from a Hub repository into models/meta_lora when it runs."""
from __future__ import annotations

import logging

import folder_paths
from comfy_api.latest import io

from ..metalora_core.formats.hub import HubFile, download_prior
from .definitions import MetaLoRAPrior
from .folders import PRIOR_FOLDER, register_folders
from .training import send_text

log = logging.getLogger(__name__)


def prior_download_folder() -> str:
    """The first registered meta_lora folder (models/meta_lora unless extra_model_paths.yaml names one)."""
    if PRIOR_FOLDER not in folder_paths.folder_names_and_paths:
        register_folders()
    return folder_paths.get_folder_paths(PRIOR_FOLDER)[0]


class MetaLoRAPriorDownload(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MetaLoRAPriorDownload", display_name="Meta-LoRA Prior Download", category="MetaLoRA/loaders",
            search_aliases=["download prior", "hugging face", "hub download"],
            description="Downloads a Meta-Down prior (or a FLUX LoRA usable as one) from a Hugging Face Hub "
                        "repository into models/meta_lora when the graph runs, checks it before placing it, and "
                        "outputs it like the Prior Loader. Uses HF_TOKEN, HF_ENDPOINT and HF_HUB_OFFLINE.",
            inputs=[
                io.String.Input("repo_id", default="", tooltip="Hub model repository, e.g. owner/name."),
                io.String.Input("filename", default="", tooltip="The .safetensors file in that repository (may include a folder)."),
                io.String.Input("revision", default="main", tooltip="Branch, tag or commit hash; a commit pins the exact file."),
            ],
            outputs=[MetaLoRAPrior.Output(display_name="prior"), io.String.Output(display_name="info")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, repo_id: str, filename: str, revision: str) -> io.NodeOutput:
        src = HubFile(repo_id.strip(), filename.strip(), revision.strip() or "main")
        node_id = getattr(getattr(cls, "hidden", None), "unique_id", None)
        send_text(f"downloading {src.repo_id}/{src.filename} @ {src.revision} ...", node_id)
        got = download_prior(src, prior_download_folder())
        folder_paths.filename_list_cache.pop(PRIOR_FOLDER, None)  # the Prior Loader lists it now
        info = got.summary()
        send_text(info, node_id)
        return io.NodeOutput(got.prior, info, ui={"text": [info]})


DOWNLOAD_NODES: list[type[io.ComfyNode]] = [MetaLoRAPriorDownload]
