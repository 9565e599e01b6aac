"""The personalization recipe shared by the CLI, the demo and the ComfyUI nodes.

photo -> face -> augmented crops (paper Sec. 3, ``faces.person.person_crops``) ; prior (or none) -> adapters ;
crops + caption conditioning + adapters -> Stage-2 on any ``FlowHost`` -> trained adapters with
their provenance. ``run_stage2`` is the one Stage-2 pipeline; ``plan_stage2`` gives the cache
key and provenance before training (a front end with a cache looks the key up first) and is the
one place a run checks its prior against the model (``fit_prior``).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
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
from ..lora.layers import DEFAULT_PRESET, PRESETS, resolve_targets
from .host import FlowHost
from .stage2 import Stage2Config, StepCallback, TrainResult, personalize

log = logging.getLogger(__name__)

CLASS_CAPTIONS = {"woman": "a photo of a woman", "man": "a photo of a man", "person": "a photo of a person"}
_INIT_SALT = 0x5EED  # keeps the adapter-init stream apart from the training stream of the same seed


def class_caption(noun: str) -> str:
    """A training caption made of the class noun alone, no trigger word (the paper states no caption)."""
    return CLASS_CAPTIONS.get(noun, f"a photo of a {noun}")


@dataclass(frozen=True)
class FittedPrior:
    """A prior checked against one model's dims (``fit_prior``), with its layers' shapes there."""

    prior: Prior
    dims: ModelDims
    shapes: dict  # canonical name -> (in, out), in model order


def fit_prior(prior: Prior, dims: ModelDims, *, source: str = "prior") -> FittedPrior:
    """Checks every layer of ``prior`` against a model of ``dims`` (``formats.prior.validate_prior``).

    Raises:
        ValueError: the prior does not fit (naming ``source``).
    """
    return FittedPrior(prior, dims, validate_prior(prior, dims, source=source))


def _adapters(prior: Prior | None, shapes: dict, *, rank: int, preset: str, seed: int) -> AdapterSet:
    gen = torch.Generator().manual_seed(seed ^ _INIT_SALT)
    if prior is None:
        return AdapterSet.plain(shapes, rank=rank, preset=preset, generator=gen)
    return AdapterSet.from_downs(prior.downs, shapes, r2=rank, preset=prior.preset, generator=gen)


def build_adapters(
    dims: ModelDims,
    prior: Prior | None,
    *,
    rank: int,
    preset: str = DEFAULT_PRESET,
    seed: int = 0,
    source: str = "prior",
) -> AdapterSet:
    """Meta-LoRA adapters on a prior (checked against ``dims``), or plain LoRA adapters when ``prior`` is None."""
    if prior is None:
        return _adapters(None, resolve_targets(preset, dims), rank=rank, preset=preset, seed=seed)
    return _adapters(prior, fit_prior(prior, dims, source=source).shapes, rank=rank, preset=preset, seed=seed)


# ---------------------------------------------------------------------------------------------
# The Stage-2 recipe: provenance, cache key, run

PROVENANCE_VERSION = 1
_KEY_VERSION = 3  # bump when the meaning of the key's parts changes (old cache entries then miss)
# Stage2Config fields that do not change the trained result (how often the loss is read back):
# recorded in the provenance, left out of the cache key
RESULT_NEUTRAL = ("sync_every",)


def resolve_preset(prior: Prior | None, config: Stage2Config) -> str | None:
    """The layers a run trains: the prior's preset wins (None: the layers of the prior file), else the setting."""
    return prior.preset if prior is not None else config.preset


_PARSE = {"int": int, "float": float, "str": str, "bool": lambda v: {"true": True, "false": False}[v]}


