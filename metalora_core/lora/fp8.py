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


_OP = "metalora_fp8::stored_linear"


def _compiled_op():
    """``_StoredLinear`` as a custom op, for compiled graphs. Traced, the autograd Function's two
    casts of the weight are one node to the partitioner, whose output the graph then keeps for
    backward: a compute-dtype copy of every weight. The op is opaque: the graph keeps its
    declared input, the stored weight, and casts it again in backward. Registered once per
    process (the module may be imported under two package names)."""
    ns, name = _OP.split("::")
    if not hasattr(getattr(torch.ops, ns), name):
        @torch.library.custom_op(_OP, mutates_args=())
        def op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

        @op.register_fake
        def _(x, weight, bias):
            return x.new_empty((*x.shape[:-1], weight.shape[0]))

        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[1])

        def backward(ctx, grad):
            (weight,) = ctx.saved_tensors
            if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
                raise RuntimeError("float8-stored Linear weights are frozen; they get no gradient")
            return grad @ weight.to(grad.dtype), None, None

        op.register_autograd(backward, setup_context=setup_context)
    return getattr(getattr(torch.ops, ns), name)


def stored_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Linear on a frozen low-precision weight; keeps only that weight for backward (compiled too:
    ``_compiled_op``)."""
    if torch.is_grad_enabled() and x.requires_grad:
        if torch.compiler.is_compiling():
            return _compiled_op()(x, weight, bias)
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
