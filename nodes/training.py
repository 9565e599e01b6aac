"""What the ComfyUI nodes do, outside the node classes: the training run's ComfyUI part, apply, files.

The Stage-2 recipe itself (hashes, cache key, provenance, adapters, the loop) is
``metalora_core.train.recipe``; this module adds only what is ComfyUI's: the disk-cache lookup
in ComfyUI's model folders, progress and previews, interrupt, out-of-memory advice.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

import comfy.lora
import comfy.lora_convert
import comfy.model_management
import comfy.utils
import folder_paths

from ..metalora_core.draw.charts import line_plot
from ..metalora_core.data.latents import encode_flip_pairs
from ..metalora_core.formats.outputs import check_output_folder
from ..metalora_core.formats.prior import Prior, check_rank
from ..metalora_core.formats.store import load_cached_adapters, store_cached_adapters
from ..metalora_core.lora.families import FLUX1, FLUX2, ZIMAGE, ModelDims, ModelFamily
from ..metalora_core.lora.flow import add_noise
from ..metalora_core.faces.crops import FaceCrops
from ..metalora_core.train.recipe import Provenance, Stage2Plan, execute_stage2, plan_stage2
from ..metalora_core.train.stage2 import Stage2Config, TrainResult
from .comfy_host import ComfyFluxCond, ComfyFluxHost
from .folders import cache_folder
from .generic_host import ComfyGenericHost, flux_host_or_generic
from .images import image_to_pils, pils_to_image
from .interop import lora_model

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainSettings:
    """The Train node's inputs: the core config (everything that affects the result) plus ComfyUI's part."""

    config: Stage2Config = field(default_factory=Stage2Config)
    resolution: int = 512  # crop side: crops are cut at about resolution^2 pixels (FaceCrops.at_resolution)
    preview_every: int = 25
    force_retrain: bool = False
    memory: str = "auto"  # "fast" (no checkpointing), "low" (every block), "auto" (what fits): checkpoint_plan


MEMORY_CHOICES = ("auto", "fast", "low")
TRAINED_FAMILIES = (FLUX1, FLUX2, ZIMAGE)  # the model families the Train node trains


def generic_family_dims(model: Any) -> ModelDims | None:
    """The dims of a ComfyUI MODEL that trains through the generic host (FLUX.2, Z-Image), from
    ComfyUI's model class and the model's weights; None for any other MODEL (FLUX.1 and what is
    not a trained family go the fast FLUX host's way, which refuses the latter)."""
    import comfy.model_base

    base = model.model
    if isinstance(base, comfy.model_base.Flux2):
        family = FLUX2
    elif (isinstance(base, comfy.model_base.Lumina2) and not isinstance(base, comfy.model_base.ZImagePixelSpace)
          and base.model_config.unet_config.get("z_image_modulation")):
        family = ZIMAGE  # Lumina 2 itself shares ComfyUI's class, not Z-Image's layers
    else:
        return None
    return family.dims_from_comfy_state_dict(base.diffusion_model.state_dict())


def check_text_width(model: Any, cond: ComfyFluxCond, family: ModelFamily) -> None:
    """Refuses conditioning of another width than the model's text input (another family's text
    encoder) before any work, in one line; FLUX.2 reads it through ``txt_in``, Z-Image ``cap_embedder``."""
    dm = model.model.diffusion_model
    layer = getattr(dm, "txt_in", None) or getattr(dm, "cap_embedder", [None])[-1]
    width = getattr(layer, "in_features", None)
    if width is not None and cond.context.shape[-1] != width:
        raise ValueError(f"the positive CONDITIONING has {cond.context.shape[-1]}-wide text states; this "
                         f"{family.title} MODEL reads {width}: encode the caption with the text encoder of "
                         f"{family.title} (its CLIPLoader type)")


def memory_choice(memory: str, gradient_checkpointing: bool) -> str:
    """The Train node's ``memory``; its older ``gradient_checkpointing`` switch on means "low"."""
    return "low" if gradient_checkpointing else memory


def checkpoint_plan(memory: str, dims: ModelDims, *, tokens: int, element_size: int, free_bytes: int | None) -> int:
    """A host's ``checkpoint_every`` for a run: 0 none, 1 every block, k every k-th block.

    "fast": none; "low": every block; "auto": none when the estimated activations of the model
    (``dims``: its width, its blocks and its family's measured activation widths) fit in 80% of
    ``free_bytes`` (None: unknown, e.g. on the CPU: none), else the widest spacing that fits, else
    every block; a family without measured widths checkpoints every block under "auto" on a card.

    Raises:
        ValueError: ``memory`` is not one of ``MEMORY_CHOICES``.
    """
    if memory not in MEMORY_CHOICES:
        raise ValueError(f"memory must be one of {MEMORY_CHOICES}, got {memory!r}")
    if memory == "low":
        return 1
    if memory == "fast" or free_bytes is None:
        return 0
    family = dims.family
    if family.activation_widths is None:
        return 1
    saved, checkpointed = family.activation_widths
    blocks = family.block_count(dims)
    full = tokens * dims.hidden * element_size * saved
    kept = tokens * dims.hidden * element_size * checkpointed
    budget = 0.8 * free_bytes
    for k in [0] + list(range(blocks, 1, -1)):  # no checkpointing first, then ever denser
        n_ckpt = 0 if k == 0 else len(range(0, blocks, k))
        if (blocks - n_ckpt) * full + n_ckpt * kept <= budget:
            return k
    return 1


class _Progress:
    """Per-step callback: progress bar + loss text, previews every N steps, interrupt check."""

    def __init__(self, node_id: str | None, settings: TrainSettings, host: ComfyFluxHost, plan: Stage2Plan) -> None:
        self.node_id, self.s, self.host, self.plan = node_id, settings, host, plan
        self.steps = settings.config.steps
        self.latent: torch.Tensor | None = None
        self.pbar = comfy.utils.ProgressBar(self.steps, node_id=node_id)

    def preview(self) -> tuple:
        if self.latent is None:  # the first crop, as the trainer sees it
            self.latent = self.host.encode_images(self.plan.images[:1])[0]
        gen = torch.Generator().manual_seed(self.s.config.seed)
        x0 = self.latent[None]  # (1, C, h, w)
        noise = torch.randn(x0.shape, generator=gen)
        sigma = torch.tensor([0.6])
        with torch.no_grad():
            x_t = add_noise(x0, noise, sigma)
            v = self.host.predict(x_t, sigma, self.plan.cond).float().cpu()
            pred = x_t - sigma * v  # one-step x0 prediction
            img = self.host.vae.decode(self.host.source.model.process_latent_out(pred))  # (1, H, W, 3)
        return ("JPEG", image_to_pils(img.reshape(-1, *img.shape[-3:])[:1])[0], 512)

    def __call__(self, step: int, loss: float) -> None:
        n = self.s.preview_every
        preview = self.preview() if n > 0 and (step % n == 0 or step == self.steps) else None
        self.pbar.update_absolute(step, self.steps, preview)
        send_text(f"step {step}/{self.steps}  loss {loss:.4f}", self.node_id)
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
                    settings: TrainSettings, node_id: str | None = None) -> TrainResult:
    """Stage-2 on a ComfyUI FLUX MODEL (its clone), with the disk cache in front.

    The caller's MODEL is never patched: the host works on a clone and drops it in ``finally``.
    """
    with torch.inference_mode(False):  # nodes run in inference mode; training needs normal tensors
        return _train(model, vae, prior, crops, positive, settings, node_id)


