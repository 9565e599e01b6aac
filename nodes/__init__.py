"""ComfyUI layer of the pack: the only code that imports comfy (imported lazily by the entry point)."""
