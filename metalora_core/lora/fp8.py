"""Frozen Linear weights stored in float8 that stay float8 through backward.

``F.linear(x, w.to(bf16))`` makes autograd keep the bf16 copy of every weight until backward,
so fp8 storage would save no training memory. Here the cast happens inside a custom autograd
Function that keeps the fp8 weight and casts it again in backward (the weights are frozen, so
only the input gradient is needed).
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


class _StoredLinear(torch.autograd.Function):
    """``x @ w^T + b`` with ``w`` (frozen) cast to x's dtype in forward and again in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            raise RuntimeError("float8-stored Linear weights are frozen; they get no gradient")
        return grad @ weight.to(grad.dtype), None, None


def stored_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Linear on a frozen low-precision weight; keeps only that weight for backward."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _StoredLinear.apply(x, weight, bias)
    return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return stored_linear(x, self.weight, self.bias)


def store_linears_fp8(root: nn.Module, *, dtype: torch.dtype = torch.float8_e4m3fn,
                      prefixes: tuple[str, ...] = ("transformer_blocks.", "single_transformer_blocks.")) -> int:
    """Stores the weights of the frozen Linears under ``prefixes`` in ``dtype``; returns how many.

    The modules stay ``nn.Linear`` (adapters attach as before); they compute in the input's
    dtype. Plain rounding to float8 (no per-tensor scale): meant for benchmarks and for
    weights already distributed in float8.

    Raises:
        ValueError: ``dtype`` is not a float8 dtype.
    """
    if dtype not in FP8_DTYPES:
        raise ValueError(f"store_linears_fp8 stores float8 weights; got {dtype}, use one of {FP8_DTYPES}")
    n = 0
    for name, mod in root.named_modules():
        if isinstance(mod, nn.Linear) and name.startswith(prefixes):
            with torch.no_grad():
                mod.weight = nn.Parameter(mod.weight.detach().to(dtype), requires_grad=False)
            mod.forward = types.MethodType(_forward, mod)
            n += 1
    return n
