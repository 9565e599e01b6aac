"""The diffusers host of the FLUX.2 and Z-Image families, and what the CLI loads any family with.

``DiffusersFamilyHost`` implements ``metalora_core.train.host.FlowHost`` on a diffusers
``Flux2Transformer2DModel`` or ``ZImageTransformer2DModel``: the adapters attach to the Linears the
family's canonical names (``lora.families``) name, and ``predict`` calls the transformer's own
forward with its pipeline's input convention:

- FLUX.2 (``Flux2KleinPipeline`` / ``Flux2Pipeline``): the host's latents are the VAE's 32 channels,
  normalised as the pipeline does (patchified 2 x 2 to 128 channels, minus the VAE's batch-norm
  mean, over its standard deviation, then unpatchified again); tokens are 2 x 2 patches with
  (t, h, w, l) position ids, the timestep is sigma (the model scales it by 1000), and the
  output is the velocity ``noise - x0``;
- Z-Image (``ZImagePipeline``): latents are the FLUX.1 VAE's, scaled and shifted; the model takes
  a list of (C, 1, h, w) latents, the timestep ``1 - sigma`` and a list of caption states
  without padding, and predicts ``x0 - noise``, so the velocity is its output negated.

FLUX.1 keeps its own host (``diffusers_flux.DiffusersFluxHost``, with its training forwards);
``diffusers_host``, ``load_pipeline``, ``encode_caption`` and ``encode_pipeline_images`` pick by
the transformer's family.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..formats.files import sha256_tensors
from ..lora.adapter import AdapterSet, AttachHandle, attach_adapters
from ..lora.families import FLUX1, FLUX2, ZIMAGE, ModelFamily, family_of_diffusers_config, family_of_pipeline
from ..lora.fused import DeviceMemo
from ..lora.layers import check_checkpoint_every
from .diffusers_flux import (DTYPES, DiffusersFluxHost, dtype_keyword, encode_images, encode_prompt,
                             encoders_off_device, frozen_for_training, load_flux_pipeline, pil_to_tensor,
                             transformer_identity)


def _flux2_pipeline_class() -> Any:
    """The pipeline class whose static helpers (patchify, pack, position ids) FLUX.2 inputs are made with."""
    from .quiet import no_torchvision_notice

    with no_torchvision_notice():
        from diffusers import Flux2KleinPipeline
    return Flux2KleinPipeline


@dataclass
class FamilyTextCond:
    """Cached conditioning of one caption (or one per batch row) for ``DiffusersFamilyHost``."""

    prompt_embeds: torch.Tensor  # (n, L, D) text states: n = 1 (shared by the batch) or one row per item
    text_ids: torch.Tensor | None = None  # (L, 4) FLUX.2 text token positions; None for Z-Image
    lengths: tuple[int, ...] | None = None  # Z-Image: valid tokens of each row (rows zero-padded to L)
    guidance: float = 1.0  # distilled-guidance input (FLUX.2 models with a guidance embedding)

    def __post_init__(self) -> None:
        if not math.isfinite(float(self.guidance)):
            raise ValueError(f"guidance {self.guidance} is not a finite number; pass a number such as 1.0")

    def digest(self) -> str:
        """sha256 over the text states, positions, lengths and guidance."""
        parts = {"prompt_embeds": self.prompt_embeds, "guidance": torch.tensor([self.guidance], dtype=torch.float64)}
        if self.text_ids is not None:
            parts["text_ids"] = self.text_ids
        if self.lengths is not None:
            parts["lengths"] = torch.tensor(self.lengths, dtype=torch.int64)
        return sha256_tensors(parts)


def collate_family_conds(conds: Sequence[FamilyTextCond]) -> FamilyTextCond:
    """One conditioning for a batch: the shared one, or the captions of the items row by row
    (Z-Image captions of different lengths are zero-padded and keep their lengths).

    Raises:
        ValueError: FLUX.2 captions encoded to different lengths, or mixed guidance values.
    """
    first = conds[0]
    if all(c is first for c in conds):
        return first
    if len({c.guidance for c in conds}) != 1:
        raise ValueError(f"a batch mixes guidance values {sorted({c.guidance for c in conds})}; encode every "
                         "caption with the same guidance")
    if first.lengths is None:
        if len({tuple(c.prompt_embeds.shape[1:]) for c in conds}) != 1:
            raise ValueError("captions were encoded to different token lengths; encode all with one "
                             "max_sequence_length")
        return FamilyTextCond(torch.cat([c.prompt_embeds for c in conds]), text_ids=first.text_ids,
                              guidance=first.guidance)
    width = max(c.prompt_embeds.shape[1] for c in conds)
    rows = [torch.nn.functional.pad(c.prompt_embeds, (0, 0, 0, width - c.prompt_embeds.shape[1])) for c in conds]
    return FamilyTextCond(torch.cat(rows), lengths=tuple(n for c in conds for n in c.lengths), guidance=first.guidance)


class DiffusersFamilyHost:
    """Trains and runs adapters on a diffusers FLUX.2 or Z-Image transformer.

    Args:
        transformer: a ``Flux2Transformer2DModel`` or ``ZImageTransformer2DModel`` (frozen here).
        vae: the family's VAE that ``encode_images`` uses (None: a host that only trains on latents).
        pipe: the pipeline the transformer belongs to (``from_pipeline`` sets it): while training,
            its VAE and text encoder wait on the CPU; without it, ``vae`` does.
        checkpoint_every: recompute block activations in backward, every k-th block (counting the
            family's block groups in model order from 0): 0 none, 1 all, 2 half of them, ...

    Raises:
        ValueError: the transformer is of another family (FLUX.1 has ``DiffusersFluxHost``).
    """

    def __init__(self, transformer: torch.nn.Module, *, vae: torch.nn.Module | None = None, pipe: Any = None,
                 checkpoint_every: int = 0):
        family = family_of_diffusers_config(transformer.config)
        if family not in (FLUX2, ZIMAGE):
            raise ValueError(f"{type(transformer).__name__} is a {family.title} model; DiffusersFamilyHost trains "
                             f"{FLUX2.title} and {ZIMAGE.title}, use diffusers_host() to get the host of any family")
        self.transformer, self.vae, self.pipe = transformer, vae, pipe
        self.family = family
        self.dims = family.dims_from_diffusers_config(transformer.config)
        self.checkpoint_every = check_checkpoint_every(checkpoint_every)
        self._memo = DeviceMemo()  # the conditioning on the device: no copy per step
        self._ids: dict[tuple, torch.Tensor] = {}

    @classmethod
    def from_pipeline(cls, pipe: Any, *, checkpoint_every: int = 0) -> "DiffusersFamilyHost":
        """The host of a ``Flux2KleinPipeline``, ``Flux2Pipeline`` or ``ZImagePipeline``."""
        return cls(pipe.transformer, vae=pipe.vae, pipe=pipe, checkpoint_every=checkpoint_every)

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def _blocks(self) -> list[torch.nn.Module]:
        """The transformer's numbered blocks, group by group in model order (the family's groups)."""
        return [b for g in self.family.groups if g.depth is not None for b in self.transformer.get_submodule(g.prefix)]

    def attach(self, adapters: AdapterSet) -> AttachHandle:
        """Attaches ``adapters`` to the Linears their canonical names name (``lora.adapter.attach_adapters``)."""
        return attach_adapters(self.transformer, adapters)

    def encode_images(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        """VAE-encodes images (sizes may differ) to (C, h, w) latents in the model's space."""
        if self.vae is None:
            raise ValueError("this DiffusersFamilyHost has no VAE; build it with DiffusersFamilyHost.from_pipeline(pipe) "
                             "or DiffusersFamilyHost(transformer, vae=vae)")
        if self.family is FLUX2:
            return encode_flux2_images(self.vae, images)
        return encode_images(self.vae, images)

    def collate(self, conds: Sequence[FamilyTextCond]) -> FamilyTextCond:
        return collate_family_conds(conds)

    def identity(self) -> str:
        return transformer_identity(self.transformer)

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        """Frozen base model (checkpointing on as set) for a training run; the VAE and text encoder
        on the training device wait on the CPU meanwhile and come back afterwards."""
        with encoders_off_device(self.pipe if self.pipe is not None else types.SimpleNamespace(vae=self.vae),
                                 self.device):
            with frozen_for_training(self.transformer, self._blocks(), self.checkpoint_every):
                yield

    def _text(self, cond: FamilyTextCond, b: int, dev: torch.device, dt: torch.dtype) -> torch.Tensor:
        """The (b, L, D) text states on the device in ``dt``, kept while ``cond`` is unchanged."""
        (text,) = self._memo.get((cond.prompt_embeds,), dev, dt)
        if text.shape[0] == b:
            return text
        if text.shape[0] != 1:
            raise ValueError(f"the conditioning has {text.shape[0]} rows for a batch of {b}; give one caption or one "
                             "per item")
        return text.expand(b, -1, -1)

    def predict(self, x_t: torch.Tensor, sigma: torch.Tensor, cond: FamilyTextCond) -> torch.Tensor:
        """Flow velocity ``noise - x0`` for (B, C, h, w) noisy latents in the model's space and (B,) sigmas."""
        dev, dt = self.device, self.dtype
        text = self._text(cond, x_t.shape[0], dev, dt)
        if self.family is FLUX2:
            return self._predict_flux2(x_t.to(dev, dt), sigma, cond, text)
        return self._predict_zimage(x_t.to(dev, dt), sigma, cond, text)

    def _predict_flux2(self, x: torch.Tensor, sigma: torch.Tensor, cond: FamilyTextCond,
                       text: torch.Tensor) -> torch.Tensor:
        pipe = _flux2_pipeline_class()
        b, _, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"latent size {h}x{w} must be even; image sides must be multiples of 16")
        patches = pipe._patchify_latents(x)  # (B, 4C, h/2, w/2)
        key = (h, w, x.device)
        if key not in self._ids:
            self._ids[key] = pipe._prepare_latent_ids(patches[:1])[0].to(x.device)  # (h/2 * w/2, 4)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((b,), float(cond.guidance), device=x.device, dtype=torch.float32)
        out = self.transformer(
            hidden_states=pipe._pack_latents(patches), encoder_hidden_states=text,
            timestep=sigma.to(x.device, x.dtype), img_ids=self._ids[key], txt_ids=cond.text_ids.to(x.device),
            guidance=guidance, return_dict=False,
        )[0]  # (B, h/2 * w/2, 4C), tokens in row-major order
        return pipe._unpatchify_latents(out.transpose(1, 2).reshape(patches.shape))

    def _predict_zimage(self, x: torch.Tensor, sigma: torch.Tensor, cond: FamilyTextCond,
                        text: torch.Tensor) -> torch.Tensor:
        lengths = cond.lengths if cond.lengths is not None else (text.shape[1],)
        if len(lengths) == 1:
            lengths = lengths * x.shape[0]
        captions = [text[i, :n] for i, n in enumerate(lengths)]
        t = 1.0 - sigma.to(x.device, torch.float32)  # Z-Image's time runs from noise (0) to the image (1)
        out = self.transformer(list(x.unsqueeze(2).unbind(0)), t, captions, return_dict=False)[0]
        return -torch.stack(out).squeeze(2)  # the model predicts x0 - noise


