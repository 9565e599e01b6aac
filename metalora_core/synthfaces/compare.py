"""The powered comparison on the gated assay: Meta-LoRA against LoRA + augmentation (same crops:
the prior is the only difference) and against plain LoRA, over identities x seeds from two
disjoint held-out sets, with paired contrasts and 95 % CIs per checkpoint, the steps each method
needs to reach plain LoRA's last-checkpoint score, a fixed-noise flow loss on the identity's other
views as a second measure, and two ablations of the frozen Down on the same pairs: a random Down
with the prior's row norms, and the top singular directions of training identities' Stage-2
gradients (what any frozen Down could at best span).

Every finished run is appended to ``runs.jsonl``; a rerun skips the runs already there.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..formats.files import atomic_save_png, atomic_write_bytes
from ..formats.prior import Prior
from .artefacts import Artefacts
from .experiment import (METHOD_LABELS, ReproConfig, draw_figure, evaluate_host, first_reaching, held_out, run_method,
                         summarise)
from .gates import mean_ci

log = logging.getLogger(__name__)

MAIN = ("lora", "lora_aug", "meta_lora")
ABLATIONS = ("random_down", "pca_down")
LABELS = {**METHOD_LABELS, "random_down": "random Down (prior's norms)", "pca_down": "gradient-PCA Down"}
CONTRASTS = (("meta_lora", "lora_aug"), ("meta_lora", "lora"))
ABLATION_CONTRASTS = (("random_down", "lora_aug"), ("pca_down", "lora_aug"), ("meta_lora", "random_down"),
                      ("pca_down", "meta_lora"))


@dataclass(frozen=True)
class CompareConfig:
    sets: tuple[int, ...] = (0, 1)  # held-out sets (``held_out`` seeds: disjoint identity ranges)
    identities_per_set: int = 8
    seeds: int = 2  # Stage-2 seeds per identity (the same for every method: paired)
    samples_per_prompt: int = 4
    references: int = 8
    flow_noises: int = 4  # fixed noise draws per reference view (sigmas 0.2..0.8)
    pca_identities: int = 16  # training identities whose Stage-2 gradients make the PCA Down
    pca_draws: int = 16
    ablations: bool = True

    @property
    def pairs(self) -> int:
        return len(self.sets) * self.identities_per_set * self.seeds

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["sets"] = list(self.sets)
        return d


SMOKE_COMPARE = CompareConfig(identities_per_set=1, seeds=1, samples_per_prompt=1, references=2, flow_noises=1,
                              pca_identities=2, pca_draws=1)


def ablation_priors(arts: Artefacts, config: CompareConfig, assay_config) -> dict[str, Prior]:
    """The two ablation Downs, each row scaled to the norm of the prior's row it replaces."""
    from ..faces.augment import make_crops
    from .assay import DOMAIN, _train_index
    from .experiment import AUGMENT, PHOTO_SIZE, _face
    from .render import face_box, make_identity, random_view, render
    from .subspace import weight_gradients

    prior = arts.prior
    gen = torch.Generator().manual_seed(4242)
    g = np.random.default_rng(4242)
    grads: dict[str, list[torch.Tensor]] = {n: [] for n in prior.downs}
    host = arts.host
    cond = arts.cond(None)
    for k in range(config.pca_identities):
        ident = make_identity(_train_index(assay_config, k), DOMAIN)
        view = random_view(g, scale=(0.7, 0.9), domain=DOMAIN)
        photo = render(ident, view, PHOTO_SIZE)
        crops = [c.image for c in make_crops(photo, _face(face_box(ident, view, PHOTO_SIZE)), AUGMENT,
                                             torch.Generator().manual_seed(k))]
        for n, gr in weight_gradients(host, cond, crops, prior.preset or "all", draws=config.pca_draws, seed=k).items():
            grads[n].append(gr)
    rand, pca = {}, {}
    for n, d in prior.downs.items():
        norms = d.norm(dim=1, keepdim=True)
        r = torch.randn(d.shape, generator=gen)
        rand[n] = (r / r.norm(dim=1, keepdim=True) * norms).float()
        _, _, vh = torch.linalg.svd(torch.cat(grads[n]), full_matrices=False)
        pca[n] = (vh[: d.shape[0]].float() * norms).float()
    return {"random_down": dataclasses.replace(prior, downs=rand, path="", file_sha256=""),
            "pca_down": dataclasses.replace(prior, downs=pca, path="", file_sha256="")}


