"""The personalization recipe shared by the CLI, the demo and the ComfyUI nodes.

photo -> face -> augmented crops (paper Sec. 3, ``faces.person.person_crops``) ; prior (or none) -> adapters ;
crops + caption conditioning + adapters -> Stage-2 on any ``FlowHost`` -> trained adapters with
their provenance. ``run_stage2`` is the one Stage-2 pipeline; ``plan_stage2`` gives the cache
key and provenance before training (a front end with a cache looks the key up first).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from PIL import Image

from .. import __version__
from ..data.latents import encode_flip_pairs
from ..faces.crops import FaceCrops
from ..formats.prior import Prior, validate_prior
from ..formats.store import content_key, image_digest
from ..lora.adapter import AdapterSet
from ..lora.families import ModelDims
from ..lora.layers import DEFAULT_PRESET, resolve_targets
from .host import FlowHost
from .stage2 import Stage2Config, StepCallback, personalize

log = logging.getLogger(__name__)

CLASS_CAPTIONS = {"woman": "a photo of a woman", "man": "a photo of a man", "person": "a photo of a person"}
_INIT_SALT = 0x5EED  # keeps the adapter-init stream apart from the training stream of the same seed


def class_caption(noun: str) -> str:
    """A training caption made of the class noun alone, no trigger word (the paper states no caption)."""
    return CLASS_CAPTIONS.get(noun, f"a photo of a {noun}")


def build_adapters(
    dims: ModelDims,
    prior: Prior | None,
    *,
    rank: int,
    preset: str = DEFAULT_PRESET,
    seed: int = 0,
    source: str = "prior",
) -> AdapterSet:
    """Meta-LoRA adapters on a validated prior, or plain LoRA adapters when ``prior`` is None."""
    gen = torch.Generator().manual_seed(seed ^ _INIT_SALT)
    if prior is None:
        return AdapterSet.plain(resolve_targets(preset, dims), rank=rank, preset=preset, generator=gen)
    shapes = validate_prior(prior, dims, source=source)
    return AdapterSet.from_downs(prior.downs, shapes, r2=rank, preset=prior.preset, generator=gen)


# ---------------------------------------------------------------------------------------------
# The Stage-2 recipe: provenance, cache key, run

PROVENANCE_VERSION = 1
_KEY_VERSION = 2  # bump when the meaning of the key's parts changes (old cache entries then miss)


def resolve_preset(prior: Prior | None, config: Stage2Config) -> str | None:
    """The layers a run trains: the prior's preset wins (None: the layers of the prior file), else the setting."""
    return prior.preset if prior is not None else config.preset


@dataclass(frozen=True)
class Provenance:
    """How a trained LoRA was made; written as string metadata by every save path.

    The same keys, with the same meanings, whoever saves: ``metalora personalize``/``export``,
    the demo, the ComfyUI Save node after training and after a disk-cache hit.
    """

    provenance_version: int  # PROVENANCE_VERSION of the writer
    metalora_version: str  # package version that trained it
    cache_key: str  # sha256 of everything the result depends on (``stage2_key``)
    model_id: str  # the host's identity of the frozen base model (``FlowHost.identity``)
    mode: str  # "meta" (Meta-LoRA on a prior) or "lora" (plain LoRA)
    preset: str  # layers trained: the prior's preset, else the setting ("" = the layers of the prior file)
    # every Stage2Config field but preset, under its own name
    steps: int
    lr: float
    weight_decay: float
    rank: int
    seed: int
    sigma_mode: str
    resolution_shift: bool
    max_grad_norm: float
    batch_size: int
    noise_device: str
    sync_every: int
    prior_sha256: str  # ``Prior.sha256`` (content hash of the Down matrices); "" for plain LoRA
    images_sha256: str  # ``formats.store.image_digest`` of the training pixels, in order
    images: int  # number of training images
    cond_sha256: str  # the conditioning's ``digest()`` (text states and guidance)
    guidance: float  # distilled-guidance input while training
    caption: str  # the training caption's text where the front end knows it, else ""
    detector: str  # face detector that placed the crops ("" when images were given directly)
    augmentation: str  # "paper_grid", "none", or "" when images were given directly
    resolution: int  # side of the crops' bucket area (0 when images were given directly)

    def to_metadata(self) -> dict[str, str]:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = ("true" if v else "false") if isinstance(v, bool) else str(v)
        return out

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str]) -> "Provenance":
        """Reads what ``to_metadata`` wrote.

        Raises:
            ValueError: a key is missing or does not parse (e.g. a file of an older version).
        """
        parse = {"int": int, "float": float, "str": str, "bool": lambda v: {"true": True, "false": False}[v]}
        values = {}
        for f in fields(cls):
            if f.name not in meta:
                raise ValueError(f"metadata has no provenance key {f.name!r}; it was not written by this "
                                 f"version's Stage-2 recipe (provenance version {PROVENANCE_VERSION})")
            try:
                values[f.name] = parse[f.type](meta[f.name])
            except (ValueError, KeyError) as e:
                raise ValueError(f"provenance key {f.name!r} has value {meta[f.name]!r}, not a {f.type}") from e
        return cls(**values)


