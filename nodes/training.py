"""What the ComfyUI nodes do, outside the node classes: conversions, training run, cache, apply."""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

import comfy.lora
import comfy.lora_convert
import comfy.model_management
import comfy.utils
import folder_paths

from ..metalora_core.lora.adapter import AdapterSet
from ..metalora_core.formats.lora import lora_state_dict
from ..metalora_core.formats.files import sha256_tensors
from ..metalora_core.lora.flow import add_noise
from ..metalora_core.lora.layers import DEFAULT_PRESET
from ..metalora_core.draw.charts import line_plot
from ..metalora_core.formats.prior import Prior
from ..metalora_core.train.recipe import FaceCrops, build_adapters
from ..metalora_core.faces import resize_to_bucket
from ..metalora_core.formats.store import content_key, image_digest, load_cached_adapters, store_cached_adapters
from ..metalora_core.train.stage2 import Stage2Config, personalize
from .comfy_host import ComfyFluxCond, ComfyFluxHost
from .folders import cache_folder

log = logging.getLogger(__name__)


@dataclass
class TrainedLoRA:
    """The META_LORA socket value: trained adapters plus how they were made."""

    adapters: AdapterSet
    losses: list[float] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------- conversions


def image_to_pils(image: torch.Tensor) -> list[Image.Image]:
    """ComfyUI IMAGE (B, H, W, 3) float in [0, 1] -> list of PIL RGB."""
    if image.ndim != 4 or image.shape[-1] < 3:
        raise ValueError(f"IMAGE has shape {tuple(image.shape)}; expected (batch, height, width, 3)")
    a = (image[..., :3].detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return [Image.fromarray(x) for x in a]


def pils_to_image(images: list[Image.Image]) -> torch.Tensor:
    """List of same-size PIL images -> ComfyUI IMAGE (B, H, W, 3)."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
    return torch.from_numpy(arr)


def encode_crops(vae: Any, model: Any, images: list[Image.Image]) -> list[torch.Tensor]:
    """VAE-encodes crops into the model's latent space, one batch per crop size: (C, h, w) each."""
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        by_size.setdefault(im.size, []).append(i)
    out: list[torch.Tensor | None] = [None] * len(images)
    for idx in by_size.values():
        with torch.no_grad():  # no autograd here: VAE weights may be inference tensors
            z = vae.encode(pils_to_image([images[i] for i in idx]))  # (n, C, h, w) raw VAE latents
            z = model.model.process_latent_in(z.float()).float().cpu()
        for j, i in enumerate(idx):
            out[i] = z[j].clone()  # clone(): a normal tensor, not a view into the batch
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------- fingerprints / cache key


def model_fingerprint(model: Any, samples: int = 4) -> str:
    """Cheap model identity: all shapes, a few weight hashes, the patch keys and strengths."""
    sd = model.model.diffusion_model.state_dict()
    keys = sorted(sd)
    h = hashlib.sha256()
    for k in keys:
        h.update(f"{k}{tuple(sd[k].shape)}{sd[k].dtype};".encode())
    step = max(1, len(keys) // samples)
    picked = {k: sd[k] for k in keys[::step][:samples] + keys[-1:]}
    h.update(sha256_tensors(picked).encode())
    for k in sorted(model.patches):
        h.update(f"{k}:{[(p[0], p[2], p[3]) for p in model.patches[k]]};".encode())
    return h.hexdigest()


def cond_digest(cond: ComfyFluxCond) -> str:
    t = {"context": cond.context}
    if cond.y is not None:
        t["y"] = cond.y
    return sha256_tensors(t)


# ---------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 375
    rank: int = 1
    lr: float = 4e-4
    seed: int = 0
    resolution: int = 512
    guidance: float = 1.0
    gradient_checkpointing: bool = False
    preview_every: int = 25
    force_retrain: bool = False
    preset: str = DEFAULT_PRESET
    memory: str = "auto"  # "fast" (no checkpointing), "low" (every block), "auto" (what fits)


MEMORY_CHOICES = ("auto", "fast", "low")
# Bytes autograd keeps per token, per block and per unit of hidden width in one Stage-2 step
# (measured with bench/gpu_stage2.py: ~15 activations of the hidden width per token and block,
# adapters included); a checkpointed block keeps only its input (1 per token and width).
_SAVED_PER_TOKEN_WIDTH = 15
_CKPT_PER_TOKEN_WIDTH = 1


def checkpoint_plan(memory: str, gradient_checkpointing: bool, *, blocks: int, tokens: int, hidden: int,
                    element_size: int, free_bytes: int | None) -> int:
    """How many blocks apart to checkpoint: 0 none, 1 every block, k every k-th block.

    ``gradient_checkpointing`` on always means every block (what the switch did before ``memory``
    existed). "fast": none; "low": every block; "auto": none when the estimated activations fit
    in 80% of ``free_bytes`` (None: unknown, e.g. on the CPU: none), else the widest spacing
    that fits, else every block.

    Raises:
        ValueError: ``memory`` is not one of ``MEMORY_CHOICES``.
    """
    if memory not in MEMORY_CHOICES:
        raise ValueError(f"memory must be one of {MEMORY_CHOICES}, got {memory!r}")
    if gradient_checkpointing or memory == "low":
        return 1
    if memory == "fast" or free_bytes is None:
        return 0
    full = tokens * hidden * element_size * _SAVED_PER_TOKEN_WIDTH
    kept = tokens * hidden * element_size * _CKPT_PER_TOKEN_WIDTH
    budget = 0.8 * free_bytes
    for k in [0] + list(range(blocks, 1, -1)):  # no checkpointing first, then ever denser
        n_ckpt = 0 if k == 0 else len(range(0, blocks, k))
        if (blocks - n_ckpt) * full + n_ckpt * kept <= budget:
            return k
    return 1


class _Progress:
    """Per-step callback: progress bar + loss text, previews every N steps, interrupt check."""

    def __init__(self, node_id: str | None, settings: TrainSettings, host: ComfyFluxHost, vae: Any,
                 latent: torch.Tensor, cond: ComfyFluxCond) -> None:
        self.node_id, self.s, self.host, self.vae, self.latent, self.cond = node_id, settings, host, vae, latent, cond
        self.pbar = comfy.utils.ProgressBar(settings.steps, node_id=node_id)

    def text(self, msg: str) -> None:
        send_text(msg, self.node_id)

    def preview(self) -> tuple:
        gen = torch.Generator().manual_seed(self.s.seed)
        x0 = self.latent[None]  # (1, C, h, w)
        noise = torch.randn(x0.shape, generator=gen)
        sigma = torch.tensor([0.6])
        with torch.no_grad():
            x_t = add_noise(x0, noise, sigma)
            v = self.host.predict(x_t, sigma, self.cond).float().cpu()
            pred = x_t - sigma * v  # one-step x0 prediction
            img = self.vae.decode(self.host.source.model.process_latent_out(pred))  # (1, H, W, 3)
        return ("JPEG", image_to_pils(img.reshape(-1, *img.shape[-3:])[:1])[0], 512)

    def __call__(self, step: int, loss: float) -> None:
        n = self.s.preview_every
        preview = self.preview() if n > 0 and (step % n == 0 or step == self.s.steps) else None
        self.pbar.update_absolute(step, self.s.steps, preview)
        self.text(f"step {step}/{self.s.steps}  loss {loss:.4f}")
        # the progress hook is throttled; this check is not: cancel lands within one step
        comfy.model_management.throw_exception_if_processing_interrupted()


def send_text(msg: str, node_id: str | None) -> None:
    """Progress text under the node in the UI (no-op without a server or node id)."""
    try:
        from server import PromptServer
    except ImportError:
        return
    srv = getattr(PromptServer, "instance", None)
    if srv is not None and node_id is not None:
        srv.send_progress_text(msg, node_id)


def train_meta_lora(model: Any, vae: Any, prior: Prior | None, crops: FaceCrops, positive: list,
                    settings: TrainSettings, node_id: str | None = None) -> TrainedLoRA:
    """Stage-2 on a ComfyUI FLUX MODEL (its clone), with the disk cache in front.

    The caller's MODEL is never patched: the host works on a clone and drops it in ``finally``.
    """
    with torch.inference_mode(False):  # nodes run in inference mode; training needs normal tensors
        return _train(model, vae, prior, crops, positive, settings, node_id)


def _plan_checkpointing(model: Any, settings: TrainSettings, images: list, cond: ComfyFluxCond) -> int:
    """``checkpoint_plan`` for this run: the largest crop's tokens, the card's free memory."""
    dm = model.model.diffusion_model
    tokens = max(im.size[0] * im.size[1] for im in images) // 256 + cond.context.shape[1]  # 16 px per token
    dev = model.load_device
    free = None
    if torch.device(dev).type != "cpu":
        free = int(comfy.model_management.get_free_memory(dev))
        if not model.loaded_size():  # the weights still have to come onto the card
            free -= int(model.model_size())
    hidden = int(dm.params.hidden_size)
    plan = checkpoint_plan(settings.memory, settings.gradient_checkpointing,
                           blocks=len(dm.double_blocks) + len(dm.single_blocks), tokens=tokens, hidden=hidden,
                           element_size=torch.finfo(model.model.get_dtype_inference()).bits // 8,
                           free_bytes=free)
    log.info("Stage-2 memory %s: checkpointing %s", settings.memory,
             {0: "off", 1: "every block"}.get(plan, f"every {plan}th block"))
    return plan


def _train(model: Any, vae: Any, prior: Prior | None, crops: FaceCrops, positive: list,
           settings: TrainSettings, node_id: str | None) -> TrainedLoRA:
    images = [resize_to_bucket(im, settings.resolution ** 2) for im in crops.images]
    cond = ComfyFluxCond.from_conditioning(positive, settings.guidance)
    plan = _plan_checkpointing(model, settings, images, cond)
    host = ComfyFluxHost(model, guidance=settings.guidance, gradient_checkpointing=plan > 0,
                         checkpoint_every=max(plan, 1))
    preset = prior.preset if prior is not None and prior.preset else settings.preset
    parts = {
        "v": 1, "images": image_digest(images), "prior": prior.sha256 if prior is not None else None,
        "model": model_fingerprint(model), "cond": cond_digest(cond), "guidance": settings.guidance,
        "steps": settings.steps, "rank": settings.rank, "lr": settings.lr, "seed": settings.seed,
        "resolution": settings.resolution, "preset": preset,
    }
    key = content_key(parts)
    cache_dir = cache_folder()
    if not settings.force_retrain:
        hit = load_cached_adapters(cache_dir, key)
        if hit is not None:
            send_text(f"loaded from cache {key[:12]} (force_retrain to train again)", node_id)
            losses = [float(x) for x in hit[1].get("losses", "").split(",") if x]
            return TrainedLoRA(hit[0], losses, {"cache_key": key, "steps": str(settings.steps)})
    latents = encode_crops(vae, model, images)
    adapters = build_adapters(host.dims, prior, rank=settings.rank, preset=preset, seed=settings.seed)
    config = Stage2Config(steps=settings.steps, lr=settings.lr, r2=settings.rank, seed=settings.seed)
    callback = _Progress(node_id, settings, host, vae, latents[0], cond)
    try:
        result = personalize(host, adapters, latents, cond, config, callback=callback)
    except torch.cuda.OutOfMemoryError as e:
        comfy.model_management.soft_empty_cache()
        tips = [] if plan == 1 else ["turn on gradient_checkpointing"]
        tips += [f"lower resolution (now {settings.resolution})"] if settings.resolution > 512 else []
        tips.append("load FLUX with weight_dtype fp8_e4m3fn in Load Diffusion Model")
        raise RuntimeError(f"Meta-LoRA training ran out of GPU memory: {'; '.join(tips)}; "
                           "nothing was saved and your MODEL is unchanged") from e
    meta = {"cache_key": key, "steps": str(settings.steps), "seed": str(settings.seed),
            "prior_sha256": parts["prior"] or "", "images_sha256": parts["images"]}
    store_cached_adapters(cache_dir, key, result.adapters, losses=",".join(f"{x:.6g}" for x in result.losses),
                          steps=settings.steps, seed=settings.seed)
    return TrainedLoRA(result.adapters, result.losses, meta)


def loss_plot(losses: list[float]) -> torch.Tensor:
    """Loss curve as a ComfyUI IMAGE (1, H, W, 3)."""
    title = "Stage-2 loss (from cache)" if not losses else f"Stage-2 loss, {len(losses)} steps"
    return pils_to_image([line_plot(losses or [0.0], title=title, smooth=10 if len(losses) > 20 else 0)])


# ---------------------------------------------------------------- apply


def apply_meta_lora(model: Any, lora: TrainedLoRA, strength: float) -> Any:
    """MODEL + trained adapters -> patched clone, exactly as ComfyUI's LoraLoaderModelOnly does."""
    sd = comfy.lora_convert.convert_lora(lora_state_dict(lora.adapters))
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    loaded = comfy.lora.load_lora(sd, key_map)
    if len(loaded) != len(lora.adapters.names):
        missing = sorted({k.split(".lora_")[0] for k in sd} - set(key_map))
        raise ValueError(f"{len(lora.adapters.names) - len(loaded)} LoRA layers have no match in this MODEL "
                         f"(first: {missing[:1]}); the META_LORA was trained on a different FLUX")
    new = model.clone()
    new.add_patches(loaded, strength)
    return new


def lora_folder() -> str:
    return folder_paths.get_folder_paths("loras")[0]


def refresh_lora_list() -> None:
    folder_paths.filename_list_cache.pop("loras", None)


def relative_lora_name(path: str | os.PathLike) -> str:
    return os.path.relpath(os.fspath(path), lora_folder()).replace(os.sep, "/")
