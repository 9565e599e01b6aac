"""The V3 extension object ComfyUI gets from ``comfy_entrypoint``."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .eval_nodes import EVAL_NODES
from .folders import register_folders


class MetaLoRAExtension(ComfyExtension):
    async def on_load(self) -> None:
        register_folders()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        from .definitions import NODES
        from .download import DOWNLOAD_NODES

        return [*NODES, *DOWNLOAD_NODES, *EVAL_NODES]
