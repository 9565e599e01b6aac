"""ComfyUI-MetaLoRA: ComfyUI entry point (V3 API only; nothing heavy is imported here)."""

WEB_DIRECTORY = "./web"  # web/docs/<node id>.md: the help page the editor shows for each node


async def comfy_entrypoint():
    """Returns the pack's ``ComfyExtension`` (ComfyUI calls this when it loads the pack)."""
    from .nodes.extension import MetaLoRAExtension

    return MetaLoRAExtension()
