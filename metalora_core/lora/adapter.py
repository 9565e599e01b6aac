"""Meta-LoRA adapters: ``delta(x) = scale * Up(Mid(Down(x)))`` per canonical layer.

Paper eq. (1): ``h = W0 x + L_up L_mid L_meta-down x``. Down (r1 x in) is the
meta-learned prior, frozen in Stage-2; Mid (r2 x r1) and Up (out x r2) are
identity-specific, Up zero-initialised so training starts from the base model.
A plain-LoRA mode (trainable Down, no Mid) serves the paper's LoRA baselines.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn


def _kaiming_(t: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """peft's lora_A init (kaiming uniform, a=sqrt(5)) drawn from an explicit generator."""
    fan_in = t.shape[1]
    bound = 1.0 / math.sqrt(fan_in)  # gain(a=sqrt(5)) * sqrt(3 / fan_in)
    with torch.no_grad():
        t.copy_(torch.rand(t.shape, generator=generator, dtype=torch.float32) * 2 * bound - bound)
    return t


class _DownProject(torch.autograd.Function):
    """``x @ Down^T`` for a trainable Down that keeps ``x`` in its own dtype for backward.

    Plain autograd would keep the float32 cast of ``x`` (twice the bytes of a bf16 input); the
    cast is redone in backward instead. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, down)
        return F.linear(x.to(down.dtype), down)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, down = ctx.saved_tensors
        gx = gd = None
        if ctx.needs_input_grad[0]:
            gx = (grad @ down).to(x.dtype)
        if ctx.needs_input_grad[1]:
            gd = grad.reshape(-1, grad.shape[-1]).T @ x.reshape(-1, x.shape[-1]).to(down.dtype)
        return gx, gd


def down_project(x: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``x @ down^T`` in down's dtype; saves for backward only what the gradients need.

    Frozen ``down``: nothing of ``x`` (autograd keeps ``down`` for the input gradient).
    Trainable ``down`` (Stage-1, plain LoRA): ``x`` in its own dtype (see ``_DownProject``).
    """
    if down.requires_grad and torch.is_grad_enabled():
        return _DownProject.apply(x, down)
    return F.linear(x.to(down.dtype), down)


