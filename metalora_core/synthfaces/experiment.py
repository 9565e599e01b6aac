"""The small-scale reproduction of the paper's claim (Sec. 4.4, Fig. 3 right, App. D):
Stage-2 from ONE image of each held-out identity with Meta-LoRA (the meta-learned prior),
plain LoRA and LoRA + augmentation, same rank r2, same seeds, scored at several step counts.

Meta-LoRA and LoRA + augmentation train on the paper's crop grid around the face
(``faces.make_crops``); plain LoRA trains on the photo itself (``faces.whole_photo_crop``).
All three run the project's Stage-2 trainer (``train.stage2.personalize``) on the diffusers FLUX
host with adapters from ``train.recipe.build_adapters``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..faces.augment import AugmentConfig, make_crops, whole_photo_crop
from ..faces.detect import Face
from ..formats.files import atomic_save_png, atomic_write_bytes
from ..hosts.diffusers_flux import tensor_to_pil
from ..train.recipe import plan_stage2, prepare_stage2
from ..train.stage2 import Stage2Config, personalize
from .artefacts import DOMAIN_LR, Artefacts
from .judge import context_score, identity_similarity
from .models import decode_latents, sample
from .render import CALIBRATION_OFFSET, CONTEXTS, HELDOUT_OFFSET, Identity, face_box, make_identity, random_view, render

log = logging.getLogger(__name__)

METHODS = ("meta_lora", "lora", "lora_aug")
METHOD_LABELS = {"meta_lora": "Meta-LoRA (prior)", "lora": "LoRA", "lora_aug": "LoRA + augmentation"}
PHOTO_SIZE = (48, 48)  # the single Stage-2 photo: a wider shot than the 32x32 frames, room for the crop grid
AUGMENT = AugmentConfig(bucket_area=32 * 32, multiple=8)  # the paper's grid at the domain's 32x32 area


@dataclass(frozen=True)
class ReproConfig:
    """The comparison's settings (defaults: the committed full run)."""

    seed: int = 0  # picks the held-out identities, their photos and every Stage-2 seed
    identities: int = 4  # held-out identities, one Stage-2 photo each
    runs_per_identity: int = 2  # Stage-2 seeds per identity and method
    checkpoints: tuple[int, ...] = (100, 200, 300, 400, 500)  # step counts scored (the paper: 250..750)
    r2: int = 1  # rank (the paper's rank-1), the same for every method
    lr: float = DOMAIN_LR  # the domain's one learning rate (artefacts.DOMAIN_LR)
    references: int = 8  # other images of each identity the identity score compares against
    samples_per_prompt: int = 2  # generated images per context prompt and checkpoint
    sample_steps: int = 16  # Euler steps per generated image

    def __post_init__(self) -> None:
        if self.identities < 1 or self.runs_per_identity < 1 or self.references < 1 or self.samples_per_prompt < 1:
            raise ValueError("identities, runs_per_identity, references and samples_per_prompt must be >= 1")
        if not self.checkpoints or list(self.checkpoints) != sorted(set(self.checkpoints)) or self.checkpoints[0] < 1:
            raise ValueError(f"checkpoints must be increasing step counts >= 1, got {self.checkpoints}")
        if self.r2 < 1 or not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"r2 must be >= 1 and lr positive, got r2={self.r2}, lr={self.lr}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["checkpoints"] = list(self.checkpoints)
        return d


SMOKE_REPRO = ReproConfig(identities=1, runs_per_identity=1, checkpoints=(2, 4), references=2, samples_per_prompt=1,
                          sample_steps=2)


@dataclass
class HeldOut:
    """One held-out identity: its single Stage-2 photo and its other images (the references)."""

    identity: Identity
    photo: Image.Image
    box: tuple[float, float, float, float]
    context: str  # the photo's background
    references: list[Image.Image]


