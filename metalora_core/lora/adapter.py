"""Meta-LoRA adapters: ``delta(x) = scale * Up(Mid(Down(x)))`` per canonical layer.

Paper eq. (1): ``h = W0 x + L_up L_mid L_meta-down x``. Down (r1 x in) is the
meta-learned prior, frozen in Stage-2; Mid (r2 x r1) and Up (out x r2) are
identity-specific, Up zero-initialised so training starts from the base model.
A plain-LoRA mode (trainable Down, no Mid) serves the paper's LoRA baselines.

Stage-2 adapters (frozen Down) run as ``base + (x @ Down^T) @ B^T`` with ``B = scale * Up @ Mid``
built once per step (``StepFactors``); Linears that read one input share one Down projection
(``shared_down``). A compiled block reads the same factors, built eagerly at the start of the step
(``_Prebuilt``). Everything else takes the general three-factor path (``LoRAAdapter.add_to``).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .layers import shared_input_groups


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


class _SharedDown(torch.autograd.Function):
    """``(x, x @ down^T)`` for a frozen ``down`` already in x's dtype: one matmul for every adapter
    that reads ``x`` (q, k and v read the same input; ``down`` stacks their Down matrices).

    The first output is ``x`` itself (a view) for the Linears to read, so backward receives their
    input gradient and adds the low-rank one to it in the same addmm (``grad_x + grad_u @ down``).
    Keeps nothing of ``x`` for backward. ``down`` is a frozen cache that outlives the step (like a
    weight), so it is held rather than saved: saved-tensor hooks (offloading, checkpointing) leave
    it alone. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.set_materialize_grads(False)
        ctx.down = down
        return x.view_as(x), F.linear(x, down)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gx: torch.Tensor | None, gu: torch.Tensor | None):
        down = ctx.down
        if gu is None:
            return gx, None
        gu2 = gu.reshape(-1, gu.shape[-1])
        if gx is None:
            return (gu2 @ down).view(*gu.shape[:-1], down.shape[1]), None
        return torch.addmm(gx.reshape(-1, gx.shape[-1]), gu2, down).view(gx.shape), None


def shared_down(x: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x for the Linears, x @ down^T)`` with a frozen ``down`` in x's dtype (see ``_SharedDown``).

    When x needs no gradient it comes back as it is, next to a plain matmul.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return _SharedDown.apply(x, down)
    return x, F.linear(x, down)


