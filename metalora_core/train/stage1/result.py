"""What a Stage-1 run hands back: the per-step ``StepInfo``, the ``MetaTrainResult`` and its ``Prior``."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ...formats.prior import Prior
from ...lora.families import DEFAULT_FAMILY
from .config import MetaTrainConfig
from .schedule import BucketPlan


@dataclass(frozen=True)
class StepInfo:
    """What the per-step callback sees (after the update of step ``step``, 1-based)."""

    step: int  # steps done so far (1-based)
    total: int  # q_total
    loss: float
    bucket: int  # index of the active bucket
    n_buckets: int
    phase: str  # "warm-up" or "joint"
    step_in_bucket: int  # 1-based position inside the bucket visit
    identities: tuple[int, ...]  # identity index of each sample in the batch
    seconds: float  # wall time of this run so far (excludes time before a resume)
    mirrored: tuple[bool, ...] = ()  # per sample: the mirrored latent of a (plain, mirrored) item was used


MetaStepCallback = Callable[[StepInfo], None]


@dataclass
class MetaTrainResult:
    downs: dict[str, torch.Tensor]  # canonical name -> (r1, in), CPU float32
    losses: list[float]  # one per step, including steps done before a resume
    buckets: list[list[int]]  # identity indices per bucket
    identities: list[str]
    config: MetaTrainConfig
    seconds: float = 0.0  # this run's wall time
    resumed_from: int = 0  # step the run resumed at (0: fresh)
    bank_bytes: int = 0  # CPU bytes of the identity bank at the end
    plan: BucketPlan | None = None  # N, buckets and identities visited
    family: str = DEFAULT_FAMILY.name  # the host model's family (``ModelFamily.name``)

    @property
    def steps(self) -> int:
        return len(self.losses)


def to_prior(result: MetaTrainResult, *, domain: str, base_model: str | None = None,
             data_summary: Mapping[str, Any] | None = None) -> Prior:
    """The learned Down matrices as a ``Prior`` (identity layers are discarded, paper Sec. 3);
    ``base_model`` defaults to the name of the family the run trained on."""
    for name, t in result.downs.items():
        if not torch.isfinite(t).all():
            raise ValueError(f"layer {name!r} holds NaN or inf; the meta-training diverged, no prior was made")
    c = result.config
    tail = result.losses[-min(50, len(result.losses)):] if result.losses else []
    training = {
        "kind": "meta-trained",
        "algorithm": "Meta-LoRA Stage-1 (Algorithm 1)",
        "steps": result.steps,
        "bucket_steps": c.bucket_steps,
        "warmup_steps": c.warmup_steps,
        "batch_size": c.batch_size,
        "lr": c.lr,
        "r2": c.r2,
        "seed": c.seed,
        "identities": len(result.identities),
        "identities_trained": result.plan.identities_visited if result.plan else None,
        "buckets": len(result.buckets),
        "final_loss_mean50": (sum(tail) / len(tail)) if tail else None,
        "data": dict(data_summary or {}),
    }
    return Prior(downs=dict(result.downs), r1=c.r1, preset=c.preset, base_model=base_model or result.family, domain=domain,
                 training=training)