def held_out(config: ReproConfig, offset: int = HELDOUT_OFFSET, domain: int = 1) -> list[HeldOut]:
    """The held-out identities of ``config.seed`` (index range disjoint from every training range;
    ``offset=CALIBRATION_OFFSET``: the calibration identities, disjoint from the scored ones)."""
    out = []
    for k in range(config.identities):
        ident = make_identity(offset + config.seed * 10_000 + k, domain)
        g = np.random.default_rng(np.random.SeedSequence([config.seed, k, 7]))
        view = random_view(g, scale=(0.7, 0.9), domain=domain)
        photo = render(ident, view, PHOTO_SIZE)
        refs = [render(ident, random_view(g, domain=domain), (32, 32)) for _ in range(config.references)]
        out.append(HeldOut(identity=ident, photo=photo, box=face_box(ident, view, PHOTO_SIZE), context=view.context,
                           references=refs))
    return out


def _face(box: tuple[float, float, float, float]) -> Face:
    x0, y0, x1, y1 = box
    cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
    marks = ((cx - w / 4, cy - h / 8), (cx + w / 4, cy - h / 8), (cx, cy), (cx - w / 5, cy + h / 4), (cx + w / 5, cy + h / 4))
    return Face(box=box, landmarks=marks, score=1.0)


def training_images(item: HeldOut, method: str, seed: int) -> list[Image.Image]:
    """The Stage-2 training images of one method: the crop grid, or the photo itself (plain LoRA)."""
    face = _face(item.box)
    if method == "lora":
        return [whole_photo_crop(item.photo, face, AUGMENT.bucket_area, AUGMENT.multiple).image]
    return [c.image for c in make_crops(item.photo, face, AUGMENT, torch.Generator().manual_seed(seed))]


def eval_prompts() -> list[str | None]:
    return list(CONTEXTS)


