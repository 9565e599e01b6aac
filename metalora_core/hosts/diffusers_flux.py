"""The diffusers FLUX host: adapters on a ``FluxTransformer2DModel``, velocity prediction.

Implements ``metalora_core.train.host.FlowHost``; the Stage-2 recipe lives in ``train.recipe``.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import os
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager

import numpy as np
import torch
from PIL import Image

from ..formats.files import sha256_tensors
from ..formats.store import weights_identity
from ..lora.adapter import AdapterSet, attach_adapters
from ..lora.fused import AttachHandle, DeviceMemo, checkpointed
from ..lora.layers import FluxDims, check_checkpoint_every
from .diffusers_blocks import MODULATION_SUFFIXES, TrainingBlocks

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class FluxTextCond:
    """Cached conditioning of one caption for the diffusers host."""

    prompt_embeds: torch.Tensor  # (1, L, joint_dim) T5 states
    pooled: torch.Tensor  # (1, pooled_dim) CLIP pooled output
    text_ids: torch.Tensor  # (L, 3) positional ids of the text tokens
    guidance: float = 1.0  # distilled-guidance input while training (ai-toolkit trains at 1.0)

    def __post_init__(self) -> None:
        if not math.isfinite(float(self.guidance)):
            raise ValueError(f"guidance {self.guidance} is not a finite number; pass a number such as 1.0")

    def digest(self) -> str:
        """sha256 over the text states, pooled output, ids and guidance."""
        return sha256_tensors({"prompt_embeds": self.prompt_embeds, "pooled": self.pooled, "text_ids": self.text_ids,
                               "guidance": torch.tensor([self.guidance], dtype=torch.float64)})


def collate_text_conds(conds: Sequence[FluxTextCond]) -> FluxTextCond:
    """One conditioning for a batch: the shared one, or the row-stacked captions of the items.

    Raises:
        ValueError: the captions were encoded to different lengths or carry different guidance.
    """
    first = conds[0]
    if all(c is first for c in conds):
        return first
    if len({tuple(c.prompt_embeds.shape) for c in conds}) != 1:
        raise ValueError("captions were encoded to different token lengths; encode all with one max_sequence_length")
    if len({c.guidance for c in conds}) != 1:
        raise ValueError(f"a batch mixes guidance values {sorted({c.guidance for c in conds})}; encode every "
                         "caption with the same guidance")
    return FluxTextCond(
        prompt_embeds=torch.cat([c.prompt_embeds for c in conds]),  # (B, L, D)
        pooled=torch.cat([c.pooled for c in conds]),  # (B, D)
        text_ids=first.text_ids, guidance=first.guidance,
    )


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
        vae: the FLUX VAE that ``encode_images`` uses (None: a host that only trains on latents).
        pipe: the ``FluxPipeline`` the transformer belongs to (``from_pipeline`` sets it): while
            training, its VAE and text encoders wait on the CPU (``encoders_off_device``); without
            it, ``vae`` does.
        checkpoint_every: recompute block activations in backward to save memory, every k-th
            block (counting double then single blocks from 0): 0 none, 1 all, 2 half of them, ...
        compile_blocks: ``torch.compile`` the transformer blocks while training (off by default;
            see ``compiled_blocks``): each run compiles its own graphs.

    The distilled-guidance input comes from the conditioning (``FluxTextCond.guidance``).
    """

    def __init__(self, transformer: torch.nn.Module, *, vae: torch.nn.Module | None = None, pipe: Any = None,
                 checkpoint_every: int = 0, compile_blocks: bool = False):
        self.transformer = transformer
        self.vae = vae
        self.pipe = pipe
        self.checkpoint_every = check_checkpoint_every(checkpoint_every)
        self.compile_blocks = bool(compile_blocks)
        self.dims = FluxDims.from_diffusers_config(transformer.config)
        self._cond_memo = DeviceMemo()  # the conditioning on the device: no copy per step
        self._ids_memo: dict[tuple, torch.Tensor] = {}
        self._own_forwards: dict[str, bool] = {}  # block kinds whose training forward agrees with diffusers'

    def _on_device(self, cond: FluxTextCond, dev: torch.device, dt: torch.dtype) -> tuple[torch.Tensor, ...]:
        return self._cond_memo.get((cond.pooled, cond.prompt_embeds, cond.text_ids), dev, dt)

    def _image_ids(self, h: int, w: int, dev: torch.device, dt: torch.dtype) -> torch.Tensor:
        key = (h, w, dev, dt)
        if key not in self._ids_memo:
            self._ids_memo[key] = image_ids(h, w, dev, dt)
        return self._ids_memo[key]

    def _blocks(self) -> list[torch.nn.Module]:
        return [*self.transformer.transformer_blocks, *self.transformer.single_transformer_blocks]

    @classmethod
    def from_pipeline(cls, pipe: Any, *, checkpoint_every: int = 0) -> "DiffusersFluxHost":
        """The host of a ``FluxPipeline``: its transformer, with its VAE for ``encode_images``; the VAE
        and the text encoders leave the device while training."""
        return cls(pipe.transformer, vae=pipe.vae, pipe=pipe, checkpoint_every=checkpoint_every)

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def attach(self, adapters: AdapterSet) -> AttachHandle:
        """Attaches ``adapters``; while they train, the blocks run ``diffusers_blocks``' training
        forwards (less kept for backward, fewer ops), and every block's modulation Linear reads one
        ``silu(temb)``, projected once for all of them."""
        blocks = TrainingBlocks(self._blocks(), own=self._own_forwards)
        held = ([n for n in adapters.names if n.endswith(MODULATION_SUFFIXES)],) if blocks.every_block else ()
        handle = attach_adapters(self.transformer, adapters, held_groups=held, compiled=self.compile_blocks)
        handle.add(blocks.install(handle, {self.transformer.get_submodule(n): n for n in adapters.names}))
        handle.add(self.transformer.register_forward_hook(lambda m, a, o: blocks.end_step()))
        return handle

    def encode_images(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        """VAE-encodes images (sizes may differ) to (C, h, w) latents; see ``encode_images``."""
        if self.vae is None:
            raise ValueError("this DiffusersFluxHost has no VAE; build it with DiffusersFluxHost.from_pipeline(pipe) "
                             "or DiffusersFluxHost(transformer, vae=vae)")
        return encode_images(self.vae, images)

    def collate(self, conds: Sequence[FluxTextCond]) -> FluxTextCond:
        return collate_text_conds(conds)

    def identity(self) -> str:
        return transformer_identity(self.transformer)

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        """Freezes the base model (and turns on checkpointing) for the duration of a training run.

        The VAE and text encoders on the training device wait on the CPU meanwhile (the latents and
        the conditioning are cached before training starts) and come back afterwards, also when
        the run raises or is interrupted.
        """
        with encoders_off_device(self.pipe if self.pipe is not None else _VaeOnly(self.vae), self.device):
            with self._frozen():
                yield

    def _frozen(self) -> ContextManager[None]:
        return frozen_for_training(self.transformer, self._blocks(), self.checkpoint_every, self.compile_blocks)

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
            guidance = torch.full((b,), cond.guidance, device=dev, dtype=torch.float32)
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


def checkpoint_func(blocks: Sequence[torch.nn.Module], every: int) -> Any:
    """diffusers' checkpoint hook that recomputes every ``every``-th of ``blocks`` (counted from 0)."""
    chosen = {id(b) for i, b in enumerate(blocks) if checkpointed(i, every)}

    def run(block, *args):
        if id(block) in chosen:
            return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)
        return block(*args)

    return run


