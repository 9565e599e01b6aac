"""The diffusers FLUX host: adapters on a ``FluxTransformer2DModel``, velocity prediction."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..lora.adapter import AdapterSet, AttachHandle, attach_adapters
from ..lora.layers import FluxDims


@dataclass
class FluxTextCond:
    """Cached conditioning of one caption for the diffusers host."""

    prompt_embeds: torch.Tensor  # (1, L, joint_dim) T5 states
    pooled: torch.Tensor  # (1, pooled_dim) CLIP pooled output
    text_ids: torch.Tensor  # (L, 3) positional ids of the text tokens


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents -> (B, H/2 * W/2, 4C) FLUX tokens (2x2 patches)."""
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent size {h}x{w} must be even; image sides must be multiples of 16")
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of ``pack_latents`` for a latent of size h x w."""
    b, _, d = x.shape
    x = x.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(h/2 * w/2, 3) positional ids of the packed latent tokens: (0, row, col)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class DiffusersFluxHost:
    """Trains and runs adapters on a diffusers FLUX transformer.

    Args:
        transformer: a ``FluxTransformer2DModel`` (frozen here).
        guidance: the distilled-guidance input used while training (ai-toolkit trains at 1.0).
        gradient_checkpointing: recompute block activations in backward to save memory.
        checkpoint_every: with checkpointing on, recompute only every k-th block (counting
            double then single blocks from 0): 1 checkpoints all, 2 half of them, ...
        compile_blocks: ``torch.compile`` each transformer block while training (off by default).
    """

    def __init__(self, transformer: torch.nn.Module, *, guidance: float = 1.0, gradient_checkpointing: bool = False,
                 checkpoint_every: int = 1, compile_blocks: bool = False):
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1 (1 checkpoints every block), got {checkpoint_every}")
        self.transformer = transformer
        self.guidance = float(guidance)
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self.checkpoint_every = int(checkpoint_every)
        self.compile_blocks = bool(compile_blocks)
        self.dims = FluxDims.from_diffusers_config(transformer.config)
        self._cond_memo: tuple | None = None  # the conditioning on the device: no copy per step
        self._ids_memo: dict[tuple, torch.Tensor] = {}

    def _on_device(self, cond: FluxTextCond, dev: torch.device, dt: torch.dtype) -> tuple[torch.Tensor, ...]:
        src = (cond.pooled, cond.prompt_embeds, cond.text_ids)
        key = (tuple(id(t) for t in src), tuple(t._version for t in src), dev, dt)
        memo = self._cond_memo
        if memo is not None and memo[0] == key:
            return memo[2]
        tensors = tuple(t.to(dev, dt) for t in src)
        self._cond_memo = (key, src, tensors)  # src held: the ids stay theirs while memoised
        return tensors

    def _image_ids(self, h: int, w: int, dev: torch.device, dt: torch.dtype) -> torch.Tensor:
        key = (h, w, dev, dt)
        if key not in self._ids_memo:
            self._ids_memo[key] = image_ids(h, w, dev, dt)
        return self._ids_memo[key]

    def _blocks(self) -> list[torch.nn.Module]:
        return [*self.transformer.transformer_blocks, *self.transformer.single_transformer_blocks]

    def _checkpoint_func(self):
        """diffusers' checkpoint hook, recomputing only the blocks ``checkpoint_every`` selects."""
        chosen = {id(b) for i, b in enumerate(self._blocks()) if i % self.checkpoint_every == 0}

        def run(block, *args):
            if id(block) in chosen:
                return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)
            return block(*args)

        return run

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def attach(self, adapters: AdapterSet) -> AttachHandle:
        return attach_adapters(self.transformer, adapters)

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        """Freezes the base model (and turns on checkpointing) for the duration of a training run."""
        flags = [p.requires_grad for p in self.transformer.parameters()]
        self.transformer.requires_grad_(False)
        if self.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing(
                None if self.checkpoint_every == 1 else self._checkpoint_func())
        if self.compile_blocks:
            for b in self._blocks():
                b.compile()
        try:
            yield
        finally:
            if self.compile_blocks:
                for b in self._blocks():
                    b._compiled_call_impl = None  # back to the eager forward
            if self.gradient_checkpointing:
                self.transformer.disable_gradient_checkpointing()
            for p, f in zip(self.transformer.parameters(), flags):
                p.requires_grad_(f)

    def collate_conds(self, conds: Sequence[FluxTextCond]) -> FluxTextCond:
        """One conditioning for a batch whose items have different captions (rows stacked)."""
        if len({tuple(c.prompt_embeds.shape) for c in conds}) != 1:
            raise ValueError("captions were encoded to different token lengths; encode all with one max_sequence_length")
        return FluxTextCond(
            prompt_embeds=torch.cat([c.prompt_embeds for c in conds]),  # (B, L, D)
            pooled=torch.cat([c.pooled for c in conds]),  # (B, D)
            text_ids=conds[0].text_ids,
        )

    def predict(self, x_t: torch.Tensor, sigma: torch.Tensor, cond: FluxTextCond) -> torch.Tensor:
        """Flow velocity for noisy latents.

        Args:
            x_t: (B, C, h, w) noisy latents (VAE space, scaled and shifted).
            sigma: (B,) noise levels in [0, 1].
            cond: cached text conditioning (batch 1, broadcast over B).

        Returns:
            (B, C, h, w) predicted velocity ``noise - x0``.
        """
        b, _, h, w = x_t.shape
        dev, dt = self.device, self.dtype
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((b,), self.guidance, device=dev, dtype=torch.float32)
        pooled, embeds, text_ids = self._on_device(cond, dev, dt)
        out = self.transformer(
            hidden_states=pack_latents(x_t).to(dev, dt),
            timestep=sigma.to(dev, dt),
            guidance=guidance,
            pooled_projections=pooled.expand(b, -1),
            encoder_hidden_states=embeds.expand(b, -1, -1),
            txt_ids=text_ids,
            img_ids=self._image_ids(h, w, dev, dt),
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w)


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float in [-1, 1]."""
    a = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(a).permute(2, 0, 1).contiguous()


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> PIL RGB."""
    a = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(a)