def stage2_key(config: Stage2Config, *, preset: str | None, model_id: str, images_sha256: str, prior_sha256: str,
               cond_sha256: str) -> str:
    """Content key of a Stage-2 result: every config field (preset as resolved) plus the inputs' hashes."""
    return content_key({"v": _KEY_VERSION, "config": {**asdict(config), "preset": preset}, "model": model_id,
                        "images": images_sha256, "prior": prior_sha256, "cond": cond_sha256})


@dataclass(frozen=True)
class Stage2Plan:
    """A Stage-2 run, fully described before it starts: inputs, config, provenance (with the cache key)."""

    images: tuple  # tuple[PIL.Image, ...] training images
    cond: Any  # the host's conditioning of the caption
    prior: Prior | None
    config: Stage2Config
    provenance: Provenance


@dataclass
class Stage2Run:
    """A finished Stage-2 run: trained adapters (CPU, float32), per-step losses, provenance."""

    adapters: AdapterSet
    losses: list[float]
    provenance: Provenance
    seconds: float = 0.0

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / max(1, len(self.losses))

    def metadata(self) -> dict[str, str]:
        return self.provenance.to_metadata()


def plan_stage2(host: FlowHost, images: FaceCrops | Sequence[Image.Image], cond: Any, prior: Prior | None,
                config: Stage2Config, *, caption: str = "") -> Stage2Plan:
    """Hashes the inputs and builds the provenance (and cache key) of a Stage-2 run, without training.

    Args:
        host: the frozen model (its ``identity()`` enters the key).
        images: ``FaceCrops`` (their detector, augmentation and resolution are recorded) or images.
        cond: the host's conditioning of the caption (its ``digest()`` and ``guidance`` are recorded).
        prior: a ``Prior`` (Meta-LoRA) or None (plain LoRA on ``config.preset`` layers).
        config: every setting that affects the result.
        caption: the caption's text, where the front end knows it (recorded only).
    """
    crops = images if isinstance(images, FaceCrops) else None
    pics = tuple(crops.images if crops is not None else images)
    if not pics:
        raise ValueError("no training images; give at least one image crop")
    preset = resolve_preset(prior, config)
    parts = dict(model_id=host.identity(), images_sha256=image_digest(pics),
                 prior_sha256=prior.sha256 if prior is not None else "", cond_sha256=cond.digest())
    prov = Provenance(
        provenance_version=PROVENANCE_VERSION, metalora_version=__version__,
        cache_key=stage2_key(config, preset=preset, **parts),
        mode="meta" if prior is not None else "lora", preset=preset or "",
        **{f.name: getattr(config, f.name) for f in fields(Stage2Config) if f.name != "preset"},
        **parts, images=len(pics), guidance=float(cond.guidance), caption=caption,
        detector=crops.detector if crops is not None else "",
        augmentation=crops.augmentation if crops is not None else "",
        resolution=crops.resolution if crops is not None else 0,
    )
    return Stage2Plan(images=pics, cond=cond, prior=prior, config=config, provenance=prov)


def prepare_stage2(host: FlowHost, plan: Stage2Plan, *, prior_source: str = "prior") -> tuple[AdapterSet, list]:
    """The untrained adapters of a plan and its training items, ready for ``personalize``.

    Returns:
        (adapters, items): adapters on the prior (or plain LoRA), and one (plain, mirrored) latent
        pair per image: Stage-2 draws one orientation per step (paper Sec. 3, random flips).

    Raises:
        ValueError: the prior does not fit the host's model (naming ``prior_source``).
    """
    config = plan.config
    adapters = build_adapters(host.dims, plan.prior, rank=config.rank, preset=config.preset, seed=config.seed,
                              source=prior_source)
    return adapters, encode_flip_pairs(host.encode_images, plan.images)


def execute_stage2(host: FlowHost, plan: Stage2Plan, callback: StepCallback | None = None, *,
                   prior_source: str = "prior") -> Stage2Run:
    """Encodes the plan's images with the host, builds the adapters and trains them (Algorithm 2).

    Raises:
        ValueError: the prior does not fit the host's model (naming ``prior_source``).
        RuntimeError: the loss became NaN or inf.
    """
    adapters, latents = prepare_stage2(host, plan, prior_source=prior_source)
    result = personalize(host, adapters, latents, plan.cond, plan.config, callback)
    return Stage2Run(adapters=result.adapters, losses=result.losses, provenance=plan.provenance,
                     seconds=result.seconds)


def run_stage2(host: FlowHost, images: FaceCrops | Sequence[Image.Image], cond: Any, prior: Prior | None,
               config: Stage2Config, callback: StepCallback | None = None, *, caption: str = "",
               prior_source: str = "prior") -> Stage2Run:
    """Stage-2 personalization on any host: ``plan_stage2`` then ``execute_stage2``.

    Args:
        host: a ``FlowHost`` (diffusers FLUX, ComfyUI FLUX).
        images: the training crops (``FaceCrops`` or images; sizes may differ).
        cond: the host's conditioning of the class caption (the paper: "a photo of a woman").
        prior: a ``Prior`` (Meta-LoRA) or None (plain LoRA on ``config.preset`` layers).
        config: steps, lr, rank, seed, ... (everything that affects the result).
        callback: called after every step with (step, loss); raising from it cancels the run.
        caption: the caption's text for the provenance.

    Returns:
        ``Stage2Run`` with the trained adapters, the losses and their provenance.
    """
    plan = plan_stage2(host, images, cond, prior, config, caption=caption)
    return execute_stage2(host, plan, callback, prior_source=prior_source)
