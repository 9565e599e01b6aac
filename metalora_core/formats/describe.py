"""What ``metalora inspect`` says about a safetensors file: kind, layers, ranks, model family,
NaN/inf tensors, malformed LoRA tensors and the content hash (``files.content_sha256``)."""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import torch

from .files import content_sha256, read_safetensors

# Key patterns of the model families a LoRA or checkpoint is commonly made for.
_FAMILIES = (
    ("flux", re.compile(r"(^|[._])(double_blocks|single_blocks|single_transformer_blocks)[._]\d+")),
    ("sd3", re.compile(r"(^|[._])joint_blocks[._]\d+")),
    ("stable-diffusion (unet: SD1.x / SD2 / SDXL)",
     re.compile(r"(^|[._])(down_blocks|up_blocks|input_blocks|output_blocks|mid_block)[._]")),
)
_DOWN_SUFFIXES = (".lora_A.weight", ".lora_down.weight")
_UP_SUFFIXES = (".lora_B.weight", ".lora_up.weight")


def model_family(keys: list[str]) -> str:
    """The family whose key pattern most keys match ("unknown" when none do)."""
    counts = {name: sum(bool(rx.search(k)) for k in keys) for name, rx in _FAMILIES}
    best = max(counts, key=counts.get)
    if counts[best]:
        return best
    if any(re.search(r"(^|\.)transformer_blocks\.\d+", k) for k in keys):
        return "flux"  # diffusers names without single blocks: FLUX double blocks only
    return "unknown"


def nonfinite_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, int]]:
    """name -> counts of NaN and inf values, for floating tensors that hold any."""
    out = {}
    for k, t in tensors.items():
        if t.is_floating_point() and t.numel():
            f = t.float()
            nan, inf = int(torch.isnan(f).sum()), int(torch.isinf(f).sum())
            if nan or inf:
                out[k] = {"nan": nan, "inf": inf}
    return out


def describe_file(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON-ready description of a prior, LoRA or adapter-state file; ``problems`` lists what
    would make it unusable (NaN/inf values, malformed LoRA tensors, another model family)."""
    tensors, meta = read_safetensors(path)
    info: dict[str, Any] = {"file": os.fspath(path), "metadata": dict(meta), "tensors": len(tensors),
                            "content_sha256": content_sha256(tensors, meta)}
    problems: list[str] = []
    keys = sorted(tensors)
    family = model_family(keys)
    info["family"] = family
    if meta.get("format") == "metalora.prior":
        info["kind"] = "prior"
        info["layers"] = sum(k.endswith(".meta_down") for k in tensors)
        bad = sorted({str(t.dtype) for t in tensors.values() if not t.is_floating_point()})
        if bad:
            problems.append(f"integer tensors ({', '.join(bad)}): a prior must hold floating-point Down matrices")
    elif any(k.endswith(_DOWN_SUFFIXES) for k in tensors):
        info["kind"] = "lora"
        downs = {k: t for k, t in tensors.items() if k.endswith(_DOWN_SUFFIXES)}
        info["layers"] = len(downs)
        ranks = set()
        for k, t in sorted(downs.items()):
            if t.ndim != 2:
                problems.append(f"{k} has shape {tuple(t.shape)}; a LoRA down/A matrix must be 2-D (rank, in)")
            else:
                ranks.add(int(t.shape[0]))
        for k, t in sorted(tensors.items()):
            if k.endswith(_UP_SUFFIXES) and t.ndim != 2:
                problems.append(f"{k} has shape {tuple(t.shape)}; a LoRA up/B matrix must be 2-D (out, rank)")
        info["ranks"] = sorted(ranks)
    elif meta.get("format") == "metalora.adapters":
        info["kind"] = "adapter-state"
        info["layers"] = sum(k.endswith(".up") for k in tensors)
    else:
        info["kind"] = "unknown"
    if info["kind"] in ("lora", "prior") and family not in ("flux", "unknown"):
        problems.append(f"the keys are those of a {family} model, not FLUX; Meta-LoRA and FLUX cannot use it")
    bad = nonfinite_tensors(tensors)
    if bad:
        info["nonfinite"] = bad
        first = next(iter(bad))
        problems.append(f"{len(bad)} tensor(s) hold NaN or inf values (e.g. {first}: {bad[first]['nan']} NaN, "
                        f"{bad[first]['inf']} inf); the file is damaged or its training diverged")
    if "training" in meta:
        try:
            info["metadata"]["training"] = json.loads(meta["training"])
        except json.JSONDecodeError:
            pass
    info["problems"] = problems
    return info
