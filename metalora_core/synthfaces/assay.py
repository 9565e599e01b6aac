"""The gated assay of the small domain: a staged, resumable build of the latent space, the judge,
the base model, the plain-LoRA positive control and the Stage-1 prior, with a gate evaluated
right after the stage it judges (``gates.py``).

Every stage writes its outputs into the build folder before the next one starts; a rerun loads
the stages already written and continues with the first missing one. A gate that fails stops the
build with one line (``gates.GateFailed``), so no comparison ever runs on an assay that cannot see
identity. ``gates.json`` holds every gate evaluated so far, ``build_log.txt`` the stage lines.

Domain 2 (``render.make_identity(..., domain=2)``): identity lives in traits that survive a 32x32
frame, views vary little. The latent is lossless (``models.SpaceToDepthLatent``: 2x2 pixel blocks
become 12 channels, packed 2x2 into 64 FLUX tokens of 48 values), so reconstructions keep every
pixel the judge sees.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..formats.files import atomic_save_png, atomic_save_safetensors, atomic_write_bytes, read_safetensors
from ..formats.prior import load_prior, save_prior
from ..hosts.diffusers_flux import DiffusersFluxHost, pil_to_tensor
from .artefacts import CLASS_NOUN, SHAPES, Artefacts, _pick_shape
from .gates import CEILING_FRACTION, PROMPT_FLOOR, Gate, GateFailed, cross_same, laplacian_energy, mean_ci, require, same_other
from .judge import IdentityEmbedder, context_score, train_embedder
from .models import (SmallFluxConfig, SpaceToDepthLatent, decode_latents, encode_batch, encode_text, sample,
                     stack_conds, train_base)
from .render import BASE_OFFSET, CALIBRATION_OFFSET, CONTEXTS, TRAIN_OFFSET, context_prompt, make_identity, random_view, render

log = logging.getLogger(__name__)

GATE_OFFSET = 40_000_000  # identities that only the latent and judge gates look at
DOMAIN = 2
VIEW_SCALE = (0.6, 1.25)  # random_view's scale range (domain 2 takes its middle, x 1.2)
STAGES = ("latent", "judge", "base", "positive_control", "prior")
# what each stage depends on (besides the stages before it), what it writes and which gates it feeds
STAGE_FIELDS = {
    "latent": ("seed", "latent_factor"),
    "judge": ("train_identities", "judge_views", "judge_steps", "judge_batch", "judge_blur", "gate_identities",
              "gate_views"),
    "base": ("heads", "num_double", "num_single", "base_images", "base_steps", "base_batch", "base_lr",
             "context_dropout", "base_samples", "sample_steps"),
    "positive_control": ("calibration_identities", "calibration_lrs", "checkpoints", "rank", "samples_per_prompt",
                         "references"),
    "prior": ("stage1_identities", "stage1_photos", "stage1_per_bucket", "stage1_bucket_steps", "stage1_visits",
              "stage1_batch", "stage1_lr", "r1", "probe_views", "probe_noises"),
}
STAGE_FILES = {"latent": ("latent.safetensors",), "judge": ("judge.safetensors",),
               "base": ("base.safetensors", "base_checkpoint.safetensors", "base_samples.png"),
               "positive_control": ("positive_control.json", "positive_control_runs.jsonl"),
               "prior": ("prior.safetensors", "prior.json", "prior_checkpoint.safetensors", "prior_probe.jsonl")}
STAGE_GATES = {"latent": (), "judge": ("latent", "judge"), "base": ("base",), "positive_control": ("positive_control",),
               "prior": ("stage1_signal",)}


@dataclass(frozen=True)
class AssayConfig:
    """Sizes of the gated assay's stages (defaults: the full build)."""

    seed: int = 0
    # space-to-depth block: 2 -> 32x32 px = 16x16x12 latent = 64 packed tokens of 48 values. The
    # model's width must exceed the token size: a narrower model cannot remove the starting noise
    # outside the span of its output layer (factor 4 gives 192-value tokens, more than width 128)
    latent_factor: int = 2
    heads: int = 10  # base-model width = heads x 16 (the base gate passed at 160 wide, 12,000 steps)
    num_double: int = 2
    num_single: int = 2
    train_identities: int = 160  # judge classes (and the base gate's centroids)
    judge_views: int = 24
    judge_steps: int = 600
    judge_batch: int = 64
    judge_blur: float = 1.5  # max Gaussian blur sigma (px) of the judge's training images
    gate_identities: int = 16  # held-out identities of the latent and judge gates
    gate_views: int = 8
    base_images: int = 12_000
    base_steps: int = 12_000
    base_batch: int = 64
    base_lr: float = 1e-3
    context_dropout: float = 0.2
    base_samples: int = 64  # samples of the base gate (16 per context)
    sample_steps: int = 16  # Euler steps of every sample
    calibration_identities: int = 8  # positive control, disjoint from every comparison identity
    calibration_lrs: tuple[float, ...] = (4e-4, 1e-3, 2e-3)
    checkpoints: tuple[int, ...] = (100, 200, 300, 500, 1000)  # 500 steps were too few for the positive control
    rank: int = 1  # Stage-2 rank r2 of every method
    samples_per_prompt: int = 4
    references: int = 8
    stage1_identities: int = 64
    stage1_photos: int = 4  # 48x48 photos per identity, each made into the crop grid (+ flips)
    stage1_per_bucket: int = 4  # N
    stage1_bucket_steps: int = 150  # q_bucket: batch 8 x 150 / 4 identities = 300 rows per identity per visit
    stage1_visits: int = 2  # visits of every bucket
    stage1_batch: int = 8
    stage1_lr: float = 1e-3
    r1: int = 8
    probe_views: int = 4  # held-out views per identity of the stage1_signal probe
    probe_noises: int = 4  # fixed noise draws per view (sigmas 0.2..0.8)

    def __post_init__(self) -> None:
        for f in ("latent_factor", "heads", "train_identities", "judge_views", "judge_steps", "judge_batch",
                  "gate_identities", "gate_views", "base_images", "base_steps", "base_batch", "base_samples",
                  "sample_steps", "calibration_identities", "rank", "samples_per_prompt", "references",
                  "stage1_identities", "stage1_photos", "stage1_per_bucket", "stage1_bucket_steps", "stage1_visits",
                  "stage1_batch", "r1", "probe_views", "probe_noises"):
            if int(getattr(self, f)) < 1:
                raise ValueError(f"AssayConfig.{f} must be >= 1, got {getattr(self, f)!r}")
        token = 4 * 3 * self.latent_factor ** 2  # values per packed FLUX token
        if 16 * self.heads <= token:
            raise ValueError(f"AssayConfig: width {16 * self.heads} (heads {self.heads} x 16) must exceed the "
                             f"{token} values of a token at latent_factor {self.latent_factor}, or samples keep the "
                             f"starting noise outside the output layer's span; raise heads to "
                             f"{token // 16 + 1} or lower latent_factor")
        if self.gate_identities < 2:
            raise ValueError(f"AssayConfig.gate_identities must be >= 2, got {self.gate_identities}")
        if self.stage1_per_bucket < 2:
            raise ValueError(f"AssayConfig.stage1_per_bucket must be >= 2 (the probe compares two identities), "
                             f"got {self.stage1_per_bucket}")
        if not self.checkpoints or list(self.checkpoints) != sorted(set(self.checkpoints)) or self.checkpoints[0] < 1:
            raise ValueError(f"checkpoints must be increasing step counts >= 1, got {self.checkpoints}")
        if not self.calibration_lrs or any(not (0 < lr < 1) for lr in self.calibration_lrs):
            raise ValueError(f"calibration_lrs must be rates in (0, 1), got {self.calibration_lrs}")

    @property
    def model(self) -> SmallFluxConfig:
        return SmallFluxConfig(heads=self.heads, num_double=self.num_double, num_single=self.num_single)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["checkpoints"], d["calibration_lrs"] = list(self.checkpoints), list(self.calibration_lrs)
        return d