def flow_measure(arts: Artefacts, item, n_noises: int, seed: int):
    """A ``run_method`` measure: fixed-noise flow loss on the identity's other views (its references)."""
    from ..hosts.diffusers_flux import encode_images
    from .assay import probe_losses

    z0 = torch.stack(encode_images(arts.vae, item.references))
    cond = arts.cond(None)
    return lambda host: {"flow": probe_losses(host, z0, cond, seed, n_noises)}


def check_shard(i: int, n: int) -> tuple[int, int]:
    """(i, n) when 0 <= i < n, else ValueError: the i-th of every n pairs."""
    if not 0 <= i < n:
        raise ValueError(f"shard {i}/{n}: needs 0 <= I < N (e.g. 0/2 and 1/2 for two processes)")
    return i, n


def run_comparison(arts: Artefacts, out: str | Path, config: CompareConfig, assay_config, lr: float, *,
                   label: str = "full", shard: tuple[int, int] = (0, 1)) -> dict[str, Any] | None:
    """Runs every (set, identity, seed, method) not yet in ``out/runs.jsonl`` and writes
    results.json, table.md, figure.png and contrasts.png.

    ``shard=(i, n)`` with n > 1 runs only the i-th of every n (set, identity, seed) units, appending
    to the same runs.jsonl (one line per write, so n processes can share it), and writes no results
    (returns None): a run without a shard then finds every unit done and writes them.
    """
    i_shard, n_shard = check_shard(*shard)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    runs_path = out / "runs.jsonl"
    done = {}
    if runs_path.is_file():
        for line in runs_path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[(r["set"], r["k"], r["seed"], r["method"])] = r
    methods = MAIN + (ABLATIONS if config.ablations else ())
    priors = {"meta_lora": arts.prior}
    repro = ReproConfig(seed=0, identities=config.identities_per_set, runs_per_identity=config.seeds,
                        checkpoints=assay_config.checkpoints, r2=assay_config.rank, lr=lr,
                        references=config.references, samples_per_prompt=config.samples_per_prompt,
                        sample_steps=assay_config.sample_steps)
    unit = -1
    for s in config.sets:
        items = held_out(dataclasses.replace(repro, seed=s), domain=arts.domain)
        for k, item in enumerate(items):
            for j in range(config.seeds):
                unit += 1
                if unit % n_shard != i_shard:
                    continue
                seed = s * 1000 + k * 10 + j
                measure = flow_measure(arts, item, config.flow_noises, seed)
                if (s, k, seed, "base") not in done:
                    with torch.no_grad():
                        scores, _ = evaluate_host(arts, arts.host, item, dataclasses.replace(repro, seed=s), seed)
                    scores.update(measure(arts.host))
                    _append(runs_path, done, {"set": s, "k": k, "index": item.identity.index, "seed": seed,
                                              "method": "base", "scores": {"0": scores}})
                for m in methods:
                    if (s, k, seed, m) in done:
                        continue
                    if m in ABLATIONS and m not in priors:
                        priors.update(ablation_priors(arts, config, assay_config))
                    a = dataclasses.replace(arts, prior=priors[m]) if m in priors else arts
                    r = run_method(a, item, "meta_lora" if m in priors else m, seed, repro, measure=measure)
                    _append(runs_path, done, {"set": s, "k": k, "index": item.identity.index, "seed": seed, "method": m,
                                              "scores": {str(st): v for st, v in r["scores"].items()},
                                              "train_images": r["train_images"], "stage2_seconds": round(r["seconds"], 2)})
                    log.info("set %d identity %d seed %d %s: %s", s, k, seed, m,
                             {st: round(v["identity"], 3) for st, v in r["scores"].items()})
    if n_shard > 1:
        return None
    results = analyse(list(done.values()), assay_config.checkpoints, methods)
    results.update(label=label, config=config.to_dict(), lr=lr, rank=assay_config.rank,
                   gates=arts.manifest.get("gates", {}), seconds=round(time.perf_counter() - t0, 1))
    atomic_write_bytes(out / "results.json", json.dumps(results, indent=2, sort_keys=True).encode())
    atomic_write_bytes(out / "table.md", render_table(results).encode())
    atomic_save_png(draw_figure(_figure_view(results)), out / "figure.png")
    atomic_save_png(draw_contrasts(results), out / "contrasts.png")
    return results


