"""Stage-1 settings (paper appendix A) and the data-parallel batch check."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ...lora.layers import DEFAULT_PRESET, PRESETS


@dataclass(frozen=True)
class MetaTrainConfig:
    """Stage-1 settings; defaults follow the paper's appendix A."""

    steps: int = 50_000  # q_total: total iterations
    bucket_steps: int = 2_500  # q_bucket: consecutive iterations on one bucket
    warmup_steps: int = 1_000  # q_warm-up: first iterations of a bucket that update only Mid/Up (0.4 q_bucket)
    identities_per_bucket: int = 0  # N; 0 = auto: each photo of a bucket is used ~uses_per_example times
    uses_per_example: int = 10  # the paper sizes buckets so each example is used 10 times (Sec. 3)
    batch_size: int = 4  # Stage-1 batch (appendix A), mixing the bucket's identities; data-parallel: the global batch
    lr: float = 4e-4  # AdamW learning rate (Down and Mid/Up)
    weight_decay: float = 0.0  # AdamW decoupled weight decay (the paper states none)
    r1: int = 16  # LoMD output rank (rows of each Down); the paper does not state its value
    r2: int = 1  # LoM output rank during meta-training (the paper's rank-1)
    preset: str = DEFAULT_PRESET  # which canonical layers get adapters
    seed: int = 0  # drives Down/Mid init, bucket assignment, data order, flips, noise and sigmas
    sigma_mode: str = "logit_normal"  # training sigma density: "logit_normal" or "uniform"
    resolution_shift: bool = False  # shift sigmas by the model family's token-count rule
    max_grad_norm: float = 1.0  # global gradient clipping over the updated parameters; 0 disables it

    def __post_init__(self) -> None:
        for name in ("steps", "bucket_steps", "batch_size", "r1", "r2", "uses_per_example"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"MetaTrainConfig.{name} must be an int >= 1, got {v!r}")
        if not isinstance(self.warmup_steps, int) or not 0 <= self.warmup_steps <= self.bucket_steps:
            raise ValueError(
                f"warmup_steps must be an int in [0, bucket_steps={self.bucket_steps}], got {self.warmup_steps!r}; "
                "the paper uses 0.4 x bucket_steps"
            )
        if not isinstance(self.identities_per_bucket, int) or self.identities_per_bucket < 0:
            raise ValueError(f"identities_per_bucket must be an int >= 0 (0 = auto), got {self.identities_per_bucket!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise ValueError(f"max_grad_norm must be >= 0 (0 disables clipping), got {self.max_grad_norm!r}")
        if self.preset not in PRESETS:
            raise ValueError(f"unknown target preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        from ...lora.flow import SIGMA_MODES  # here: lora.flow imports torch, and --help reads these defaults

        if self.sigma_mode not in SIGMA_MODES:
            raise ValueError(f"sigma_mode {self.sigma_mode!r} unknown; choose one of {SIGMA_MODES}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_world_size(batch_size: int, world_size: int) -> None:
    """A data-parallel run splits each global batch of ``batch_size`` items across its processes.

    Raises:
        ValueError: fewer items per batch than processes (names both and the fix).
    """
    if isinstance(batch_size, int) and batch_size < world_size:
        raise ValueError(
            f"--batch-size {batch_size} is smaller than the number of processes ({world_size}): the global "
            f"batch is split across the processes, so each needs at least one item; raise --batch-size to "
            f"{world_size} or a multiple of it, or launch fewer processes (torchrun --nproc_per_node / --nnodes)")
