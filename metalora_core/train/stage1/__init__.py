"""Stage-1 meta-training: learn the shared Meta-Down (LoMD) from many identities (paper Sec. 3,
Algorithm 1, appendix A).

Identities are grouped into buckets; each bucket gets ``q_bucket`` consecutive steps, the first
``q_warmup`` of them updating only the bucket's identity-specific Mid/Up layers, the rest Down
too. A batch is drawn from the whole active bucket, so one batch can hold several identities;
each sample uses its own identity's Mid/Up. At the end only Down is kept (``to_prior``).

Modules:
    config      ``MetaTrainConfig`` (appendix A's defaults) and the data-parallel batch check.
    schedule    Algorithm 1's counters: bucket sizes and order, the bucket and phase of a step.
    bank        the identity layers: init, the per-sample ``BucketAdapter``, the CPU ``IdentityBank``
                (sharded by identity across data-parallel ranks).
    checkpoint  checkpoint files (safetensors) and the checks a resume must pass.
    trainer     ``MetaTrainer`` (the loop, one step function for one process and data-parallel)
                and ``meta_train``.
    result      what a run hands back: ``StepInfo`` per step, ``MetaTrainResult``, ``to_prior``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ...lazy import lazy_exports

# Names are resolved on first use (PEP 562), so reading ``MetaTrainConfig``'s defaults, as
# ``metalora --help`` does, does not import torch.
_EXPORTS: dict[str, str] = {
    "MetaTrainData": "...data.latents",
    **dict.fromkeys(("BankKey", "BucketAdapter", "IdentityBank", "IdentityRouter", "initial_downs",
                     "merge_bank_states", "split_bank_state"), ".bank"),
    **dict.fromkeys(("CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "check_resumable", "load_checkpoint",
                     "save_checkpoint"), ".checkpoint"),
    **dict.fromkeys(("MetaTrainConfig", "check_world_size"), ".config"),
    **dict.fromkeys(("BucketPlan", "LrSchedule", "SchedulePoint", "bucket_sizes", "make_buckets", "plan_buckets",
                     "resolve_identities_per_bucket", "schedule_at"), ".schedule"),
    **dict.fromkeys(("MetaStepCallback", "MetaTrainResult", "StepInfo", "to_prior"), ".result"),
    **dict.fromkeys(("SMALL_VISIT_FRACTION", "MetaTrainer", "make_optimizer", "meta_train"), ".trainer"),
}

if TYPE_CHECKING:
    from ...data.latents import MetaTrainData
    from .bank import (BankKey, BucketAdapter, IdentityBank, IdentityRouter, initial_downs, merge_bank_states,
                       split_bank_state)
    from .checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, check_resumable, load_checkpoint, save_checkpoint
    from .config import MetaTrainConfig, check_world_size
    from .schedule import (BucketPlan, LrSchedule, SchedulePoint, bucket_sizes, make_buckets, plan_buckets,
                           resolve_identities_per_bucket, schedule_at)
    from .result import MetaStepCallback, MetaTrainResult, StepInfo, to_prior
    from .trainer import SMALL_VISIT_FRACTION, MetaTrainer, make_optimizer, meta_train


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


__all__ = sorted(_EXPORTS)