SMOKE_ASSAY = AssayConfig(heads=4, num_double=1, num_single=1, train_identities=4, judge_views=3, judge_steps=3,
                          judge_batch=8, gate_identities=2, gate_views=2, base_images=24, base_steps=3, base_batch=4,
                          base_samples=4, sample_steps=2, calibration_identities=1, calibration_lrs=(1e-3,),
                          checkpoints=(2,), samples_per_prompt=1, references=2, stage1_identities=2,
                          stage1_photos=1, stage1_per_bucket=2, stage1_bucket_steps=4, stage1_visits=1,
                          stage1_batch=2, r1=2, probe_views=1, probe_noises=1)


# ---------------------------------------------------------------------------------------------
# Small helpers


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, 3, H, W) images (sigma in pixels; < 0.2: unchanged)."""
    if sigma < 0.2:
        return x
    r = max(1, int(math.ceil(2.5 * sigma)))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * sigma * sigma))
    k = (k / k.sum()).to(x.dtype)
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def reconstruct(latent, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return latent.decode(latent.encode(x).latent_dist.mean).sample.clamp(-1, 1)


def _views(identity_index: int, n: int, g: np.random.Generator, size=(32, 32)) -> torch.Tensor:
    ident = make_identity(identity_index, DOMAIN)
    return torch.stack([pil_to_tensor(render(ident, random_view(g, scale=VIEW_SCALE, domain=DOMAIN), size))
                        for _ in range(n)])


def _train_index(config: AssayConfig, k: int) -> int:
    return TRAIN_OFFSET + config.seed * 100_000 + k


class BuildLog:
    """Appends stage lines to ``build_log.txt`` (and the logger)."""

    def __init__(self, out: Path) -> None:
        self.path = out / "build_log.txt"

    def __call__(self, line: str) -> None:
        log.info("%s", line)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"{stamp} {line}\n")


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_bytes(path, json.dumps(data, indent=2, sort_keys=True).encode())


# ---------------------------------------------------------------------------------------------
# Stages: each returns what later stages need and writes its files; ``load_*`` reads them back


def stage_latent(config: AssayConfig, out: Path) -> SpaceToDepthLatent:
    g = np.random.default_rng(np.random.SeedSequence([config.seed, 11]))
    x = torch.cat([_views(BASE_OFFSET + config.seed * 1_000_000 + 900_000 + k, 1, g) for k in range(256)])
    latent = SpaceToDepthLatent(config.latent_factor)
    latent.fit(x)
    atomic_save_safetensors({k: v.contiguous() for k, v in latent.state_dict().items()}, out / "latent.safetensors",
                            {"factor": str(config.latent_factor)})
    return latent


def load_latent(out: Path) -> SpaceToDepthLatent:
    tensors, meta = read_safetensors(out / "latent.safetensors")
    latent = SpaceToDepthLatent(int(meta["factor"]))
    latent.load_state_dict(tensors)
    return latent.eval()


def _train_images(config: AssayConfig) -> torch.Tensor:
    """(identities, views, 3, 32, 32) renders of the training identities (the judge's classes)."""
    g = np.random.default_rng(np.random.SeedSequence([config.seed, 12]))
    return torch.stack([_views(_train_index(config, k), config.judge_views, g) for k in range(config.train_identities)])


def stage_judge(config: AssayConfig, out: Path, latent) -> IdentityEmbedder:
    """The judge: cosine-softmax over the training identities, on renders, their reconstructions
    through the latent and blurred copies (0..judge_blur px)."""
    imgs = _train_images(config)
    n, v = imgs.shape[:2]
    recs = reconstruct(latent, imgs.flatten(0, 1)).view_as(imgs)

    def batches(g: np.random.Generator):
        ks = g.integers(n, size=config.judge_batch)
        js = g.integers(v, size=config.judge_batch)
        use_rec = g.random(config.judge_batch) < 0.5
        x = torch.where(torch.as_tensor(use_rec)[:, None, None, None], recs[ks, js], imgs[ks, js])
        x = torch.cat([blur(x[i:i + 1], float(g.uniform(0, config.judge_blur))) for i in range(len(x))])
        return x, torch.as_tensor(ks, dtype=torch.long)

    torch.manual_seed(config.seed)
    judge = IdentityEmbedder()
    losses = train_embedder(judge, n, batches, steps=config.judge_steps, seed=config.seed)
    atomic_save_safetensors({k: v.contiguous() for k, v in judge.state_dict().items()}, out / "judge.safetensors",
                            {"kind": "synthfaces identity judge", "loss_last50": f"{float(np.mean(losses[-50:])):.5f}"})
    return judge


def load_judge(out: Path) -> IdentityEmbedder:
    judge = IdentityEmbedder()
    judge.load_state_dict(read_safetensors(out / "judge.safetensors")[0])
    return judge.eval().requires_grad_(False)


def gate_latent_and_judge(config: AssayConfig, latent, judge: IdentityEmbedder) -> tuple[Gate, Gate]:
    """Both gates on held-out identities (GATE_OFFSET): real renders, their reconstructions and
    degraded copies (reconstruction, then a blur of 0..judge_blur px)."""
    g = np.random.default_rng(np.random.SeedSequence([config.seed, 13]))
    real = [_views(GATE_OFFSET + config.seed * 10_000 + k, 2 * config.gate_views, g) for k in range(config.gate_identities)]
    with torch.no_grad():
        e_real = [judge(x[: config.gate_views]).numpy() for x in real]
        e_other_views = [judge(x[config.gate_views:]).numpy() for x in real]
        e_rec = [judge(reconstruct(latent, x[: config.gate_views])).numpy() for x in real]
        deg = [torch.cat([blur(r[i:i + 1], float(g.uniform(0, config.judge_blur))) for i in range(len(r))])
               for r in (reconstruct(latent, x[: config.gate_views]) for x in real)]
        e_deg = [judge(x).numpy() for x in deg]
    real_same, other = same_other(e_real)
    latent_gate = Gate("latent", {"reconstruction_same": cross_same(e_rec, e_other_views), "real_same": real_same,
                                  "other": other},
                       {"identities": config.gate_identities, "views": config.gate_views,
                        "max_abs_reconstruction_error": float(max((reconstruct(latent, x) - x).abs().max() for x in real))})
    deg_same, deg_other = same_other(e_deg)
    judge_gate = Gate("judge", {"degraded_same": deg_same, "degraded_other": deg_other},
                      {"blur_max_px": config.judge_blur, "identities": config.gate_identities})
    return latent_gate, judge_gate


def _base_data(config: AssayConfig, latent):
    g = np.random.default_rng(np.random.SeedSequence([config.seed, 14]))
    pools: dict[tuple[int, int], list] = {s: [] for s in SHAPES}
    for k in range(config.base_images):
        size = _pick_shape(g)
        ident = make_identity(BASE_OFFSET + config.seed * 1_000_000 + k, DOMAIN)
        view = random_view(g, scale=VIEW_SCALE, domain=DOMAIN)
        pools[size].append((render(ident, view, size), None if g.random() < config.context_dropout else view.context))
    conds = {c: encode_text(context_prompt(c, CLASS_NOUN), config.model.text_dim) for c in [None, *CONTEXTS]}
    latents, captions = {}, {}
    for size, items in pools.items():
        if items:
            latents[size] = torch.cat([encode_batch(latent, [im for im, _ in items[i:i + 256]])
                                       for i in range(0, len(items), 256)])
            captions[size] = [c for _, c in items]
    return latents, captions, conds, g


def build_base_transformer(config: AssayConfig, latent_channels: int, generator_seed: int = 0):
    from diffusers import FluxTransformer2DModel

    mc = config.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(generator_seed)
        return FluxTransformer2DModel(
            patch_size=1, in_channels=4 * latent_channels, num_layers=mc.num_double, num_single_layers=mc.num_single,
            attention_head_dim=mc.head_dim, num_attention_heads=mc.heads, joint_attention_dim=mc.text_dim,
            pooled_projection_dim=mc.text_dim, guidance_embeds=False, axes_dims_rope=mc.axes_dims_rope)


def stage_base(config: AssayConfig, out: Path, latent, blog: BuildLog):
    latents, captions, conds, _ = _base_data(config, latent)
    sizes = [s for s in SHAPES if s in latents]
    weights = np.array([len(captions[s]) for s in sizes], dtype=np.float64)

    probs = torch.as_tensor(weights / weights.sum())

    def batches(gen: torch.Generator):  # draws from ``gen`` alone, so a resumed run repeats it
        size = sizes[int(torch.multinomial(probs, 1, generator=gen))]
        idx = torch.randint(len(captions[size]), (config.base_batch,), generator=gen)
        return latents[size][idx], stack_conds([conds[captions[size][int(i)]] for i in idx])

    transformer = build_base_transformer(config, latent.config.latent_channels, config.seed)
    ckpt = out / "base_checkpoint.safetensors"
    losses = train_base(transformer, batches, steps=config.base_steps, lr=config.base_lr, seed=config.seed,
                        log_every=max(1, config.base_steps // 20), checkpoint_path=ckpt,
                        checkpoint_every=max(1, config.base_steps // 10))
    blog(f"base: {sum(p.numel() for p in transformer.parameters())} parameters, {config.base_steps} steps x "
         f"{config.base_batch}, loss first 50 {np.mean(losses[:50]):.4f} last 50 {np.mean(losses[-50:]):.4f}")
    with torch.no_grad():  # the model is its float16-rounded weights (the file stores them in half the bytes)
        for p in transformer.parameters():
            p.copy_(p.half().float())
    atomic_save_safetensors({k: v.half().contiguous() for k, v in transformer.state_dict().items()},
                            out / "base.safetensors", {"loss_last50": f"{float(np.mean(losses[-50:])):.5f}"})
    ckpt.unlink(missing_ok=True)
    return transformer.eval().requires_grad_(False)


def load_base(config: AssayConfig, out: Path, latent):
    transformer = build_base_transformer(config, latent.config.latent_channels)
    transformer.load_state_dict({k: v.float() for k, v in read_safetensors(out / "base.safetensors")[0].items()})
    return transformer.eval().requires_grad_(False)


def training_centroids(config: AssayConfig, judge: IdentityEmbedder) -> torch.Tensor:
    imgs = _train_images(config)
    with torch.no_grad():
        return F.normalize(torch.stack([judge(x).mean(0) for x in imgs]), dim=-1)


def base_samples(config: AssayConfig, latent, transformer) -> dict[str, torch.Tensor]:
    """``base_samples`` images (equal share per context prompt), fixed noise, in [-1, 1]."""
    host = DiffusersFluxHost(transformer, vae=latent)
    per = max(1, config.base_samples // len(CONTEXTS))
    out = {}
    for j, c in enumerate(CONTEXTS):
        gen = torch.Generator().manual_seed(config.seed * 1009 + 500 + j)
        cond = encode_text(context_prompt(c, CLASS_NOUN), config.model.text_dim)
        z = sample(host, cond, n=per, generator=gen, steps=config.sample_steps, channels=latent.config.latent_channels,
                   latent_hw=(32 // latent.config.factor,) * 2)
        out[c] = decode_latents(latent, z)
    return out


def shuffle_patches(x: torch.Tensor, patch: int, seed: int = 0) -> torch.Tensor:
    """(B, 3, H, W) images with their ``patch`` x ``patch`` tiles permuted (colours and local
    texture kept, no face): a nonsense control of the base gate."""
    b, c, h, w = x.shape
    t = x.unfold(2, patch, patch).unfold(3, patch, patch)  # (B, C, h/p, w/p, p, p)
    nh, nw = t.shape[2], t.shape[3]
    t = t.reshape(b, c, nh * nw, patch, patch)
    gen = torch.Generator().manual_seed(seed)
    out = torch.stack([t[i][:, torch.randperm(nh * nw, generator=gen)] for i in range(b)])
    return out.reshape(b, c, nh, nw, patch, patch).permute(0, 1, 2, 4, 3, 5).reshape(b, c, h, w)


def gate_base(config: AssayConfig, latent, transformer, judge: IdentityEmbedder, sheet: Path | None = None) -> Gate:
    """Base-model samples against real renders of held-out identities and three nonsense controls
    (Gaussian noise, real renders with shuffled 4x4 tiles, each render's background colour alone);
    ``sheet``: where to write the samples (one row per context prompt) as a PNG."""
    samples = base_samples(config, latent, transformer)
    x = torch.cat(list(samples.values()))
    if sheet is not None:
        from ..draw.sheets import draw_grid
        from PIL import Image

        rows = [[_pil(im).resize((64, 64), Image.Resampling.NEAREST) for im in ims] for ims in samples.values()]
        atomic_save_png(draw_grid(rows, tile=68, row_labels=[f"base model: {c} background" for c in samples]), sheet)
    cent = training_centroids(config, judge)
    g = np.random.default_rng(np.random.SeedSequence([config.seed, 15]))
    real = torch.cat([_views(GATE_OFFSET + config.seed * 10_000 + 5_000 + k, 1, g) for k in range(len(x))])
    gen = torch.Generator().manual_seed(config.seed)
    controls = {"noise": torch.randn(real.shape, generator=gen).clamp(-1, 1),
                "shuffled_tiles": shuffle_patches(real, 4, config.seed),
                "background": real[:, :, :2, :2].mean((2, 3), keepdim=True).expand_as(real).contiguous()}

    def nearest(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return (judge(images) @ cent.T).max(1).values

    near, near_real = nearest(x), float(nearest(real).mean())
    near_controls = {k: float(nearest(v).mean()) for k, v in controls.items()}
    floor = max(near_controls.values())
    realism = (float(near.mean()) - floor) / max(near_real - floor, 1e-6)
    rec = reconstruct(latent, real)
    as_np = lambda t: ((t + 1) / 2).permute(0, 2, 3, 1).numpy()  # noqa: E731
    ratio = laplacian_energy(as_np(x)) / max(laplacian_energy(as_np(rec)), 1e-12)
    prompt = float(np.mean([context_score(_pil(im), c) for c, ims in samples.items() for im in ims]))
    return Gate("base", {"nearest_identity_cosine": float(near.mean()), "realism": realism, "sharpness_ratio": ratio},
                {"samples": len(x), "sample_steps": config.sample_steps, "prompt_score": prompt,
                 "nearest_identity_cosine_min": float(near.min()), "nearest_identity_cosine_real": near_real,
                 "nearest_identity_cosine_controls": near_controls})


def _pil(x: torch.Tensor):
    from ..hosts.diffusers_flux import tensor_to_pil

    return tensor_to_pil(x)


def assay_artefacts(config: AssayConfig, latent, transformer, judge, prior=None, manifest=None) -> Artefacts:
    return Artefacts(vae=latent, transformer=transformer, embedder=judge, prior=prior, model_config=config.model,
                     manifest=manifest or {"assay": config.to_dict()}, domain=DOMAIN)


def stage_positive_control(config: AssayConfig, out: Path, arts: Artefacts, ceiling: float, blog: BuildLog
                           ) -> tuple[Gate, dict[str, Any]]:
    """Plain LoRA alone on calibration identities (never compared): every rate of
    ``calibration_lrs``; the rule fixed in advance picks the rate with the most identities reaching
    50 % of the latent ceiling with prompt score >= 0.9 at the last checkpoint (ties: the higher
    mean identity score). The gate needs that share >= 80 %."""
    from .experiment import ReproConfig, held_out, run_method

    cfg = ReproConfig(seed=config.seed, identities=config.calibration_identities, runs_per_identity=1,
                      checkpoints=config.checkpoints, r2=config.rank, references=config.references,
                      samples_per_prompt=config.samples_per_prompt, sample_steps=config.sample_steps)
    items = held_out(cfg, offset=CALIBRATION_OFFSET, domain=DOMAIN)
    target = CEILING_FRACTION * ceiling
    last = config.checkpoints[-1]
    table, runs = {}, []
    log_path = out / "positive_control_runs.jsonl"  # every finished run; a rerun skips them
    done = {(r["lr"], r["identity"]): r for r in (json.loads(x) for x in
                                                  (log_path.read_text().splitlines() if log_path.is_file() else [])
                                                  if x.strip())}
    for lr in config.calibration_lrs:
        c = dataclasses.replace(cfg, lr=float(lr))
        reached, ids = 0, []
        for k, item in enumerate(items):
            seed = config.seed * 1000 + k * 10
            row = done.get((float(lr), item.identity.index))
            if row is None:
                r = run_method(arts, item, "lora", seed, c)
                s = r["scores"][last]
                row = {"lr": float(lr), "identity": item.identity.index, "seed": seed,
                       "reached": bool(s["identity"] >= target and s["prompt"] >= PROMPT_FLOOR),
                       "scores": {str(st): v for st, v in r["scores"].items()}}
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row, sort_keys=True) + "\n")
            reached += row["reached"]
            ids.append(row["scores"][str(last)]["identity"])
            runs.append(row)
        table[repr(float(lr))] = {"share_reaching": reached / len(items), "identity_mean": float(np.mean(ids))}
        blog(f"positive control: lr {lr:g}: {reached}/{len(items)} identities reach {target:.3f} "
             f"(identity mean {np.mean(ids):.3f})")
    chosen = max(config.calibration_lrs, key=lambda lr: (table[repr(float(lr))]["share_reaching"],
                                                         table[repr(float(lr))]["identity_mean"]))
    result = {"rule": "most identities reaching 50 % of the latent ceiling with prompt >= 0.9 at the last "
                      "checkpoint; ties: higher mean identity score", "chosen_lr": float(chosen), "target": target,
              "ceiling": ceiling, "table": table, "runs": runs, "checkpoints": list(config.checkpoints)}
    _write_json(out / "positive_control.json", result)
    gate = Gate("positive_control", {"share_reaching": table[repr(float(chosen))]["share_reaching"],
                                     "calibration_identities": float(len(items))},
                {"chosen_lr": float(chosen), "target": target, "rank": config.rank})
    return gate, result


# ---------------------------------------------------------------------------------------------
# Stage-1 with the crop grid and flips, and the stage1_signal probe


def stage1_data(config: AssayConfig, latent):
    """Stage-1's items: ``stage1_photos`` 48x48 photos per training identity, each made into the
    crop grid of Stage-2, every crop a (plain, mirrored) latent pair; the class caption."""
    from ..data.latents import MetaTrainData
    from ..hosts.diffusers_flux import encode_images
    from .experiment import AUGMENT, PHOTO_SIZE, _face
    from ..faces.augment import make_crops
    from .render import face_box

    g = np.random.default_rng(np.random.SeedSequence([config.seed, 16]))
    lat, item_id, item_photo = [], [], []
    photo = 0
    for k in range(config.stage1_identities):
        ident = make_identity(_train_index(config, k), DOMAIN)
        for _ in range(config.stage1_photos):
            view = random_view(g, scale=(0.7, 0.9), domain=DOMAIN)
            im = render(ident, view, PHOTO_SIZE)
            crops = [c.image for c in make_crops(im, _face(face_box(ident, view, PHOTO_SIZE)), AUGMENT,
                                                 torch.Generator().manual_seed(photo))]
            plain = encode_images(latent, crops)
            mirrored = encode_images(latent, [c.transpose(0) for c in crops])  # PIL FLIP_LEFT_RIGHT
            lat.extend(zip(plain, mirrored))
            item_id.extend([k] * len(crops))
            item_photo.extend([photo] * len(crops))
            photo += 1
    caption = context_prompt(None, CLASS_NOUN)
    cond = encode_text(caption, config.model.text_dim)
    return MetaTrainData(identities=[f"id{_train_index(config, k)}" for k in range(config.stage1_identities)],
                         latents=lat, item_identity=item_id, item_caption=[caption] * len(lat), conds={caption: cond},
                         item_photo=item_photo,
                         summary={"identities": config.stage1_identities, "photos": photo, "items": len(lat),
                                  "class_caption": caption, "augment": True, "flips": True, "domain": "synthfaces-2"})


def _probe_latents(config: AssayConfig, latent, identity: int, g: np.random.Generator) -> torch.Tensor:
    ident = make_identity(_train_index(config, identity), DOMAIN)
    views = [render(ident, random_view(g, scale=VIEW_SCALE, domain=DOMAIN)) for _ in range(config.probe_views)]
    return encode_batch(latent, views)


def probe_losses(host, z0: torch.Tensor, cond, seed: int, n_noises: int) -> float:
    """Mean flow loss of the attached adapters on latents ``z0`` with fixed noise and sigmas 0.2..0.8."""
    from ..lora.flow import add_noise, flow_loss, velocity_target
    from .models import predict_batch

    gen = torch.Generator().manual_seed(seed)
    sigmas = torch.linspace(0.2, 0.8, n_noises)
    total = 0.0
    with torch.no_grad():
        for s in sigmas:
            noise = torch.randn(z0.shape, generator=gen)
            sig = s.expand(z0.shape[0])
            pred = predict_batch(host.transformer, add_noise(z0, noise, sig), sig,
                                 stack_conds([cond] * z0.shape[0]))
            total += float(flow_loss(pred, velocity_target(z0, noise)))
    return total / len(sigmas)


def stage_prior(config: AssayConfig, out: Path, arts: Artefacts, blog: BuildLog) -> tuple[Gate, Any]:
    """Stage-1 (Algorithm 1, ``train.stage1.MetaTrainer``) on the crop grid with flips, every
    bucket visited ``stage1_visits`` times; at the end of every visit the probe compares, for
    each identity of the bucket, the held-out-view loss under its own Mid/Up with that under the
    next bucket identity's (same Down, same noise)."""
    from ..train.stage1 import MetaTrainConfig, MetaTrainer, load_checkpoint, to_prior

    data = stage1_data(config, arts.vae)
    n_buckets = -(-config.stage1_identities // config.stage1_per_bucket)
    steps = n_buckets * config.stage1_bucket_steps * config.stage1_visits
    mcfg = MetaTrainConfig(steps=steps, bucket_steps=config.stage1_bucket_steps,
                           warmup_steps=int(0.4 * config.stage1_bucket_steps),
                           identities_per_bucket=config.stage1_per_bucket, batch_size=config.stage1_batch,
                           r1=config.r1, r2=1, preset="all", lr=config.stage1_lr, seed=config.seed)
    host = DiffusersFluxHost(arts.transformer)
    trainer = MetaTrainer(host, data, mcfg)
    cond = arts.cond(None)
    g = np.random.default_rng(np.random.SeedSequence([config.seed, 17]))
    probe = {k: _probe_latents(config, arts.vae, k, g) for k in range(config.stage1_identities)}
    diffs: list[dict[str, Any]] = []
    ckpt, probe_log = out / "prior_checkpoint.safetensors", out / "prior_probe.jsonl"
    if ckpt.is_file():  # an interrupted Stage-1: continue from its checkpoint with the probe rows it had
        trainer.load_state_dict(load_checkpoint(ckpt), source=str(ckpt))
        if probe_log.is_file():
            diffs = [r for r in (json.loads(x) for x in probe_log.read_text().splitlines() if x.strip())
                     if r["step"] <= trainer.step]
        blog(f"prior: resuming Stage-1 at step {trainer.step} of {steps} ({len(diffs)} probe rows)")
    atomic_write_bytes(probe_log, "".join(json.dumps(r) + "\n" for r in diffs).encode())

    def callback(info) -> None:
        if info.step_in_bucket != config.stage1_bucket_steps:
            return
        live = trainer._live  # the bucket's Mid/Up are attached to the host at this point
        idents = list(live.identities)
        for a, ident in enumerate(idents):
            other = idents[(a + 1) % len(idents)]
            z0 = probe[ident]
            losses = []
            for who in (ident, other):
                trainer._router.slots = [live.slot[who]] * z0.shape[0]
                losses.append(probe_losses(host, z0, cond, config.seed * 7919 + ident, config.probe_noises))
            row = {"step": int(info.step), "visit": int(live.visit), "identity": int(ident), "other": int(other),
                   "own": losses[0], "others": losses[1], "difference": losses[0] - losses[1]}
            diffs.append(row)
            with open(probe_log, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        if info.step % max(1, steps // 10) == 0 or info.step == steps:
            blog(f"prior: step {info.step}/{steps}, loss of the last 50 {np.mean(trainer.losses[-50:]):.4f}")

    result = trainer.run(callback=callback, checkpoint_path=ckpt, checkpoint_every=max(1, steps // 16))
    prior = to_prior(result, domain="synthfaces-2", base_model="synthfaces-2-small-flux", data_summary=data.summary)
    save_prior(prior, out / "prior.safetensors")
    stats = mean_ci([d["difference"] for d in diffs])
    by_visit = {}
    for v in sorted({d["visit"] for d in diffs}):
        by_visit[str(v)] = mean_ci([d["difference"] for d in diffs if d["visit"] == v])
    report = {"config": mcfg.to_dict(), "items": len(data.latents), "steps": steps,
              "rows_per_identity_per_visit": config.stage1_bucket_steps * config.stage1_batch / config.stage1_per_bucket,
              "loss_first50": float(np.mean(result.losses[:50])), "loss_last50": float(np.mean(result.losses[-50:])),
              "probe": {"pooled": stats, "by_visit": by_visit, "pairs": diffs}, "sha256": prior.sha256}
    _write_json(out / "prior.json", report)
    ckpt.unlink(missing_ok=True)
    gate = Gate("stage1_signal", {"paired_difference_ci_high": stats["ci95"][1]},
                {"n": stats["n"], "mean": stats["mean"], "ci95": stats["ci95"],
                 "mean_own_loss": float(np.mean([d["own"] for d in diffs]))})
    return gate, prior


# ---------------------------------------------------------------------------------------------
# The staged build


def build_assay(out: str | Path, config: AssayConfig = AssayConfig(), *, stop_after: str | None = None,
                enforce: bool = True, allow_changes: str | None = None) -> dict[str, Any]:
    """Runs the stages not yet in ``out`` (a rerun continues where the last one stopped) and the
    gate after each; returns ``gates.json``'s content. ``enforce=False`` (smoke builds only, whose
    few steps cannot pass) records the gates without stopping; ``load_assay`` still refuses such a
    build for a comparison.

    Raises:
        GateFailed: a gate did not pass (one line; the build stops there, every earlier output kept).
        ValueError: ``out`` holds a build of another config.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    blog = BuildLog(out)
    cfg_path = out / "assay_config.json"
    gates_path = out / "gates.json"
    gates = _read_json(gates_path)
    new = json.loads(json.dumps(config.to_dict()))
    if cfg_path.is_file():
        saved = _read_json(cfg_path)
        changed = [st for st in STAGES if any(saved.get(f) != new[f] for f in STAGE_FIELDS[st])]
        if changed and (allow_changes is None or STAGES.index(changed[0]) < STAGES.index(allow_changes)):
            raise ValueError(f"{out} holds a build whose stage {changed[0]!r} had other settings ({cfg_path}); give a "
                             f"new --out, the same settings, or --rebuild-from {changed[0]} (it drops that stage and "
                             "every later one)")
        if changed:  # rebuild from the first changed stage on: drop its outputs and every later stage's
            for st in STAGES[STAGES.index(changed[0]):]:
                for f in STAGE_FILES[st]:
                    (out / f).unlink(missing_ok=True)
                for gname in STAGE_GATES[st]:
                    gates.pop(gname, None)
            _write_json(gates_path, gates)
            blog(f"settings of stage {changed[0]} changed: rebuilding from it")
    _write_json(cfg_path, new)
    times = _read_json(out / "seconds.json")

    def record(gate: Gate) -> Gate:
        gates[gate.name] = gate.to_dict()
        _write_json(gates_path, gates)
        blog(gate.line())
        return require(gate) if enforce else gate

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        r = fn()
        times[name] = round(time.perf_counter() - t, 1)
        _write_json(out / "seconds.json", times)
        blog(f"stage {name} done in {times[name]:.0f} s")
        return r

    def done(name: str) -> bool:
        return name == stop_after

    # latent
    if (out / "latent.safetensors").is_file():
        latent = load_latent(out)
    else:
        latent = timed("latent", lambda: stage_latent(config, out))
    if done("latent"):
        return gates
    # judge, then the latent and judge gates (the latent gate needs the judge)
    if (out / "judge.safetensors").is_file():
        judge = load_judge(out)
    else:
        judge = timed("judge", lambda: stage_judge(config, out, latent))
    lg, jg = gate_latent_and_judge(config, latent, judge)
    record(lg)
    record(jg)
    if done("judge"):
        return gates
    # base
    if (out / "base.safetensors").is_file():
        transformer = load_base(config, out, latent)
    else:
        transformer = timed("base", lambda: stage_base(config, out, latent, blog))
    record(gate_base(config, latent, transformer, judge, out / "base_samples.png"))
    if done("base"):
        return gates
    arts = assay_artefacts(config, latent, transformer, judge)
    # positive control
    if (out / "positive_control.json").is_file() and "positive_control" in gates:
        record(Gate("positive_control", gates["positive_control"]["value"], gates["positive_control"].get("detail", {})))
    else:
        gate, _ = timed("positive_control",
                        lambda: stage_positive_control(config, out, arts, gates["latent"]["value"]["reconstruction_same"], blog))
        record(gate)
    if done("positive_control"):
        return gates
    # prior + stage1_signal
    if (out / "prior.safetensors").is_file() and "stage1_signal" in gates:
        record(Gate("stage1_signal", gates["stage1_signal"]["value"], gates["stage1_signal"].get("detail", {})))
    else:
        gate, _ = timed("prior", lambda: stage_prior(config, out, arts, blog))
        record(gate)
    blog("every gate passed: the comparison may run" if all(g["passed"] for g in gates.values())
         else "smoke build: gates recorded, not enforced")
    return gates


def load_assay(folder: str | Path, *, require_gates: bool = True) -> Artefacts:
    """The built assay as ``Artefacts`` (the comparison's input); ``require_gates=False`` only for
    smoke builds (plumbing checks), whose gates cannot pass.

    Raises:
        FileNotFoundError: a stage's file is missing (names the command that builds it).
        GateFailed: gates.json holds a failed gate, or lacks one.
    """
    folder = Path(folder)
    need = ("assay_config.json", "latent.safetensors", "judge.safetensors", "base.safetensors", "prior.safetensors",
            "gates.json")
    missing = [f for f in need if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {', '.join(missing)}; build the assay with "
                                f"'python experiments/build_assay.py --out {folder}'")
    config = config_from_dict(_read_json(folder / "assay_config.json"))
    gates = _read_json(folder / "gates.json")
    from .gates import ORDER

    for name in ORDER if require_gates else ():
        if name not in gates:
            raise GateFailed(Gate(name, {m: float("nan") for m in _thresholds(name)}))
        require(Gate(name, gates[name]["value"]))
    latent = load_latent(folder)
    return assay_artefacts(config, latent, load_base(config, folder, latent), load_judge(folder),
                           load_prior(folder / "prior.safetensors"),
                           {"assay": config.to_dict(), "gates": gates})


def _thresholds(name: str):
    from .gates import THRESHOLDS

    return THRESHOLDS[name]


def config_from_dict(d: dict[str, Any]) -> AssayConfig:
    d = dict(d)
    d["checkpoints"] = tuple(d["checkpoints"])
    d["calibration_lrs"] = tuple(d["calibration_lrs"])
    return AssayConfig(**d)