def add_rows(base: torch.Tensor, u: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``base + u @ b^T`` out of place in one addmm. base: (..., out); u: (..., r1); b: (out, r1);
    one dtype."""
    flat = torch.addmm(base.reshape(-1, base.shape[-1]), u.reshape(-1, u.shape[-1]), b.T)
    return flat.view(base.shape)


def frozen_meta(adapter: object) -> bool:
    """A Stage-2 Meta-LoRA adapter (frozen Down, trained Mid and Up): ``StepFactors`` runs it."""
    return isinstance(adapter, LoRAAdapter) and adapter.mid is not None and not adapter.down.requires_grad


class _UpMid(torch.autograd.Function):
    """``scale * Up @ Mid`` of n adapters of one shape, in ``dtype``: (out, r1) for one, stacked
    (n, out, r1) for more (one stack of the Ups, one of the Mids, one batched matmul).

    The parameters are held, not saved: nothing here is redone under checkpointing and no stacked
    copy of the Ups is kept (backward restacks them). A parameter changed in place before
    backward raises, as autograd does for saved tensors. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, dtype: torch.dtype, scales: tuple[float, ...] | None, n: int, *params: torch.Tensor) -> torch.Tensor:
        ups, mids = params[:n], params[n:]
        if n == 1:
            mid = mids[0]
            b = ups[0] @ mid
            scale = None if scales is None else scales[0]
        else:
            mid = torch.stack(mids)  # (n, r2, r1)
            b = torch.bmm(torch.stack(ups), mid)
            scale = None if scales is None else torch.tensor(scales, dtype=b.dtype).to(b.device).view(-1, 1, 1)
        if scale is not None:
            b.mul_(scale)
        ctx.n, ctx.scale, ctx.mid, ctx.params = n, scale, mid, params
        ctx.versions = [p._version for p in params]
        return b.to(dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        if any(p._version != v for p, v in zip(ctx.params, ctx.versions)):
            raise RuntimeError("an adapter's Mid or Up was modified in place between the forward and the backward "
                               "that needs it; run backward before the optimizer step")
        n, mid, ups = ctx.n, ctx.mid, ctx.params[: ctx.n]
        g = grad.to(mid.dtype)
        if ctx.scale is not None:
            g = g * ctx.scale
        if n == 1:
            return None, None, None, g @ mid.T, ups[0].T @ g
        g_up = torch.bmm(g, mid.transpose(1, 2))  # (n, out, r2)
        g_mid = torch.bmm(torch.stack(ups).transpose(1, 2), g)  # (n, r2, r1)
        return None, None, None, *g_up.unbind(0), *g_mid.unbind(0)


class StepFactors:
    """Per-step factors ``B = scale * Up @ Mid`` (out, r1) of frozen-Down adapters: a call is then
    ``base + (x @ Down^T) @ B^T``, one addmm, and two matmuls in its backward.

    Adapters whose Up and Mid have the same shapes are built together: one stack of their Ups, one
    of their Mids, one batched matmul and one cast for all of them (backward: one stack, one cast,
    two batched matmuls) instead of matmuls and casts per adapter and per call. Built at the first
    call of a step and reused by every call in it (checkpoint recompute included); ``new_step``
    starts the next. A changed Mid or Up (``_version`` or storage), another dtype or grad mode, or a
    backward through the factors rebuilds them too.
    """

    def __init__(self, adapters: list[LoRAAdapter]) -> None:
        classes: dict[tuple, list[LoRAAdapter]] = {}
        for a in adapters:
            classes.setdefault((tuple(a.up.shape), tuple(a.mid.shape)), []).append(a)
        self._class = {id(a): tuple(members) for members in classes.values() for a in members}
        self._built: dict[int, tuple] = {}  # id(first member) -> ((dtype, grad, states), {id(adapter): B})

    def new_step(self) -> None:
        self._built.clear()

    @staticmethod
    def _state(a: LoRAAdapter) -> tuple:
        return (a.mid._version, a.mid.data_ptr(), a.up._version, a.up.data_ptr())

    def get(self, adapter: LoRAAdapter, dtype: torch.dtype) -> torch.Tensor:
        """``adapter``'s (out, r1) factor in ``dtype`` for this step."""
        members = self._class[id(adapter)]
        key = id(members[0])
        grad = torch.is_grad_enabled()
        hit = self._built.get(key)
        if hit is not None:
            (h_dtype, h_grad, states), factors, _ = hit
            if h_dtype == dtype and h_grad == grad and states[id(adapter)] == self._state(adapter):
                return factors[id(adapter)]
        token = object()
        factors = self._build(key, token, members, dtype)
        self._built[key] = ((dtype, grad, {id(a): self._state(a) for a in members}), factors, token)
        return factors[id(adapter)]

    def built(self, adapter: LoRAAdapter, dtype: torch.dtype) -> torch.Tensor | None:
        """``adapter``'s factor in ``dtype`` as this step built it (its Up and Mid unchanged since),
        detached, or None: for a backward that computes a layer's output again."""
        hit = self._built.get(id(self._class[id(adapter)][0]))
        if hit is None:
            return None
        (h_dtype, _, states), factors, _ = hit
        return factors[id(adapter)].detach() if h_dtype == dtype and states[id(adapter)] == self._state(adapter) else None

    def _build(self, key: int, token: object, members: tuple[LoRAAdapter, ...],
               dtype: torch.dtype) -> dict[int, torch.Tensor]:
        scales = tuple(a.scale for a in members)
        b = _UpMid.apply(dtype, None if all(x == 1.0 for x in scales) else scales, len(members),
                         *[a.up for a in members], *[a.mid for a in members])
        if b.requires_grad:  # a backward through them spends their graph: rebuild at the next call
            b.register_hook(lambda g: self._spent(key, token))
        parts = (b,) if len(members) == 1 else b.unbind(0)
        return {id(a): p for a, p in zip(members, parts)}

    def _spent(self, key: int, token: object) -> None:
        hit = self._built.get(key)
        if hit is not None and hit[2] is token:
            del self._built[key]


class _Plan:
    """The frozen-Down adapters of one ``attach_adapters``: shared-input groups, their stacked
    Downs (cached per dtype and device while the Downs stay unchanged) and the step factors.

    ``slot`` holds the shared Down projection of the latest input; a new input replaces it, the
    end of the root module's forward drops it. A ``held`` group (layers of several blocks that
    read one small tensor, such as every block's modulation Linear reading ``silu(temb)``) keeps
    its own slot until the end of the forward, whatever the other layers read in between.
    """

    def __init__(self, adapters: Mapping[str, LoRAAdapter], groups: Iterable[tuple[str, ...]],
                 held: Iterable[tuple[str, ...]] = (), prebuild: bool = False) -> None:
        self.adapters = dict(adapters)
        self.group: dict[str, tuple[str, ...]] = {}
        held = [tuple(n for n in g if n in self.adapters) for g in held]
        for g in [*groups, *held]:
            g = tuple(n for n in g if n in self.adapters)
            widths = {(self.adapters[n].in_features, self.adapters[n].down.device) for n in g}
            if len(g) > 1 and len(widths) == 1:
                for n in g:
                    self.group[n] = g
        for n in self.adapters:
            self.group.setdefault(n, (n,))
        self.factors = StepFactors(list(self.adapters.values()))
        self._downs: dict[tuple[str, ...], tuple] = {}
        self.slot: tuple | None = None  # (x, x._version, alias or None, {member: x @ Down^T})
        self.held_groups = {g for g in held if len(g) > 1 and self.group[g[0]] == g}
        self.held: dict[tuple[str, ...], tuple] = {}  # a held group's own slot
        self.prebuild = prebuild
        self.prebuilt = {n: _Prebuilt() for n in self.adapters}

    def new_step(self, dtype: torch.dtype | None = None) -> None:
        """Starts a step. With ``prebuild`` (compiled blocks), autograd on and the step's compute
        ``dtype`` known (the root's input), every adapter's Down and factor in that dtype are built
        now, eagerly, for the compiled blocks to read (``_Prebuilt``)."""
        self.factors.new_step()
        self.end_forward()
        if not self.prebuild:  # eager blocks never read them
            return
        build = dtype is not None and torch.is_grad_enabled()
        for n, a in self.adapters.items():
            pb = self.prebuilt[n]
            pb.down, pb.b = (self.down((n,), dtype, a.down.device), self.factors.get(a, dtype)) if build else (None, None)

    def end_forward(self) -> None:
        self.slot = None
        self.held.clear()

    def release(self) -> None:
        self.new_step()
        self._downs.clear()

    def down(self, group: tuple[str, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The group's Down matrices stacked, (sum r1, in), in ``dtype`` on ``device``."""
        downs = [self.adapters[n].down for n in group]
        key = tuple((id(d), d._version, d.data_ptr()) for d in downs) + (dtype, device)
        hit = self._downs.get(group)
        if hit is None or hit[0] != key:
            with torch.no_grad():
                d = downs[0] if len(downs) == 1 else torch.cat(downs)
                hit = (key, d.to(device, dtype))
            self._downs[group] = hit
        return hit[1]

    def project(self, name: str, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(x for the Linear, {member: x @ Down^T}) of ``name``'s group, shared while x is the same."""
        group = self.group[name]
        held = group in self.held_groups
        s = self.held.get(group) if held else self.slot
        if s is not None and (x is s[0] or x is s[2]) and x._version == s[1] and name in s[3]:
            return (x if s[2] is None else s[2]), s[3]
        alias, u = shared_down(x, self.down(group, x.dtype, x.device))
        sizes = [self.adapters[n].down.shape[0] for n in group]
        parts = dict(zip(group, u.split(sizes, dim=-1) if len(group) > 1 else (u,)))
        s = (x, x._version, alias if alias is not x else None, parts)
        if held:
            self.held[group] = s
        else:
            self.slot = s
        return alias, parts


class _Prebuilt:
    """One frozen-Down adapter's ``(Down, B)`` in the step's compute dtype, built eagerly at the start
    of the step. A compiled block reads them as graph inputs (``torch.compile`` cannot trace the
    caches), so its call is ``base + (x @ Down^T) @ B^T`` as in eager mode."""

    def __init__(self) -> None:
        self.down: torch.Tensor | None = None  # (r1, in)
        self.b: torch.Tensor | None = None  # (out, r1), ``scale * Up @ Mid``


def _float_input(args: tuple, kwargs: dict) -> torch.dtype | None:
    """The dtype of the first floating-point tensor among a forward's arguments."""
    for v in (*args, *kwargs.values()):
        if torch.is_tensor(v) and v.is_floating_point():
            return v.dtype
    return None


def _fast(x: torch.Tensor, adapter: LoRAAdapter) -> bool:
    """The eager step-factor path applies (another device or a Down made trainable after attaching
    take the general path; the hooks send a compiled graph to the prebuilt factors first)."""
    return x.is_floating_point() and not adapter.down.requires_grad and x.device == adapter.up.device


def _bypass_pre_hook(name: str, plan: _Plan):
    def hook(module: nn.Module, args: tuple):
        x = args[0]
        if torch.compiler.is_compiling():  # no shared projection; nothing per layer (a name) traced
            return None
        if not (torch.is_grad_enabled() and x.requires_grad and _fast(x, plan.adapters[name])):
            return None
        alias, _ = plan.project(name, x)  # the Linear reads the alias: backward adds the low-rank input gradient
        return (alias, *args[1:])

    return hook


def _bypass_hook(name: str, adapter: nn.Module, plan: _Plan | None):
    pb = plan.prebuilt[name] if plan is not None else None

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        # Out-of-place: base weights and base output tensors are never modified.
        x = args[0]
        if torch.compiler.is_compiling():  # nothing per layer (a name) traced: the prebuilt factors
            if (pb is not None and pb.b is not None and torch.is_grad_enabled()
                    and output.dtype == x.dtype == pb.b.dtype):
                return add_rows(output, F.linear(x, pb.down), pb.b)
            return adapter.add_to(output, x)
        if plan is not None and output.dtype == x.dtype and _fast(x, adapter):
            _, parts = plan.project(name, x)
            return add_rows(output, parts[name], plan.factors.get(adapter, output.dtype))
        return adapter.add_to(output, x)

    return hook


class AttachHandle:
    """Removes attached adapters; usable as a context manager."""

    def __init__(self, handles: list[torch.utils.hooks.RemovableHandle], plan: _Plan | None = None,
                 adapters: Mapping[str, LoRAAdapter] | None = None) -> None:
        self._handles = handles
        self._plan = plan
        self._adapters = dict(adapters or {})

    def only_ours(self, module: nn.Module) -> bool:
        """``module`` has no hooks but the ones this attachment registered (a ``forward`` call plus
        ``output_again`` is then what calling it computes)."""
        ours = {h.id for h in self._handles if isinstance(h, torch.utils.hooks.RemovableHandle)}
        return (set(module._forward_pre_hooks) | set(module._forward_hooks)) <= ours and not (
            module._backward_hooks or module._backward_pre_hooks)

    def output_again(self, name: str | None, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """What ``module(x)`` returned in this step's forward, computed again without hooks or
        autograd (for a backward that recomputes a layer's output instead of keeping it): the
        frozen layer's ``forward``, plus the update of the adapter attached at ``name`` (None:
        none), from the step's factors where the forward used them (the same ops, so the same
        bits), else ``add_to``."""
        with torch.no_grad():
            y = module.forward(x)
            a = self._adapters.get(name) if name is not None else None
            if a is None:
                return y
            plan = self._plan
            if plan is not None and name in plan.adapters and y.dtype == x.dtype and _fast(x, a):
                b = plan.factors.built(a, y.dtype)
                if b is not None:
                    group = plan.group[name]
                    u = F.linear(x, plan.down(group, x.dtype, x.device))
                    if len(group) > 1:
                        sizes = [plan.adapters[n].down.shape[0] for n in group]
                        u = u.split(sizes, dim=-1)[group.index(name)]
                    return add_rows(y, u, b)
            return a.add_to(y, x)

    def cached_tensors(self) -> list[torch.Tensor]:
        """What the attachment keeps for the whole run (the frozen Downs in the compute dtype):
        like the weights, they exist anyway, so a graph that saves them keeps nothing more."""
        return [] if self._plan is None else [hit[1] for hit in self._plan._downs.values()]

    def add(self, removable: Any) -> None:
        """Removes ``removable`` (anything with ``.remove()``) too, before what was attached earlier."""
        self._handles.append(removable)

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()
        if self._plan is not None:
            self._plan.release()

    def __enter__(self) -> "AttachHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def attach_adapters(root: nn.Module, adapters: AdapterSet, *, held_groups: Iterable[tuple[str, ...]] = (),
                    compiled: bool = False) -> AttachHandle:
    """Attaches each adapter to ``root.get_submodule(name)`` in bypass form.

    The model's parameters and state dict stay untouched; ``handle.remove()``
    detaches everything. ``held_groups``: layers of several blocks that the caller makes read one
    tensor per forward (see ``_Plan``); the layers of one block that read one input
    (``shared_input_groups``) share their Down projection anyway. ``compiled``: the caller runs
    the blocks compiled; each step then builds the factors they read first (``_Prebuilt``;
    without, a compiled block's adapters take the general path).

    Raises:
        ValueError: a canonical layer is missing from ``root`` or is not a Linear
            of the adapter's shape.
    """
    handles = []
    fast = {n: a for n, a in adapters.items() if frozen_meta(a)}
    plan = _Plan(fast, shared_input_groups(fast), held_groups, prebuild=compiled) if fast else None
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
            if name in fast:
                handles.append(mod.register_forward_pre_hook(_bypass_pre_hook(name, plan)))
            handles.append(mod.register_forward_hook(_bypass_hook(name, adapter, plan if name in fast else None)))
        if plan is not None:  # each forward of the root is a step: new factors, no stale projection kept
            handles.append(root.register_forward_pre_hook(lambda m, a, kw: plan.new_step(_float_input(a, kw)),
                                                          with_kwargs=True))
            handles.append(root.register_forward_hook(lambda m, a, o: plan.end_forward()))
    except Exception:
        for h in handles:
            h.remove()
        raise
    return AttachHandle(handles, plan, adapters=dict(adapters.items()))
