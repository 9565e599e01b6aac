"""What a trainer needs from a model implementation (the diffusers FLUX host, the ComfyUI FLUX host).

A host owns the frozen model and everything that is specific to it: how adapters reach its
layers, how images become latents in its latent space, how a batch's conditionings are joined
and how the model is identified for a content-keyed cache. Conditioning objects are the host's
own; each carries the distilled-guidance value it is trained with and a content digest.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ContextManager, Protocol

import torch
from PIL import Image

from ..lora.adapter import AdapterSet
from ..lora.families import ModelDims


class FlowHost(Protocol):
    """A frozen flow-matching model that adapters are trained against."""

    dims: ModelDims  # the model's family dims type (FluxDims for FLUX.1); dims.family describes the model
    # blocks apart to recompute in backward while training (``lora.layers.check_checkpoint_every``):
    # 0 none, 1 every block (double blocks then single blocks, counted from 0), k every k-th block
    checkpoint_every: int

    @property
    def device(self) -> torch.device: ...

    def attach(self, adapters: AdapterSet) -> Any:
        """Routes the model's layers through ``adapters``; returns an object with ``.remove()``."""
        ...

    def training(self) -> ContextManager[None]:
        """Frozen base, training-time settings (checkpointing, ...) for the duration of a run."""
        ...

    def predict(self, x_t: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        """(B, C, h, w) noisy latents, (B,) sigmas -> (B, C, h, w) velocity ``noise - x0``."""
        ...

    def encode_images(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        """RGB images (sizes may differ) -> (C, h, w) float32 CPU latents in the model's space."""
        ...

    def collate(self, conds: Sequence[Any]) -> Any:
        """One conditioning for a batch whose items have the given conditionings (row i: item i)."""
        ...

    def identity(self) -> str:
        """A content identity of the frozen model for cache keys (independent of transient state)."""
        ...