@torch.no_grad()
def encode_flux2_images(vae: torch.nn.Module, images: Sequence[Image.Image]) -> list[torch.Tensor]:
    """Encodes images with a FLUX.2 VAE (``AutoencoderKLFlux2``) as its pipelines do (the posterior
    mode, patchified 2 x 2 and normalised by the VAE's batch-norm statistics), returned
    unpatchified: (32, h, w) float32 CPU latents per image."""
    pipe = _flux2_pipeline_class()
    dev, dt = next(vae.parameters()).device, next(vae.parameters()).dtype
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(dev, dt)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(dev, dt)
    out = []
    for im in images:
        z = vae.encode(pil_to_tensor(im)[None].to(dev, dt)).latent_dist.mode()
        out.append(pipe._unpatchify_latents((pipe._patchify_latents(z) - mean) / std)[0].float().cpu())
    return out


def diffusers_host(transformer: torch.nn.Module, *, vae: torch.nn.Module | None = None, pipe: Any = None,
                   checkpoint_every: int = 0) -> Any:
    """The ``FlowHost`` of a diffusers transformer of any family (FLUX.1: ``DiffusersFluxHost``)."""
    if family_of_diffusers_config(transformer.config) is FLUX1:
        return DiffusersFluxHost(transformer, vae=vae, pipe=pipe, checkpoint_every=checkpoint_every)
    return DiffusersFamilyHost(transformer, vae=vae, pipe=pipe, checkpoint_every=checkpoint_every)


