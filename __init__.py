"""ComfyUI-MetaLoRA: ComfyUI entry point (V3 API only; nothing heavy is imported here)."""


async def comfy_entrypoint():
    """Returns the pack's ``ComfyExtension`` (ComfyUI calls this when it loads the pack)."""
    from .nodes.extension import MetaLoRAExtension

    return MetaLoRAExtension()
