"""FLUX's modulated LayerNorm, ``LayerNorm(x) * (1 + scale) + shift``, for trained modulation.

When the modulation Linears are adapted (preset ``all``), ``shift`` and ``scale`` need gradients;
plain autograd then keeps the normalised ``x`` (one activation as large as ``x``) for ``scale``'s
gradient, on top of what LayerNorm keeps for its own backward (``x`` and two per-token
statistics). ``modulated_norm`` keeps only those: for one sample as an affine LayerNorm whose
weight is ``1 + scale`` and bias ``shift`` (one op each way), for a batch by recomputing the
normalised ``x`` in backward with the same LayerNorm kernel (bit-identical).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class _ModulatedNorm(torch.autograd.Function):
    """``addcmul(shift, layer_norm(x), 1 + scale)`` (LayerNorm without weights). Not twice
    differentiable."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
        width = (x.shape[-1],)
        n, mean, rstd = torch.ops.aten.native_layer_norm(x, width, None, None, eps)
        scale1 = 1 + scale
        ctx.save_for_backward(x, mean, rstd, scale1)
        ctx.eps, ctx.shift_shape, ctx.scale_shape = eps, shift.shape, scale.shape
        return torch.addcmul(shift, n, scale1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor):
        x, mean, rstd, scale1 = ctx.saved_tensors
        gx = g_shift = g_scale = None
        if ctx.needs_input_grad[2]:
            n = torch.ops.aten.native_layer_norm(x, (x.shape[-1],), None, None, ctx.eps)[0]
            g_scale = (g * n).sum_to_size(ctx.scale_shape)
        if ctx.needs_input_grad[1]:
            g_shift = g.sum_to_size(ctx.shift_shape)
        if ctx.needs_input_grad[0]:
            gx = torch.ops.aten.native_layer_norm_backward(g * scale1, x, (x.shape[-1],), mean, rstd, None, None,
                                                  [True, False, False])[0]
        return gx, g_shift, g_scale, None


def plain_layer_norm(norm: nn.Module) -> float | None:
    """The eps of a LayerNorm over the last dimension without weights (FLUX's block norms), else None."""
    shape = getattr(norm, "normalized_shape", None)
    if (isinstance(norm, nn.LayerNorm) and getattr(norm, "weight", None) is None
            and getattr(norm, "bias", None) is None and shape is not None and len(shape) == 1):
        return float(norm.eps)
    return None


