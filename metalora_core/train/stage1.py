"""Stage-1 meta-training: learn the shared Meta-Down (LoMD) from many identities (paper Sec. 3,
Algorithm 1, appendix A).

Identities are grouped into buckets. Each bucket gets ``q_bucket`` consecutive steps; in the first
``q_warmup`` of them only the bucket's identity-specific Mid/Up layers are updated ("warm-up"),
afterwards Down is updated too ("joint"). Buckets are visited in a fixed order, pass after pass,
until ``q_total`` steps are done (the paper's loop may overshoot ``q_total`` by finishing a pass;
here the last bucket visit is cut at exactly ``q_total``).

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

Checkpoints (``save_checkpoint``) hold Down, its optimizer state, the bank (with the live bucket
synced into it), both RNG states, the data queue and the schedule position; resuming from one
reproduces an uninterrupted run bit for bit on the CPU.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..lora.adapter import AdapterSet
from ..formats.files import atomic_save_safetensors, read_safetensors
from ..lora.flow import SIGMA_MODES
from ..lora.layers import DEFAULT_PRESET, PRESETS, resolve_targets
from ..formats.prior import Prior
from .stage2 import FlowHost, check_latents, flow_step_loss

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "metalora.metatrain-checkpoint"
CHECKPOINT_VERSION = 1
_INIT_SALT = 0x4D455441  # keeps the init streams apart from the training stream of the same seed
_BUCKET_SALT = 0x42554B54


@dataclass(frozen=True)
class MetaTrainConfig:
    """Stage-1 settings; defaults follow the paper's appendix A."""

    steps: int = 50_000  # q_total: total iterations
    bucket_steps: int = 2_500  # q_bucket: consecutive iterations on one bucket
    warmup_steps: int = 1_000  # q_warm-up: first iterations of a bucket that update only Mid/Up (0.4 q_bucket)
    identities_per_bucket: int = 0  # N; 0 = auto: each bucket example is used ~uses_per_example times
    uses_per_example: int = 10  # the paper sizes buckets so each example is used 10 times (Sec. 3)
    batch_size: int = 4  # Stage-1 batch (appendix A); a batch mixes the bucket's identities
    lr: float = 4e-4  # AdamW learning rate (Down and Mid/Up)
    weight_decay: float = 0.0  # AdamW decoupled weight decay (the paper states none)
    r1: int = 16  # LoMD output rank (rows of each Down); the paper does not state its value
    r2: int = 1  # LoM output rank during meta-training (the paper's rank-1)
    preset: str = DEFAULT_PRESET  # which canonical layers get adapters
    seed: int = 0  # drives Down/Mid init, bucket assignment, data order, noise and sigmas
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


# ---------------------------------------------------------------------------------------------
# Data


