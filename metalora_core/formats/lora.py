"""Export: Up * (Mid * Down) as a standard rank-r2 LoRA (paper Sec. 3, last paragraph).

Keys follow the diffusers/peft format that diffusers' ``load_lora_weights`` and
ComfyUI's LoRA loader both read: ``transformer.<canonical>.lora_A.weight`` (r2 x in)
and ``transformer.<canonical>.lora_B.weight`` (out x r2). No alpha key is written, so
every reader applies scale 1 (the adapter scale is folded into lora_B).
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ..lora.adapter import AdapterSet
from ..lora.families import DEFAULT_FAMILY, ModelFamily
from .files import atomic_save_safetensors, read_safetensors

LORA_FORMAT = "metalora.lora"
PREFIX = "transformer."


def lora_state_dict(adapters: AdapterSet, dtype: torch.dtype = torch.float32,
                    stems: Mapping[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Merged LoRA tensors; ``B @ A`` equals each adapter's delta weight.

    Args:
        stems: canonical layer name -> the key stem to write for it instead of
            ``transformer.<canonical>`` (a reader that knows a layer by another name only).
    """
    stems = stems or {}
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, a in adapters.items():
            la, lb = a.lora_factors()
            if not (torch.isfinite(la).all() and torch.isfinite(lb).all()):
                raise ValueError(f"layer {name!r} holds NaN or inf; the training diverged, nothing was exported")
            stem = stems.get(name, f"{PREFIX}{name}")
            out[f"{stem}.lora_A.weight"] = la.detach().to("cpu", dtype).contiguous()
            out[f"{stem}.lora_B.weight"] = lb.detach().to("cpu", dtype).contiguous()
    return out


def lora_metadata(adapters: AdapterSet, family: ModelFamily = DEFAULT_FAMILY, **extra: object) -> dict[str, str]:
    """String metadata of a LoRA of a ``family`` model: Meta-LoRA keys, ``modelspec.*`` and ``extra``."""
    meta = {
        "format": LORA_FORMAT,
        "mode": adapters.mode,
        "rank": str(adapters.rank),
        "r1": str(adapters.r1 or ""),
        "preset": adapters.preset or "",
        "base_model": family.name,
    }
    for k, v in extra.items():
        meta[k] = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    return {**modelspec(adapters, meta.get("resolution"), family), **meta}


def modelspec(adapters: AdapterSet, resolution: object = None,
              family: ModelFamily = DEFAULT_FAMILY) -> dict[str, str]:
    """``modelspec.*`` keys (what LoRA managers read): architecture, title, resolution, date (UTC day)."""
    import datetime

    out = {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": family.modelspec_architecture,
           "modelspec.implementation": family.modelspec_implementation,
           "modelspec.title": f"Meta-LoRA {adapters.mode} rank {adapters.rank}",
           "modelspec.date": datetime.datetime.now(datetime.timezone.utc).date().isoformat()}
    if resolution not in (None, "", "0", 0):
        out["modelspec.resolution"] = f"{resolution}x{resolution}"
    return out


def save_lora(adapters: AdapterSet, path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
              family: ModelFamily = DEFAULT_FAMILY, stems: Mapping[str, str] | None = None,
              **metadata: object) -> Path:
    """Writes the merged LoRA of a ``family`` model atomically, with metadata (steps, prior hash, image hash, ...);
    ``stems`` as in ``lora_state_dict``."""
    return atomic_save_safetensors(lora_state_dict(adapters, dtype, stems), path,
                                   lora_metadata(adapters, family, **metadata))


def load_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Reads a LoRA file (safetensors only) and checks that A/B pairs match up.

    Raises:
        ValueError: unpaired keys or inconsistent shapes, naming the layer.
    """
    tensors, meta = read_safetensors(path)
    check_lora(tensors, str(path))
    return tensors, meta


def check_lora(tensors: Mapping[str, torch.Tensor], where: str = "LoRA") -> None:
    a_keys = {k[: -len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight")}
    b_keys = {k[: -len(".lora_B.weight")] for k in tensors if k.endswith(".lora_B.weight")}
    if not a_keys:
        raise ValueError(f"{where}: no '.lora_A.weight' keys; not a diffusers/peft-format LoRA")
    if a_keys != b_keys:
        odd = sorted(a_keys ^ b_keys)[0]
        raise ValueError(f"{where}: layer {odd!r} has only one of lora_A / lora_B")
    for m in sorted(a_keys):
        a, b = tensors[f"{m}.lora_A.weight"], tensors[f"{m}.lora_B.weight"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"{where}: layer {m!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; ranks differ")


STATE_FORMAT = "metalora.adapters"


def save_adapter_state(adapters: AdapterSet, path: str | os.PathLike, *, family: ModelFamily = DEFAULT_FAMILY,
                       **metadata: object) -> Path:
    """Saves the three-layer adapters (Down, Mid, Up per layer) of a ``family`` model for later export or reuse."""
    tensors: dict[str, torch.Tensor] = {}
    for name, a in adapters.items():
        tensors[f"{name}.down"] = a.down
        if a.mid is not None:
            tensors[f"{name}.mid"] = a.mid
        tensors[f"{name}.up"] = a.up
    meta = lora_metadata(adapters, family, **metadata)
    meta.update(format=STATE_FORMAT, scale=repr(adapters[adapters.names[0]].scale))
    return atomic_save_safetensors(tensors, path, meta)


def load_adapter_state(path: str | os.PathLike) -> tuple[AdapterSet, dict[str, str]]:
    """Reads a file written by ``save_adapter_state``."""
    from ..lora.adapter import LoRAAdapter

    tensors, meta = read_safetensors(path)
    if meta.get("format") != STATE_FORMAT:
        raise ValueError(f"{path}: not a Meta-LoRA adapter state (metadata format={meta.get('format')!r})")
    names = [k[: -len(".up")] for k in tensors if k.endswith(".up")]
    adapters = {}
    for n in names:
        down, up, mid = tensors[f"{n}.down"], tensors[f"{n}.up"], tensors.get(f"{n}.mid")
        a = LoRAAdapter(down.shape[1], up.shape[0], rank=up.shape[1], down=down, mid=mid is not None,
                        scale=float(meta.get("scale", "1.0")))
        with torch.no_grad():
            if mid is not None:
                a.mid.copy_(mid)
            a.up.copy_(up)
        adapters[n] = a
    out = AdapterSet(adapters, mode=meta.get("mode", "meta"), preset=meta.get("preset") or None)
    out.freeze_down(True)
    return out, meta
