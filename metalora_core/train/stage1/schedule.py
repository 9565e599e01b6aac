"""Algorithm 1's loop counters: bucket sizes, the bucket of each step, the warm-up/joint phase.

Pure functions of the config. Identities are grouped into buckets; each bucket gets ``q_bucket``
consecutive steps, the first ``q_warmup`` of them update only the bucket's Mid/Up ("warm-up"),
the rest Down too ("joint"). Buckets are visited in a fixed order, pass after pass, until
``q_total`` steps are done (the paper's loop may overshoot ``q_total`` by finishing a pass; here
the last bucket visit is cut at exactly ``q_total``). The paper sizes a bucket "such that each
example in a bucket is utilized for 10 iterations"; an example is a photo (crops of one photo count
once), so its setting (20 photos per identity, batch 4, q_bucket 2,500) gives 50 identities per
bucket (``plan_buckets``).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import torch

from .config import MetaTrainConfig

_BUCKET_SALT = 0x42554B54  # keeps the bucket shuffle apart from the training stream of the same seed


def resolve_identities_per_bucket(config: MetaTrainConfig, photos_per_identity: Sequence[int]) -> int:
    """N of Algorithm 1: the config's value, or (auto) so that each photo of a bucket is used
    about ``uses_per_example`` times in ``q_bucket`` steps of ``batch_size`` (paper Sec. 3).

    Args:
        config: q_bucket, batch size, uses per example, an explicit N.
        photos_per_identity: distinct source photos per identity (crops of one photo count once).
    """
    n_ids = len(photos_per_identity)
    if config.identities_per_bucket:
        return min(config.identities_per_bucket, n_ids)
    mean_photos = sum(photos_per_identity) / max(1, n_ids)
    n = round(config.bucket_steps * config.batch_size / (config.uses_per_example * max(mean_photos, 1e-9)))
    return max(1, min(n_ids, n))


def bucket_sizes(n_identities: int, per_bucket: int) -> list[int]:
    """How many identities each bucket holds, in bucket order: ``per_bucket`` each, the rest last.

    The one place that decides it: ``make_buckets`` cuts at these sizes, ``plan_buckets`` counts them.

    Raises:
        ValueError: fewer than one identity or one identity per bucket.
    """
    if n_identities < 1 or per_bucket < 1:
        raise ValueError(f"need >= 1 identity and >= 1 per bucket, got {n_identities} and {per_bucket}")
    return [min(per_bucket, n_identities - i) for i in range(0, n_identities, per_bucket)]


@dataclass(frozen=True)
class BucketPlan:
    """How many identities a run's schedule trains."""

    identities: int  # all identities of the data
    identities_per_bucket: int  # N
    buckets: int  # ceil(identities / N)
    visits: int  # bucket visits in q_total steps (the last one may be cut short)
    identities_visited: int  # identities whose bucket is visited at least once
    steps_to_visit_all: int  # q_total that visits every bucket once (buckets x q_bucket)

    @property
    def fraction_visited(self) -> float:
        return self.identities_visited / max(1, self.identities)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "fraction_visited": round(self.fraction_visited, 4)}


def plan_buckets(config: MetaTrainConfig, photos_per_identity: Sequence[int]) -> BucketPlan:
    """N, the bucket count and how many identities ``q_total`` steps visit (pure arithmetic).

    The paper's setting, 1,050 identities x 20 photos, batch 4, q_bucket 2,500, q_total 50,000:
    N = 50, 21 buckets, 20 visits, 1,000 identities trained.
    """
    n_ids = len(photos_per_identity)
    if n_ids < 1:
        raise ValueError("no identities to plan buckets for; give a folder with one subfolder per person")
    per = resolve_identities_per_bucket(config, photos_per_identity)
    sizes = bucket_sizes(n_ids, per)
    visits = math.ceil(config.steps / config.bucket_steps)
    return BucketPlan(identities=n_ids, identities_per_bucket=per, buckets=len(sizes), visits=visits,
                      identities_visited=sum(sizes[: min(visits, len(sizes))]),
                      steps_to_visit_all=len(sizes) * config.bucket_steps)


def make_buckets(n_identities: int, per_bucket: int, seed: int) -> list[list[int]]:
    """Shuffles identity indices with ``seed`` and cuts them into buckets of ``bucket_sizes``."""
    sizes = bucket_sizes(n_identities, per_bucket)
    g = torch.Generator().manual_seed(seed ^ _BUCKET_SALT)
    order = torch.randperm(n_identities, generator=g).tolist()
    return [sorted(order[end - k : end]) for k, end in zip(sizes, accumulate(sizes))]


@dataclass(frozen=True)
class SchedulePoint:
    """Where global step ``step`` (0-based) falls in Algorithm 1."""

    step: int
    visit: int  # how many bucket visits came before this one (i_curr // q_bucket)
    bucket: int  # index into the bucket list
    step_in_bucket: int  # i_cb
    warmup: bool  # i_cb < q_warm-up: only Mid/Up are updated

    @property
    def phase(self) -> str:
        return "warm-up" if self.warmup else "joint"


def schedule_at(step: int, config: MetaTrainConfig, n_buckets: int) -> SchedulePoint:
    """The bucket and phase of a global step (buckets visited in order, pass after pass)."""
    visit, i_cb = divmod(step, config.bucket_steps)
    return SchedulePoint(step=step, visit=visit, bucket=visit % n_buckets, step_in_bucket=i_cb,
                         warmup=i_cb < config.warmup_steps)


# The learning rate of a step, as a function of where it falls (``MetaTrainer(lr_schedule=...)``).
# A function of the schedule point alone keeps resuming exact: nothing to store in a checkpoint.
LrSchedule = Callable[[SchedulePoint], float]
