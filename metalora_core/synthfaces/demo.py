"""The demo on the small domain: one held-out identity's single photo, Stage-2 with the
meta-learned prior, and a picture a person reads at a glance (reference, then samples of the base
model, plain LoRA, LoRA + augmentation and Meta-LoRA for the same prompts and seeds, each with its
identity score).
"""
from __future__ import annotations

import contextlib
import json
import logging
import platform
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..formats.files import atomic_save_png, atomic_write_bytes
from ..formats.lora import save_lora
from ..draw.charts import line_plot
from ..train.recipe import run_stage2
from ..train.stage2 import Stage2Config
from .artefacts import DOMAIN_LR, load_artefacts
from .experiment import ReproConfig, generate, held_out, training_images
from .judge import context_score, identity_similarity
from .render import CONTEXTS

log = logging.getLogger(__name__)


def default_artefacts() -> Path:
    """The committed gated assay (experiments/assay) once every gate in its gates.json passed,
    else the first domain's artefacts (experiments/artefacts), of the repository this package was
    installed from (editable or source)."""
    root = Path(__file__).resolve().parents[2] / "experiments"
    return root / "assay" if assay_passed(root / "assay") else root / "artefacts"


def assay_passed(folder: Path) -> bool:
    """True when ``folder`` is a gated-assay build whose five gates are all recorded as passed."""
    from .gates import ORDER

    path = folder / "gates.json"
    if not (folder / "prior.safetensors").is_file() or not path.is_file():
        return False
    gates = json.loads(path.read_text())
    return all(name in gates and gates[name].get("passed") for name in ORDER)


def _load(folder: Path):
    """(artefacts, learning rate, rank, steps): a gated assay (its gates required; the positive
    control's rate, the assay's rank and Stage-2 length, its last checkpoint) or the first domain's
    artefacts (DOMAIN_LR, rank 1, the paper's 375 steps)."""
    if (folder / "assay_config.json").is_file():
        from .assay import load_assay

        lr = float(json.loads((folder / "positive_control.json").read_text())["chosen_lr"])
        cfg = json.loads((folder / "assay_config.json").read_text())
        return load_assay(folder), lr, int(cfg["rank"]), int(cfg["checkpoints"][-1])
    return load_artefacts(folder), DOMAIN_LR, 1, 375