def _append(path: Path, done: dict, row: dict) -> None:
    done[(row["set"], row["k"], row["seed"], row["method"])] = row
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:  # one write of the whole line: lines of concurrent shards never interleave
        os.write(fd, (json.dumps(row, sort_keys=True) + "\n").encode())
    finally:
        os.close(fd)


def _pairs(runs: list[dict], a: str, b: str, step: str, metric: str) -> list[float]:
    by = {(r["set"], r["k"], r["seed"], r["method"]): r for r in runs}
    out = []
    for (s, k, seed, m), r in sorted(by.items()):
        if m == a and (s, k, seed, b) in by:
            out.append(r["scores"][step][metric] - by[(s, k, seed, b)]["scores"][step][metric])
    return out


def analyse(runs: list[dict], checkpoints, methods) -> dict[str, Any]:
    """Per-method summaries, paired contrasts with 95 % CIs, steps to reach plain LoRA's last score."""
    steps = [str(s) for s in checkpoints]
    last = steps[-1]
    summary = {m: {"label": LABELS[m], "steps": {s: {met: summarise([r["scores"][s][met] for r in runs if r["method"] == m])
                                                     for met in ("identity", "prompt", "flow")} for s in steps}}
               for m in methods}
    base = {met: summarise([r["scores"]["0"][met] for r in runs if r["method"] == "base"])
            for met in ("identity", "prompt", "flow")}

    def contrast(a: str, b: str) -> dict[str, Any]:
        return {metric: {s: mean_ci(_pairs(runs, a, b, s, metric)) for s in steps} for metric in ("identity", "flow")}

    contrasts = {f"{a} - {b}": contrast(a, b) for a, b in CONTRASTS}
    ablations = {f"{a} - {b}": contrast(a, b) for a, b in ABLATION_CONTRASTS if a in methods and b in methods}
    reach = {}
    lora = {(r["set"], r["k"], r["seed"]): r for r in runs if r["method"] == "lora"}
    for m in methods:
        per = []
        for r in runs:
            if r["method"] != m or (r["set"], r["k"], r["seed"]) not in lora:
                continue
            target = lora[(r["set"], r["k"], r["seed"])]["scores"][last]["identity"]
            per.append(first_reaching({int(s): r["scores"][s]["identity"] for s in steps}, target))
        reached = [p for p in per if p is not None]
        reach[m] = {"pairs": len(per), "reaching": len(reached), "median_step_among_reaching":
                    float(np.median(reached)) if reached else None,
                    "by_step": {s: sum(1 for p in reached if p <= int(s)) for s in steps}}
    return {"methods": summary, "base_model": base, "contrasts": contrasts, "ablations": ablations,
            "reach": {"target": f"each pair's plain-LoRA identity score at {last} steps", "methods": reach},
            "verdict": verdict(contrasts, last), "pairs": len(lora), "checkpoints": [int(s) for s in steps]}


def verdict(contrasts: dict[str, Any], last: str) -> str:
    """What the identity contrasts at the last checkpoint support, from their 95 % CIs alone."""
    parts = []
    for name, what in (("meta_lora - lora_aug", "the prior (Meta-LoRA vs LoRA + augmentation, same crops)"),
                       ("meta_lora - lora", "Meta-LoRA vs plain LoRA")):
        c = contrasts[name]["identity"][last]
        lo, hi = c["ci95"]
        if lo > 0:
            word = "higher identity score"
        elif hi < 0:
            word = "lower identity score"
        else:
            word = "no difference detectable"
        parts.append(f"{what}: {word} at {last} steps ({c['mean']:+.3f}, 95 % CI {lo:+.3f} to {hi:+.3f}, n = {c['n']})")
    return "; ".join(parts)


def _figure_view(results: dict[str, Any]) -> dict[str, Any]:
    """The results in the shape ``experiment.draw_figure`` reads (the three main methods)."""
    return {"config": {"checkpoints": results["checkpoints"]}, "base_model": results["base_model"],
            "methods": {m: results["methods"][m] for m in MAIN}}


