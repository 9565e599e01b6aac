"""The Stage-1 loop (Algorithm 1): ``MetaTrainer`` and its one-call wrapper ``meta_train``.

``MetaTrainer`` owns Down and its optimizer, the identity bank, the generator, the losses and the
schedule position. Down and its AdamW state stay on the device for the whole run; each bucket
visit brings the bucket's Mid/Up (and moments) from the bank and gets its own optimizer over them.
At the end the identity layers are discarded and only Down is kept (``result.to_prior``).

Data-parallel (``torchrun``, a ``ProcessGroup`` passed as ``group``): every rank holds the same
Down, draws the same global batch from the same generator (queue order, flips, noise and sigmas
of all of its items) and computes the loss of its share of the batch's rows (``split_rows``),
weighted by share/batch so that the ranks' losses sum to the single-process batch mean. The
gradients of Down and of the Mid/Up of the batch's identities are summed over the ranks in one
all-reduce, so every rank holds the single-process batch gradient and applies the same clipping
and AdamW update: Down and the live bucket stay identical on all ranks, and the run equals a
single process with the same global batch and seed up to float summation order. One process is
the same step with every row and no all-reduce (``MetaTrainer._train_step``).
"""
from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...data.latents import MetaTrainData, latent_shape, pick_orientation
from ...lora.adapter import AdapterSet
from ...lora.layers import resolve_targets
from ..distributed import ProcessGroup, split_rows
from ..stage2 import FlowHost, flow_step_loss
from .bank import (BucketAdapter, IdentityBank, IdentityRouter, cpu_state, device_state, fetch_entries,
                   gather_state, initial_downs, share_state)
from .checkpoint import check_resumable, load_checkpoint, save_checkpoint
from .config import MetaTrainConfig, check_world_size
from .result import MetaStepCallback, MetaTrainResult, StepInfo
from .schedule import LrSchedule, SchedulePoint, make_buckets, plan_buckets, schedule_at

log = logging.getLogger(__name__)

SMALL_VISIT_FRACTION = 0.5  # warn when q_total trains fewer than this share of the identities


def make_optimizer(params: Sequence[nn.Parameter], config: MetaTrainConfig) -> torch.optim.Optimizer:
    """The optimizer of Down (one for the run) and of a bucket visit's Mid/Up (one per visit):
    AdamW with the config's learning rate and weight decay (appendix A)."""
    return torch.optim.AdamW(list(params), lr=config.lr, weight_decay=config.weight_decay)


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


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
    opt: torch.optim.Optimizer  # over the bucket's Mid/Up
    slot: dict[int, int]  # identity -> its Mid/Up index in every BucketAdapter
    queue: _Queue
    handle: Any  # the host's attach handle (.remove())

    def pairs(self) -> Iterator[tuple[int, str, str, nn.Parameter]]:
        """(identity, layer, part, parameter) of every live Mid/Up."""
        for slot, ident in enumerate(self.identities):
            for n, a in self.adapters.items():
                yield ident, n, "mid", a.mids[slot]
                yield ident, n, "up", a.ups[slot]

    def params(self, identities: set[int] | None = None) -> list[nn.Parameter]:
        """Mid/Up of ``identities`` (default all) in ``_mid_up_params`` order."""
        return _mid_up_params(self.adapters, [identities is None or i in identities for i in self.identities])


def _mid_up_params(adapters: Mapping[str, BucketAdapter], keep: Sequence[bool]) -> list[nn.Parameter]:
    """The Mid/Up of the kept slots, layer by layer (each layer's Mids, then its Ups): one order for
    the optimizer, the gradient clipping and the all-reduce (the clipping norm sums in this order)."""
    return [p for a in adapters.values() for ps in (a.mids, a.ups) for s, p in enumerate(ps) if keep[s]]