def add_low_rank(base: torch.Tensor, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``base + h @ b^T`` out of place in base's dtype, the add fused into one addmm.

    base: (..., out); h: (..., r) low-rank hidden (any float dtype); b: (out, r).
    """
    flat = torch.addmm(base.reshape(-1, base.shape[-1]), h.reshape(-1, h.shape[-1]).to(base.dtype),
                       b.to(base.dtype).T)
    return flat.view(base.shape)


class LoRAAdapter(nn.Module):
    """One layer's adapter in bypass form.

    Args:
        in_features, out_features: the wrapped Linear's widths.
        down: (r1, in) Down matrix (the prior), or None for a random one.
        rank: r2 (meta mode) or r (plain mode).
        mid: True for the three-layer Meta-LoRA, False for a plain two-layer LoRA.
        scale: multiplies the delta; folded into Up on export.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rank: int,
        down: torch.Tensor | None = None,
        r1: int | None = None,
        mid: bool = True,
        scale: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"adapter rank must be >= 1, got {rank}")
        self.in_features, self.out_features, self.scale = in_features, out_features, float(scale)
        down_rows = (down.shape[0] if down is not None else r1) if mid else rank
        if down_rows is None:
            raise ValueError("a Meta-LoRA adapter needs a Down matrix or r1")
        if down is not None:
            if tuple(down.shape) != (down_rows, in_features):
                raise ValueError(f"Down has shape {tuple(down.shape)}, expected ({down_rows}, {in_features})")
            down_t = down.detach().to(torch.float32).clone()
        else:
            down_t = _kaiming_(torch.empty(down_rows, in_features), generator)
        self.down = nn.Parameter(down_t)  # (r1, in) meta mode / (r, in) plain mode
        self.mid = nn.Parameter(_kaiming_(torch.empty(rank, down_rows), generator)) if mid else None  # (r2, r1)
        self.up = nn.Parameter(torch.zeros(out_features, rank))  # (out, r2)

    @property
    def rank(self) -> int:
        return self.up.shape[1]

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Standard LoRA factors (A: (r, in), B: (out, r)) with ``B @ A == delta weight``."""
        a = self.down if self.mid is None else self.mid @ self.down  # (r2, in): cheaper than two passes
        return a, self.up * self.scale  # scale on the (out, r) matrix, not on every token

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ Down^T`` in Down's dtype (float32): (..., in) -> (..., r1) (plain mode: (..., r)).

        A frozen Down keeps nothing of ``x`` for backward (the input gradient needs Down only);
        a trainable Down keeps ``x`` in its own dtype, not a float32 copy of it.
        """
        return down_project(x, self.down)

    def low_rank(self, x: torch.Tensor) -> torch.Tensor:
        """``Mid(Down(x))``, the r2-wide hidden of the three-factor form (plain mode: ``Down(x)``).

        Three factors, not ``x @ (Mid @ Down)^T``: autograd then keeps the r1-wide ``x @ Down^T``
        for Mid's gradient instead of the whole input.
        """
        u = self.project(x)
        return u if self.mid is None else F.linear(u, self.mid)

    def up_factor(self) -> torch.Tensor:
        """``scale * Up`` (out, r); no multiply when the scale is 1."""
        return self.up if self.scale == 1.0 else self.up * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the delta only. x: (..., in) -> (..., out)."""
        return F.linear(self.low_rank(x), self.up_factor())

    def add_to(self, base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``base + delta(x)`` out of place, the add fused into the Up matmul (one pass over base)."""
        h = self.low_rank(x)  # (..., r) float32
        return add_low_rank(base, h, self.up_factor())


def _key(name: str) -> str:
    return name.replace(".", "__")


class AdapterSet(nn.Module):
    """Adapters keyed by canonical layer name, plus what describes them."""

    def __init__(self, adapters: Mapping[str, LoRAAdapter], *, mode: str, preset: str | None) -> None:
        super().__init__()
        if mode not in ("meta", "lora"):
            raise ValueError(f"AdapterSet mode must be 'meta' or 'lora', got {mode!r}")
        if not adapters:
            raise ValueError("an AdapterSet needs at least one adapter")
        self.mode, self.preset = mode, preset
        self.names = list(adapters)
        self.layers = nn.ModuleDict({_key(n): a for n, a in adapters.items()})

    def __getitem__(self, name: str) -> LoRAAdapter:
        return self.layers[_key(name)]  # type: ignore[return-value]

    def items(self) -> Iterator[tuple[str, LoRAAdapter]]:
        for n in self.names:
            yield n, self[n]

    @property
    def r1(self) -> int | None:
        return self[self.names[0]].down.shape[0] if self.mode == "meta" else None

    @property
    def rank(self) -> int:
        return self[self.names[0]].rank

    @classmethod
    def from_downs(
        cls,
        downs: Mapping[str, torch.Tensor],
        shapes: Mapping[str, tuple[int, int]],
        *,
        r2: int,
        preset: str | None,
        generator: torch.Generator | None = None,
        scale: float = 1.0,
    ) -> "AdapterSet":
        """Meta-LoRA adapters on the given Down matrices (a prior); Down frozen."""
        adapters = {}
        for name, down in downs.items():
            fin, fout = shapes[name]
            adapters[name] = LoRAAdapter(fin, fout, rank=r2, down=down, mid=True, scale=scale, generator=generator)
        out = cls(adapters, mode="meta", preset=preset)
        out.freeze_down(True)
        return out

    @classmethod
    def meta_random(
        cls,
        shapes: Mapping[str, tuple[int, int]],
        *,
        r1: int,
        r2: int,
        preset: str | None,
        generator: torch.Generator | None = None,
    ) -> "AdapterSet":
        """Meta-LoRA adapters with a random Down (the start of Stage-1)."""
        adapters = {
            n: LoRAAdapter(fin, fout, rank=r2, r1=r1, mid=True, generator=generator) for n, (fin, fout) in shapes.items()
        }
        return cls(adapters, mode="meta", preset=preset)

    @classmethod
    def plain(
        cls,
        shapes: Mapping[str, tuple[int, int]],
        *,
        rank: int,
        preset: str | None,
        generator: torch.Generator | None = None,
    ) -> "AdapterSet":
        """Plain LoRA (trainable Down, zero Up) for the paper's LoRA baselines."""
        adapters = {n: LoRAAdapter(fin, fout, rank=rank, mid=False, generator=generator) for n, (fin, fout) in shapes.items()}
        return cls(adapters, mode="lora", preset=preset)

    def freeze_down(self, frozen: bool = True) -> None:
        """Stage-2 freezes the Meta-Down prior; plain LoRA keeps Down trainable."""
        if self.mode == "lora":
            return
        for _, a in self.items():
            a.down.requires_grad_(not frozen)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