@torch.no_grad()
def generate(arts: Artefacts, host, context: str, n: int, seed: int, steps: int) -> list[Image.Image]:
    """``n`` 32x32 images for one context prompt; the noise depends only on ``seed`` and the context."""
    gen = torch.Generator().manual_seed(seed * 1009 + list(CONTEXTS).index(context))
    f = arts.latent_factor
    z = sample(host, arts.cond(context), n=n, generator=gen, steps=steps, channels=arts.latent_channels,
               latent_hw=(32 // f, 32 // f))
    return [tensor_to_pil(x) for x in decode_latents(arts.vae, z)]


def score_images(arts: Artefacts, images_by_context: dict[str, list[Image.Image]], item: HeldOut) -> dict[str, float]:
    """Identity score (mean cosine to the other images) and context score of a set of samples."""
    ids, ctx = [], []
    for c, ims in images_by_context.items():
        ids += identity_similarity(arts.embedder, ims, item.references)
        ctx += [context_score(im, c) for im in ims]
    return {"identity": float(np.mean(ids)), "prompt": float(np.mean(ctx))}


def evaluate_host(arts: Artefacts, host, item: HeldOut, config: ReproConfig, sample_seed: int):
    images = {c: generate(arts, host, c, config.samples_per_prompt, sample_seed, config.sample_steps)
              for c in eval_prompts()}
    return score_images(arts, images, item), images


def run_method(arts: Artefacts, item: HeldOut, method: str, seed: int, config: ReproConfig,
               keep_images: Sequence[int] = (), measure=None) -> dict[str, Any]:
    """Stage-2 for one (identity, method, seed); scores at every checkpoint (and the samples of
    the checkpoints in ``keep_images``). ``measure(host)``, called with the checkpoint's adapters
    attached, adds its dict of numbers to that checkpoint's scores."""
    host = arts.host
    prior = arts.prior if method == "meta_lora" else None
    images = training_images(item, method, seed)
    cond = arts.cond(None)  # the class caption only, as the paper trains (no context, no trigger word)
    s2 = Stage2Config(steps=config.checkpoints[-1], lr=config.lr, rank=config.r2, seed=seed,
                      preset=(arts.prior.preset if arts.prior is not None else None) or "all")
    # the recipe's adapters and items (both orientations of every image), trained by the recipe's
    # trainer; only the per-checkpoint snapshots below are this experiment's own
    adapters, latents = prepare_stage2(host, plan_stage2(host, images, cond, prior, s2))
    snaps: dict[int, dict[str, torch.Tensor]] = {}
    marks = set(config.checkpoints)

    def keep(step: int, loss: float) -> None:
        if step in marks:
            snaps[step] = {k: v.detach().clone() for k, v in adapters.state_dict().items()}

    result = personalize(host, adapters, latents, cond, s2, keep)
    scores, kept = {}, {}
    for step in config.checkpoints:
        adapters.load_state_dict(snaps[step])
        with host.attach(adapters):
            scores[step], imgs = evaluate_host(arts, host, item, config, seed)
            if measure is not None:
                scores[step].update(measure(host))
        if step in keep_images:
            kept[step] = imgs
    return {"scores": scores, "losses": result.losses, "seconds": result.seconds, "train_images": len(images),
            "adapters": adapters, "images": kept}


def embedder_check(arts: Artefacts, items: Sequence[HeldOut]) -> dict[str, Any]:
    """How well the embedder separates the held-out identities it never saw: mean cosine of two
    images of the same identity vs of two different identities."""
    embs = [arts.embedder.embed(it.references) for it in items]
    same = [float((e @ e.T)[~torch.eye(len(e), dtype=torch.bool)].mean()) for e in embs if len(e) > 1]
    diff = [float((a @ b.T).mean()) for i, a in enumerate(embs) for b in embs[i + 1:]]
    return {"same_identity_mean_cosine": float(np.mean(same)) if same else None,
            "different_identity_mean_cosine": float(np.mean(diff)) if diff else None}


def summarise(values: Sequence[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0, "n": int(a.size)}


def first_reaching(curve: dict[int, float], target: float) -> int | None:
    """The smallest step count whose score is >= target (None: never)."""
    for step in sorted(curve):
        if curve[step] >= target:
            return step
    return None


def reach_analysis(per_run: list[dict[str, Any]], config: ReproConfig) -> dict[str, Any]:
    """Does Meta-LoRA reach plain LoRA's longest-step identity score in fewer steps?"""
    last = config.checkpoints[-1]

    def mean_curve(method: str, metric: str = "identity") -> dict[int, float]:
        return {s: float(np.mean([r["scores"][s][metric] for r in per_run if r["method"] == method]))
                for s in config.checkpoints}

    target = mean_curve("lora")[last]
    out: dict[str, Any] = {"target": f"plain LoRA's mean identity score at {last} steps", "target_value": target,
                           "target_step": last}
    for method in ("meta_lora", "lora_aug"):
        step = first_reaching(mean_curve(method), target)
        pairs = []
        for r in per_run:
            if r["method"] != method:
                continue
            twin = next(x for x in per_run if x["method"] == "lora" and x["identity"] == r["identity"]
                        and x["seed"] == r["seed"])
            pairs.append(first_reaching({s: r["scores"][s]["identity"] for s in config.checkpoints},
                                        twin["scores"][last]["identity"]))
        reached = [p for p in pairs if p is not None]
        out[method] = {
            "mean_curve_first_step_at_or_above_target": step,
            "steps_saved_vs_lora": (last - step) if step is not None else None,
            "pairs": len(pairs),
            "pairs_reaching_own_lora_target": len(reached),
            "pairs_reaching_before_last_step": sum(1 for p in reached if p < last),
            "median_step_among_reaching": float(np.median(reached)) if reached else None,
        }
    return out


def run_reproduction(arts: Artefacts, out: str | Path, config: ReproConfig = ReproConfig(), *,
                     label: str = "full") -> dict[str, Any]:
    """Runs every (identity, seed, method), writes results.json, table.md, figure.png, samples.png."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    items = held_out(config, domain=arts.domain)
    per_run: list[dict[str, Any]] = []
    base_scores: list[dict[str, Any]] = []
    sheet_rows: list[tuple[str, list[Image.Image]]] = []
    for k, item in enumerate(items):
        for j in range(config.runs_per_identity):
            seed = config.seed * 1000 + k * 10 + j
            base, base_imgs = evaluate_host(arts, arts.host, item, config, seed)
            base_scores.append({"identity": k, "seed": seed, **base})
            show = k < 2 and j == 0
            if show:
                sheet_rows.append((f"id {k}: base model", [item.photo] + _flat(base_imgs)))
            for method in METHODS:
                keep = sorted({config.checkpoints[len(config.checkpoints) // 2 - 1], config.checkpoints[-1]}) if show else ()
                r = run_method(arts, item, method, seed, config, keep)
                for step in keep:
                    sheet_rows.append((f"id {k}: {METHOD_LABELS[method]} @ {step}", [item.photo] + _flat(r["images"][step])))
                per_run.append({"identity": k, "seed": seed, "method": method, "scores": r["scores"],
                                "train_images": r["train_images"], "stage2_seconds": round(r["seconds"], 2),
                                "final_loss_mean25": float(np.mean(r["losses"][-25:]))})
                log.info("identity %d seed %d %s: identity %s", k, seed, method,
                         {s: round(v["identity"], 3) for s, v in r["scores"].items()})
    results = _collect(per_run, base_scores, config)
    results["embedder_check"] = embedder_check(arts, items)
    results["reach"] = reach_analysis(per_run, config)
    results["config"] = config.to_dict()
    results["label"] = label
    results["artefacts"] = {k: arts.manifest[k] for k in ("build", "prior", "autoencoder", "base", "embedder")}
    results["held_out"] = [{"index": it.identity.index, "photo_context": it.context} for it in items]
    results["runs"] = [{k: v for k, v in r.items()} for r in per_run]
    results["base_runs"] = base_scores
    results["seconds"] = round(time.perf_counter() - t0, 1)
    for r in results["runs"]:
        r["scores"] = {str(s): v for s, v in r["scores"].items()}
    atomic_write_bytes(out / "results.json", json.dumps(results, indent=2, sort_keys=True).encode())
    atomic_write_bytes(out / "table.md", render_table(results).encode())
    atomic_save_png(draw_figure(results), out / "figure.png")
    atomic_save_png(draw_samples(sheet_rows), out / "samples.png")
    return results


CALIBRATION_LRS = (4e-4, 4e-3, 1.9e-2)  # the paper's rate, x10, and x 48 (the paper model's width over this one's 64)
SMOKE_CALIBRATION = dict(lrs=(4e-4, 4e-3), config=SMOKE_REPRO)


def run_calibration(arts: Artefacts, out: str | Path, lrs: Sequence[float] = CALIBRATION_LRS,
                    config: ReproConfig = ReproConfig(identities=2, runs_per_identity=1), *,
                    label: str = "full") -> dict[str, Any]:
    """Chooses the domain's learning rate with plain LoRA alone, on calibration identities that the
    comparison never scores: per rate, the similarity of the samples to the ONE photo trained on
    (the FaceSim idea: does LoRA learn its photo?), the identity and prompt scores, at every
    checkpoint. The chosen rate has the highest mean photo similarity at the last checkpoint.
    Writes calibration.json and table.md to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    items = held_out(config, offset=CALIBRATION_OFFSET)
    runs = []
    for lr in lrs:
        cfg = dataclasses.replace(config, lr=float(lr))
        for k, item in enumerate(items):
            seed = config.seed * 1000 + k * 10
            photo = item.photo.resize((32, 32), Image.Resampling.BILINEAR)
            r = run_method(arts, item, "lora", seed, cfg, keep_images=cfg.checkpoints)
            per_step = {}
            for s in cfg.checkpoints:
                ims = _flat(r["images"][s])
                per_step[str(s)] = {**r["scores"][s],
                                    "photo": float(np.mean(identity_similarity(arts.embedder, ims, [photo])))}
            runs.append({"lr": float(lr), "identity": k, "index": item.identity.index, "seed": seed,
                         "scores": per_step, "final_loss_mean25": float(np.mean(r["losses"][-25:]))})
            log.info("calibration lr %g identity %d: %s", lr, k, per_step[str(cfg.checkpoints[-1])])
    last = str(config.checkpoints[-1])
    table = {}
    for lr in lrs:
        rows = [r for r in runs if r["lr"] == float(lr)]
        table[repr(float(lr))] = {s: {m: summarise([r["scores"][s][m] for r in rows]) for m in ("photo", "identity", "prompt")}
                                  for s in map(str, config.checkpoints)}
    chosen = max(lrs, key=lambda lr: table[repr(float(lr))][last]["photo"]["mean"])
    results = {"label": label, "method": "lora", "rule": f"highest mean photo similarity at {last} steps",
               "chosen_lr": float(chosen), "lrs": [float(x) for x in lrs], "table": table, "runs": runs,
               "config": config.to_dict(), "identities": [it.identity.index for it in items],
               "seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_bytes(out / "calibration.json", json.dumps(results, indent=2, sort_keys=True).encode())
    lines = [f"# Learning-rate calibration ({label}): plain LoRA on {len(items)} calibration identities "
             "(never scored by the comparison)", "", "Cells: mean ± std (n) at each checkpoint; photo = "
             "similarity to the one photo trained on, identity = to the identity's other images.", "",
             "| lr | steps | photo | identity | prompt |", "|---|---|---|---|---|"]
    cell = lambda d: f"{d['mean']:.3f} ± {d['std']:.3f} ({d['n']})"  # noqa: E731
    for lr in lrs:
        for s in map(str, config.checkpoints):
            c = table[repr(float(lr))][s]
            lines.append(f"| {float(lr):g} | {s} | {cell(c['photo'])} | {cell(c['identity'])} | {cell(c['prompt'])} |")
    lines += ["", f"Chosen ({results['rule']}): lr = {float(chosen):g}."]
    atomic_write_bytes(out / "table.md", ("\n".join(lines) + "\n").encode())
    return results


def _flat(images_by_context: dict[str, list[Image.Image]]) -> list[Image.Image]:
    return [im for c in images_by_context for im in images_by_context[c]]


def draw_samples(rows: list[tuple[str, list[Image.Image]]], tile: int = 80) -> Image.Image:
    """One row per (identity, method, checkpoint): the Stage-2 photo, then the samples per context prompt."""
    from ..draw.sheets import draw_labelled_grid

    n = max(len(r[1]) for r in rows) - 1
    per = max(1, n // len(CONTEXTS))
    cols = ["Stage-2 photo"] + [f"prompt: {c} background" for c in CONTEXTS for _ in range(per)]
    return draw_labelled_grid([[im.resize((tile - 8, tile - 8), Image.Resampling.NEAREST) for im in ims] for _, ims in rows],
                              row_labels=[r[0] for r in rows], column_labels=cols[: n + 1], tile=tile)


def _collect(per_run: list[dict[str, Any]], base_scores: list[dict[str, Any]], config: ReproConfig) -> dict[str, Any]:
    methods: dict[str, Any] = {}
    for m in METHODS:
        methods[m] = {"label": METHOD_LABELS[m], "steps": {}}
        for s in config.checkpoints:
            rows = [r["scores"][s] for r in per_run if r["method"] == m]
            methods[m]["steps"][str(s)] = {"identity": summarise([x["identity"] for x in rows]),
                                           "prompt": summarise([x["prompt"] for x in rows])}
    base = {"identity": summarise([b["identity"] for b in base_scores]),
            "prompt": summarise([b["prompt"] for b in base_scores])}
    return {"methods": methods, "base_model": base, "n_identities": config.identities,
            "runs_per_identity": config.runs_per_identity}


def render_table(results: dict[str, Any]) -> str:
    steps = results["config"]["checkpoints"]
    lines = [f"# Small-scale reproduction ({results['label']}): identity score (R-FaceSim idea) and prompt "
             f"score (CLIP-T idea)", "",
             f"{results['n_identities']} held-out identities x {results['runs_per_identity']} seeds per method, "
             f"one Stage-2 photo each, r2 = {results['config']['r2']}. Cells: mean ± std (n).", "",
             "| steps | " + " | ".join(f"{METHOD_LABELS[m]} identity" for m in METHODS) + " | "
             + " | ".join(f"{METHOD_LABELS[m]} prompt" for m in METHODS) + " |",
             "|---" * (1 + 2 * len(METHODS)) + "|"]
    b = results["base_model"]
    cell = lambda d: f"{d['mean']:.3f} ± {d['std']:.3f} ({d['n']})"  # noqa: E731
    lines.append("| 0 (base model) | " + " | ".join(cell(b["identity"]) for _ in METHODS) + " | "
                 + " | ".join(cell(b["prompt"]) for _ in METHODS) + " |")
    for s in steps:
        row = [results["methods"][m]["steps"][str(s)] for m in METHODS]
        lines.append(f"| {s} | " + " | ".join(cell(r["identity"]) for r in row) + " | "
                     + " | ".join(cell(r["prompt"]) for r in row) + " |")
    reach = results["reach"]
    lines += ["", f"Target: {reach['target']} = {reach['target_value']:.3f}."]
    for m in ("meta_lora", "lora_aug"):
        r = reach[m]
        first = r["mean_curve_first_step_at_or_above_target"]
        lines.append(f"- {METHOD_LABELS[m]}: mean curve first at or above it at "
                     f"{'never (within ' + str(steps[-1]) + ' steps)' if first is None else str(first) + ' steps'}; "
                     f"per (identity, seed) pair against its own LoRA twin: {r['pairs_reaching_own_lora_target']}/"
                     f"{r['pairs']} reach it, {r['pairs_reaching_before_last_step']} before step {steps[-1]}.")
    return "\n".join(lines) + "\n"


COLOURS = {"meta_lora": (200, 40, 40), "lora": (40, 80, 200), "lora_aug": (40, 150, 60)}


def draw_figure(results: dict[str, Any], size: tuple[int, int] = (980, 400)) -> Image.Image:
    """Like the paper's Figure 3 right: identity (left) and prompt (right) score vs steps, mean ± std."""
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    steps = [0] + list(results["config"]["checkpoints"])
    half = size[0] // 2
    for panel, metric in enumerate(("identity", "prompt")):
        left, right, top, bottom = panel * half + 70, panel * half + half - 20, 40, size[1] - 60
        d.rectangle([left, top, right, bottom], outline=(0, 0, 0))
        d.text((left, 10), f"{metric} score vs Stage-2 steps (mean ± std over identities x seeds)", fill=(0, 0, 0))
        series = {}
        for m in METHODS:
            pts = [(0, results["base_model"][metric])] + [(s, results["methods"][m]["steps"][str(s)][metric])
                                                           for s in steps[1:]]
            series[m] = pts
        vals = [p[1]["mean"] + sgn * p[1]["std"] for pts in series.values() for p in pts for sgn in (-1, 1)]
        lo, hi = min(vals), max(vals)
        if not hi > lo:
            lo, hi = lo - 1, hi + 1
        pad = 0.05 * (hi - lo)
        lo, hi = lo - pad, hi + pad

        def xy(s: float, v: float) -> tuple[float, float]:
            return (left + (right - left) * s / steps[-1], bottom - (bottom - top) * (v - lo) / (hi - lo))

        digits = max(2, min(6, 2 - int(math.floor(math.log10(hi - lo)))))
        for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
            v = lo + (hi - lo) * frac
            d.text((left - 55, xy(0, v)[1] - 6), f"{v:.{digits}f}", fill=(0, 0, 0))
        for s in steps:
            d.text((xy(s, lo)[0] - 8, bottom + 6), str(s), fill=(0, 0, 0))
        for k, (m, pts) in enumerate(series.items()):
            c = COLOURS[m]
            off = (k - 1) * 4
            for s, st in pts:
                x, y0 = xy(s, st["mean"] - st["std"])
                _, y1 = xy(s, st["mean"] + st["std"])
                d.line([(x + off, y0), (x + off, y1)], fill=c, width=1)
            d.line([(xy(s, st["mean"])[0] + off, xy(s, st["mean"])[1]) for s, st in pts], fill=c, width=2)
            for s, st in pts:
                x, y = xy(s, st["mean"])
                d.ellipse([x + off - 3, y - 3, x + off + 3, y + 3], fill=c)
        for k, m in enumerate(METHODS):
            d.text((panel * half + 60 + 150 * k, size[1] - 24), METHOD_LABELS[m], fill=COLOURS[m])
    return img