@dataclass(frozen=True)
class Provenance:
    """How a trained LoRA was made; written as string metadata by every save path.

    The same keys, with the same meanings, whoever saves: ``metalora personalize``/``export``,
    the demo, the ComfyUI Save node after training and after a disk-cache hit. ``config`` is
    written field by field under each field's own name (its preset as ``preset``).
    """

    provenance_version: int  # PROVENANCE_VERSION of the writer
    metalora_version: str  # package version that trained it
    cache_key: str  # sha256 of everything the result depends on (``stage2_key``)
    model_id: str  # the host's identity of the frozen base model (``FlowHost.identity``)
    mode: str  # "meta" (Meta-LoRA on a prior) or "lora" (plain LoRA)
    preset: str  # layers trained: the prior's preset, else the setting ("" = the layers of the prior file)
    config: Stage2Config  # the run's settings; its preset is ``preset`` where that names one
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
        flat = {**vars(self.config), **{f.name: getattr(self, f.name) for f in fields(self)}}  # preset: the run's
        out = {}
        for name, _ in _metadata_types():
            v = flat[name]
            out[name] = ("true" if v else "false") if isinstance(v, bool) else str(v)
        return out

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str]) -> "Provenance":
        """Reads what ``to_metadata`` wrote.

        Raises:
            ValueError: a key is missing or does not parse (e.g. a file of an older version).
        """
        values = {}
        for name, kind in _metadata_types():
            if name not in meta:
                raise ValueError(f"metadata has no provenance key {name!r}; it was not written by this "
                                 f"version's Stage-2 recipe (provenance version {PROVENANCE_VERSION})")
            try:
                values[name] = _PARSE[kind](meta[name])
            except (ValueError, KeyError) as e:
                raise ValueError(f"provenance key {name!r} has value {meta[name]!r}, not a {kind}") from e
        settings = {k: values.pop(k) for k in _CONFIG_KEYS}
        try:
            config = Stage2Config(**settings, preset=_config_preset(values["preset"]))
        except ValueError as e:
            raise ValueError(f"provenance settings do not make a Stage-2 config: {e}") from e
        return cls(config=config, **values)


_CONFIG_KEYS = tuple(f.name for f in fields(Stage2Config) if f.name != "preset")


def _metadata_types() -> list[tuple[str, str]]:
    """(key, type) of the provenance metadata, in the order it is written: the config's fields
    (but preset, which is the provenance's own) where ``config`` stands."""
    config = [(f.name, f.type) for f in fields(Stage2Config) if f.name != "preset"]
    return [kt for f in fields(Provenance) for kt in (config if f.name == "config" else [(f.name, f.type)])]


def _config_preset(preset: str) -> str:
    """The config preset a resolved preset stands for ("": the prior file's layers, any setting: the default)."""
    return preset if preset in PRESETS else DEFAULT_PRESET


def stage2_key(config: Stage2Config, *, model_id: str, images_sha256: str, prior_sha256: str, cond_sha256: str,
               flips: bool = True) -> str:
    """Content key of a Stage-2 result: every config field that changes it plus the inputs' hashes
    and whether the crops are flipped per step."""
    settings = {k: v for k, v in asdict(config).items() if k not in RESULT_NEUTRAL}
    return content_key({"v": _KEY_VERSION, "config": settings, "model": model_id, "images": images_sha256,
                        "prior": prior_sha256, "cond": cond_sha256, "flips": flips})


@dataclass(frozen=True)
class Stage2Plan:
    """A Stage-2 run, fully described before it starts: inputs, the prior fitted to the model, provenance."""

    images: tuple  # tuple[PIL.Image, ...] training images
    cond: Any  # the host's conditioning of the caption
    prior: Prior | None
    shapes: dict  # the trained layers' (in, out): the prior's on the host's model, or the preset's
    flips: bool  # each crop drawn plain or mirrored per step (the paper's random flips)
    provenance: Provenance  # with the config and the cache key

    @property
    def config(self) -> Stage2Config:
        return self.provenance.config


