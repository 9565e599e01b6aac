"""Stage-1's identity layers: their init, the per-sample adapter and the CPU bank that keeps them.

Every adapter layer keeps one Mid/Up pair per identity of the active bucket and applies to each
sample the pair of that sample's identity (``BucketAdapter``), so each sample's loss flows only
into its own identity's Mid/Up and into the shared Down. An identity absent from a batch gets no
gradient and (AdamW skips parameters without a gradient) no update at all, as if it had its own
optimizer.

The bank: Mid/Up of every identity seen so far, plus their AdamW moments, live on the CPU in an
``IdentityBank``; only the active bucket's are moved to the training device.

Data-parallel, the bank is sharded by identity: identity ``i`` is kept (Mid/Up and AdamW moments,
on the CPU) by rank ``i % world_size`` only. On a bucket change the owners hand the bucket's
identities to every rank (``fetch_entries``; the live bucket is replicated, so the batch can be
split by rows and balanced whatever identities it holds; routing rows to their identity's owner
instead would leave ranks idle whenever a batch holds one or two identities), and on leaving it
each rank keeps its own identities. A checkpoint gathers the shards onto rank 0 (``gather_state``);
its contents do not depend on the world size, so a run can resume with another one (rank 0 reads
it and hands each rank its shard, ``share_state``).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...lora.adapter import AdapterSet
from ..distributed import ProcessGroup
from .config import MetaTrainConfig

_INIT_SALT = 0x4D455441  # keeps the init streams apart from the training stream of the same seed
ADAM_KEYS = ("step", "exp_avg", "exp_avg_sq")  # AdamW's per-parameter state, as checkpoints hold it
BankKey = tuple[int, str, str]  # (identity, layer, "mid" | "up")


def initial_downs(config: MetaTrainConfig, shapes: Mapping[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    """The Down matrices a fresh run starts from ((r1, in) per layer, peft's lora_A init)."""
    init = AdapterSet.meta_random(shapes, r1=config.r1, r2=config.r2, preset=config.preset,
                                  generator=torch.Generator().manual_seed(config.seed ^ _INIT_SALT))
    return {n: a.down.detach().clone() for n, a in init.items()}


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


def cpu_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of an optimizer's per-parameter state on the CPU."""
    return {k: v.detach().to("cpu").clone() for k, v in state.items()}


def device_state(state: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A copy of a per-parameter optimizer state for ``device`` (AdamW keeps ``step`` on the CPU)."""
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

    def store(self, key: BankKey, param: torch.Tensor, moments: Mapping[str, torch.Tensor] | None) -> None:
        """Keeps a live Mid/Up (and its optimizer moments, when it has any) on the CPU."""
        self.params[key] = param.detach().to("cpu").clone()
        if moments:
            self.adam[key] = cpu_state(moments)

    @property
    def identities(self) -> list[int]:
        return sorted({k[0] for k in self.params})

    def nbytes(self) -> int:
        n = sum(t.numel() * t.element_size() for t in self.params.values())
        return n + sum(t.numel() * t.element_size() for s in self.adam.values() for t in s.values())

    def state_dict(self) -> dict[str, Any]:
        return {"params": {k: v.clone() for k, v in self.params.items()},
                "adam": {k: cpu_state(v) for k, v in self.adam.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.params = {tuple(k): v.clone() for k, v in state["params"].items()}  # type: ignore[misc]
        self.adam = {tuple(k): cpu_state(v) for k, v in state["adam"].items()}  # type: ignore[misc]


def fetch_entries(bank: IdentityBank, identities: Sequence[int], group: ProcessGroup | None
                  ) -> tuple[dict[BankKey, torch.Tensor], dict[BankKey, dict[str, torch.Tensor]]]:
    """Mid/Up and AdamW moments of ``identities`` (created on first use by their owners).

    Data-parallel: a collective; every rank gets the identities from the ranks that own them.
    """
    for ident in identities:
        if bank.owns(ident):
            bank.ensure(ident)
    if group is None:
        return bank.params, bank.adam
    params: dict[BankKey, torch.Tensor] = {}
    moments: dict[BankKey, dict[str, torch.Tensor]] = {}
    for shard in group.all_gather(bank.entries(identities)):
        for k, (v, s) in shard.items():
            params[k] = v
            if s is not None:
                moments[k] = s
    return params, moments


def gather_state(bank: IdentityBank, group: ProcessGroup | None) -> dict[str, Any] | None:
    """The whole bank's ``state_dict``; data-parallel, a collective whose result is on rank 0 only."""
    if group is None:
        return bank.state_dict()
    shards = group.gather_to_root(bank.state_dict())
    return None if shards is None else merge_bank_states(shards)


def share_state(state: Mapping[str, Any] | None, group: ProcessGroup) -> dict[str, Any]:
    """Rank 0's trainer ``state`` on every rank, each with only its own shard of the bank (a collective).

    Raises:
        ValueError: rank 0 passed no state.
    """
    if group.is_root and state is None:
        raise ValueError("rank 0 of a data-parallel run must pass the state to load")
    head = group.broadcast({k: v for k, v in state.items() if k != "bank"} if group.is_root else None)
    shard = group.scatter(split_bank_state(state["bank"], group.world_size) if group.is_root else None)
    return {**head, "bank": shard}


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