def _plan_checkpointing(host: ComfyFluxHost, settings: TrainSettings, images: list, cond: ComfyFluxCond) -> int:
    """``checkpoint_plan`` for this run: the host's model, the largest crop's tokens, the card's free memory."""
    per_token = host.dims.family.pixels_per_token ** 2
    tokens = max(im.size[0] * im.size[1] for im in images) // per_token + cond.context.shape[1]
    model, free = host.source, None
    if torch.device(host.device).type != "cpu":
        free = int(comfy.model_management.get_free_memory(host.device))
        if not model.loaded_size():  # the weights still have to come onto the card
            free -= int(model.model_size())
    every = checkpoint_plan(settings.memory, host.dims, tokens=tokens,
                            element_size=torch.finfo(host.dtype).bits // 8, free_bytes=free)
    log.info("Stage-2 memory %s: checkpointing %s", settings.memory,
             {0: "off", 1: "every block"}.get(every, f"every {every}th block"))
    return every


def _cached(cache_dir: str, key: str, node_id: str | None = None, family: ModelFamily = FLUX1) -> TrainResult | None:
    hit = load_cached_adapters(cache_dir, key, on_ignored=lambda why: send_text(why, node_id))
    if hit is None:
        return None
    adapters, meta = hit
    try:
        provenance = Provenance.from_metadata(meta)
    except ValueError as e:  # an entry of an older version: train again (and overwrite it)
        why = f"ignoring training cache entry {key[:12]}: it has no full provenance ({e}); training again"
        log.warning("%s", why)
        send_text(why, node_id)
        return None
    losses = [float(x) for x in meta.get("losses", "").split(",") if x]
    return TrainResult(adapters, losses, provenance=provenance, from_cache=True, family=family)


def _train(model: Any, vae: Any, prior: Prior | None, crops: FaceCrops, positive: list,
           settings: TrainSettings, node_id: str | None) -> TrainResult:
    check_rank(settings.config.rank, prior)  # the CLI's --rank check: before any crop is cut or encoded
    used = crops.at_resolution(settings.resolution)
    if used is not crops:
        send_text(f"crops cut again at {settings.resolution}x{settings.resolution} from the photos "
                  f"(Face Augment made them at {crops.resolution})", node_id)
    cond = ComfyFluxCond.from_conditioning(positive)
    dims = generic_family_dims(model)
    if dims is None:  # FLUX.1: the fast host
        try:
            host = ComfyFluxHost(model, vae=vae)
        except ValueError as e:  # not a FLUX model
            titles = [f.title for f in TRAINED_FAMILIES]
            raise ValueError(f"Meta-LoRA Train trains {', '.join(titles[:-1])} and {titles[-1]} models; this MODEL is "
                             f"{type(model.model).__name__}; load one of those with Load Diffusion Model") from e
        host.checkpoint_every = _plan_checkpointing(host, settings, used.images, cond)
    else:
        check_text_width(model, cond, dims.family)
        host = ComfyGenericHost.of_family(model, dims, vae=vae)
    family = host.dims.family
    plan = plan_stage2(host, used, cond, prior, settings.config)  # a prior that does not fit this MODEL fails here
    key, cache_dir = plan.provenance.cache_key, cache_folder()
    if not settings.force_retrain:
        hit = _cached(cache_dir, key, node_id, family)
        if hit is not None:
            send_text(f"loaded from cache {key[:12]} (force_retrain to train again)", node_id)
            return hit
    check_output_folders(cache_dir)
    note = None
    if isinstance(host, ComfyFluxHost):
        host, note = flux_host_or_generic(host, cond)  # ComfyUI's own model where the fast copy disagrees
    if note is not None:
        log.warning("%s", note)
        send_text(note, node_id)
    send_text(encode_crops(host, plan.images, node_id, flips=plan.flips), node_id)
    try:
        run = execute_stage2(host, plan, _Progress(node_id, settings, host, plan))
    except torch.cuda.OutOfMemoryError as e:
        comfy.model_management.soft_empty_cache()
        can_checkpoint = isinstance(host, ComfyFluxHost) and host.checkpoint_every != 1  # the generic path cannot
        tips = ["set memory to low (or turn on gradient_checkpointing)"] if can_checkpoint else []
        tips += [f"lower resolution (now {settings.resolution})"] if settings.resolution > 512 else []
        tips.append(f"load {family.title} with weight_dtype fp8_e4m3fn in Load Diffusion Model")
        raise RuntimeError(f"Meta-LoRA training ran out of GPU memory: {'; '.join(tips)}; "
                           "nothing was saved and your MODEL is unchanged") from e
    store_cached_adapters(cache_dir, key, run.adapters, losses=",".join(f"{x:.6g}" for x in run.losses),
                          family=family, **run.metadata)
    return run


def encode_crops(host: ComfyFluxHost, images: tuple, node_id: str | None = None, *, flips: bool = True) -> str:
    """VAE-encodes the crops (and, for crops trained with flips, their mirror images) into
    ``latents.CACHE`` (what is there already is reused), so that training finds them there;
    returns what it did, in one line."""
    encoder = host.encoder
    what = "crops and their mirror images" if flips else "crops"

    def announce(n: int) -> None:
        if encoder.encoded == 0:  # before the first VAE batch (crops or mirror images) only
            send_text(f"encoding {len(images)} {what} with the VAE (once: runs that change only training "
                      "settings reuse them)", node_id)

    encoder.before_encode = announce
    try:
        if flips:
            encode_flip_pairs(encoder, images)
        else:
            encoder(list(images))
    finally:
        encoder.before_encode = None
    line = encoder.summary(len(images), mirrored=flips)
    log.info("Meta-LoRA Train: %s", line)
    return line


def check_output_folders(cache_dir: str) -> None:
    """Refuses to train when its result could not be kept: the training cache folder or the loras
    folder (where Meta-LoRA Save writes) is not a writable folder. Checked before training, not after."""
    check_output_folder(cache_dir, what="the Meta-LoRA training cache folder (models/meta_lora/cache)")
    check_output_folder(lora_folder(), what="ComfyUI's loras folder (where Meta-LoRA Save writes)")


def loss_plot(losses: list[float]) -> torch.Tensor:
    """Loss curve as a ComfyUI IMAGE (1, H, W, 3)."""
    title = "Stage-2 loss (from cache)" if not losses else f"Stage-2 loss, {len(losses)} steps"
    return pils_to_image([line_plot(losses or [0.0], title=title, smooth=10 if len(losses) > 20 else 0)])


# ---------------------------------------------------------------- apply


def apply_meta_lora(model: Any, lora: TrainResult, strength: float) -> Any:
    """MODEL + trained adapters -> patched clone, exactly as ComfyUI's LoraLoaderModelOnly does."""
    sd = comfy.lora_convert.convert_lora(lora_model(lora))
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    loaded = comfy.lora.load_lora(sd, key_map)
    if len(loaded) != len(lora.adapters.names):
        missing = sorted({k.split(".lora_")[0] for k in sd} - set(key_map))
        raise ValueError(f"{len(lora.adapters.names) - len(loaded)} LoRA layers have no match in this MODEL "
                         f"(first: {missing[:1]}); the META_LORA ({lora.family.title}) was trained on a different model")
    new = model.clone()
    new.add_patches(loaded, strength)
    return new


def lora_folder() -> str:
    return folder_paths.get_folder_paths("loras")[0]


def refresh_lora_list() -> None:
    folder_paths.filename_list_cache.pop("loras", None)


def relative_lora_name(path: str | os.PathLike) -> str:
    return os.path.relpath(os.fspath(path), lora_folder()).replace(os.sep, "/")
