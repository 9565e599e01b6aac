"""The embedded demo: the whole Meta-LoRA job on a tiny FLUX, CPU, no model download.

It proves the pipeline (prior -> face crops -> Stage-2 -> merged LoRA -> diffusers
generation with that LoRA), not image quality: the tiny model has random weights.
"""
from __future__ import annotations

import json
import logging
import platform
import resource
import time
from pathlib import Path

import torch

from ..hosts.diffusers_flux import DiffusersFluxHost, encode_prompt
from ..formats.lora import save_lora
from ..formats.files import atomic_save_png, atomic_write_bytes
from ..lora.families import family_of_diffusers_config
from ..lora.layers import DEFAULT_PRESET
from ..draw.charts import line_plot
from ..formats.prior import load_prior, make_prior, save_prior
from ..faces.person import person_crops
from ..train.recipe import class_caption, run_stage2
from ..hosts.tiny import TINY_T5_LEN, build_tiny_flux_pipeline
from ..train.stage2 import Stage2Config

log = logging.getLogger(__name__)

DEMO_PROMPTS = (
    "a photo of a woman as an astronaut on the moon",
    "a photo of a woman in a sunflower field",
    "a watercolor portrait of a woman",
)


def run_demo(out: str | Path, *, steps: int = 375, seed: int = 0, r1: int = 8, r2: int = 1,
             photo: str | Path | None = None, resolution: int = 256, sample_size: int = 128,
             sample_steps: int = 4) -> dict:
    """Runs the demo and writes prior, LoRA, samples, loss plot and report into ``out``.

    ``photo``: a photo of one person (``make demo`` fetches a public-domain one first).
    """
    from ..faces import contact_sheet, labelled_sheet

    if photo is None or not Path(photo).is_file():
        raise FileNotFoundError(
            f"the demo needs a photo of one person: pass --photo PATH (got {photo}); 'make demo' fetches "
            "a public-domain one with 'python tests/sample_photos.py astronaut'")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    pipe = build_tiny_flux_pipeline(seed)
    pipe.set_progress_bar_config(disable=True)

    prior_path = save_prior(
        make_prior(family_of_diffusers_config(pipe.transformer.config).dims_from_diffusers_config(
            pipe.transformer.config), r1=r1, preset=DEFAULT_PRESET,
                   generator=torch.Generator().manual_seed(seed), domain="demo"), out / "prior.safetensors")
    prior = load_prior(prior_path)

    photo_path = Path(photo)
    made, _ = person_crops([photo_path], resolution=resolution, seed=seed)
    atomic_save_png(contact_sheet(made.crops, tile=128), out / "crops.png")
    caption = class_caption("woman")
    config = Stage2Config(steps=steps, rank=r2, seed=seed)
    cond = encode_prompt(pipe, caption, max_sequence_length=TINY_T5_LEN)
    result = run_stage2(DiffusersFluxHost.from_pipeline(pipe), made, cond, prior, config, caption=caption,
                        prior_source=str(prior_path))

    lora_path = save_lora(result.adapters, out / "lora.safetensors", **result.metadata)
    atomic_save_png(line_plot(result.losses, title=f"Stage-2 loss ({steps} steps)", smooth=25), out / "loss.png")

    # Same prompts and seeds without and with the LoRA, loaded by diffusers itself.
    def generate() -> list:
        return [pipe(prompt=p, height=sample_size, width=sample_size, num_inference_steps=sample_steps,
                     guidance_scale=3.5, max_sequence_length=TINY_T5_LEN,
                     generator=torch.Generator().manual_seed(seed)).images[0] for p in DEMO_PROMPTS]

    base = generate()
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # the LoRA has no text-encoder keys, by design
    try:
        pipe.load_lora_weights(str(lora_path), adapter_name="metalora")
    finally:
        diffusers_logging.set_verbosity(level)
    tuned = generate()
    pipe.unload_lora_weights()
    labels = [f"base: {p}" for p in DEMO_PROMPTS] + [f"LoRA: {p}" for p in DEMO_PROMPTS]
    atomic_save_png(labelled_sheet(base + tuned, labels, tile=sample_size, columns=len(DEMO_PROMPTS)), out / "samples.png")
    # ru_maxrss is in KiB on Linux: the process's peak resident memory.
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report = {
        "steps": steps,
        "first_loss": result.losses[0],
        "last_loss": result.losses[-1],
        "mean_loss_first_25": sum(result.losses[:25]) / len(result.losses[:25]),
        "mean_loss_last_25": sum(result.losses[-25:]) / len(result.losses[-25:]),
        "seconds_per_step": result.seconds_per_step,
        "peak_memory_mb": round(peak_mb, 1),
        "peak_memory_kind": "process peak RSS (CPU)",
        "total_seconds": round(time.perf_counter() - t_start, 2),
        "photo": str(photo_path),
        "detector": made.detector,
        "crops": len(made.crops),
        "caption": caption,
        "r1": r1,
        "r2": r2,
        "layers": len(result.adapters.names),
        "device": "cpu",
        "torch": torch.__version__,
        "machine": platform.machine(),
        "files": {k: str(out / f"{k}{ext}") for k, ext in
                  (("prior", ".safetensors"), ("crops", ".png"), ("lora", ".safetensors"),
                   ("samples", ".png"), ("loss", ".png"))},
        "note": "tiny random-weight FLUX: proves the pipeline, not image quality",
    }
    atomic_write_bytes(out / "report.json", json.dumps(report, indent=2).encode())
    return report