def run_domain_demo(out: str | Path, *, steps: int | None = None, seed: int = 0, artefacts: str | Path | None = None,
                    samples_per_prompt: int = 2, sample_steps: int = 20, tile: int = 96) -> dict[str, Any]:
    """Runs the small-domain demo and writes comparison.png, crops.png, lora.safetensors, loss.png, report.json.

    ``steps``: Stage-2 steps of the three trained rows; default the gated assay's Stage-2 length (what
    its comparison scores last), 375 on the first domain's artefacts.

    Raises:
        FileNotFoundError: the artefacts are missing (the message names the command that builds them).
    """
    from ..draw.sheets import draw_grid
    from ..faces import labelled_sheet

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    folder = Path(artefacts) if artefacts else default_artefacts()
    arts, lr, rank, default_steps = _load(folder)
    steps = default_steps if steps is None else steps
    item = held_out(ReproConfig(seed=seed, identities=1, references=8), domain=arts.domain)[0]
    host = arts.host
    images = training_images(item, "meta_lora", seed)
    atomic_save_png(labelled_sheet(images, [f"{im.size[0]}x{im.size[1]}" for im in images],
                                   tile=tile, columns=5), out / "crops.png")
    s2 = Stage2Config(steps=steps, rank=rank, lr=lr, seed=seed, preset=arts.prior.preset or "all")
    result = run_stage2(host, images, arts.cond(None), arts.prior, s2, caption="a photo of a face")
    # LoRA + augmentation: the same crops, flips, steps, rate and seed, without the prior; plain LoRA:
    # the photo itself (the comparison's three methods)
    aug = run_stage2(host, images, arts.cond(None), None, s2, caption="a photo of a face")
    lone = run_stage2(host, training_images(item, "lora", seed), arts.cond(None), None, s2,
                      caption="a photo of a face")
    save_lora(result.adapters, out / "lora.safetensors", domain="synthfaces", **result.metadata)
    atomic_save_png(line_plot(result.losses, title=f"Stage-2 loss ({steps} steps)", smooth=25), out / "loss.png")

    contexts = list(CONTEXTS)

    def sampled(adapters=None) -> dict[str, list[Image.Image]]:
        """Samples per context prompt, with ``adapters`` attached (None: the base model)."""
        with host.attach(adapters) if adapters is not None else contextlib.nullcontext():
            return {c: generate(arts, host, c, samples_per_prompt, seed, sample_steps) for c in contexts}

    base, tuned, augmented, plain = (sampled(a) for a in (None, result.adapters, aug.adapters, lone.adapters))

    def scored(imgs: dict[str, list[Image.Image]]):
        ims, captions, ids, ctx = [], [], [], []
        for c in contexts:
            sims = identity_similarity(arts.embedder, imgs[c], item.references)
            for im, s in zip(imgs[c], sims):
                ims.append(im)
                captions.append(f"{c}: id {s:.2f}")
                ids.append(s)
                ctx.append(context_score(im, c))
        return ims, captions, ids, ctx

    ref_sims = identity_similarity(arts.embedder, [item.photo], item.references)
    n = len(contexts) * samples_per_prompt
    row0 = [item.photo] + list(item.references[: n - 1])
    cap0 = [f"trained on: id {ref_sims[0]:.2f}"] + ["other image"] * (len(row0) - 1)
    b_ims, b_cap, b_ids, b_ctx = scored(base)
    t_ims, t_cap, t_ids, t_ctx = scored(tuned)
    a_ims, a_cap, a_ids, a_ctx = scored(augmented)
    p_ims, p_cap, p_ids, p_ctx = scored(plain)
    sheet = draw_grid([row0, b_ims, p_ims, a_ims, t_ims], captions=[cap0, b_cap, p_cap, a_cap, t_cap], tile=tile + 24,
                      row_labels=[
        "the one photo trained on, then other images of the identity (the scores compare to these)",
        f"base model, no LoRA (mean id {np.mean(b_ids):.2f}, prompt {np.mean(b_ctx):.2f})",
        f"plain LoRA after {steps} steps on the photo itself, same prompts and noise (mean id {np.mean(p_ids):.2f}, "
        f"prompt {np.mean(p_ctx):.2f})",
        f"LoRA + augmentation after {steps} steps, same crops, prompts and noise (mean id {np.mean(a_ids):.2f}, "
        f"prompt {np.mean(a_ctx):.2f})",
        f"Meta-LoRA after {steps} steps, same crops, prompts and noise (mean id {np.mean(t_ids):.2f}, "
        f"prompt {np.mean(t_ctx):.2f})"])
    atomic_save_png(sheet, out / "comparison.png")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report = {
        "domain": "synthfaces (small synthetic face domain, trained base model, meta-learned prior)",
        "steps": steps,
        "first_loss": result.losses[0],
        "last_loss": result.losses[-1],
        "mean_loss_first_25": float(np.mean(result.losses[:25])),
        "mean_loss_last_25": float(np.mean(result.losses[-25:])),
        "seconds_per_step": result.seconds_per_step,
        "peak_memory_mb": round(peak_mb, 1),
        "peak_memory_kind": "process peak RSS (CPU)",
        "total_seconds": round(time.perf_counter() - t0, 2),
        "identity_index": item.identity.index,
        "photo_context": item.context,
        "crops": len(images),
        "caption": "a photo of a face",
        "prompts": [f"a photo of a face on a {c} background" for c in contexts],
        "identity_score_base_mean": float(np.mean(b_ids)),
        "identity_score_metalora_mean": float(np.mean(t_ids)),
        "identity_score_lora_aug_mean": float(np.mean(a_ids)),
        "prompt_score_lora_aug_mean": float(np.mean(a_ctx)),
        "identity_score_lora_mean": float(np.mean(p_ids)),
        "prompt_score_lora_mean": float(np.mean(p_ctx)),
        "artefacts": str(folder),
        "prompt_score_base_mean": float(np.mean(b_ctx)),
        "prompt_score_metalora_mean": float(np.mean(t_ctx)),
        "identity_score_of_the_photo_itself": ref_sims[0],
        "r1": arts.prior.r1,
        "r2": rank,
        "lr": lr,
        "layers": len(result.adapters.names),
        "device": "cpu",
        "torch": torch.__version__,
        "machine": platform.machine(),
        "files": {k: str(out / f"{k}{ext}") for k, ext in
                  (("comparison", ".png"), ("crops", ".png"), ("lora", ".safetensors"), ("loss", ".png"))},
        "note": ("identity score: mean cosine similarity of the domain's identity embedder to the identity's "
                 "other images (never the photo trained on); see experiments/README.md"),
    }
    atomic_write_bytes(out / "report.json", json.dumps(report, indent=2).encode())
    return report
