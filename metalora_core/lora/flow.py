"""Rectified-flow math as small pure functions.

Notation: ``x_t = (1 - sigma) * x0 + sigma * noise``, velocity ``v = noise - x0``.
Every random function takes an explicit ``torch.Generator``.
"""
from __future__ import annotations

import math

import torch

SIGMA_MODES = ("uniform", "logit_normal")


def resolution_shift(seq_len: int, base_seq: int, max_seq: int, base_shift: float, max_shift: float) -> float:
    """A resolution-dependent shift ``exp(mu)``, mu linear in the image token count: ``base_shift`` at
    ``base_seq`` tokens, ``max_shift`` at ``max_seq`` (a family's ``FlowShift`` holds the constants)."""
    m = (max_shift - base_shift) / (max_seq - base_seq)
    mu = base_shift + m * (seq_len - base_seq)
    return math.exp(mu)


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Moves sigmas towards noise: ``shift * s / (1 + (shift - 1) * s)``."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sample_sigmas(
    batch: int,
    *,
    generator: torch.Generator,
    mode: str = "logit_normal",
    mean: float = 0.0,
    std: float = 1.0,
    shift: float | None = None,
) -> torch.Tensor:
    """Draws training sigmas in (0, 1).

    Args:
        batch: number of sigmas.
        generator: the generator to draw from; the sigmas are made on its device.
        mode: "uniform" or "logit_normal" (sigmoid of a normal, as SD3/FLUX trainers use).
        shift: optional resolution shift (see ``resolution_shift``, ``ModelFamily.shift_for``).

    Returns:
        (batch,) float32 tensor on the generator's device.
    """
    dev = generator.device
    if mode == "uniform":
        s = torch.rand(batch, generator=generator, device=dev)
    elif mode == "logit_normal":
        s = torch.sigmoid(torch.randn(batch, generator=generator, device=dev) * std + mean)
    else:
        raise ValueError(f"unknown sigma sampling mode {mode!r}; choose one of {SIGMA_MODES}")
    if shift is not None:
        s = shift_sigmas(s, shift)
    return s


def _expand(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigma.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - sigma) * x0 + sigma * noise``; sigma (B,) broadcast over x0 (B, ...)."""
    s = _expand(sigma, x0)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The rectified-flow target ``v = noise - x0``."""
    return noise - x0


def flow_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error in float32 (the paper's plain L2 diffusion loss)."""
    return torch.mean((pred.float() - target.float()) ** 2)
