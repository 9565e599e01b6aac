"""Canonical layer names and target presets, resolved through the model's family.

Canonical names are the module names of the family's diffusers transformer
(``transformer_blocks.N.attn.to_q``, ``single_transformer_blocks.N.proj_mlp``, ...).
Prior files and exported LoRAs use them; each host maps them onto its own modules.
The tables live in ``families``; a dims object (``FluxDims``, ...) knows its family.
"""
from __future__ import annotations

from typing import Any

from .families import DEFAULT_PRESET, PRESET_NAMES, FluxDims, shared_input_groups

PRESETS = PRESET_NAMES  # "attn", "attn_mlp", "all": every family offers them

__all__ = ["DEFAULT_PRESET", "PRESETS", "FluxDims", "resolve_targets", "shared_input_groups"]


def resolve_targets(preset: str, dims: Any) -> dict[str, tuple[int, int]]:
    """Resolves a preset to concrete canonical layer names and shapes.

    Args:
        preset: one of ``PRESETS`` ("attn", "attn_mlp", "all").
        dims: the host model's widths and depth (its type names the family).

    Returns:
        Ordered mapping canonical name -> (in_features, out_features).

    Raises:
        ValueError: unknown preset.
    """
    return dims.family.resolve(preset, dims)


def check_checkpoint_every(k: int) -> int:
    """A host's ``checkpoint_every``: 0 no checkpointing, 1 every block, k every k-th block.

    Raises:
        ValueError: not an int >= 0.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"checkpoint_every must be an int >= 0 (0 off, 1 every block, k every k-th block), got {k!r}")
    return k