class SharedCast:
    """One dtype cast per input tensor shared by several adapted Linears (q, k and v read the same x).

    Holds the last input and its cast; a different tensor (or an in-place change) replaces them.
    """

    def __init__(self) -> None:
        self._src: torch.Tensor | None = None
        self._version = -1
        self._out: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if x.dtype == dtype:
            return x
        if torch.compiler.is_compiling():  # a compiled graph shares the cast itself; no Python state
            return x.to(dtype)
        out = self._out
        if (out is not None and self._src is x and self._version == x._version and out.dtype == dtype
                and (out.grad_fn is not None) == (torch.is_grad_enabled() and x.requires_grad)):
            return out
        out = x.to(dtype)
        self._src, self._version, self._out = x, x._version, out
        return out

    def clear(self) -> None:
        self._src = self._out = None


class AttachHandle:
    """Removes attached adapters; usable as a context manager."""

    def __init__(self, handles: list[torch.utils.hooks.RemovableHandle], cast: SharedCast | None = None) -> None:
        self._handles = handles
        self._cast = cast

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()
        if self._cast is not None:
            self._cast.clear()

    def __enter__(self) -> "AttachHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _bypass_hook(adapter: LoRAAdapter, cast: SharedCast):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        # Out-of-place: base weights and base output tensors are never modified.
        x = args[0]
        if isinstance(adapter, LoRAAdapter) and not adapter.down.requires_grad:
            x = cast(x, adapter.down.dtype)  # frozen Down: the cast is not kept for backward, so share it
        return adapter.add_to(output, x)

    return hook


def attach_adapters(root: nn.Module, adapters: AdapterSet) -> AttachHandle:
    """Attaches each adapter to ``root.get_submodule(name)`` in bypass form.

    The model's parameters and state dict stay untouched; ``handle.remove()``
    detaches everything.

    Raises:
        ValueError: a canonical layer is missing from ``root`` or is not a Linear
            of the adapter's shape.
    """
    handles = []
    cast = SharedCast()
    try:
        for name, adapter in adapters.items():
            try:
                mod = root.get_submodule(name)
            except AttributeError as e:
                raise ValueError(f"layer {name!r} does not exist in the model ({type(root).__name__})") from e
            if not isinstance(mod, nn.Linear) or (mod.in_features, mod.out_features) != (
                adapter.in_features,
                adapter.out_features,
            ):
                got = (getattr(mod, "in_features", None), getattr(mod, "out_features", None))
                raise ValueError(
                    f"layer {name!r}: model has {type(mod).__name__} {got}, adapter expects Linear "
                    f"({adapter.in_features}, {adapter.out_features})"
                )
            handles.append(mod.register_forward_hook(_bypass_hook(adapter, cast)))
    except Exception:
        for h in handles:
            h.remove()
        raise
    return AttachHandle(handles, cast)