@dataclass
class MetaTrainData:
    """Cached training items of many identities (see ``identities.prepare_dataset``).

    ``latents[i]`` (C, h, w) belongs to identity ``item_identity[i]`` (an index into
    ``identities``) and is trained with the conditioning ``conds[item_caption[i]]``.
    """

    identities: list[str]  # identity names (folder names)
    latents: list[torch.Tensor]  # (C, h, w) each; sizes may differ (aspect buckets)
    item_identity: list[int]  # per item: index into identities
    item_caption: list[str]  # per item: key into conds
    conds: dict[str, Any]  # caption -> the host's cached conditioning
    summary: dict[str, Any] = field(default_factory=dict)  # what the data is (for the prior's metadata)

    def validate(self) -> None:
        check_latents(self.latents)
        n = len(self.latents)
        if len(self.item_identity) != n or len(self.item_caption) != n:
            raise ValueError(
                f"MetaTrainData has {n} latents but {len(self.item_identity)} identity labels and "
                f"{len(self.item_caption)} captions; they must match one to one"
            )
        if len(self.identities) < 1:
            raise ValueError("MetaTrainData has no identities; give a folder with one subfolder per person")
        for i, k in enumerate(self.item_identity):
            if not 0 <= k < len(self.identities):
                raise ValueError(f"item {i} has identity index {k}, outside 0..{len(self.identities) - 1}")
        missing = sorted(set(self.item_caption) - set(self.conds))
        if missing:
            raise ValueError(f"caption {missing[0]!r} has no encoded conditioning in MetaTrainData.conds")
        empty = [self.identities[k] for k in range(len(self.identities)) if k not in set(self.item_identity)]
        if empty:
            raise ValueError(f"identity {empty[0]!r} has no training items; remove it or add images")

    def fingerprint(self) -> str:
        """Content hash of identities, captions and latents (a resume must see the same data)."""
        h = hashlib.sha256()
        h.update(json.dumps(self.identities).encode())
        for z, k, c in zip(self.latents, self.item_identity, self.item_caption):
            t = z.detach().to("cpu", torch.float32).contiguous()
            h.update(f"{k}|{c}|{tuple(t.shape)}".encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Schedule (pure functions of the config; Algorithm 1's loop counters)


def resolve_identities_per_bucket(config: MetaTrainConfig, items_per_identity: Sequence[int]) -> int:
    """N of Algorithm 1: the config's value, or (auto) so that each example of a bucket is used
    about ``uses_per_example`` times in ``q_bucket`` steps of ``batch_size`` (paper Sec. 3)."""
    n_ids = len(items_per_identity)
    if config.identities_per_bucket:
        return min(config.identities_per_bucket, n_ids)
    mean_items = sum(items_per_identity) / max(1, n_ids)
    n = round(config.bucket_steps * config.batch_size / (config.uses_per_example * max(mean_items, 1e-9)))
    return max(1, min(n_ids, n))


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


class IdentityBank:
    """Mid/Up per identity and layer, with their AdamW moments, on the CPU.

    Keys: ``(identity, layer, "mid" | "up")`` -> tensor; ``adam[(identity, layer, part)]`` ->
    {"step", "exp_avg", "exp_avg_sq"}. An identity is created on first use with a Mid drawn from
    its own generator (so its init does not depend on the visiting order) and a zero Up.
    """

    def __init__(self, shapes: Mapping[str, tuple[int, int]], *, r1: int, r2: int, seed: int) -> None:
        self.shapes, self.r1, self.r2, self.seed = dict(shapes), r1, r2, seed
        self.params: dict[tuple[int, str, str], torch.Tensor] = {}
        self.adam: dict[tuple[int, str, str], dict[str, torch.Tensor]] = {}

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

    @property
    def steps(self) -> int:
        return len(self.losses)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _adam_tensors(prefix: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.adam.{k}": state[k].detach().to("cpu").clone() for k in _ADAM_KEYS if k in state}


def _rng_tensor(state: torch.Tensor) -> torch.Tensor:
    return state.detach().to("cpu").clone()


@dataclass
class _RunState:
    """Everything a checkpoint holds besides the live modules."""

    step: int
    downs: dict[str, torch.Tensor]
    down_adam: dict[str, dict[str, torch.Tensor]]
    bank: IdentityBank
    gen_state: torch.Tensor
    torch_state: torch.Tensor
    queue: list[int]
    queue_visit: int
    losses: list[float]


def _config_for_compare(config: MetaTrainConfig) -> dict[str, Any]:
    d = config.to_dict()
    d.pop("steps")  # a resume may extend q_total; everything else must match
    return d


def save_checkpoint(path: str | os.PathLike, state: _RunState, config: MetaTrainConfig, data_fp: str,
                    buckets: list[list[int]]) -> Path:
    """Writes a Stage-1 checkpoint atomically (safetensors tensors + JSON metadata)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, t in state.downs.items():
        tensors[f"down.{name}"] = t.detach().to("cpu").clone()
        if name in state.down_adam:
            tensors.update(_adam_tensors(f"down.{name}", state.down_adam[name]))
    for (ident, name, part), t in state.bank.params.items():
        key = f"bank.{ident}.{name}.{part}"
        tensors[key] = t.detach().to("cpu").clone()
        if (ident, name, part) in state.bank.adam:
            tensors.update(_adam_tensors(key, state.bank.adam[(ident, name, part)]))
    tensors["rng.generator"] = _rng_tensor(state.gen_state)
    tensors["rng.torch"] = _rng_tensor(state.torch_state)
    meta = {
        "format": CHECKPOINT_FORMAT,
        "format_version": str(CHECKPOINT_VERSION),
        "state": json.dumps({
            "step": state.step,
            "config": config.to_dict(),
            "data_fingerprint": data_fp,
            "buckets": buckets,
            "queue": state.queue,
            "queue_visit": state.queue_visit,
            "losses": state.losses,
            "bank_identities": state.bank.identities,
        }),
    }
    return atomic_save_safetensors(tensors, path, meta)


def _split_adam(tensors: Mapping[str, torch.Tensor], key: str) -> dict[str, torch.Tensor]:
    return {k: tensors[f"{key}.adam.{k}"] for k in _ADAM_KEYS if f"{key}.adam.{k}" in tensors}


def load_checkpoint(path: str | os.PathLike, config: MetaTrainConfig, data_fp: str,
                    shapes: Mapping[str, tuple[int, int]]) -> tuple[_RunState, list[list[int]]]:
    """Reads a checkpoint and checks that it belongs to this config and data.

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        ValueError: not a checkpoint, or made with another config or other data (names the field).
    """
    tensors, meta = read_safetensors(path)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a meta-train checkpoint (format={meta.get('format')!r})")
    if int(meta.get("format_version", "0")) > CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint version {meta['format_version']} is newer than this pack reads")
    info = json.loads(meta["state"])
    saved = _config_for_compare(MetaTrainConfig(**info["config"]))
    now = _config_for_compare(config)
    for k in now:
        if saved.get(k) != now[k]:
            raise ValueError(
                f"{path} was made with {k}={saved.get(k)!r} but this run has {k}={now[k]!r}; resume with the "
                "same settings (only --steps may change) or start a new run in another folder"
            )
    if info["data_fingerprint"] != data_fp:
        raise ValueError(
            f"{path} was made from other training data (fingerprint {info['data_fingerprint'][:12]} vs "
            f"{data_fp[:12]}); resume with the same data folder and augmentation, or start a new run"
        )
    if info["step"] > config.steps:
        raise ValueError(f"{path} is at step {info['step']}, beyond steps={config.steps}; raise --steps to resume")
    downs = {n: tensors[f"down.{n}"] for n in shapes}
    down_adam = {n: s for n in shapes if (s := _split_adam(tensors, f"down.{n}"))}
    bank = IdentityBank(shapes, r1=config.r1, r2=config.r2, seed=config.seed)
    for ident in info["bank_identities"]:
        for n in shapes:
            for part in ("mid", "up"):
                key = f"bank.{ident}.{n}.{part}"
                bank.params[(ident, n, part)] = tensors[key]
                if s := _split_adam(tensors, key):
                    bank.adam[(ident, n, part)] = s
    state = _RunState(step=info["step"], downs=downs, down_adam=down_adam, bank=bank,
                      gen_state=tensors["rng.generator"], torch_state=tensors["rng.torch"],
                      queue=list(info["queue"]), queue_visit=int(info["queue_visit"]), losses=list(info["losses"]))
    return state, [list(b) for b in info["buckets"]]


# ---------------------------------------------------------------------------------------------
# Conditioning of a mixed batch


def collate_conds(conds: Sequence[Any]) -> Any:
    """One conditioning for a batch: the shared one, or (diffusers host) a row-stacked one."""
    first = conds[0]
    if all(c is first for c in conds):
        return first
    from ..hosts.diffusers_flux import FluxTextCond, collate_text_conds

    if all(isinstance(c, FluxTextCond) for c in conds):
        return collate_text_conds(conds)
    raise ValueError(
        f"a batch mixes captions but their conditioning ({type(first).__name__}) cannot be stacked; pass "
        "collate= to meta_train, use one class caption, or batch_size=1"
    )


# ---------------------------------------------------------------------------------------------
# The loop


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


def meta_train(
    host: FlowHost,
    data: MetaTrainData,
    config: MetaTrainConfig = MetaTrainConfig(),
    *,
    callback: MetaStepCallback | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    collate: Callable[[Sequence[Any]], Any] = collate_conds,
) -> MetaTrainResult:
    """Runs Stage-1 meta-training (Algorithm 1) and returns the learned Down matrices.

    Args:
        host: the frozen model (diffusers FLUX host, ComfyUI host, ...).
        data: cached latents of all identities with their captions' conditioning.
        config: schedule, ranks, optimizer settings, seed.
        callback: called after every step with a ``StepInfo``; raising from it stops the run
            (the last checkpoint stays valid; the host is cleaned up).
        checkpoint_path: where checkpoints go (a safetensors file, written atomically).
        checkpoint_every: write a checkpoint every this many steps (0: only at the end).
        resume: continue from ``checkpoint_path``; the result equals an uninterrupted run.
        collate: joins the conditioning of a batch whose items have different captions.

    Returns:
        MetaTrainResult with Down per canonical layer ((r1, in), CPU float32) and per-step losses.

    Raises:
        ValueError: bad data, or a checkpoint from another config/data.
        FileNotFoundError: ``resume`` without a checkpoint file.
        RuntimeError: the loss or the gradients became NaN/inf.
    """
    data.validate()
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0, got {checkpoint_every}")
    if resume and checkpoint_path is None:
        raise ValueError("resume=True needs checkpoint_path")
    shapes = resolve_targets(config.preset, host.dims)
    n_ids = len(data.identities)
    per_id = [data.item_identity.count(k) for k in range(n_ids)]
    data_fp = data.fingerprint()
    dev = host.device
    latent_shapes = [tuple(z.shape) for z in data.latents]
    items_of = {k: [i for i, j in enumerate(data.item_identity) if j == k] for k in range(n_ids)}

    if resume:
        if not Path(checkpoint_path).is_file():  # type: ignore[arg-type]
            raise FileNotFoundError(f"no checkpoint at {checkpoint_path} to resume from; run without resume first")
        state, buckets = load_checkpoint(checkpoint_path, config, data_fp, shapes)  # type: ignore[arg-type]
        log.info("meta-train: resuming at step %d of %d from %s", state.step, config.steps, checkpoint_path)
    else:
        per_bucket = resolve_identities_per_bucket(config, per_id)
        buckets = make_buckets(n_ids, per_bucket, config.seed)
        gen = torch.Generator().manual_seed(config.seed)
        state = _RunState(step=0, downs=initial_downs(config, shapes), down_adam={},
                          bank=IdentityBank(shapes, r1=config.r1, r2=config.r2, seed=config.seed),
                          gen_state=gen.get_state(), torch_state=torch.get_rng_state(), queue=[], queue_visit=-1,
                          losses=[])
    log.info("meta-train: %d identities, %d items, %d buckets of <= %d identities, %d steps (bucket %d, warm-up %d)",
             n_ids, len(data.latents), len(buckets), max(len(b) for b in buckets), config.steps,
             config.bucket_steps, config.warmup_steps)

    gen = torch.Generator()
    gen.set_state(state.gen_state)
    torch.set_rng_state(state.torch_state)
    downs = {n: nn.Parameter(t.to(dev, torch.float32).clone()) for n, t in state.downs.items()}
    down_opt = torch.optim.AdamW(list(downs.values()), lr=config.lr, weight_decay=config.weight_decay)
    for n, s in state.down_adam.items():
        down_opt.state[downs[n]] = {k: v.clone() if k == "step" else v.to(dev).clone() for k, v in s.items()}
    bank = state.bank
    losses = list(state.losses)
    router = IdentityRouter()
    result = MetaTrainResult(downs={}, losses=losses, buckets=buckets, identities=list(data.identities),
                             config=config, resumed_from=state.step)

    active: dict[str, Any] = {"visit": None}  # the bucket whose identity layers are on the device

    def unload() -> None:
        """Copies the live bucket's Mid/Up and AdamW moments back into the bank."""
        if active["visit"] is None:
            return
        opt: torch.optim.Optimizer = active["opt"]
        for slot, ident in enumerate(active["idents"]):
            for n, a in active["adapters"].items():
                for part, p in (("mid", a.mids[slot]), ("up", a.ups[slot])):
                    bank.params[(ident, n, part)] = p.detach().to("cpu").clone()
                    if p in opt.state and opt.state[p]:
                        bank.adam[(ident, n, part)] = {k: v.detach().to("cpu").clone() for k, v in opt.state[p].items()}

    def load(pt: SchedulePoint) -> None:
        unload()
        if active.get("handle") is not None:
            active["handle"].remove()
        idents = buckets[pt.bucket]
        for ident in idents:
            bank.ensure(ident)
        adapters = {
            n: BucketAdapter(downs[n], [bank.params[(i, n, "mid")].to(dev).clone() for i in idents],
                             [bank.params[(i, n, "up")].to(dev).clone() for i in idents], router)
            for n in shapes
        }
        params = [p for a in adapters.values() for p in (*a.mids, *a.ups)]
        opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        for slot, ident in enumerate(idents):
            for n, a in adapters.items():
                for part, p in (("mid", a.mids[slot]), ("up", a.ups[slot])):
                    if (ident, n, part) in bank.adam:
                        opt.state[p] = {k: v.to(dev).clone() if k != "step" else v.clone()
                                        for k, v in bank.adam[(ident, n, part)].items()}
        active.update(visit=pt.visit, idents=idents, adapters=adapters, opt=opt, params=params,
                      slot={ident: s for s, ident in enumerate(idents)},
                      handle=host.attach(AdapterSet(adapters, mode="meta", preset=config.preset)))
        bucket_items = [i for ident in idents for i in items_of[ident]]
        if pt.visit == state.queue_visit:  # resumed inside this visit: keep its data order
            queue = state.queue
        else:
            queue = []
        active["queue"] = _Queue(bucket_items, latent_shapes, queue)
        log.debug("bucket %d (visit %d): identities %s", pt.bucket, pt.visit, [data.identities[i] for i in idents])

    def checkpoint(step: int) -> None:
        if checkpoint_path is None:
            return
        unload()
        snap = _RunState(step=step, downs={n: p.detach() for n, p in downs.items()},
                         down_adam={n: down_opt.state[p] for n, p in downs.items() if down_opt.state.get(p)},
                         bank=bank, gen_state=gen.get_state(), torch_state=torch.get_rng_state(),
                         queue=list(active["queue"].queue) if active["visit"] is not None else [],
                         queue_visit=active["visit"] if active["visit"] is not None else -1, losses=losses)
        save_checkpoint(checkpoint_path, snap, config, data_fp, buckets)
        log.debug("checkpoint at step %d -> %s", step, checkpoint_path)

    t0 = time.perf_counter()
    try:
        with host.training(), torch.enable_grad():
            for step in range(state.step, config.steps):
                pt = schedule_at(step, config, len(buckets))
                if active["visit"] != pt.visit:
                    load(pt)
                for p in downs.values():
                    p.requires_grad_(not pt.warmup)  # warm-up: Down gets no gradient and no update
                batch = active["queue"].take(config.batch_size, gen)
                idents = tuple(data.item_identity[i] for i in batch)
                router.slots = [active["slot"][k] for k in idents]
                cond = collate([data.conds[data.item_caption[i]] for i in batch])
                loss = flow_step_loss(host, [data.latents[i] for i in batch], cond, gen,
                                      sigma_mode=config.sigma_mode, use_shift=config.resolution_shift)
                value = float(loss.detach())  # a device sync point, needed for the guard
                if not math.isfinite(value):
                    raise RuntimeError(
                        f"Stage-1 loss became {value} at step {step + 1} (bucket {pt.bucket}, {pt.phase}); lower "
                        f"the learning rate (now {config.lr}), check the latents, or use bf16/fp32 instead of fp16; "
                        "resume from the last checkpoint after fixing it"
                    )
                opt: torch.optim.Optimizer = active["opt"]
                opt.zero_grad(set_to_none=True)
                down_opt.zero_grad(set_to_none=True)
                loss.backward()
                updated = [p for p in active["params"] if p.grad is not None]
                if not pt.warmup:
                    updated += list(downs.values())
                norm = torch.nn.utils.clip_grad_norm_(updated, config.max_grad_norm if config.max_grad_norm > 0 else float("inf"))
                if not torch.isfinite(norm):
                    raise RuntimeError(
                        f"Stage-1 gradients became {float(norm)} at step {step + 1} (bucket {pt.bucket}, {pt.phase}); "
                        f"lower the learning rate (now {config.lr}) or use bf16/fp32 instead of fp16"
                    )
                opt.step()
                if not pt.warmup:
                    down_opt.step()
                losses.append(value)
                done = step + 1
                if checkpoint_every and done % checkpoint_every == 0 and done < config.steps:
                    checkpoint(done)
                if callback is not None:
                    callback(StepInfo(step=done, total=config.steps, loss=value, bucket=pt.bucket,
                                      n_buckets=len(buckets), phase=pt.phase, step_in_bucket=pt.step_in_bucket + 1,
                                      identities=idents, seconds=time.perf_counter() - t0))
            if state.step < config.steps or not resume:
                checkpoint(config.steps)
    finally:
        if active.get("handle") is not None:
            active["handle"].remove()
        result.seconds = time.perf_counter() - t0
        for p in downs.values():
            p.requires_grad_(False)
    unload()
    result.downs = {n: p.detach().to("cpu", torch.float32).clone() for n, p in downs.items()}
    result.bank_bytes = bank.nbytes()
    log.info("Stage-1: steps %d..%d in %.1fs, loss %.4f -> %.4f", state.step, len(losses), result.seconds,
             losses[0] if losses else float("nan"), losses[-1] if losses else float("nan"))
    return result


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
        "buckets": len(result.buckets),
        "final_loss_mean50": (sum(tail) / len(tail)) if tail else None,
        "data": dict(data_summary or {}),
    }
    return Prior(downs=dict(result.downs), r1=c.r1, preset=c.preset, base_model=base_model, domain=domain,
                 training=training)