class MetaTrainer:
    """Stage-1 (Algorithm 1) with all of its state: Down and its AdamW, the identity bank, the
    generator, the losses and the schedule position.

    ``state_dict()`` / ``load_state_dict()`` are what checkpoints hold (``save_checkpoint`` /
    ``load_checkpoint``); resuming from one reproduces an uninterrupted run bit for bit on the CPU.
    Every random draw comes from the trainer's own generators; the process's global RNG is never
    read or set.

    Args:
        host: the frozen model; its ``collate`` joins the conditionings of a batch.
        data: cached latents of all identities with their captions' conditioning.
        config: schedule, ranks, optimizer settings, seed.
        collate: joins the conditioning of a batch whose items have different captions
            (default: the host's ``collate``).
        group: the data-parallel process group of a ``torchrun`` launch (None: one process);
            every rank builds its trainer with the same data and config (see the module docstring).
        lr_schedule: the learning rate of each step from its ``SchedulePoint`` (set on Down's and
            the bucket's optimizer before they step); None keeps ``config.lr`` throughout. A
            function of the step alone, so a resumed run gets the same rates.

    Raises:
        ValueError: bad data, a batch smaller than the world size, or ranks that disagree on the
            config or the data.
    """

    def __init__(self, host: FlowHost, data: MetaTrainData, config: MetaTrainConfig = MetaTrainConfig(), *,
                 collate: Callable[[Sequence[Any]], Any] | None = None, group: ProcessGroup | None = None,
                 lr_schedule: LrSchedule | None = None) -> None:
        data.validate()
        self.group = group
        if group is not None:
            check_world_size(config.batch_size, group.world_size)
        self.host, self.data, self.config = host, data, config
        self.collate = collate or host.collate
        self.lr_schedule = lr_schedule
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
        self.down_opt = make_optimizer(list(self.downs.values()), config)
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
        if self.is_root:
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
                    loss, idents, mirrored = self._train_step(pt)
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
                               resumed_from=self.resumed_from, bank_bytes=bank_bytes, plan=self.plan,
                               family=self.host.dims.family.name)

    def _train_step(self, pt: SchedulePoint) -> tuple[float, tuple[int, ...], tuple[bool, ...]]:
        """One iteration on the live bucket: Mid/Up always, Down after the bucket's warm-up.

        The whole batch is drawn alike on every rank; a rank computes the loss of its rows (one
        process: all of them), weighted by its share of the batch, and a data-parallel step sums
        the loss and the gradients of everything the batch updates over the ranks in one all-reduce.
        """
        live, data, c, gen, group = self._live, self.data, self.config, self.generator, self.group
        assert live is not None
        update_down = not pt.warmup
        for p in self.downs.values():
            p.requires_grad_(update_down)  # warm-up: Down gets no gradient and no update
        batch = live.queue.take(c.batch_size, gen)
        idents = tuple(data.item_identity[i] for i in batch)
        picked = [pick_orientation(data.latents[i], gen) for i in batch]  # the per-step random flip
        rows = list(range(len(batch))) if group is None else split_rows(len(batch), group.world_size, group.rank)
        self._router.slots = [live.slot[idents[r]] for r in rows]
        cond = self.collate([data.conds[data.item_caption[batch[r]]] for r in rows]) if rows else None
        live.opt.zero_grad(set_to_none=True)
        self.down_opt.zero_grad(set_to_none=True)
        loss = flow_step_loss(self.host, [z for z, _ in picked], cond, gen, sigma_mode=c.sigma_mode,
                              use_shift=c.resolution_shift, rows=rows)
        dev = self.host.device
        if loss is not None:
            loss = loss * (len(rows) / len(batch))  # the ranks' shares sum to the batch mean (one process: x 1)
            loss.backward()
        # The same parameters in the same order on every rank: the batch's identities' Mid/Up, and Down.
        updated = live.params(set(idents)) + (list(self.downs.values()) if update_down else [])
        total = (loss.detach() if loss is not None else torch.zeros((), device=dev)).reshape(1).to(dev, torch.float32)
        if group is not None:
            for p in updated:
                if p.grad is None:  # this rank had no row of the identity (or no row at all)
                    p.grad = torch.zeros_like(p)
            group.all_reduce_sum_([total, *(p.grad for p in updated)])
        value = float(total)  # a device sync point, needed for the guard
        self._update(live, updated, value, pt, update_down=update_down)
        return value, idents, tuple(m for _, m in picked)

    def _update(self, live: _LiveBucket, updated: list[nn.Parameter], value: float, pt: SchedulePoint, *,
                update_down: bool) -> None:
        """Stops on a NaN/inf loss or gradient, clips the gradients of ``updated``, sets the step's
        learning rate (``lr_schedule``), steps the optimizers and records the loss."""
        c = self.config
        where = f"step {pt.step + 1} (bucket {pt.bucket}, {pt.phase})"
        if not math.isfinite(value):
            raise RuntimeError(
                f"Stage-1 loss became {value} at {where}; lower the learning rate (now {c.lr}), check "
                "the latents, or use bf16/fp32 instead of fp16; resume from the last checkpoint after fixing it"
            )
        norm = torch.nn.utils.clip_grad_norm_(updated, c.max_grad_norm if c.max_grad_norm > 0 else float("inf"))
        if not torch.isfinite(norm):
            raise RuntimeError(f"Stage-1 gradients became {float(norm)} at {where}; lower the learning rate "
                               f"(now {c.lr}) or use bf16/fp32 instead of fp16")
        if self.lr_schedule is not None:
            lr = self.lr_schedule(pt)
            if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
                raise ValueError(f"lr_schedule gave {lr!r} for {where}; it must return a finite number >= 0")
            _set_lr(live.opt, lr)
            _set_lr(self.down_opt, lr)
        live.opt.step()
        if update_down:
            self.down_opt.step()
        self.losses.append(value)

    # -- moving identity layers between the bank and the device -------------------------------

    def _enter_bucket(self, pt: SchedulePoint) -> None:
        self._leave_bucket()
        dev, c = self.host.device, self.config
        idents = self.buckets[pt.bucket]
        params, moments = fetch_entries(self.bank, idents, self.group)
        adapters = {
            n: BucketAdapter(self.downs[n], [params[(i, n, "mid")].to(dev).clone() for i in idents],
                             [params[(i, n, "up")].to(dev).clone() for i in idents], self._router)
            for n in self.shapes
        }
        visit, saved = self._resume_queue
        queue = _Queue([i for ident in idents for i in self._items_of[ident]], self._shapes_of,
                       saved if visit == pt.visit else [])  # resumed inside this visit: keep its data order
        opt = make_optimizer(_mid_up_params(adapters, [True] * len(idents)), c)
        live = _LiveBucket(visit=pt.visit, identities=idents, adapters=adapters, opt=opt,
                           slot={ident: s for s, ident in enumerate(idents)}, queue=queue,
                           handle=self.host.attach(AdapterSet(adapters, mode="meta", preset=c.preset)))
        for ident, n, part, p in live.pairs():
            if (ident, n, part) in moments:
                live.opt.state[p] = device_state(moments[(ident, n, part)], dev)
        self._live = live
        log.debug("bucket %d (visit %d): identities %s", pt.bucket, pt.visit, [self.data.identities[i] for i in idents])

    def _sync_bank(self) -> None:
        """Copies the live bucket's Mid/Up and AdamW moments back into the bank (its own identities)."""
        if self._live is None:
            return
        opt = self._live.opt
        for ident, n, part, p in self._live.pairs():
            if self.bank.owns(ident):
                self.bank.store((ident, n, part), p, opt.state.get(p))

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
        bank = gather_state(self.bank, self.group)
        if bank is None:
            return None
        return {
            "step": self.step,
            "config": self.config.to_dict(),
            "data_fingerprint": self.data_fingerprint,
            "buckets": [list(b) for b in self.buckets],
            "downs": {n: p.detach().to("cpu").clone() for n, p in self.downs.items()},
            "down_adam": {n: cpu_state(self.down_opt.state[p]) for n, p in self.downs.items()
                          if self.down_opt.state.get(p)},
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
            ValueError: another config or other data (names the field), a step beyond ``steps``,
                or other adapter layers.
        """
        if self.group is not None:
            state = share_state(state, self.group)
        assert state is not None
        check_resumable(state, self.config, self.data_fingerprint, set(self.downs), source=source)
        self._leave_bucket()
        dev = self.host.device
        with torch.no_grad():
            for n, p in self.downs.items():
                p.copy_(state["downs"][n].to(dev, torch.float32))
        self.down_opt.state.clear()
        for n, s in state["down_adam"].items():
            self.down_opt.state[self.downs[n]] = device_state(s, dev)
        self.bank.load_state_dict(state["bank"])
        self.generator.set_state(state["generator"].clone())
        self.buckets = [list(b) for b in state["buckets"]]
        self.losses = list(state["losses"])
        self.step = self.resumed_from = int(state["step"])
        self._resume_queue = (int(state["queue_visit"]), list(state["queue"]))


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
    lr_schedule: LrSchedule | None = None,
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
        lr_schedule: the learning rate per step (see ``MetaTrainer``); None: ``config.lr``.

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
    trainer = MetaTrainer(host, data, config, collate=collate, group=group, lr_schedule=lr_schedule)
    if resume:
        if group is None:
            state = load_checkpoint(checkpoint_path)  # type: ignore[arg-type]
        else:  # rank 0 reads it (its failure is raised on every rank) and hands it out
            state = group.root_only(lambda: load_checkpoint(checkpoint_path))  # type: ignore[arg-type]
        trainer.load_state_dict(state, source=str(checkpoint_path))
        if trainer.is_root:
            log.info("meta-train: resuming at step %d of %d from %s", trainer.step, config.steps, checkpoint_path)
    return trainer.run(callback=callback, checkpoint_path=checkpoint_path, checkpoint_every=checkpoint_every)