def pipeline_family(pipe: Any) -> ModelFamily:
    return family_of_diffusers_config(pipe.transformer.config)


@torch.no_grad()
def encode_caption(pipe: Any, prompt: str, max_sequence_length: int = 512, *, guidance: float = 1.0) -> Any:
    """Encodes one caption with the pipeline's own text encoder; the host's conditioning of it."""
    family = pipeline_family(pipe)
    if family is FLUX1:
        return encode_prompt(pipe, prompt, max_sequence_length, guidance=guidance)
    dev = pipe.transformer.device
    if family is FLUX2:
        embeds, text_ids = pipe.encode_prompt(prompt=prompt, device=dev, num_images_per_prompt=1,
                                              max_sequence_length=max_sequence_length)
        return FamilyTextCond(embeds.float().cpu(), text_ids=text_ids[0].cpu(), guidance=float(guidance))
    embeds, _ = pipe.encode_prompt(prompt=prompt, device=dev, do_classifier_free_guidance=False,
                                   max_sequence_length=max_sequence_length)
    return FamilyTextCond(embeds[0][None].float().cpu(), lengths=(int(embeds[0].shape[0]),), guidance=float(guidance))


def encode_pipeline_images(pipe: Any, images: Sequence[Image.Image]) -> list[torch.Tensor]:
    """VAE-encodes images into the latent space of the pipeline's transformer."""
    if pipeline_family(pipe) is FLUX2:
        return encode_flux2_images(pipe.vae, images)
    return encode_images(pipe.vae, images)


