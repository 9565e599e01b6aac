"""Stage-1 meta-training: learn the shared Meta-Down (LoMD) from many identities (paper Sec. 3,
Algorithm 1, appendix A).

Identities are grouped into buckets. Each bucket gets ``q_bucket`` consecutive steps; in the first
``q_warmup`` of them only the bucket's identity-specific Mid/Up layers are updated ("warm-up"),
afterwards Down is updated too ("joint"). Buckets are visited in a fixed order, pass after pass,
until ``q_total`` steps are done (the paper's loop may overshoot ``q_total`` by finishing a pass;
here the last bucket visit is cut at exactly ``q_total``). The paper sizes a bucket "such that
each example in a bucket is utilized for 10 iterations"; an example is a photo (crops of one photo
count once), so its setting (20 photos per identity, batch 4, q_bucket 2,500) gives 50 identities
per bucket (``plan_buckets``).

Batches and identities: a batch is drawn from the whole active bucket, so one batch can hold
several identities. Every adapter layer keeps one Mid/Up pair per bucket identity and applies to
each sample the pair of that sample's identity (``BucketAdapter``), so each sample's loss flows
only into its own identity's Mid/Up and into the shared Down. An identity absent from a batch gets
no gradient and (AdamW skips parameters without a gradient) no update at all, as if it had its own
optimizer.

The bank: Mid/Up of every identity seen so far, plus their AdamW moments, live on the CPU in an
``IdentityBank``; only the active bucket's are moved to the training device. Down and its AdamW
state stay on the device for the whole run. At the end the identity layers are discarded and only
Down is kept (``to_prior``).

``MetaTrainer`` owns all of it (Down and its optimizer, the bank, the generator, the losses, the
schedule position). ``state_dict()`` / ``load_state_dict()`` are what checkpoints hold
(``save_checkpoint`` / ``load_checkpoint``); resuming from one reproduces an uninterrupted run bit
for bit on the CPU. Every random draw comes from the trainer's own generators; the process's
global RNG is never read or set.

Data-parallel (``torchrun``, a ``ProcessGroup`` passed as ``group``): every rank holds the same
Down, draws the same global batch from the same generator (queue order, flips, noise and sigmas
of all of its items) and computes the loss of its share of the batch's rows (``split_rows``),
weighted by share/batch so that the ranks' losses sum to the single-process batch mean. The
gradients of Down and of the Mid/Up of the batch's identities are summed over the ranks in one
all-reduce, so every rank holds the single-process batch gradient and applies the same clipping
and AdamW update: Down and the live bucket stay identical on all ranks, and the run equals a
single process with the same global batch and seed up to float summation order.

The identity bank is sharded by identity: identity ``i`` is kept (Mid/Up and AdamW moments, on
the CPU) by rank ``i % world_size`` only. On a bucket change the owners hand the bucket's
identities to every rank (the live bucket is replicated, so the batch can be split by rows and
balanced whatever identities it holds; routing rows to their identity's owner instead would
leave ranks idle whenever a batch holds one or two identities), and on leaving it each rank
keeps its own identities. A checkpoint gathers the shards onto rank 0, which alone writes it;
its contents do not depend on the world size, so a run can resume with another one (rank 0
reads it and hands each rank its shard).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.latents import MetaTrainData, latent_shape, pick_orientation
from ..formats.files import atomic_save_safetensors, read_safetensors
from ..formats.prior import Prior
from ..lora.adapter import AdapterSet
from ..lora.flow import SIGMA_MODES
from ..lora.layers import DEFAULT_PRESET, PRESETS, resolve_targets
from .distributed import ProcessGroup, split_rows
from .stage2 import FlowHost, flow_step_loss

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "metalora.metatrain-checkpoint"
CHECKPOINT_VERSION = 2  # 2: no global torch RNG state (version 1 files still load)
_INIT_SALT = 0x4D455441  # keeps the init streams apart from the training stream of the same seed
_BUCKET_SALT = 0x42554B54
SMALL_VISIT_FRACTION = 0.5  # warn when q_total trains fewer than this share of the identities


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
    resolution_shift: bool = False  # shift sigmas by FLUX's token-count rule
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


# ---------------------------------------------------------------------------------------------
# Schedule (pure functions of the config; Algorithm 1's loop counters)


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
    sizes = [min(per, n_ids - i) for i in range(0, n_ids, per)]  # make_buckets' sizes, in order
    visits = math.ceil(config.steps / config.bucket_steps)
    return BucketPlan(identities=n_ids, identities_per_bucket=per, buckets=len(sizes), visits=visits,
                      identities_visited=sum(sizes[: min(visits, len(sizes))]),
                      steps_to_visit_all=len(sizes) * config.bucket_steps)


def initial_downs(config: MetaTrainConfig, shapes: Mapping[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    """The Down matrices a fresh run starts from ((r1, in) per layer, peft's lora_A init)."""
    init = AdapterSet.meta_random(shapes, r1=config.r1, r2=config.r2, preset=config.preset,
                                  generator=torch.Generator().manual_seed(config.seed ^ _INIT_SALT))
    return {n: a.down.detach().clone() for n, a in init.items()}


def make_buckets(n_identities: int, per_bucket: int, seed: int) -> list[list[int]]:
    """Shuffles identity indices with ``seed`` and cuts them into buckets of ``per_bucket``."""
    if n_identities < 1 or per_bucket < 1:
        raise ValueError(f"need >= 1 identity and >= 1 per bucket, got {n_identities} and {per_bucket}")
    g = torch.Generator().manual_seed(seed ^ _BUCKET_SALT)
    order = torch.randperm(n_identities, generator=g).tolist()
    return [sorted(order[i : i + per_bucket]) for i in range(0, n_identities, per_bucket)]


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


# ---------------------------------------------------------------------------------------------
# Per-sample identity adapters


class IdentityRouter:
    """Tells every ``BucketAdapter`` which bucket slot each sample of the current batch uses."""

    def __init__(self) -> None:
        self.slots: list[int] = []


class BucketAdapter(nn.Module):
    """One layer's Meta-LoRA during Stage-1: a shared Down and one Mid/Up pair per bucket identity.

    ``delta(x_b) = scale * Up[s_b] Mid[s_b] Down x_b`` for sample b with slot ``s_b`` (paper
    eq. (1) with the identity index i). Same call contract as ``LoRAAdapter``: returns the delta
    only; x's first dim is the batch.
    """

    def __init__(self, down: nn.Parameter, mids: Sequence[torch.Tensor], ups: Sequence[torch.Tensor],
                 router: IdentityRouter, scale: float = 1.0) -> None:
        super().__init__()
        self.in_features = down.shape[1]
        self.out_features = ups[0].shape[0]
        self.scale = float(scale)
        self.down = down  # (r1, in), shared by all identities (and all BucketAdapters of a run)
        self.mids = nn.ParameterList([nn.Parameter(m) for m in mids])  # each (r2, r1)
        self.ups = nn.ParameterList([nn.Parameter(u) for u in ups])  # each (out, r2)
        self._router = router

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slots = self._router.slots
        b = x.shape[0]
        if len(slots) != b:
            raise RuntimeError(f"BucketAdapter got a batch of {b} but the router holds {len(slots)} identity slots")
        h = F.linear(x.to(self.down.dtype), self.down)  # (B, ..., r1)
        lead = h.shape[:-1]
        if all(s == slots[0] for s in slots):  # one identity: plain GEMMs
            y = F.linear(F.linear(h, self.mids[slots[0]]), self.ups[slots[0]])  # (B, ..., out)
        else:
            h = h.reshape(b, -1, h.shape[-1])  # (B, L, r1)
            mid = torch.stack([self.mids[s] for s in slots])  # (B, r2, r1)
            up = torch.stack([self.ups[s] for s in slots])  # (B, out, r2)
            y = torch.bmm(torch.bmm(h, mid.transpose(1, 2)), up.transpose(1, 2))  # (B, L, out)
            y = y.reshape(*lead, self.out_features)
        return y * self.scale

    def add_to(self, base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``base + delta(x)`` out of place (the hook contract of ``adapter.attach_adapters``)."""
        return base + self(x).to(base.dtype)


# ---------------------------------------------------------------------------------------------
# The bank of identity layers (CPU)


_ADAM_KEYS = ("step", "exp_avg", "exp_avg_sq")
BankKey = tuple[int, str, str]  # (identity, layer, "mid" | "up")


def _cpu(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").clone() for k, v in state.items()}


def _to_device(state: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.clone() if k == "step" else v.to(device).clone() for k, v in state.items()}


class IdentityBank:
    """Mid/Up per identity and layer, with their AdamW moments, on the CPU.

    Keys: ``(identity, layer, "mid" | "up")`` -> tensor; ``adam[(identity, layer, part)]`` ->
    {"step", "exp_avg", "exp_avg_sq"}. An identity is created on first use with a Mid drawn from
    its own generator (so its init does not depend on the visiting order) and a zero Up.

    ``shard=(rank, world_size)``: a data-parallel rank's bank keeps only the identities it owns
    (``owner``); the default (0, 1) keeps all.
    """

    def __init__(self, shapes: Mapping[str, tuple[int, int]], *, r1: int, r2: int, seed: int,
                 shard: tuple[int, int] = (0, 1)) -> None:
        self.shapes, self.r1, self.r2, self.seed = dict(shapes), r1, r2, seed
        self.rank, self.world_size = shard  # this bank keeps the identities i with i % world_size == rank
        self.params: dict[BankKey, torch.Tensor] = {}
        self.adam: dict[BankKey, dict[str, torch.Tensor]] = {}

    def owner(self, identity: int) -> int:
        """The rank whose bank keeps ``identity``."""
        return identity % self.world_size

    def owns(self, identity: int) -> bool:
        return self.owner(identity) == self.rank

    def entries(self, identities: Sequence[int]) -> dict[BankKey, tuple[torch.Tensor, dict[str, torch.Tensor] | None]]:
        """(Mid or Up, its AdamW moments or None) of the given identities that this bank keeps."""
        wanted = set(identities)
        return {k: (v, self.adam.get(k)) for k, v in self.params.items() if k[0] in wanted}

    def ensure(self, identity: int) -> None:
        if (identity, next(iter(self.shapes)), "mid") in self.params:
            return
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + identity * 7919 + _INIT_SALT) % (2**63))
        bound = 1.0 / math.sqrt(self.r1)  # LoRAAdapter's Mid init (kaiming uniform, a=sqrt(5))
        for name, (_, fout) in self.shapes.items():
            self.params[(identity, name, "mid")] = torch.rand((self.r2, self.r1), generator=g) * 2 * bound - bound
            self.params[(identity, name, "up")] = torch.zeros(fout, self.r2)

    @property
    def identities(self) -> list[int]:
        return sorted({k[0] for k in self.params})

    def nbytes(self) -> int:
        n = sum(t.numel() * t.element_size() for t in self.params.values())
        return n + sum(t.numel() * t.element_size() for s in self.adam.values() for t in s.values())

    def state_dict(self) -> dict[str, Any]:
        return {"params": {k: v.clone() for k, v in self.params.items()},
                "adam": {k: _cpu(v) for k, v in self.adam.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.params = {tuple(k): v.clone() for k, v in state["params"].items()}  # type: ignore[misc]
        self.adam = {tuple(k): _cpu(v) for k, v in state["adam"].items()}  # type: ignore[misc]


def split_bank_state(state: Mapping[str, Any], world_size: int) -> list[dict[str, Any]]:
    """A whole bank's ``state_dict`` cut into the shards of a ``world_size`` run (identity i goes to
    rank i % world_size, ``IdentityBank.owner``)."""
    shards: list[dict[str, Any]] = [{"params": {}, "adam": {}} for _ in range(world_size)]
    for part in ("params", "adam"):
        for k, v in state[part].items():
            shards[k[0] % world_size][part][k] = v
    return shards


def merge_bank_states(shards: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The shards of a sharded bank (rank order) as one bank ``state_dict``, identities in order."""
    merged: dict[str, Any] = {"params": {}, "adam": {}}
    for part in ("params", "adam"):
        items = [(k, v) for shard in shards for k, v in shard[part].items()]
        merged[part] = dict(sorted(items, key=lambda kv: kv[0][0]))  # stable: layer order kept per identity
    return merged


# ---------------------------------------------------------------------------------------------
# Results and callback


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

    @property
    def steps(self) -> int:
        return len(self.losses)


# ---------------------------------------------------------------------------------------------
# The trainer


class _Queue:
    """Algorithm 1's per-bucket Dataloader: epochs of random permutations, same-size batches."""

    def __init__(self, items: Sequence[int], shapes: Sequence[tuple[int, ...]], queue: list[int]) -> None:
        self.items, self.shapes, self.queue = list(items), shapes, queue
        self.group: dict[tuple[int, ...], int] = {}
        for i in self.items:
            self.group[shapes[i]] = self.group.get(shapes[i], 0) + 1

    def _refill(self, gen: torch.Generator) -> None:
        self.queue.extend(self.items[j] for j in torch.randperm(len(self.items), generator=gen).tolist())

    def take(self, k: int, gen: torch.Generator) -> list[int]:
        """Next batch: the queue's first item plus the next queued items of the same latent size."""
        if not self.queue:
            self._refill(gen)
        first = self.queue.pop(0)
        shape = self.shapes[first]
        batch = [first]
        target = min(k, self.group[shape])
        while len(batch) < target:
            pos = next((p for p, i in enumerate(self.queue) if self.shapes[i] == shape and i not in batch), None)
            if pos is None:
                self._refill(gen)  # the epoch ran out of this size: start the next one
                continue
            batch.append(self.queue.pop(pos))
        return batch


@dataclass
class _LiveBucket:
    """The bucket whose identity layers are on the device (one bucket visit)."""

    visit: int
    identities: list[int]
    adapters: dict[str, BucketAdapter]
    opt: torch.optim.Optimizer  # AdamW over the bucket's Mid/Up
    params: list[nn.Parameter]
    slot: dict[int, int]  # identity -> its Mid/Up index in every BucketAdapter
    queue: _Queue
    handle: Any  # the host's attach handle (.remove())

    def pairs(self):
        """(identity, layer, part, parameter) of every live Mid/Up."""
        for slot, ident in enumerate(self.identities):
            for n, a in self.adapters.items():
                yield ident, n, "mid", a.mids[slot]
                yield ident, n, "up", a.ups[slot]


class MetaTrainer:
    """Stage-1 (Algorithm 1) with all of its state: Down and its AdamW, the identity bank, the
    generator, the losses and the schedule position.

    Args:
        host: the frozen model; its ``collate`` joins the conditionings of a batch.
        data: cached latents of all identities with their captions' conditioning.
        config: schedule, ranks, optimizer settings, seed.
        collate: joins the conditioning of a batch whose items have different captions
            (default: the host's ``collate_conds``).
        group: the data-parallel process group of a ``torchrun`` launch (None: one process);
            every rank builds its trainer with the same data and config (see the module docstring).

    Raises:
        ValueError: bad data, a batch smaller than the world size, or ranks that disagree on the
            config or the data.
    """

    def __init__(self, host: FlowHost, data: MetaTrainData, config: MetaTrainConfig = MetaTrainConfig(), *,
                 collate: Callable[[Sequence[Any]], Any] | None = None, group: ProcessGroup | None = None) -> None:
        data.validate()
        self.group = group
        if group is not None:
            check_world_size(config.batch_size, group.world_size)
        self.host, self.data, self.config = host, data, config
        self.collate = collate or host.collate
        self.shapes = resolve_targets(config.preset, host.dims)
        self.data_fingerprint = data.fingerprint()
        if group is not None:
            group.check_same("the Stage-1 settings", config.to_dict(), "launch every process with the same arguments")
            group.check_same("the training data (fingerprint)", self.data_fingerprint,
                             "give every process the same --data (and --cache) folder, e.g. on a shared file system")
        self.plan = plan_buckets(config, data.photos_per_identity())
        self.buckets = make_buckets(len(data.identities), self.plan.identities_per_bucket, config.seed)
        self.generator = torch.Generator().manual_seed(config.seed)  # data order, flips, noise, sigmas
        dev = host.device
        self.downs = {n: nn.Parameter(t.to(dev, torch.float32)) for n, t in initial_downs(config, self.shapes).items()}
        self.down_opt = torch.optim.AdamW(list(self.downs.values()), lr=config.lr, weight_decay=config.weight_decay)
        self.bank = IdentityBank(self.shapes, r1=config.r1, r2=config.r2, seed=config.seed,
                                 shard=(group.rank, group.world_size) if group is not None else (0, 1))
        self.losses: list[float] = []
        self.step = 0  # i_curr: steps done
        self.resumed_from = 0
        self._router = IdentityRouter()
        self._live: _LiveBucket | None = None
        self._resume_queue: tuple[int, list[int]] = (-1, [])  # (visit, queue) from a checkpoint
        self._items_of = {k: [i for i, j in enumerate(data.item_identity) if j == k] for k in range(len(data.identities))}
        self._shapes_of = [latent_shape(z) for z in data.latents]
        if group is None or group.is_root:
            self._log_plan()

    @property
    def is_root(self) -> bool:
        """True in a single process and on rank 0 of a data-parallel run (the one that writes)."""
        return self.group is None or self.group.is_root

    def _log_plan(self) -> None:
        p, c = self.plan, self.config
        if self.group is not None:
            log.info("meta-train: data-parallel on %d processes (%s), global batch %d = about %.1f item(s) per "
                     "process per step", self.group.world_size, self.group.backend, c.batch_size,
                     c.batch_size / self.group.world_size)
            if c.batch_size % self.group.world_size:
                log.warning("meta-train: batch size %d is not a multiple of the %d processes; the result is the same, "
                            "but some processes wait on every step; use a multiple of %d for the full speed",
                            c.batch_size, self.group.world_size, self.group.world_size)
        log.info("meta-train: %d identities, %d items, %d buckets of <= %d identities, %d steps (bucket %d, "
                 "warm-up %d): %d of %d identities trained", p.identities, len(self.data.latents), p.buckets,
                 p.identities_per_bucket, c.steps, c.bucket_steps, c.warmup_steps, p.identities_visited, p.identities)
        if p.fraction_visited < SMALL_VISIT_FRACTION:
            log.warning(
                "meta-train: q_total=%d steps visit only %d of %d identities (%.0f%%); raise --steps to %d to "
                "visit every bucket once, or set --identities-per-bucket", c.steps, p.identities_visited,
                p.identities, 100 * p.fraction_visited, p.steps_to_visit_all)

    # -- the loop (Algorithm 1) ---------------------------------------------------------------

    def run(self, *, callback: MetaStepCallback | None = None, checkpoint_path: str | os.PathLike | None = None,
            checkpoint_every: int = 0) -> MetaTrainResult:
        """Trains from the current step to ``config.steps``.

        Args:
            callback: called after every step with a ``StepInfo``; raising from it stops the run
                (the last checkpoint stays valid; the host is cleaned up).
            checkpoint_path: where checkpoints go (a safetensors file, written atomically).
            checkpoint_every: write a checkpoint every this many steps (0: only at the end).

        Raises:
            RuntimeError: the loss or the gradients became NaN/inf.
        """
        if checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {checkpoint_every}")
        c, start, t0 = self.config, self.step, time.perf_counter()
        try:
            with self.host.training(), torch.enable_grad():
                while self.step < c.steps:  # i_curr < q_total
                    pt = schedule_at(self.step, c, len(self.buckets))  # bucket b, i_cb
                    if self._live is None or self._live.visit != pt.visit:
                        self._enter_bucket(pt)  # this bucket's Mid/Up (and moments) from the bank
                    loss, idents, mirrored = self._train_step(pt, update_down=not pt.warmup)
                    self.step += 1
                    if checkpoint_path and checkpoint_every and self.step % checkpoint_every == 0 and self.step < c.steps:
                        save_checkpoint(checkpoint_path, self)
                    if callback is not None:
                        callback(StepInfo(step=self.step, total=c.steps, loss=loss, bucket=pt.bucket,
                                          n_buckets=len(self.buckets), phase=pt.phase,
                                          step_in_bucket=pt.step_in_bucket + 1, identities=idents,
                                          seconds=time.perf_counter() - t0, mirrored=mirrored))
                if checkpoint_path is not None and (self.step > start or start == 0):
                    save_checkpoint(checkpoint_path, self)
        finally:
            self._leave_bucket()
            for p in self.downs.values():
                p.requires_grad_(False)
        seconds = time.perf_counter() - t0
        if self.is_root:
            log.info("Stage-1: steps %d..%d in %.1fs, loss %.4f -> %.4f", start, len(self.losses), seconds,
                     self.losses[0] if self.losses else float("nan"),
                     self.losses[-1] if self.losses else float("nan"))
        bank_bytes = self.bank.nbytes() if self.group is None else sum(self.group.all_gather(self.bank.nbytes()))
        return MetaTrainResult(downs={n: p.detach().to("cpu", torch.float32).clone() for n, p in self.downs.items()},
                               losses=list(self.losses), buckets=[list(b) for b in self.buckets],
                               identities=list(self.data.identities), config=c, seconds=seconds,
                               resumed_from=self.resumed_from, bank_bytes=bank_bytes, plan=self.plan)

    def _train_step(self, pt: SchedulePoint, *, update_down: bool) -> tuple[float, tuple[int, ...], tuple[bool, ...]]:
        """One iteration on the live bucket: Mid/Up always, Down only when ``update_down``."""
        live, data, c, gen = self._live, self.data, self.config, self.generator
        assert live is not None
        for p in self.downs.values():
            p.requires_grad_(update_down)  # warm-up: Down gets no gradient and no update
        batch = live.queue.take(c.batch_size, gen)
        idents = tuple(data.item_identity[i] for i in batch)
        picked = [pick_orientation(data.latents[i], gen) for i in batch]  # the per-step random flip
        if self.group is not None:
            return self._train_step_shared(pt, batch, idents, picked, update_down=update_down)
        self._router.slots = [live.slot[k] for k in idents]
        cond = self.collate([data.conds[data.item_caption[i]] for i in batch])
        loss = flow_step_loss(self.host, [z for z, _ in picked], cond, gen, sigma_mode=c.sigma_mode,
                              use_shift=c.resolution_shift)
        value = float(loss.detach())  # a device sync point, needed for the guard
        where = self._check_loss(value, pt)
        live.opt.zero_grad(set_to_none=True)
        self.down_opt.zero_grad(set_to_none=True)
        loss.backward()
        updated = [p for p in live.params if p.grad is not None] + (list(self.downs.values()) if update_down else [])
        self._update(live, updated, value, where, update_down=update_down)
        return value, idents, tuple(m for _, m in picked)

    def _train_step_shared(self, pt: SchedulePoint, batch: list[int], idents: tuple[int, ...],
                           picked: list[tuple[torch.Tensor, bool]], *, update_down: bool
                           ) -> tuple[float, tuple[int, ...], tuple[bool, ...]]:
        """``_train_step`` of one rank of a data-parallel run: this rank's rows of the global batch,
        then one all-reduce of the loss and of the gradients of everything the batch updates."""
        live, data, c, gen, group = self._live, self.data, self.config, self.generator, self.group
        assert live is not None and group is not None
        rows = split_rows(len(batch), group.world_size, group.rank)
        self._router.slots = [live.slot[idents[r]] for r in rows]
        cond = self.collate([data.conds[data.item_caption[batch[r]]] for r in rows]) if rows else None
        live.opt.zero_grad(set_to_none=True)
        self.down_opt.zero_grad(set_to_none=True)
        loss = flow_step_loss(self.host, [z for z, _ in picked], cond, gen, sigma_mode=c.sigma_mode,
                              use_shift=c.resolution_shift, rows=rows)
        dev = self.host.device
        if loss is not None:
            loss = loss * (len(rows) / len(batch))  # the ranks' shares sum to the batch mean
            loss.backward()
        in_batch = set(idents)
        # The same parameters in the same order on every rank: those the single-process step updates.
        updated = [p for ident, _, _, p in live.pairs() if ident in in_batch]
        if update_down:
            updated += list(self.downs.values())
        for p in updated:
            if p.grad is None:  # this rank had no row of the identity (or no row at all)
                p.grad = torch.zeros_like(p)
        total = (loss.detach() if loss is not None else torch.zeros((), device=dev)).reshape(1).to(dev, torch.float32)
        group.all_reduce_sum_([total, *(p.grad for p in updated)])
        value = float(total)
        where = self._check_loss(value, pt)
        self._update(live, updated, value, where, update_down=update_down)
        return value, idents, tuple(m for _, m in picked)

    def _check_loss(self, value: float, pt: SchedulePoint) -> str:
        """Stops on a NaN/inf loss (naming the step and the fix); returns where the step is."""
        where = f"step {pt.step + 1} (bucket {pt.bucket}, {pt.phase})"
        if not math.isfinite(value):
            raise RuntimeError(
                f"Stage-1 loss became {value} at {where}; lower the learning rate (now {self.config.lr}), check "
                "the latents, or use bf16/fp32 instead of fp16; resume from the last checkpoint after fixing it"
            )
        return where

    def _update(self, live: "_LiveBucket", updated: list[torch.Tensor], value: float, where: str, *,
                update_down: bool) -> None:
        """Clips the gradients of ``updated`` (stopping on NaN/inf), steps the optimizers, records the loss."""
        c = self.config
        norm = torch.nn.utils.clip_grad_norm_(updated, c.max_grad_norm if c.max_grad_norm > 0 else float("inf"))
        if not torch.isfinite(norm):
            raise RuntimeError(f"Stage-1 gradients became {float(norm)} at {where}; lower the learning rate "
                               f"(now {c.lr}) or use bf16/fp32 instead of fp16")
        live.opt.step()
        if update_down:
            self.down_opt.step()
        self.losses.append(value)

    # -- moving identity layers between the bank and the device -------------------------------

    def _enter_bucket(self, pt: SchedulePoint) -> None:
        self._leave_bucket()
        dev, c = self.host.device, self.config
        idents = self.buckets[pt.bucket]
        for ident in idents:
            if self.bank.owns(ident):
                self.bank.ensure(ident)
        params, moments = self.bank.params, self.bank.adam
        if self.group is not None:  # every rank gets the bucket's identities from their owners
            params, moments = {}, {}
            for shard in self.group.all_gather(self.bank.entries(idents)):
                for k, (v, s) in shard.items():
                    params[k] = v
                    if s is not None:
                        moments[k] = s
        adapters = {
            n: BucketAdapter(self.downs[n], [params[(i, n, "mid")].to(dev).clone() for i in idents],
                             [params[(i, n, "up")].to(dev).clone() for i in idents], self._router)
            for n in self.shapes
        }
        params = [p for a in adapters.values() for p in (*a.mids, *a.ups)]
        opt = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
        visit, saved = self._resume_queue
        queue = _Queue([i for ident in idents for i in self._items_of[ident]], self._shapes_of,
                       saved if visit == pt.visit else [])  # resumed inside this visit: keep its data order
        live = _LiveBucket(visit=pt.visit, identities=idents, adapters=adapters, opt=opt, params=params,
                           slot={ident: s for s, ident in enumerate(idents)}, queue=queue,
                           handle=self.host.attach(AdapterSet(adapters, mode="meta", preset=c.preset)))
        for ident, n, part, p in live.pairs():
            if (ident, n, part) in moments:
                opt.state[p] = _to_device(moments[(ident, n, part)], dev)
        self._live = live
        log.debug("bucket %d (visit %d): identities %s", pt.bucket, pt.visit, [self.data.identities[i] for i in idents])

    def _sync_bank(self) -> None:
        """Copies the live bucket's Mid/Up and AdamW moments back into the bank (its own identities)."""
        if self._live is None:
            return
        opt = self._live.opt
        for ident, n, part, p in self._live.pairs():
            if not self.bank.owns(ident):
                continue
            self.bank.params[(ident, n, part)] = p.detach().to("cpu").clone()
            if opt.state.get(p):
                self.bank.adam[(ident, n, part)] = _cpu(opt.state[p])

    def _leave_bucket(self) -> None:
        if self._live is None:
            return
        self._sync_bank()
        self._live.handle.remove()
        self._resume_queue = (self._live.visit, list(self._live.queue.queue))  # a later state_dict keeps it
        self._live = None

    # -- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any] | None:
        """Everything a resume needs, on the CPU (the live bucket is synced into the bank first).

        Data-parallel: a collective (every rank calls it); the bank shards are gathered onto rank
        0, which gets the whole state (the same as a single process's); the other ranks get None.
        """
        self._sync_bank()
        live = self._live
        queue_visit, queue = (live.visit, list(live.queue.queue)) if live is not None else self._resume_queue
        if self.group is not None:
            shards = self.group.gather_to_root(self.bank.state_dict())
            if shards is None:
                return None
            bank = merge_bank_states(shards)
        else:
            bank = self.bank.state_dict()
        return {
            "step": self.step,
            "config": self.config.to_dict(),
            "data_fingerprint": self.data_fingerprint,
            "buckets": [list(b) for b in self.buckets],
            "downs": {n: p.detach().to("cpu").clone() for n, p in self.downs.items()},
            "down_adam": {n: _cpu(self.down_opt.state[p]) for n, p in self.downs.items() if self.down_opt.state.get(p)},
            "bank": bank,
            "generator": self.generator.get_state(),
            "queue": list(queue),
            "queue_visit": queue_visit,
            "losses": list(self.losses),
        }

    def load_state_dict(self, state: Mapping[str, Any] | None, *, source: str = "checkpoint") -> None:
        """Restores a ``state_dict`` made with the same config (``steps`` may grow) and data.

        Data-parallel: a collective; rank 0 passes the state (of any world size's run, or of a
        single process), the others None; each rank receives its shard of the bank.

        Raises:
            ValueError: another config or other data (names the field), or a step beyond ``steps``.
        """
        if self.group is not None:
            state = self._share_state(state)
        assert state is not None
        saved = _config_for_compare(MetaTrainConfig(**state["config"]))
        now = _config_for_compare(self.config)
        for k in now:
            if saved.get(k) != now[k]:
                raise ValueError(
                    f"{source} was made with {k}={saved.get(k)!r} but this run has {k}={now[k]!r}; resume with the "
                    "same settings (only --steps may change) or start a new run in another folder"
                )
        if state["data_fingerprint"] != self.data_fingerprint:
            raise ValueError(
                f"{source} was made from other training data (fingerprint {state['data_fingerprint'][:12]} vs "
                f"{self.data_fingerprint[:12]}); resume with the same data folder and augmentation, or start a new run"
            )
        if state["step"] > self.config.steps:
            raise ValueError(f"{source} is at step {state['step']}, beyond steps={self.config.steps}; raise --steps to resume")
        if set(state["downs"]) != set(self.downs):
            extra = sorted(set(state["downs"]) ^ set(self.downs))[:3]
            raise ValueError(f"{source} holds other adapter layers than this model's (e.g. {extra}); resume on the "
                             "model the run started with")
        self._leave_bucket()
        dev = self.host.device
        with torch.no_grad():
            for n, p in self.downs.items():
                p.copy_(state["downs"][n].to(dev, torch.float32))
        self.down_opt.state.clear()
        for n, s in state["down_adam"].items():
            self.down_opt.state[self.downs[n]] = _to_device(s, dev)
        self.bank.load_state_dict(state["bank"])
        self.generator.set_state(state["generator"].clone())
        self.buckets = [list(b) for b in state["buckets"]]
        self.losses = list(state["losses"])
        self.step = self.resumed_from = int(state["step"])
        self._resume_queue = (int(state["queue_visit"]), list(state["queue"]))


    def _share_state(self, state: Mapping[str, Any] | None) -> dict[str, Any]:
        """Rank 0's ``state`` on every rank, each with only its own shard of the bank."""
        group = self.group
        assert group is not None
        if group.is_root and state is None:
            raise ValueError("rank 0 of a data-parallel run must pass the state to load")
        head = group.broadcast({k: v for k, v in state.items() if k != "bank"} if group.is_root else None)
        shard = group.scatter(split_bank_state(state["bank"], group.world_size) if group.is_root else None)
        return {**head, "bank": shard}


# ---------------------------------------------------------------------------------------------
# Checkpoint files


def _config_for_compare(config: MetaTrainConfig) -> dict[str, Any]:
    d = config.to_dict()
    d.pop("steps")  # a resume may extend q_total; everything else must match
    return d


def _adam_tensors(prefix: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.adam.{k}": state[k].detach().to("cpu").clone() for k in _ADAM_KEYS if k in state}


def _split_adam(tensors: Mapping[str, torch.Tensor], key: str) -> dict[str, torch.Tensor]:
    return {k: tensors[f"{key}.adam.{k}"] for k in _ADAM_KEYS if f"{key}.adam.{k}" in tensors}


def save_checkpoint(path: str | os.PathLike, trainer: MetaTrainer | Mapping[str, Any]) -> Path | None:
    """Writes a trainer's ``state_dict`` atomically as a safetensors file (tensors + JSON metadata).

    Data-parallel: every rank calls it with its trainer; rank 0 writes the whole (gathered) state
    and returns the path, the other ranks write nothing and get None.
    """
    state = trainer.state_dict() if isinstance(trainer, MetaTrainer) else trainer
    if state is None:
        return None
    tensors: dict[str, torch.Tensor] = {}
    for name, t in state["downs"].items():
        tensors[f"down.{name}"] = t
        if name in state["down_adam"]:
            tensors.update(_adam_tensors(f"down.{name}", state["down_adam"][name]))
    bank = state["bank"]
    for (ident, name, part), t in bank["params"].items():
        key = f"bank.{ident}.{name}.{part}"
        tensors[key] = t
        if (ident, name, part) in bank["adam"]:
            tensors.update(_adam_tensors(key, bank["adam"][(ident, name, part)]))
    tensors["rng.generator"] = state["generator"]
    meta = {
        "format": CHECKPOINT_FORMAT,
        "format_version": str(CHECKPOINT_VERSION),
        "state": json.dumps({
            "step": state["step"],
            "config": state["config"],
            "data_fingerprint": state["data_fingerprint"],
            "buckets": state["buckets"],
            "queue": state["queue"],
            "queue_visit": state["queue_visit"],
            "losses": state["losses"],
            "bank_identities": sorted({k[0] for k in bank["params"]}),
        }),
    }
    return atomic_save_safetensors(tensors, path, meta)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a checkpoint file back into a ``MetaTrainer.state_dict``.

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        ValueError: not a meta-train checkpoint, or one newer than this pack reads.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"no checkpoint at {path} to resume from; run without resume first")
    tensors, meta = read_safetensors(path)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a meta-train checkpoint (format={meta.get('format')!r})")
    if int(meta.get("format_version", "0")) > CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint version {meta['format_version']} is newer than this pack reads")
    info = json.loads(meta["state"])
    layers = [k[len("down."):] for k in tensors if k.startswith("down.") and ".adam." not in k]
    params: dict[BankKey, torch.Tensor] = {}
    adam: dict[BankKey, dict[str, torch.Tensor]] = {}
    for ident in info["bank_identities"]:
        for n in layers:
            for part in ("mid", "up"):
                key = f"bank.{ident}.{n}.{part}"
                params[(ident, n, part)] = tensors[key]
                if s := _split_adam(tensors, key):
                    adam[(ident, n, part)] = s
    return {
        "step": info["step"], "config": info["config"], "data_fingerprint": info["data_fingerprint"],
        "buckets": info["buckets"], "queue": info["queue"], "queue_visit": info["queue_visit"],
        "losses": info["losses"],
        "downs": {n: tensors[f"down.{n}"] for n in layers},
        "down_adam": {n: s for n in layers if (s := _split_adam(tensors, f"down.{n}"))},
        "bank": {"params": params, "adam": adam},
        "generator": tensors["rng.generator"],
    }


# ---------------------------------------------------------------------------------------------
# One call


def meta_train(
    host: FlowHost,
    data: MetaTrainData,
    config: MetaTrainConfig = MetaTrainConfig(),
    *,
    callback: MetaStepCallback | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    collate: Callable[[Sequence[Any]], Any] | None = None,
    group: ProcessGroup | None = None,
) -> MetaTrainResult:
    """Runs Stage-1 meta-training (Algorithm 1) and returns the learned Down matrices.

    A thin wrapper over ``MetaTrainer``: build it, load the checkpoint when resuming, run.

    Args:
        host: the frozen model (diffusers FLUX host, ...).
        data: cached latents of all identities with their captions' conditioning.
        config: schedule, ranks, optimizer settings, seed.
        callback: called after every step with a ``StepInfo`` (see ``MetaTrainer.run``).
        checkpoint_path: where checkpoints go (a safetensors file, written atomically).
        checkpoint_every: write a checkpoint every this many steps (0: only at the end).
        resume: continue from ``checkpoint_path``; the result equals an uninterrupted run.
        collate: joins the conditioning of a batch whose items have different captions.
        group: the process group of a data-parallel ``torchrun`` launch (None: one process). Every
            rank calls ``meta_train`` alike; rank 0 alone reads and writes the checkpoint (give
            ``callback`` on rank 0 only for progress lines).

    Returns:
        MetaTrainResult with Down per canonical layer ((r1, in), CPU float32) and per-step losses.

    Raises:
        ValueError: bad data, or a checkpoint from another config/data.
        FileNotFoundError: ``resume`` without a checkpoint file.
        RuntimeError: the loss or the gradients became NaN/inf.
    """
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0, got {checkpoint_every}")
    if resume and checkpoint_path is None:
        raise ValueError("resume=True needs checkpoint_path")
    trainer = MetaTrainer(host, data, config, collate=collate, group=group)
    if resume:
        if group is None:
            state = load_checkpoint(checkpoint_path)  # type: ignore[arg-type]
        else:  # rank 0 reads it (its failure is raised on every rank) and hands it out
            state = group.root_only(lambda: load_checkpoint(checkpoint_path))  # type: ignore[arg-type]
        trainer.load_state_dict(state, source=str(checkpoint_path))
        if trainer.is_root:
            log.info("meta-train: resuming at step %d of %d from %s", trainer.step, config.steps, checkpoint_path)
    return trainer.run(callback=callback, checkpoint_path=checkpoint_path, checkpoint_every=checkpoint_every)


def to_prior(result: MetaTrainResult, *, domain: str, base_model: str = "flux.1-dev",
             data_summary: Mapping[str, Any] | None = None) -> Prior:
    """The learned Down matrices as a ``Prior`` (identity layers are discarded, paper Sec. 3)."""
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
    return Prior(downs=dict(result.downs), r1=c.r1, preset=c.preset, base_model=base_model, domain=domain,
                 training=training)
