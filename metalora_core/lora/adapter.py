"""Meta-LoRA adapters: ``delta(x) = scale * Up(Mid(Down(x)))`` per canonical layer.

Paper eq. (1): ``h = W0 x + L_up L_mid L_meta-down x``. Down (r1 x in) is the
meta-learned prior, frozen in Stage-2; Mid (r2 x r1) and Up (out x r2) are
identity-specific, Up zero-initialised so training starts from the base model.
A plain-LoRA mode (trainable Down, no Mid) serves the paper's LoRA baselines.

This module says what an adapter computes (``LoRAAdapter``: its three factors, its delta, its
standard LoRA factors for a merge or an export) and attaches adapters to a model's Linears in
bypass form (``attach_adapters``). How a training step computes Stage-2 adapters cheaply (per-step
factors, shared Down projections, compute again in backward) is ``lora.fused``, which every host uses.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .fused import AttachHandle, add_low_rank, attach_hooks, down_project
from .layers import shared_input_groups


def _kaiming_(t: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """peft's lora_A init (kaiming uniform, a=sqrt(5)) drawn from an explicit generator."""
    fan_in = t.shape[1]
    bound = 1.0 / math.sqrt(fan_in)  # gain(a=sqrt(5)) * sqrt(3 / fan_in)
    with torch.no_grad():
        t.copy_(torch.rand(t.shape, generator=generator, dtype=torch.float32) * 2 * bound - bound)
    return t



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


def frozen_meta(adapter: object) -> bool:
    """A Stage-2 Meta-LoRA adapter (frozen Down, trained Mid and Up): the fused step runs it
    (``fused.StepFactors``)."""
    return isinstance(adapter, LoRAAdapter) and adapter.mid is not None and not adapter.down.requires_grad


def attach_adapters(root: nn.Module, adapters: AdapterSet, *, held_groups: Iterable[tuple[str, ...]] = (),
                    compiled: bool = False) -> AttachHandle:
    """Attaches each adapter to ``root.get_submodule(name)`` in bypass form.

    The model's parameters and state dict stay untouched; ``handle.remove()``
    detaches everything. Stage-2 adapters (``frozen_meta``) take the fused step (``lora.fused``);
    ``held_groups``: layers of several blocks that the caller makes read one tensor per forward
    (see ``fused.FusedLinears``); the layers of one block that read one input (``shared_input_groups``)
    share their Down projection anyway. ``compiled``: the caller runs the blocks compiled; each
    step then builds the factors they read first (``fused.Prebuilt``; without, a compiled
    block's adapters take the general path).

    Raises:
        ValueError: a canonical layer is missing from ``root`` or is not a Linear
            of the adapter's shape.
    """
    modules = {}
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
        modules[name] = (mod, adapter)
    fast = {n: a for n, a in adapters.items() if frozen_meta(a)}
    return attach_hooks(root, modules, list(fast), shared_input_groups(fast), held_groups, compiled=compiled)
