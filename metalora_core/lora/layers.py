"""Canonical FLUX layer names and target presets.

Canonical names are the module names of diffusers' ``FluxTransformer2DModel``
(``transformer_blocks.N.attn.to_q``, ``single_transformer_blocks.N.proj_mlp``, ...).
Prior files and exported LoRAs use them; each host maps them onto its own modules.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

# Per-block layer lists: (suffix, in_kind, out_kind). Kinds are resolved against
# FluxDims: "h" hidden, "m" MLP hidden, "hm" hidden + MLP hidden, "6h"/"3h" multiples.
_DOUBLE_ATTN = (
    ("attn.to_q", "h", "h"),
    ("attn.to_k", "h", "h"),
    ("attn.to_v", "h", "h"),
    ("attn.to_out.0", "h", "h"),
    ("attn.add_q_proj", "h", "h"),
    ("attn.add_k_proj", "h", "h"),
    ("attn.add_v_proj", "h", "h"),
    ("attn.to_add_out", "h", "h"),
)
_DOUBLE_MLP = (
    ("ff.net.0.proj", "h", "m"),
    ("ff.net.2", "m", "h"),
    ("ff_context.net.0.proj", "h", "m"),
    ("ff_context.net.2", "m", "h"),
)
_DOUBLE_MOD = (
    ("norm1.linear", "h", "6h"),
    ("norm1_context.linear", "h", "6h"),
)
_SINGLE_ATTN = (
    ("attn.to_q", "h", "h"),
    ("attn.to_k", "h", "h"),
    ("attn.to_v", "h", "h"),
)
_SINGLE_MLP = (
    ("proj_mlp", "h", "m"),
    ("proj_out", "hm", "h"),
)
_SINGLE_MOD = (("norm.linear", "h", "3h"),)

# Preset name -> (double-block layers, single-block layers).
PRESETS: dict[str, tuple[tuple[tuple[str, str, str], ...], tuple[tuple[str, str, str], ...]]] = {
    # attention projections only
    "attn": (_DOUBLE_ATTN, _SINGLE_ATTN),
    # attention + feed-forward
    "attn_mlp": (_DOUBLE_ATTN + _DOUBLE_MLP, _SINGLE_ATTN + _SINGLE_MLP),
    # every Linear of the transformer blocks, modulation included: what ai-toolkit trains on FLUX
    # by default (the paper names no target set; it says it was implemented with ai-toolkit)
    "all": (_DOUBLE_ATTN + _DOUBLE_MLP + _DOUBLE_MOD, _SINGLE_ATTN + _SINGLE_MLP + _SINGLE_MOD),
}
DEFAULT_PRESET = "all"  # FLUX.1-dev: 494 layers (attn_mlp: 418)

# Layers of one block that read the same input tensor in diffusers' FLUX blocks (q, k and v of
# each stream; in a single block proj_mlp too): their Down projections can run as one matmul.
SHARED_INPUT_SUFFIXES = (
    ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
)


def shared_input_groups(names: Iterable[str]) -> list[tuple[str, ...]]:
    """Groups of canonical layer names that read one input (``SHARED_INPUT_SUFFIXES``), 2+ each."""
    groups: dict[tuple[str, int], list[str]] = {}
    for name in names:
        for i, suffixes in enumerate(SHARED_INPUT_SUFFIXES):
            hit = next((s for s in suffixes if name.endswith("." + s)), None)
            if hit is not None:
                groups.setdefault((name[: -len(hit)], i), []).append(name)
                break
    return [tuple(g) for g in groups.values() if len(g) > 1]


@dataclass(frozen=True)
class FluxDims:
    """Widths and depth of a FLUX transformer, enough to name and size its layers."""

    hidden: int = 3072  # inner width (heads x head dim); FLUX.1-dev: 24 x 128
    mlp_hidden: int = 12288  # feed-forward width; FLUX uses 4 x hidden
    num_double: int = 19  # double-stream (MM-DiT) blocks
    num_single: int = 38  # single-stream blocks

    def __post_init__(self) -> None:
        for field in ("hidden", "mlp_hidden"):
            if getattr(self, field) <= 0:
                raise ValueError(f"FluxDims.{field} must be positive, got {getattr(self, field)}")
        for field in ("num_double", "num_single"):
            if getattr(self, field) < 0:
                raise ValueError(f"FluxDims.{field} must be >= 0, got {getattr(self, field)}")

    def width(self, kind: str) -> int:
        return {
            "h": self.hidden,
            "m": self.mlp_hidden,
            "hm": self.hidden + self.mlp_hidden,
            "6h": 6 * self.hidden,
            "3h": 3 * self.hidden,
        }[kind]

    @classmethod
    def from_diffusers_config(cls, config: Any) -> "FluxDims":
        """Reads the dims from a diffusers ``FluxTransformer2DModel.config``."""
        get = config.get if isinstance(config, dict) else (lambda k: getattr(config, k))
        hidden = int(get("num_attention_heads")) * int(get("attention_head_dim"))
        return cls(
            hidden=hidden,
            mlp_hidden=4 * hidden,
            num_double=int(get("num_layers")),
            num_single=int(get("num_single_layers")),
        )


def resolve_targets(preset: str, dims: FluxDims) -> dict[str, tuple[int, int]]:
    """Resolves a preset to concrete canonical layer names and shapes.

    Args:
        preset: one of ``PRESETS`` ("attn", "attn_mlp", "all").
        dims: the host model's widths and depth.

    Returns:
        Ordered mapping canonical name -> (in_features, out_features).

    Raises:
        ValueError: unknown preset.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown target preset {preset!r}; choose one of {sorted(PRESETS)}")
    double, single = PRESETS[preset]
    out: dict[str, tuple[int, int]] = {}
    for i in range(dims.num_double):
        for suffix, kin, kout in double:
            out[f"transformer_blocks.{i}.{suffix}"] = (dims.width(kin), dims.width(kout))
    for i in range(dims.num_single):
        for suffix, kin, kout in single:
            out[f"single_transformer_blocks.{i}.{suffix}"] = (dims.width(kin), dims.width(kout))
    return out