@contextlib.contextmanager
def frozen_for_training(transformer: torch.nn.Module, blocks: Sequence[torch.nn.Module], checkpoint_every: int,
                        compile_on: bool = False) -> Iterator[None]:
    """A diffusers transformer frozen for a training run: no parameter needs a gradient, every
    ``checkpoint_every``-th of its ``blocks`` recomputes its activations in backward (0: none),
    the blocks run compiled with ``compile_on`` (``compiled_blocks``); all undone afterwards."""
    flags = [p.requires_grad for p in transformer.parameters()]
    transformer.requires_grad_(False)
    every = check_checkpoint_every(checkpoint_every)
    if every:
        transformer.enable_gradient_checkpointing(None if every == 1 else checkpoint_func(blocks, every))
    try:
        with compiled_blocks(blocks, compile_on):
            yield
    finally:
        if every:
            transformer.disable_gradient_checkpointing()
        for p, f in zip(transformer.parameters(), flags):
            p.requires_grad_(f)


def _call_block(block: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """What ``compiled_blocks`` compiles: a block's call, its hooks (the adapters) included."""
    return block._call_impl(*args, **kwargs)


_RUNS = itertools.count()


@contextlib.contextmanager
def compiled_blocks(blocks: Sequence[torch.nn.Module], compile_on: bool) -> Iterator[None]:
    """Runs ``blocks`` compiled (``compile_on``) or eagerly for one training run; afterwards each
    block calls what it called before.

    torch.compile keeps its graphs per code object and does not guard on module hooks, so a graph
    traced without this run's adapters (a compiled bare step, another run's adapters, the caller's
    own ``Module.compile`` or diffusers' ``compile_repeated_blocks``) would run the model without
    them, silently. Hence: each run compiles a copy of ``_call_block`` with a code object of its
    own (the blocks of one kind share its graphs within the run), and blocks the caller compiled
    run eagerly while training.
    """
    previous = [b.__dict__.get("_compiled_call_impl") for b in blocks]
    compiled = None
    if compile_on:
        code = _call_block.__code__
        fn = types.FunctionType(code.replace(co_name=f"{code.co_name}_{next(_RUNS)}"), _call_block.__globals__)
        compiled = torch.compile(fn)
    try:
        for b in blocks:
            b._compiled_call_impl = None if compiled is None else _bound(compiled, b)
        yield
    finally:
        for b, impl in zip(blocks, previous):
            if impl is None:
                b.__dict__.pop("_compiled_call_impl", None)
            else:
                b._compiled_call_impl = impl


def _bound(compiled: Any, block: torch.nn.Module) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        prepare = getattr(block.forward, "prepare", None)  # a training forward's check runs eagerly
        if prepare is not None:
            prepare(block, *args, **kwargs)
        return compiled(block, *args, **kwargs)

    return call


def transformer_identity(transformer: torch.nn.Module) -> str:
    """Class, config and a sample of a diffusers transformer's weights (see ``formats.store.weights_identity``)."""
    config = sorted((k, str(v)) for k, v in dict(transformer.config).items() if not k.startswith("_"))
    return weights_identity(transformer.state_dict(), extra=f"{type(transformer).__name__}{config}")


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> PIL RGB (the inverse of ``pil_to_tensor``)."""
    a = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(a)


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float in [-1, 1]."""
    a = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(a).permute(2, 0, 1).contiguous()


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
def encode_prompt(pipe, prompt: str, max_sequence_length: int = 512, *, guidance: float = 1.0) -> FluxTextCond:
    """Encodes one caption with a ``FluxPipeline``'s text encoders; ``guidance`` travels with it."""
    embeds, pooled, text_ids = pipe.encode_prompt(
        prompt=prompt, prompt_2=None, device=pipe.transformer.device, num_images_per_prompt=1,
        max_sequence_length=max_sequence_length,
    )
    return FluxTextCond(prompt_embeds=embeds.float().cpu(), pooled=pooled.float().cpu(), text_ids=text_ids.float().cpu(),
                        guidance=float(guidance))


def load_flux_pipeline(model: str | os.PathLike, *, dtype: str = "bfloat16", device: str | None = None,
                       transformer: str | os.PathLike | None = None) -> Any:
    """Loads a local diffusers FLUX folder (never downloads).

    Args:
        model: the folder that holds ``model_index.json`` (FluxPipeline layout).
        dtype: "float32", "bfloat16" or "float16".
        device: where to put the pipeline (None: cuda when available, else cpu).
        transformer: optional single-file FLUX transformer (.safetensors) overriding the folder's;
            its config comes from the folder.

    Raises:
        FileNotFoundError: ``model`` is not a diffusers FLUX folder.
        ValueError: unknown dtype.
    """
    model = Path(model)
    if not (model / "model_index.json").is_file():
        raise FileNotFoundError(f"{model} is not a diffusers FLUX folder (no model_index.json); "
                                "pass the folder that holds model_index.json")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} unknown; choose one of {sorted(DTYPES)}")
    from .quiet import no_torchvision_notice

    with no_torchvision_notice():
        from diffusers import FluxPipeline, FluxTransformer2DModel

    as_dtype = {dtype_keyword(): DTYPES[dtype]}
    kw = {}
    if transformer is not None:
        kw["transformer"] = FluxTransformer2DModel.from_single_file(
            str(transformer), config=str(model), subfolder="transformer", local_files_only=True, **as_dtype)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return FluxPipeline.from_pretrained(str(model), local_files_only=True, **as_dtype, **kw).to(device)


def dtype_keyword() -> str:
    """The keyword diffusers' ``from_pretrained`` / ``from_single_file`` take the weights' dtype
    by: ``dtype`` from diffusers 0.42 (which deprecates ``torch_dtype``), ``torch_dtype`` before."""
    import diffusers

    major, minor = (int(part) for part in diffusers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (0, 42) else "torch_dtype"


@dataclass
class _VaeOnly:
    """``encoders_off_device``'s view of a host built without a pipeline: its VAE only."""

    vae: torch.nn.Module | None


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