def modulated_norm(norm: nn.Module, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``norm(x) * (1 + scale) + shift`` for a plain LayerNorm ``norm`` (``plain_layer_norm``), in
    as few ops as autograd allows:

    - one sample's modulation (``shift`` and ``scale`` of ``width`` values each): a LayerNorm with
      ``1 + scale`` as its weight and ``shift`` as its bias, one op forward and one backward, whose
      weight and bias gradients are the scale's and shift's (sums over the tokens); it keeps ``x``
      and two per-token statistics, as the plain LayerNorm does;
    - a batch of them, ``x`` and ``scale`` needing gradients: ``_ModulatedNorm``, which recomputes
      the normalised ``x`` in backward instead of keeping it (same forward bits as the plain ops);
    - otherwise ``torch.addcmul(shift, norm(x), 1 + scale)``: an ``x`` that needs no gradient (the
      first block's input) is kept by nobody else, so keeping it would save nothing over its
      normalised copy.
    """
    eps = _trainable_norm(norm, x, shift, scale)
    if eps is not None and (x.requires_grad or scale.requires_grad or shift.requires_grad):
        affine = _one_sample_affine(x, shift, scale)
        if affine is not None:
            return F.layer_norm(x, (x.shape[-1],), *affine, eps)
        if x.requires_grad and scale.requires_grad:
            return _ModulatedNorm.apply(x, shift, scale, eps)
    return plain_modulated_norm(norm, x, shift, scale)


def plain_modulated_norm(norm: nn.Module, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``norm(x) * (1 + scale) + shift`` in plain ops (what autograd keeps: see the module docstring)."""
    return torch.addcmul(shift, norm(x), 1 + scale)


def _trainable_norm(norm: nn.Module, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> float | None:
    """``norm``'s eps where the fused forms apply (a plain LayerNorm over x's width, one dtype,
    grad mode on), else None."""
    eps = plain_layer_norm(norm)
    if (eps is None or not torch.is_grad_enabled() or x.shape[-1] != norm.normalized_shape[0]
            or not x.dtype == shift.dtype == scale.dtype):
        return None
    return eps


def _one_sample_affine(x: torch.Tensor, shift: torch.Tensor,
                       scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(weight, bias) = (1 + scale, shift) of one sample's modulation as a LayerNorm's, or None for
    a batch."""
    width = x.shape[-1]
    if shift.numel() == scale.numel() == width:
        return (1 + scale).reshape(width), shift.reshape(width)
    return None


class Recompute:
    """How to compute a gated residual's ``out`` again in backward instead of keeping it:
    ``fn(source)`` under no grad, ``source`` being a tensor that backward keeps anyway (the
    attention kernel's output, which an attention output projection reads). The gate's gradient
    then keeps ``source``, not ``out``: nothing more where ``source``'s storage is kept already,
    one projection more in backward."""

    __slots__ = ("source", "fn")

    def __init__(self, source: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.source, self.fn = source, fn

    def out(self, source: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.fn(source)


def _keep_out(ctx, out: torch.Tensor, again: Recompute | None) -> torch.Tensor:
    """What the gate's gradient keeps of ``out``: ``out``, or ``again.source``."""
    ctx.again = again
    return out if again is None else again.source


def _out_again(ctx, kept: torch.Tensor) -> torch.Tensor:
    return kept if ctx.again is None else ctx.again.out(kept)


class _GatedResidual(torch.autograd.Function):
    """``residual + gate * out`` in one addcmul; backward in three ops (plain autograd of addcmul
    takes five: it multiplies by the unit ``value`` again). Not twice differentiable."""

    @staticmethod
    def forward(ctx, residual: torch.Tensor, gate: torch.Tensor, out: torch.Tensor,
                again: Recompute | None = None) -> torch.Tensor:
        kept = _keep_out(ctx, out, again) if ctx.needs_input_grad[1] else None
        ctx.save_for_backward(gate if ctx.needs_input_grad[2] else None, kept)
        ctx.gate_shape, ctx.residual_shape = gate.shape, residual.shape
        return torch.addcmul(residual, gate, out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor):
        gate, out = ctx.saved_tensors
        g_res = g_gate = g_out = None
        if ctx.needs_input_grad[0]:
            g_res = g if g.shape == ctx.residual_shape else g.sum_to_size(ctx.residual_shape)
        if ctx.needs_input_grad[1]:
            g_gate = (g * _out_again(ctx, out)).sum_to_size(ctx.gate_shape)
        if ctx.needs_input_grad[2]:
            g_out = g * gate
        return g_res, g_gate, g_out, None


def gated_residual(residual: torch.Tensor, gate: torch.Tensor, out: torch.Tensor,
                   again: Recompute | None = None) -> torch.Tensor:
    """``residual + gate * out`` (FLUX's gated residual; ``gate`` broadcasts over the tokens), out of
    place, in one op forward and three backward (``_GatedResidual``) where autograd needs it.
    ``again``: the gate's gradient recomputes ``out`` instead of keeping it (``Recompute``)."""
    if torch.is_grad_enabled() and (gate.requires_grad or out.requires_grad or residual.requires_grad):
        if out.shape == residual.shape and residual.dtype == gate.dtype == out.dtype:
            return _GatedResidual.apply(residual, gate, out, again)
    return residual + gate * out


class _GatedNorm(torch.autograd.Function):
    """``(y, layer_norm(y, weight, bias))`` with ``y = residual + gate * out``, keeping ``residual``,
    ``gate`` and ``out`` (or ``Recompute.source``) for backward, not ``y``: ``y`` is recomputed
    there by the same op. Not twice differentiable."""

    @staticmethod
    def forward(ctx, residual, gate, out, weight, bias, eps: float, again: Recompute | None = None):
        y = torch.addcmul(residual, gate, out)
        n, mean, rstd = torch.ops.aten.native_layer_norm(y, (y.shape[-1],), weight, bias, eps)
        ctx.save_for_backward(residual, gate, _keep_out(ctx, out, again), weight, bias, mean, rstd)
        return y, n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_y: torch.Tensor, g_n: torch.Tensor):
        residual, gate, out, weight, bias, mean, rstd = ctx.saved_tensors
        out = _out_again(ctx, out)
        y = torch.addcmul(residual, gate, out)
        need = ctx.needs_input_grad
        gx, g_weight, g_bias = torch.ops.aten.native_layer_norm_backward(
            g_n, y, (y.shape[-1],), mean, rstd, weight, bias, [True, need[3], need[4]])
        g = gx + g_y
        g_gate = (g * out).sum_to_size(gate.shape) if need[1] else None
        g_out = g * gate if need[2] else None
        return (g if need[0] else None), g_gate, g_out, g_weight, g_bias, None, None


def gated_modulated_norm(norm: nn.Module, residual: torch.Tensor, gate: torch.Tensor, out: torch.Tensor,
                         shift: torch.Tensor, scale: torch.Tensor,
                         again: Recompute | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, norm(y) * (1 + scale) + shift)`` with ``y = residual + gate * out``: a gated residual
    followed by the next modulated LayerNorm (FLUX's double block, between attention and MLP).

    With trained gates (the gate's gradient keeps ``out`` anyway, and the block's first LayerNorm
    keeps ``residual``) and one sample's modulation, ``y`` is not kept for backward but recomputed
    there (``_GatedNorm``): one activation fewer per stream and block, for one op more in backward.
    Otherwise ``gated_residual`` then ``modulated_norm``; the forward bits are the same either way.
    ``again``: ``out`` is recomputed in backward too (``Recompute``), not kept.
    """
    eps = _trainable_norm(norm, residual, shift, scale)
    if (eps is not None and gate.requires_grad and out.shape == residual.shape
            and residual.dtype == gate.dtype == out.dtype):
        affine = _one_sample_affine(residual, shift, scale)
        if affine is not None:
            return _GatedNorm.apply(residual, gate, out, *affine, eps, again)
    y = gated_residual(residual, gate, out, again)
    return y, modulated_norm(norm, y, shift, scale)


def block_agrees(mine: torch.Tensor, ref: torch.Tensor) -> tuple[bool, float]:
    """(agrees, largest difference) of a training copy of a block's output and the framework's own
    block's: within 1e-4 (float32, float64) or 3e-2 (16-bit) of the reference's largest value
    (at least 1). The hosts check their block forwards, built from the forms above, with it."""
    r = ref.detach().float()
    worst = float((mine.detach().float() - r).abs().max())
    tol = (1e-4 if mine.dtype in (torch.float32, torch.float64) else 3e-2) * max(1.0, float(r.abs().max()))
    return worst <= tol, worst