@torch.no_grad()
def encode_images(vae: torch.nn.Module, images: Sequence[Image.Image]) -> list[torch.Tensor]:
    """VAE-encodes images one by one (they may differ in size) to (C, h, w) latents.

    Uses the posterior mean, so cached latents are deterministic.
    """
    cfg = vae.config
    shift = getattr(cfg, "shift_factor", None) or 0.0
    dev, dt = next(vae.parameters()).device, next(vae.parameters()).dtype
    out = []
    for im in images:
        x = pil_to_tensor(im)[None].to(dev, dt)
        z = vae.encode(x).latent_dist.mean
        out.append(((z - shift) * cfg.scaling_factor)[0].float().cpu())
    return out


@torch.no_grad()
def encode_prompt(pipe, prompt: str, max_sequence_length: int = 512) -> FluxTextCond:
    """Encodes one caption with a ``FluxPipeline``'s text encoders."""
    embeds, pooled, text_ids = pipe.encode_prompt(
        prompt=prompt, prompt_2=None, device=pipe.transformer.device, num_images_per_prompt=1,
        max_sequence_length=max_sequence_length,
    )
    return FluxTextCond(prompt_embeds=embeds.float().cpu(), pooled=pooled.float().cpu(), text_ids=text_ids.float().cpu())


def personalize_pipeline(
    pipe,
    prior,
    images: Sequence[Image.Image],
    *,
    caption: str,
    config,
    preset: str | None = None,
    guidance: float = 1.0,
    gradient_checkpointing: bool = False,
    max_sequence_length: int = 512,
    callback=None,
    prior_source: str = "prior",
):
    """Stage-2 on a diffusers ``FluxPipeline``: encode the crops and the caption, train, return.

    Args:
        pipe: the pipeline (its VAE encodes the crops, its text encoders the caption).
        prior: a ``Prior`` (Meta-LoRA) or None (plain LoRA on ``preset`` layers).
        images: the training crops (sizes may differ).
        caption: the training caption, e.g. "a photo of a woman" (the paper states none).
        config: ``train.Stage2Config``; its ``r2`` is the rank, its ``seed`` seeds everything.

    Returns:
        ``train.TrainResult`` with the trained adapters and the losses.
    """
    from ..lora.layers import DEFAULT_PRESET
    from ..train.recipe import build_adapters
    from ..train.stage2 import personalize

    from ..data.latents import encode_flip_pairs

    host = DiffusersFluxHost(pipe.transformer, guidance=guidance, gradient_checkpointing=gradient_checkpointing)
    # both orientations of every crop: Stage-2 draws a random horizontal flip per step (paper Sec. 3)
    latents = encode_flip_pairs(lambda ims: encode_images(pipe.vae, ims), images)
    cond = encode_prompt(pipe, caption, max_sequence_length=max_sequence_length)
    adapters = build_adapters(host.dims, prior, rank=config.r2, preset=preset or DEFAULT_PRESET, seed=config.seed,
                              source=prior_source)
    with encoders_off_device(pipe, host.device):
        return personalize(host, adapters, latents, cond, config, callback)


@contextlib.contextmanager
def encoders_off_device(pipe, device: torch.device) -> Iterator[None]:
    """Moves the VAE and text encoders that sit on ``device`` to the CPU while training.

    Their outputs are cached before training starts; on an accelerator they would only hold
    memory the training step can use. They go back to ``device`` afterwards. Modules already
    elsewhere (CPU offload hooks) are left alone.
    """
    moved = []
    if torch.device(device).type != "cpu":
        for name in ("vae", "text_encoder", "text_encoder_2"):
            m = getattr(pipe, name, None)
            p = next(m.parameters(), None) if m is not None else None
            if p is not None and p.device == torch.device(device):
                m.to("cpu")
                moved.append(m)
    try:
        yield
    finally:
        for m in moved:
            m.to(device)
