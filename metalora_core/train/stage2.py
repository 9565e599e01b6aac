"""Stage-2 test-time personalization (paper Sec. 3, Algorithm 2).

Only LoRA-Mid and LoRA-Up are trained (plain LoRA mode: Down and Up) with the
rectified-flow loss on cached latents of the augmented crops and the cached
conditioning of one caption. Hosts (diffusers FLUX, ComfyUI FLUX) supply the model.

Random horizontal flips (paper Sec. 3): a crop given as a (plain, mirrored) latent pair
(``data.latents.encode_flip_pairs``) is drawn in one orientation per step from the run's
seeded generator; a single latent is used as it is.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..data.latents import Latent, check_latents, latent_shape, pick_orientation
from ..lora.adapter import AdapterSet
from ..lora.families import DEFAULT_FAMILY, ModelFamily
from ..lora.flow import SIGMA_MODES, add_noise, flow_loss, sample_sigmas, velocity_target
from ..lora.layers import DEFAULT_PRESET, PRESETS
from .host import FlowHost

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage2Config:
    """Everything that decides a Stage-2 result besides its inputs; defaults follow the paper's appendix A.

    The disk cache keys a run by a hash of every field, so a setting that changes the result
    belongs here (and nowhere else).
    """

    steps: int = 375  # q_st2: Meta-LoRA uses 375, plain LoRA 625 in the paper
    lr: float = 4e-4  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    rank: int = 1  # r2: LoRA-Mid output rank (Meta-LoRA) or r (plain LoRA): the exported LoRA's rank
    seed: int = 0  # drives Mid init, data order, noise and sigmas
    sigma_mode: str = "logit_normal"  # training sigma density: "logit_normal" or "uniform"
    resolution_shift: bool = False  # shift sigmas by the model family's token-count rule
    max_grad_norm: float = 1.0  # gradient clipping; 0 disables it
    batch_size: int = 1  # the paper trains Stage-2 at batch 1
    # Where noise and sigmas are drawn: "cpu" draws them from the seeded CPU generator and copies
    # them (the same stream on every device: a CUDA run repeats a CPU run's draws); "device" uses
    # a generator on the training device seeded with ``seed`` (no copy per step; repeatable on
    # the same device type, a different stream from the CPU's). On a CPU host both are the same.
    noise_device: str = "device"
    # Read the loss back from the device (and check it for NaN) every this many steps; the steps
    # in between do not wait for the device. The callback still runs every step.
    sync_every: int = 10
    preset: str = DEFAULT_PRESET  # target layers of a plain LoRA; a prior's own preset wins over it

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.sigma_mode not in SIGMA_MODES:
            raise ValueError(f"sigma_mode {self.sigma_mode!r} unknown; choose one of {SIGMA_MODES}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.noise_device not in ("device", "cpu"):
            raise ValueError(f"noise_device must be 'device' or 'cpu', got {self.noise_device!r}")
        if self.sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {self.sync_every}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError("weight_decay and max_grad_norm must be >= 0")
        if self.preset not in PRESETS:
            raise ValueError(f"preset {self.preset!r} unknown; choose one of {sorted(PRESETS)}")


@dataclass
class TrainResult:
    """A Stage-2 result: trained adapters (CPU, float32), per-step losses and, from the recipe
    (``train.recipe``), how they were made; ``from_cache`` when read from a training cache."""

    adapters: AdapterSet
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    provenance: Any = None  # train.recipe.Provenance; None straight from ``personalize``
    from_cache: bool = False
    family: ModelFamily = DEFAULT_FAMILY  # the model family trained on (what saves name as base_model)

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / max(1, len(self.losses))

    @property
    def metadata(self) -> dict[str, str]:
        """What every save writes (``Provenance.to_metadata``)."""
        if self.provenance is None:
            raise ValueError("this result has no provenance; train it with train.recipe.run_stage2")
        return self.provenance.to_metadata()


StepCallback = Callable[[int, float], None]


class DataOrder:
    """Per-epoch random permutation of item indices drawn from a generator (Algorithm 2's loop)."""

    def __init__(self, n: int, generator: torch.Generator) -> None:
        self.n, self.generator, self._queue = n, generator, []

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if not self._queue:
                self._queue = torch.randperm(self.n, generator=self.generator).tolist()
            out.append(self._queue.pop(0))
        return out


def flow_step_loss(
    host: FlowHost,
    latents: Sequence[torch.Tensor],
    cond: Any,
    generator: torch.Generator,
    *,
    sigma_mode: str,
    use_shift: bool,
    noise_generator: torch.Generator | None = None,
    rows: Sequence[int] | None = None,
) -> torch.Tensor | None:
    """The rectified-flow loss of one batch of same-size latents (B, C, h, w).

    Noise and sigmas come from ``noise_generator`` (made on its device) or, when None, from
    ``generator`` on the CPU and are copied to the host's device.

    ``rows`` (data-parallel training): the loss of only these rows of the batch (their mean;
    ``cond`` holds their conditioning). Noise and sigmas are still drawn for the whole batch, so
    the random stream and each row's draws do not depend on how the batch is split. With no
    rows the draws are made and None is returned.
    """
    dev = host.device
    gen = generator if noise_generator is None else noise_generator
    if rows is not None:
        shape = (len(latents), *latents[0].shape)
        noise = torch.randn(shape, generator=gen, device=gen.device)
        shift = host.dims.family.shift_for(shape[-2], shape[-1]) if use_shift else None
        sigma = sample_sigmas(shape[0], generator=gen, mode=sigma_mode, shift=shift)
        if not rows:
            return None
        x0 = torch.stack([latents[r] for r in rows]).to(dev, torch.float32)
        noise, sigma = noise[list(rows)].to(dev), sigma[list(rows)].to(dev)
        pred = host.predict(add_noise(x0, noise, sigma), sigma, cond)
        return flow_loss(pred, velocity_target(x0, noise))
    x0 = torch.stack(list(latents)).to(dev, torch.float32)  # (B, C, h, w); a no-op copy when already there
    noise = torch.randn(x0.shape, generator=gen, device=gen.device)
    shift = host.dims.family.shift_for(x0.shape[-2], x0.shape[-1]) if use_shift else None
    sigma = sample_sigmas(x0.shape[0], generator=gen, mode=sigma_mode, shift=shift)
    noise, sigma = noise.to(dev), sigma.to(dev)
    pred = host.predict(add_noise(x0, noise, sigma), sigma, cond)
    return flow_loss(pred, velocity_target(x0, noise))


def _batches(latents: Sequence[Latent], order: DataOrder, batch_size: int) -> list[torch.Tensor]:
    """Next batch: crops differ in size, so a batch holds the first pick's size only; each pair
    item is drawn in one orientation (the per-step random flip)."""
    first = order.take(1)[0]
    picked = [first]
    if batch_size > 1:
        shape = latent_shape(latents[first])
        same = [i for i in range(len(latents)) if latent_shape(latents[i]) == shape and i != first]
        for j in torch.randperm(len(same), generator=order.generator).tolist()[: batch_size - 1]:
            picked.append(same[j])
    return [pick_orientation(latents[i], order.generator)[0] for i in picked]


def _read_back(pending: list[torch.Tensor], step: int, losses: list[float], config: Stage2Config) -> float:
    """Moves the pending device losses into ``losses`` (one copy); raises at the first NaN/inf."""
    values = torch.stack(pending).float().cpu().tolist()
    first = step - len(values) + 1
    pending.clear()
    for i, v in enumerate(values):
        if not math.isfinite(v):
            losses.extend(values[:i])
            raise RuntimeError(
                f"Stage-2 loss became {v} at step {first + i}; lower the learning rate "
                f"(now {config.lr}) or check the model precision (fp16 overflows: use bf16 or fp32)"
            )
    losses.extend(values)
    return values[-1]


def personalize(
    host: FlowHost,
    adapters: AdapterSet,
    latents: Sequence[Latent],
    cond: Any,
    config: Stage2Config = Stage2Config(),
    callback: StepCallback | None = None,
) -> TrainResult:
    """Trains Mid/Up (or plain-LoRA Down/Up) on one identity's crops.

    Args:
        host: the model (frozen) to train against.
        adapters: from ``AdapterSet.from_downs`` (Down frozen) or ``AdapterSet.plain``.
        latents: cached (C, h, w) latents of the augmented crops, or (plain, mirrored) pairs of
            them (``data.latents.encode_flip_pairs``) for a random flip per step; sizes may differ.
        cond: the host's cached conditioning of the caption.
        config: steps, lr, seed, ...
        callback: called after every step with (step, loss); raising from it cancels
            the run (the adapters are left as trained so far, the host is cleaned up). ``loss``
            is the latest value read back from the device: exact on the steps that read it
            (step 1, then every ``config.sync_every`` steps, and the last), the one before otherwise.

    Returns:
        TrainResult with the trained adapters (on the CPU, float32) and per-step losses.

    Raises:
        RuntimeError: the loss became NaN or inf.
    """
    check_latents(latents)
    adapters.freeze_down(True)
    params = adapters.trainable_parameters()
    if not params:
        raise ValueError("the adapters have no trainable parameters")
    dev = torch.device(host.device)
    gen = torch.Generator().manual_seed(config.seed)  # data order (and noise with noise_device="cpu")
    noise_gen = None
    if config.noise_device == "device" and dev.type != "cpu":
        noise_gen = torch.Generator(device=dev).manual_seed(config.seed)
    order = DataOrder(len(latents), gen)
    # the crops live on the device for the whole run, in float32: the loss target noise - x0 is
    # float32 (the model input is cast to the compute dtype inside the host)
    on_device = [tuple(t.detach().to(dev, torch.float32) for t in z) if isinstance(z, tuple)
                 else z.detach().to(dev, torch.float32) for z in latents]
    adapters.to(dev)
    fused = dev.type == "cuda"  # one kernel per step for the whole update; CPU keeps the reference loop
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, **({"fused": True} if fused else {}))
    result = TrainResult(adapters=adapters)
    pending: list[torch.Tensor] = []  # losses of the steps since the last read-back, on the device
    last = float("nan")
    t0 = time.perf_counter()
    handle = host.attach(adapters)
    try:
        with host.training(), torch.enable_grad():
            for step in range(1, config.steps + 1):
                batch = _batches(on_device, order, config.batch_size)
                loss = flow_step_loss(host, batch, cond, gen, sigma_mode=config.sigma_mode,
                                      use_shift=config.resolution_shift, noise_generator=noise_gen)
                pending.append(loss.detach())
                if (step - 1) % config.sync_every == 0 or step == config.steps:
                    last = _read_back(pending, step, result.losses, config)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if config.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                opt.step()
                if callback is not None:
                    callback(step, last)
    finally:
        handle.remove()
        result.seconds = time.perf_counter() - t0
        if pending:  # cancelled between read-backs: keep the losses of the steps that ran
            result.losses.extend(float(v) for v in torch.stack(pending).float().cpu().tolist())
        adapters.to("cpu")
        opt.zero_grad(set_to_none=True)
    log.info("Stage-2: %d steps in %.1fs, loss %.4f -> %.4f", len(result.losses), result.seconds,
             result.losses[0] if result.losses else float("nan"), result.losses[-1] if result.losses else float("nan"))
    return result