def render_table(results: dict[str, Any]) -> str:
    steps = [str(s) for s in results["checkpoints"]]
    cell = lambda d: f"{d['mean']:.3f} ± {d['std']:.3f}"  # noqa: E731
    ci = lambda d: f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] ({d['n']})"  # noqa: E731
    ms = list(results["methods"])
    lines = [f"# Gated comparison ({results['label']}): {results['pairs']} (identity, seed) pairs, rank "
             f"{results['rank']}, lr {results['lr']:g}", "",
             "Identity score, mean ± std over pairs (base model: "
             f"{cell(results['base_model']['identity'])}).", "",
             "| steps | " + " | ".join(LABELS[m] for m in ms) + " |", "|---" * (1 + len(ms)) + "|"]
    for s in steps:
        lines.append(f"| {s} | " + " | ".join(cell(results["methods"][m]["steps"][s]["identity"]) for m in ms) + " |")
    lines += ["", "Paired differences, mean [95 % CI] (n); identity score (higher is better) and fixed-noise flow "
              "loss on the identity's other views (lower is better):", "",
              "| contrast | measure | " + " | ".join(steps) + " |", "|---|---" + "|---" * len(steps) + "|"]
    for group in ("contrasts", "ablations"):
        for name, c in results[group].items():
            for metric in ("identity", "flow"):
                lines.append(f"| {name} | {metric} | " + " | ".join(ci(c[metric][s]) for s in steps) + " |")
    lines += ["", f"Reach ({results['reach']['target']}): " + "; ".join(
        f"{LABELS[m]} {r['reaching']}/{r['pairs']}" + (f" (median step {r['median_step_among_reaching']:g})"
                                                         if r["median_step_among_reaching"] is not None else "")
        for m, r in results["reach"]["methods"].items()) + ".", "", f"Verdict: {results['verdict']}."]
    return "\n".join(lines) + "\n"


def draw_contrasts(results: dict[str, Any], size: tuple[int, int] = (980, 420)) -> Image.Image:
    """Paired differences of the identity score per checkpoint, mean with its 95 % CI, zero line."""
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    items = list(results["contrasts"].items()) + list(results["ablations"].items())
    steps = [str(s) for s in results["checkpoints"]]
    vals = [v for _, c in items for s in steps for v in c["identity"][s]["ci95"] if math.isfinite(v)] + [0.0]
    lo, hi = min(vals), max(vals)
    pad = 0.08 * (hi - lo or 1.0)
    lo, hi = lo - pad, hi + pad
    left, right, top, bottom = 80, size[0] - 20, 40, size[1] - 90
    d.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    d.text((left, 10), "paired difference of the identity score (mean, 95 % CI) per Stage-2 checkpoint", fill=(0, 0, 0))
    y = lambda v: bottom - (bottom - top) * (v - lo) / (hi - lo)  # noqa: E731
    d.line([(left, y(0)), (right, y(0))], fill=(120, 120, 120))
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        v = lo + (hi - lo) * frac
        d.text((left - 60, y(v) - 6), f"{v:+.3f}", fill=(0, 0, 0))
    colours = [(200, 40, 40), (40, 80, 200), (120, 120, 120), (40, 150, 60), (150, 80, 0), (120, 0, 160)]
    slot = (right - left) / len(steps)
    for i, s in enumerate(steps):
        d.text((left + slot * (i + 0.5) - 10, bottom + 6), s, fill=(0, 0, 0))
        for j, (name, c) in enumerate(items):
            x = left + slot * i + slot * (j + 1) / (len(items) + 1)
            m, (a, b) = c["identity"][s]["mean"], c["identity"][s]["ci95"]
            col = colours[j % len(colours)]
            if math.isfinite(a) and math.isfinite(b):
                d.line([(x, y(a)), (x, y(b))], fill=col, width=2)
            d.ellipse([x - 3, y(m) - 3, x + 3, y(m) + 3], fill=col)
    for j, (name, _) in enumerate(items):
        d.text((left + (j % 3) * 300, bottom + 28 + 16 * (j // 3)), name, fill=colours[j % len(colours)])
    return img
