"""Does a longer Stage-1 make a better prior? One Stage-1 run of ``steps`` steps on fresh photos of
the training identities, its Down saved at several step counts; for each snapshot the share of the
held-out identities' Stage-2 gradient inside Down (``subspace.capture``) and the Stage-1 loss over
the steps before it; then Meta-LoRA with the chosen snapshots against plain LoRA on the
comparison's held-out identities, seeds and checkpoints (``experiment.run_method``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..formats.files import atomic_write_bytes
from ..formats.prior import Prior
from ..train.stage1 import MetaTrainConfig, MetaTrainer, StepInfo
from .artefacts import DOMAIN_LR, Artefacts, stage1_data
from .experiment import ReproConfig, first_reaching, held_out, run_method, summarise, training_images
from .render import TRAIN_OFFSET, make_identity
from .subspace import capture, summarise_shares, weight_gradients

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LengthConfig:
    """The experiment's settings (defaults: the committed run)."""

    steps: int = 9_600  # q_total: 3x the committed prior's 3,200
    snapshots: tuple[int, ...] = (0, 800, 1_600, 3_200, 6_400, 9_600)  # Down saved after these steps
    compared: tuple[int, ...] = (3_200, 9_600)  # snapshots that Stage-2 runs with
    bucket_steps: int = 200  # q_bucket, q_warm-up, batch, r1 and identities as the committed prior
    warmup_steps: int = 80
    batch: int = 4
    r1: int = 8
    identities: int = 160
    photos_per_identity: int = 8
    draws: int = 64  # noise draws per gradient
    repro: ReproConfig = ReproConfig()
    seed: int = 0

    def __post_init__(self) -> None:
        if list(self.snapshots) != sorted(set(self.snapshots)) or self.snapshots[-1] != self.steps:
            raise ValueError(f"snapshots must increase and end at steps={self.steps}, got {self.snapshots}")
        if not set(self.compared) <= set(self.snapshots):
            raise ValueError(f"compared {self.compared} must be among the snapshots {self.snapshots}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["repro"] = self.repro.to_dict()
        return d


SMOKE_LENGTH = LengthConfig(steps=8, snapshots=(0, 4, 8), compared=(8,), bucket_steps=4, warmup_steps=2, batch=2,
                            r1=2, identities=4, photos_per_identity=2, draws=2,
                            repro=ReproConfig(identities=1, runs_per_identity=1, checkpoints=(2, 4), references=2,
                                              samples_per_prompt=1, sample_steps=2))


def run_stage1_length(arts: Artefacts, out: str | Path, config: LengthConfig = LengthConfig(), *,
                      label: str = "full") -> dict[str, Any]:
    """Runs the experiment; writes results.json and table.md to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    g = np.random.default_rng(np.random.SeedSequence([config.seed, 12]))  # photos of its own
    train_ids = [make_identity(TRAIN_OFFSET + config.seed * 100_000 + k) for k in range(config.identities)]
    data = stage1_data(arts.vae, arts.cond(None), train_ids, config.photos_per_identity, g)
    mcfg = MetaTrainConfig(steps=config.steps, bucket_steps=config.bucket_steps, warmup_steps=config.warmup_steps,
                           batch_size=config.batch, r1=config.r1, r2=1, preset=arts.prior.preset or "all",
                           lr=DOMAIN_LR, seed=config.seed)
    trainer = MetaTrainer(arts.host, data, mcfg)
    snaps: dict[int, dict[str, torch.Tensor]] = {}

    def keep(step: int) -> None:
        snaps[step] = {n: p.detach().to("cpu", torch.float32).clone() for n, p in trainer.downs.items()}

    if 0 in config.snapshots:
        keep(0)
    marks = set(config.snapshots)

    def on_step(info: StepInfo) -> None:
        if info.step in marks:
            keep(info.step)

    result = trainer.run(callback=on_step)
    stage1_s = time.perf_counter() - t0

    items = held_out(config.repro)
    grads = [weight_gradients(arts.host, arts.cond(None), training_images(it, "meta_lora", config.repro.seed),
                              mcfg.preset, draws=config.draws, seed=config.seed * 1000 + k)
             for k, it in enumerate(items)]
    curve = []
    prev = 0
    for step in config.snapshots:
        window = result.losses[prev:step] if step > prev else []
        shares = summarise_shares([capture(gr, snaps[step], seed=k) for k, gr in enumerate(grads)])
        curve.append({"step": step, "prior_share": shares["prior"], "random_share": shares["random"],
                      "stage1_loss_since_last_snapshot": summarise(window) if window else None})
        prev = step

    def prior_at(step: int) -> Prior:
        return Prior(downs=snaps[step], r1=config.r1, preset=mcfg.preset, base_model="synthfaces-small-flux",
                     domain="synthfaces", training={"kind": "meta-trained", "steps": step, "of": config.steps})

    rc = config.repro
    methods = ["lora"] + [f"meta_lora@{s}" for s in config.compared]
    per_run: list[dict[str, Any]] = []
    for k, item in enumerate(items):
        for j in range(rc.runs_per_identity):
            seed = rc.seed * 1000 + k * 10 + j  # the comparison's seeds (experiment.run_reproduction)
            for m in methods:
                if m == "lora":
                    r = run_method(arts, item, "lora", seed, rc)
                else:
                    r = run_method(dataclasses.replace(arts, prior=prior_at(int(m.split("@")[1]))), item, "meta_lora",
                                   seed, rc)
                per_run.append({"identity": k, "seed": seed, "method": m, "scores": r["scores"]})
                log.info("identity %d seed %d %s: %s", k, seed, m, {s: round(v["identity"], 3) for s, v in r["scores"].items()})
    table = {m: {str(s): summarise([r["scores"][s]["identity"] for r in per_run if r["method"] == m])
                 for s in rc.checkpoints} for m in methods}
    reach = {}
    last = rc.checkpoints[-1]
    for s in config.compared:
        m = f"meta_lora@{s}"
        target = table["lora"][str(last)]["mean"]
        mean_curve = {c: table[m][str(c)]["mean"] for c in rc.checkpoints}
        pairs = []
        for r in (x for x in per_run if x["method"] == m):
            twin = next(x for x in per_run if x["method"] == "lora" and x["identity"] == r["identity"]
                        and x["seed"] == r["seed"])
            pairs.append(first_reaching({c: r["scores"][c]["identity"] for c in rc.checkpoints},
                                        twin["scores"][last]["identity"]))
        reached = [p for p in pairs if p is not None]
        reach[str(s)] = {"target_value": target, "mean_curve_first_step_at_or_above_target": first_reaching(mean_curve, target),
                         "pairs": len(pairs), "pairs_reaching_own_lora_target": len(reached),
                         "pairs_reaching_before_last_step": sum(1 for p in reached if p < last)}
    results = {"label": label, "config": config.to_dict(), "curve": curve, "identity": table, "reach": reach,
               "stage1_seconds": round(stage1_s, 1), "stage1_loss": {"first50": summarise(result.losses[:50]),
                                                                      "last50": summarise(result.losses[-50:])},
               "runs": [dict(r, scores={str(s): v for s, v in r["scores"].items()}) for r in per_run],
               "seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_bytes(out / "results.json", json.dumps(results, indent=2, sort_keys=True).encode())
    atomic_write_bytes(out / "table.md", render_table(results).encode())
    return results


def render_table(results: dict[str, Any]) -> str:
    c = results["config"]
    cell = lambda d: f"{d['mean']:.3f} ± {d['std']:.3f} ({d['n']})"  # noqa: E731
    lines = [f"# Stage-1 length ({results['label']}): one Stage-1 run of {c['steps']} steps, Down saved along it", "",
             "| Stage-1 steps | share of held-out Stage-2 gradient in Down | random Down | Stage-1 loss since the "
             "previous snapshot |", "|---|---|---|---|"]
    for p in results["curve"]:
        loss = p["stage1_loss_since_last_snapshot"]
        lines.append(f"| {p['step']} | {cell(p['prior_share'])} | {cell(p['random_share'])} | "
                     f"{cell(loss) if loss else '-'} |")
    steps = c["repro"]["checkpoints"]
    methods = list(results["identity"])
    lines += ["", "Identity score (mean ± std (n) over held-out identities x seeds) per Stage-2 step count:", "",
              "| Stage-2 steps | " + " | ".join(methods) + " |", "|---" * (1 + len(methods)) + "|"]
    for s in steps:
        lines.append(f"| {s} | " + " | ".join(cell(results["identity"][m][str(s)]) for m in methods) + " |")
    lines.append("")
    for s, r in results["reach"].items():
        first = r["mean_curve_first_step_at_or_above_target"]
        lines.append(f"- prior after {s} Stage-1 steps: mean curve first at or above plain LoRA's {steps[-1]}-step "
                     f"score at {'never' if first is None else first}; pairs reaching their own LoRA twin's score: "
                     f"{r['pairs_reaching_own_lora_target']}/{r['pairs']} ({r['pairs_reaching_before_last_step']} "
                     f"before step {steps[-1]}).")
    return "\n".join(lines) + "\n"
