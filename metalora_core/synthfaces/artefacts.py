"""Builds, saves and loads the small domain's trained artefacts: autoencoder, base model,
identity embedder and the Stage-1 prior.

``build_artefacts`` is the one function behind ``experiments/build_artefacts.py``; every part
trains from scratch on rendered images, single-threaded CPU, deterministic in ``seed``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..formats.files import atomic_save_safetensors, atomic_write_bytes, read_safetensors
from ..formats.prior import Prior, load_prior, save_prior
from ..hosts.diffusers_flux import DiffusersFluxHost, encode_images, pil_to_tensor
from .judge import IdentityEmbedder, train_embedder
from .models import (SmallFluxConfig, build_autoencoder, build_transformer, encode_batch, encode_text, latent_stats,
                     stack_conds, train_autoencoder, train_base)
from .render import (BASE_OFFSET, CONTEXTS, TRAIN_OFFSET, context_prompt, make_identity, random_view, render)

log = logging.getLogger(__name__)

SHAPES = ((32, 32), (40, 24), (24, 40))  # the crop grid's buckets at 32x32 area, multiple 8
SHAPE_WEIGHTS = (0.6, 0.2, 0.2)
CLASS_NOUN = "face"
# One learning rate for every Stage-1 and Stage-2 run of this domain, as the paper uses one for all
# its runs (4e-4). The calibration of experiments/calibrate.py (plain LoRA alone, on identities the
# comparison never scores; 4e-4, 4e-3 and 4e-4 x 48, the paper model's width over this one's 64) keeps it: see
# experiments/results/calibration/.
DOMAIN_LR = 4e-4
FILES = ("autoencoder.safetensors", "base.safetensors", "embedder.safetensors", "prior.safetensors", "manifest.json")


@dataclass(frozen=True)
class BuildConfig:
    """How much training each artefact gets (defaults: the committed artefacts, ~15 CPU minutes)."""

    seed: int = 0  # drives every render and every initialisation
    model: SmallFluxConfig = SmallFluxConfig()
    ae_steps: int = 600  # autoencoder steps (batch ae_batch)
    ae_batch: int = 32
    base_images: int = 12_000  # pre-rendered base-model training images, one fresh face each
    base_steps: int = 4_000  # base-model steps (batch base_batch)
    base_batch: int = 64
    context_dropout: float = 0.2  # fraction of base captions without the context (the class caption)
    train_identities: int = 160  # Stage-1 / embedder identities (disjoint from held-out ones)
    photos_per_identity: int = 8  # Stage-1 photos per identity
    embed_views: int = 24  # embedder training views per identity (drawn per batch)
    embed_steps: int = 800
    embed_batch: int = 128
    meta_steps: int = 3_200  # q_total (Algorithm 1)
    meta_bucket_steps: int = 200  # q_bucket
    meta_warmup_steps: int = 80  # q_warm-up = 0.4 q_bucket
    meta_batch: int = 4  # the paper's Stage-1 batch
    meta_lr: float = DOMAIN_LR  # Stage-1 learning rate (Down and Mid/Up)
    r1: int = 8  # Meta-Down rank
    preset: str = "all"  # target layers: every Linear of the blocks (ai-toolkit's FLUX default)

    def __post_init__(self) -> None:
        for f in ("ae_steps", "ae_batch", "base_images", "base_steps", "base_batch", "train_identities",
                  "photos_per_identity", "embed_steps", "embed_batch", "meta_steps", "meta_bucket_steps",
                  "meta_batch", "r1"):
            if int(getattr(self, f)) < 1:
                raise ValueError(f"BuildConfig.{f} must be >= 1, got {getattr(self, f)!r}")
        if not 0 <= self.meta_warmup_steps <= self.meta_bucket_steps:
            raise ValueError(f"meta_warmup_steps must be in [0, meta_bucket_steps], got {self.meta_warmup_steps}")
        if not (isinstance(self.meta_lr, (int, float)) and 0 < self.meta_lr < 1):
            raise ValueError(f"meta_lr must be in (0, 1), got {self.meta_lr!r}")
        if not 0.0 <= self.context_dropout < 1.0:
            raise ValueError(f"context_dropout must be in [0, 1), got {self.context_dropout}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        return d


SMOKE_BUILD = BuildConfig(ae_steps=3, ae_batch=4, base_images=48, base_steps=3, base_batch=8, train_identities=4,
                          photos_per_identity=2, embed_views=2, embed_steps=3, embed_batch=8, meta_steps=8,
                          meta_bucket_steps=4, meta_warmup_steps=2, meta_batch=2, r1=2)


@dataclass
class Artefacts:
    """The loaded small domain: models on the CPU, frozen."""

    vae: Any
    transformer: Any
    embedder: IdentityEmbedder
    prior: Prior | None  # None: a build whose Stage-1 has not run yet (plain LoRA only)
    model_config: SmallFluxConfig
    manifest: dict[str, Any]
    domain: int = 1  # render.make_identity's domain

    @property
    def latent_channels(self) -> int:
        return int(getattr(self.vae.config, "latent_channels", 16))

    @property
    def latent_factor(self) -> int:
        """Pixels per latent cell along a side."""
        f = getattr(self.vae.config, "factor", None)
        return int(f) if f is not None else 2 ** (len(self.model_config.ae_channels) - 1)

    @property
    def host(self) -> DiffusersFluxHost:
        return DiffusersFluxHost(self.transformer, vae=self.vae)

    def cond(self, context: str | None) -> Any:
        return encode_text(context_prompt(context, CLASS_NOUN), self.model_config.text_dim)


def _pick_shape(g: np.random.Generator) -> tuple[int, int]:
    return SHAPES[int(g.choice(len(SHAPES), p=SHAPE_WEIGHTS))]


def _render_random(g: np.random.Generator, index: int, size: tuple[int, int]):
    ident = make_identity(index)
    view = random_view(g, scale=(0.6, 1.25))
    return render(ident, view, size), view.context


def build_artefacts(out: str | Path, config: BuildConfig = BuildConfig()) -> Artefacts:
    """Trains autoencoder, base model, embedder and prior; writes them and a manifest to ``out``."""
    from ..train.stage1 import MetaTrainConfig, meta_train, to_prior

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mc = config.model
    g = np.random.default_rng(np.random.SeedSequence([config.seed, 1]))
    times: dict[str, float] = {}
    next_base = [BASE_OFFSET + config.seed * 1_000_000]

    def fresh_index() -> int:
        next_base[0] += 1
        return next_base[0]

    # 1. autoencoder (FLUX latent layout: 16 channels; here 4x downsampling)
    t = time.perf_counter()
    vae = build_autoencoder(mc, config.seed)

    def ae_batch(gen: torch.Generator) -> torch.Tensor:
        size = _pick_shape(g)
        return torch.stack([pil_to_tensor(_render_random(g, fresh_index(), size)[0]) for _ in range(config.ae_batch)])

    ae_losses = train_autoencoder(vae, ae_batch, steps=config.ae_steps, seed=config.seed)
    stats_imgs = [_render_random(g, fresh_index(), (32, 32))[0] for _ in range(min(256, config.base_images))]
    shift, std = latent_stats(vae, stats_imgs)
    vae.register_to_config(shift_factor=shift, scaling_factor=1.0 / max(std, 1e-6))
    test = [_render_random(g, fresh_index(), (32, 32))[0] for _ in range(min(64, config.base_images))]
    with torch.no_grad():
        x = torch.stack([pil_to_tensor(im) for im in test])
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
    ae_mse = float(torch.mean((rec.clamp(-1, 1) - x) ** 2))
    times["autoencoder_s"] = time.perf_counter() - t
    log.info("autoencoder: held-out reconstruction MSE %.4f (images in [-1, 1])", ae_mse)

    # 2. base model: class caption + context, no identity conditioning, one fresh face per image
    t = time.perf_counter()
    pools: dict[tuple[int, int], list] = {s: [] for s in SHAPES}
    for _ in range(config.base_images):
        size = _pick_shape(g)
        img, ctx = _render_random(g, fresh_index(), size)
        pools[size].append((img, None if g.random() < config.context_dropout else ctx))
    conds = {c: encode_text(context_prompt(c, CLASS_NOUN), mc.text_dim) for c in [None, *CONTEXTS]}
    latents: dict[tuple[int, int], torch.Tensor] = {}
    captions: dict[tuple[int, int], list] = {}
    for size, items in pools.items():
        if not items:
            continue
        zs = [encode_batch(vae, [im for im, _ in items[i:i + 256]]) for i in range(0, len(items), 256)]
        latents[size] = torch.cat(zs)
        captions[size] = [c for _, c in items]
    sizes = [s for s in SHAPES if s in latents]
    weights = np.array([len(captions[s]) for s in sizes], dtype=np.float64)

    def base_batch(gen: torch.Generator):
        size = sizes[int(g.choice(len(sizes), p=weights / weights.sum()))]
        idx = torch.randint(len(captions[size]), (config.base_batch,), generator=gen)
        return latents[size][idx], stack_conds([conds[captions[size][int(i)]] for i in idx])

    transformer = build_transformer(mc, config.seed)
    base_losses = train_base(transformer, base_batch, steps=config.base_steps, seed=config.seed)
    times["base_s"] = time.perf_counter() - t

    # 3. identity embedder on the training identities only
    t = time.perf_counter()
    train_ids = [make_identity(TRAIN_OFFSET + config.seed * 100_000 + k) for k in range(config.train_identities)]
    views = {k: [random_view(g, scale=(0.6, 1.25)) for _ in range(config.embed_views)] for k in range(len(train_ids))}
    embed_imgs = {k: [pil_to_tensor(render(train_ids[k], v, (32, 32))) for v in vs] for k, vs in views.items()}

    def embed_batch(gen: np.random.Generator):
        ks = gen.integers(len(train_ids), size=config.embed_batch)
        js = gen.integers(config.embed_views, size=config.embed_batch)
        x = torch.stack([embed_imgs[int(k)][int(j)] for k, j in zip(ks, js)])
        return x, torch.as_tensor(ks, dtype=torch.long)

    torch.manual_seed(config.seed)
    embedder = IdentityEmbedder()
    embed_losses = train_embedder(embedder, len(train_ids), embed_batch, steps=config.embed_steps, seed=config.seed)
    times["embedder_s"] = time.perf_counter() - t

    # 4. Stage-1 prior: Algorithm 1 on the training identities' photos (one latent per photo)
    t = time.perf_counter()
    host = DiffusersFluxHost(transformer)
    data = stage1_data(vae, conds[None], train_ids, config.photos_per_identity, g)
    mcfg = MetaTrainConfig(steps=config.meta_steps, bucket_steps=config.meta_bucket_steps,
                           warmup_steps=config.meta_warmup_steps, batch_size=config.meta_batch, r1=config.r1,
                           r2=1, preset=config.preset, lr=config.meta_lr, seed=config.seed)
    result = meta_train(host, data, mcfg)
    prior = to_prior(result, domain="synthfaces", base_model="synthfaces-small-flux", data_summary=data.summary)
    times["prior_s"] = time.perf_counter() - t
    visited = sorted({i for v in range(-(-config.meta_steps // config.meta_bucket_steps))
                      for i in result.buckets[v % len(result.buckets)]})

    def tail(xs: list[float], n: int = 50) -> float:
        xs = xs[-n:]
        return sum(xs) / max(1, len(xs))

    manifest = {
        "build": config.to_dict(),
        "model": mc.to_dict(),
        "autoencoder": {"loss_last50": tail(ae_losses), "heldout_mse": ae_mse, "shift_factor": shift,
                        "scaling_factor": 1.0 / max(std, 1e-6)},
        "base": {"loss_first50": sum(base_losses[:50]) / max(1, len(base_losses[:50])),
                 "loss_last50": tail(base_losses)},
        "embedder": {"loss_last50": tail(embed_losses), "classes": len(train_ids)},
        "prior": {"loss_first50": sum(result.losses[:50]) / max(1, len(result.losses[:50])),
                  "loss_last50": tail(result.losses), "buckets": len(result.buckets),
                  "identities_per_bucket": max(len(b) for b in result.buckets),
                  "identities_visited": len(visited), "identities": len(train_ids), "r1": config.r1,
                  "preset": config.preset, "sha256": prior.sha256},
        "seconds": {k: round(v, 1) for k, v in times.items()},
    }
    save_artefacts(out, vae, transformer, embedder, prior, manifest)
    return load_artefacts(out)


def stage1_data(vae, class_cond, identities: list, photos_per_identity: int, g: np.random.Generator):
    """Stage-1's data: ``photos_per_identity`` fresh 32x32 photos of each identity (views drawn
    from ``g``), one latent each, all with the class caption."""
    from ..train.stage1 import MetaTrainData

    lat, item_id = [], []
    for k, ident in enumerate(identities):
        photos = [render(ident, random_view(g, scale=(0.6, 1.25)), (32, 32)) for _ in range(photos_per_identity)]
        lat.extend(encode_images(vae, photos))
        item_id.extend([k] * len(photos))
    caption = context_prompt(None, CLASS_NOUN)
    return MetaTrainData(identities=[f"id{ident.index}" for ident in identities], latents=lat, item_identity=item_id,
                         item_caption=[caption] * len(lat), conds={caption: class_cond},
                         summary={"identities": len(identities), "images": len(lat), "items": len(lat),
                                  "class_caption": caption, "augment": False, "domain": "synthfaces"})


def save_artefacts(out: Path, vae, transformer, embedder: IdentityEmbedder, prior: Prior, manifest: dict) -> None:
    vcfg = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    atomic_save_safetensors({k: v.contiguous() for k, v in vae.state_dict().items()}, out / "autoencoder.safetensors",
                            {"config": json.dumps(vcfg, default=list)})
    atomic_save_safetensors({k: v.contiguous() for k, v in transformer.state_dict().items()}, out / "base.safetensors",
                            {"config": json.dumps(manifest["model"])})
    atomic_save_safetensors({k: v.contiguous() for k, v in embedder.state_dict().items()},
                            out / "embedder.safetensors", {"kind": "synthfaces identity embedder"})
    save_prior(prior, out / "prior.safetensors")
    atomic_write_bytes(out / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True).encode())


def load_artefacts(folder: str | Path) -> Artefacts:
    """Loads the four artefacts written by ``build_artefacts``.

    Raises:
        FileNotFoundError: a file is missing (names the command that rebuilds them).
    """
    folder = Path(folder)
    missing = [f for f in FILES if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder} lacks {', '.join(missing)}; rebuild the artefacts with "
            f"'python experiments/build_artefacts.py --out {folder}'")
    manifest = json.loads((folder / "manifest.json").read_text())
    mc = SmallFluxConfig.from_dict(manifest["model"])
    vae = build_autoencoder(mc)
    tensors, meta = read_safetensors(folder / "autoencoder.safetensors")
    vcfg = json.loads(meta["config"])
    vae.register_to_config(shift_factor=vcfg["shift_factor"], scaling_factor=vcfg["scaling_factor"])
    vae.load_state_dict(tensors)
    transformer = build_transformer(mc)
    transformer.load_state_dict(read_safetensors(folder / "base.safetensors")[0])
    embedder = IdentityEmbedder()
    embedder.load_state_dict(read_safetensors(folder / "embedder.safetensors")[0])
    for m in (vae, transformer, embedder):
        m.eval().requires_grad_(False)
    return Artefacts(vae=vae, transformer=transformer, embedder=embedder, prior=load_prior(folder / "prior.safetensors"),
                     model_config=mc, manifest=manifest)
