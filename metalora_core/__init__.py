"""Framework-agnostic core of ComfyUI-MetaLoRA (never imports ComfyUI)."""
from __future__ import annotations

__version__ = "0.1.0"
