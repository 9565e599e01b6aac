"""What ``metalora inspect`` says about a safetensors file: kind, layers, ranks, model family,
NaN/inf tensors, malformed LoRA tensors and the content hash (``files.content_sha256``)."""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import torch

from ..lora.families import FAMILIES
from .files import content_sha256, read_safetensors
from .prior import PRIOR_FORMAT, prior_from_tensors

# Key patterns of the model families a LoRA or checkpoint is commonly made for; the first three are
# the ones Meta-LoRA trains (``TRAINED``). Layers only FLUX.2 and Z-Image have come first: FLUX.2 also
# has FLUX.1's block names.
_FAMILIES = (
    ("flux.2", re.compile(r"(^|[._])(to_qkv_mlp_proj|(ff|ff_context)[._]linear_(in|out)|"
                          r"(double|single)_stream_modulation)([._]|$)")),
    ("z-image", re.compile(r"(^|[._])(noise_refiner|context_refiner|layers[._]\d+[._](attention|feed_forward|"
                           r"adaLN_modulation))[._]")),
    ("flux", re.compile(r"(^|[._])(double_blocks|single_blocks|single_transformer_blocks)[._]\d+")),
    ("sd3", re.compile(r"(^|[._])joint_blocks[._]\d+")),
    ("stable-diffusion (unet: SD1.x / SD2 / SDXL)",
     re.compile(r"(^|[._])(down_blocks|up_blocks|input_blocks|output_blocks|mid_block)[._]")),
)
_DOWN_SUFFIXES = (".lora_A.weight", ".lora_down.weight")
_UP_SUFFIXES = (".lora_B.weight", ".lora_up.weight")


TRAINED = ("flux", "flux.2", "z-image")  # the labels of FLUX.1-dev, FLUX.2 and Z-Image


def model_family(keys: list[str]) -> str:
    """The family whose key pattern most keys match ("unknown" when none do); a key of a layer only
    FLUX.2 or Z-Image has decides for that family."""
    counts = {name: sum(bool(rx.search(k)) for k in keys) for name, rx in _FAMILIES}
    for name in ("flux.2", "z-image"):
        if counts[name]:
            return name
    best = max(counts, key=counts.get)
    if counts[best]:
        return best
    if any(re.search(r"(^|\.)transformer_blocks\.\d+", k) for k in keys):
        return "flux"  # diffusers names without single blocks: FLUX double blocks only
    return "unknown"


def trained_titles() -> str:
    """The families Meta-LoRA trains, for messages: "FLUX.1-dev, FLUX.2 or Z-Image"."""
    titles = [f.title for f in FAMILIES.values()]
    return ", ".join(titles[:-1]) + " or " + titles[-1]


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
    would make it unusable: for a prior or LoRA, what ``load_prior`` refuses (the same checks:
    ``prior_from_tensors``), and NaN/inf values, malformed LoRA up/B tensors, another model family."""
    tensors, meta = read_safetensors(path)
    info: dict[str, Any] = {"file": os.fspath(path), "metadata": dict(meta), "tensors": len(tensors),
                            "content_sha256": content_sha256(tensors, meta)}
    problems: list[str] = []
    keys = sorted(tensors)
    family = model_family(keys)
    info["family"] = family
    if meta.get("format") == PRIOR_FORMAT:
        info["kind"] = "prior"
        info["layers"] = sum(k.endswith(".meta_down") for k in tensors)
    elif any(k.endswith(_DOWN_SUFFIXES) for k in tensors):
        info["kind"] = "lora"
        downs = {k: t for k, t in tensors.items() if k.endswith(_DOWN_SUFFIXES)}
        info["layers"] = len(downs)
        info["ranks"] = sorted({int(t.shape[0]) for t in downs.values() if t.ndim == 2})
        for k, t in sorted(tensors.items()):
            if k.endswith(_UP_SUFFIXES) and t.ndim != 2:
                problems.append(f"{k} has shape {tuple(t.shape)}; a LoRA up/B matrix must be 2-D (out, rank)")
    elif meta.get("format") == "metalora.adapters":
        info["kind"] = "adapter-state"
        info["layers"] = sum(k.endswith(".up") for k in tensors)
    else:
        info["kind"] = "unknown"
    refused = None
    if info["kind"] in ("lora", "prior"):
        try:
            prior_from_tensors(tensors, meta, os.path.basename(path))
        except ValueError as e:
            refused = str(e)
            problems.insert(0, f"not usable as a prior: {refused}")
    if info["kind"] in ("lora", "prior") and family not in (*TRAINED, "unknown") and family not in (refused or ""):
        problems.append(f"the keys are those of a {family} model, not {trained_titles()}; Meta-LoRA cannot use it")
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
