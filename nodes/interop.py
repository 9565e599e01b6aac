"""Values for ComfyUI's core training sockets, made from a trained Meta-LoRA.

``LORA_MODEL`` is what core ``TrainLoraNode`` outputs and ``SaveLoRA`` / ``LoraModelLoader``
read: a flat dict of LoRA tensors in a key layout ``comfy.lora_convert`` + ``comfy.lora`` map
onto the model (here the merged rank-r2 ``lora_A``/``lora_B`` pairs, exactly what Meta-LoRA
Save writes). ``LOSS_MAP`` is ``{"loss": [float per step]}``, as ``LossGraphNode`` plots it.
"""
from __future__ import annotations

import torch

from ..metalora_core.formats.lora import lora_state_dict
from ..metalora_core.lora.adapter import AdapterSet
from ..metalora_core.lora.families import ModelFamily
from ..metalora_core.train.stage2 import TrainResult


def comfy_lora_stems(adapters: AdapterSet, family: ModelFamily) -> dict[str, str]:
    """LoRA key stems for the layers ComfyUI's LoRA loader knows by their ComfyUI names only: the
    top-level (unnumbered) layers, FLUX.2's shared modulation Linears, which ComfyUI 0.33's
    diffusers key map (``comfy.utils.flux_to_diffusers``, numbered blocks only) lacks. They are
    written as ``diffusion_model.<ComfyUI module>``, a key ComfyUI maps for every weight."""
    out: dict[str, str] = {}
    for group, table in zip(family.groups, family.comfy_names):
        if group.depth is not None:
            continue
        for comfy_name, canonical in table.items():
            if len(canonical) == 1 and group.module(0, canonical[0]) in adapters.names:
                out[group.module(0, canonical[0])] = f"diffusion_model.{group.module(0, comfy_name, comfy=True)}"
    return out


def lora_model(trained: TrainResult, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The LORA_MODEL socket value: merged LoRA tensors (``B @ A`` = each layer's trained delta), in
    the keys Meta-LoRA Save writes (``comfy_lora_stems``)."""
    return lora_state_dict(trained.adapters, dtype, comfy_lora_stems(trained.adapters, trained.family))


def loss_map(losses: list[float]) -> dict[str, list[float]]:
    """The LOSS_MAP socket value: one loss per training step (empty when the run came from a cache without them)."""
    return {"loss": [float(x) for x in losses]}


def describe_prior(prior) -> str:
    """One line naming the prior a training uses (or that there is none)."""
    if prior is None:
        return "no prior: training a plain LoRA (the paper's baseline)"
    kind = f"preset {prior.preset}" if prior.preset else f"from a {prior.source} LoRA"
    where = prior.provenance
    src = f", {where['source_repo']}/{where.get('source_filename', '')} @ {where.get('source_commit', '')[:12]}" \
        if where.get("source_repo") else ""
    return f"prior: r1 {prior.r1}, {len(prior.downs)} layers, {kind}, sha256 {prior.sha256[:12]}{src}"


def run_summary(trained: TrainResult, prior) -> str:
    """What the node shows when the run is over: loss, steps and the prior used."""
    losses = trained.losses
    loss = f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps" if losses else "no loss record"
    where = " (from the cache)" if trained.from_cache else ""
    return f"done{where}: {loss}; {describe_prior(prior)}"


def labelled(image: torch.Tensor, text: str) -> torch.Tensor:
    """A ComfyUI IMAGE (1, H, W, 3) with ``text`` written in a band above it (wrapped to the width)."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    pil = Image.fromarray((image[0].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy())
    font = ImageFont.load_default()
    per_line = max(20, pil.width // 6)
    words, lines, line = text.split(), [], ""
    for w in words:
        if len(line) + len(w) + 1 > per_line and line:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    lines.append(line)
    out = Image.new("RGB", (pil.width, pil.height + 8 + 14 * len(lines)), (255, 255, 255))
    out.paste(pil, (0, out.height - pil.height))
    d = ImageDraw.Draw(out)
    for k, ln in enumerate(lines):
        d.text((6, 4 + 14 * k), ln, fill=(20, 20, 20), font=font)
    return torch.from_numpy(np.asarray(out, dtype=np.float32) / 255.0)[None]