def plan_stage2(host: FlowHost, images: FaceCrops | Sequence[Image.Image], cond: Any,
                prior: Prior | FittedPrior | None, config: Stage2Config, *, caption: str = "",
                prior_source: str = "prior") -> Stage2Plan:
    """Checks the prior against the host's model, hashes the inputs and builds the provenance (and
    cache key) of a Stage-2 run, without training.

    Args:
        host: the frozen model (its ``identity()`` enters the key, its ``dims`` fit the prior).
        images: ``FaceCrops`` (their detector, augmentation, resolution and flips are recorded) or
            images (flipped per step).
        cond: the host's conditioning of the caption (its ``digest()`` and ``guidance`` are recorded).
        prior: a ``Prior`` (Meta-LoRA), one already fitted to a model of the host's dims
            (``fit_prior``, e.g. by a front end's checks before it loaded the model), or None
            (plain LoRA on ``config.preset`` layers).
        config: every setting that affects the result.
        caption: the caption's text, where the front end knows it (recorded only).
        prior_source: how errors name the prior.

    Raises:
        ValueError: no image, or the prior does not fit the host's model (naming ``prior_source``).
    """
    crops = images if isinstance(images, FaceCrops) else None
    pics = tuple(crops.images if crops is not None else images)
    if not pics:
        raise ValueError("no training images; give at least one image crop")
    if isinstance(prior, FittedPrior) and prior.dims != host.dims:
        prior = prior.prior
    if isinstance(prior, Prior):
        prior = fit_prior(prior, host.dims, source=prior_source)
    plain = prior is None
    preset = resolve_preset(None if plain else prior.prior, config)
    shapes = resolve_targets(preset, host.dims) if plain else prior.shapes
    config = replace(config, preset=_config_preset(preset or ""))
    flips = crops.flips if crops is not None else True
    parts = dict(model_id=host.identity(), images_sha256=image_digest(pics),
                 prior_sha256="" if plain else prior.prior.sha256, cond_sha256=cond.digest())
    prov = Provenance(
        provenance_version=PROVENANCE_VERSION, metalora_version=__version__,
        cache_key=stage2_key(config, **parts, flips=flips), mode="lora" if plain else "meta", preset=preset or "",
        config=config, **parts, images=len(pics), guidance=float(cond.guidance), caption=caption,
        detector=crops.detector if crops is not None else "",
        augmentation=crops.augmentation if crops is not None else "",
        resolution=crops.resolution if crops is not None else 0,
    )
    return Stage2Plan(images=pics, cond=cond, prior=None if plain else prior.prior, shapes=shapes, flips=flips,
                      provenance=prov)


def prepare_stage2(host: FlowHost, plan: Stage2Plan) -> tuple[AdapterSet, list]:
    """The untrained adapters of a plan and its training items, ready for ``personalize``.

    Returns:
        (adapters, items): adapters on the prior (or plain LoRA), and per image one (plain,
        mirrored) latent pair when the plan flips (Stage-2 draws one orientation per step, paper
        Sec. 3, random flips), else its one latent.
    """
    config = plan.config
    adapters = _adapters(plan.prior, plan.shapes, rank=config.rank, preset=config.preset, seed=config.seed)
    if plan.flips:
        return adapters, encode_flip_pairs(host.encode_images, plan.images)
    return adapters, host.encode_images(list(plan.images))


def execute_stage2(host: FlowHost, plan: Stage2Plan, callback: StepCallback | None = None) -> TrainResult:
    """Encodes the plan's images with the host, builds the adapters and trains them (Algorithm 2).

    Raises:
        RuntimeError: the loss became NaN or inf.
    """
    adapters, latents = prepare_stage2(host, plan)
    return replace(personalize(host, adapters, latents, plan.cond, plan.config, callback), provenance=plan.provenance,
                   family=host.dims.family)


def run_stage2(host: FlowHost, images: FaceCrops | Sequence[Image.Image], cond: Any,
               prior: Prior | FittedPrior | None, config: Stage2Config, callback: StepCallback | None = None, *,
               caption: str = "", prior_source: str = "prior") -> TrainResult:
    """Stage-2 personalization on any host: ``plan_stage2`` then ``execute_stage2``.

    Args:
        host: a ``FlowHost`` (diffusers FLUX, ComfyUI FLUX).
        images: the training crops (``FaceCrops`` or images; sizes may differ).
        cond: the host's conditioning of the class caption (the paper: "a photo of a woman").
        prior: a ``Prior`` or ``FittedPrior`` (Meta-LoRA) or None (plain LoRA on ``config.preset`` layers).
        config: steps, lr, rank, seed, ... (everything that affects the result).
        callback: called after every step with (step, loss); raising from it cancels the run.
        caption: the caption's text for the provenance.

    Returns:
        ``TrainResult`` with the trained adapters, the losses and their provenance.

    Raises:
        ValueError: the prior does not fit the host's model (naming ``prior_source``).
        RuntimeError: the loss became NaN or inf.
    """
    plan = plan_stage2(host, images, cond, prior, config, caption=caption, prior_source=prior_source)
    return execute_stage2(host, plan, callback)