def load_pipeline(model: str | os.PathLike, *, dtype: str = "bfloat16", device: str | None = None,
                  transformer: str | os.PathLike | None = None) -> Any:
    """Loads a local diffusers folder of FLUX.1 (``load_flux_pipeline``), FLUX.2 or Z-Image (never downloads).

    Args:
        model: the folder that holds ``model_index.json``.
        dtype: "float32", "bfloat16" or "float16".
        device: where to put the pipeline (None: cuda when available, else cpu).
        transformer: optional single-file transformer (.safetensors) overriding the folder's; its
            config comes from the folder.

    Raises:
        FileNotFoundError: ``model`` holds no ``model_index.json``.
        ValueError: unknown dtype, or a pipeline class no family loads.
    """
    model = Path(model)
    index = model / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{model} is not a diffusers model folder (no model_index.json); "
                                "pass the folder that holds model_index.json")
    name = str(json.loads(index.read_text(encoding="utf-8")).get("_class_name", ""))
    family = family_of_pipeline(name)
    if family is None and "Flux" in name and not name.startswith("Flux2"):
        family = FLUX1  # FluxPipeline loads any FLUX.1 folder
    if family is None:
        known = ", ".join(p for f in (FLUX1, FLUX2, ZIMAGE) for p in f.diffusers_pipelines)
        raise ValueError(f"{model}: model_index.json names the pipeline {name or 'no class'}, which MetaLoRA does not "
                         f"load; pass a folder of one of {known}")
    if family is FLUX1:
        return load_flux_pipeline(model, dtype=dtype, device=device, transformer=transformer)
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} unknown; choose one of {sorted(DTYPES)}")
    from .quiet import no_torchvision_notice

    with no_torchvision_notice():
        import diffusers

    as_dtype = {dtype_keyword(): DTYPES[dtype]}
    kw = {}
    if transformer is not None:
        cls = getattr(diffusers, family.diffusers_class)
        kw["transformer"] = cls.from_single_file(str(transformer), config=str(model), subfolder="transformer",
                                                 local_files_only=True, **as_dtype)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return getattr(diffusers, name).from_pretrained(str(model), local_files_only=True, **as_dtype, **kw).to(device)
