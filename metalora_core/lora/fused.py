"""The fused training step of frozen-Down Meta-LoRA adapters, written once for every host.

A Stage-2 adapter (frozen Down, trained Mid and Up, ``lora.adapter``) runs as
``base + (x @ Down^T) @ B^T`` with ``B = scale * Up @ Mid`` built once per step. ``FusedLinears``
holds one attachment's step: which Linear each adapter writes (whole, or a row slice where a
framework fuses q/k/v into one Linear), the per-step factors, the shared Down projections and
the outputs computed again in backward. Hosts reach a model's Linears two ways and both use it:
hooks on the Linears (``attach_hooks``, behind ``lora.adapter.attach_adapters``: the diffusers
host) and a host's own block forwards calling ``FusedLinears.forward`` (ComfyUI's fast FLUX path).

- low-rank ops that keep little for backward: ``down_project``, ``shared_down``, ``add_rows``,
  ``add_low_rank``;
- per-step factors: ``StepFactors`` (``scale * Up @ Mid`` of adapters of one shape in one batched
  matmul), ``FusedLinears.factor`` (block-diagonal for row-sliced Linears), ``Prebuilt`` (what a
  compiled block reads);
- device memos: ``StackedDowns`` (frozen Downs stacked in the compute dtype), ``DeviceMemo`` (a
  caption's conditioning on the device), ``StepSilu`` (one ``silu`` of the time embedding per
  step, projected once for every modulation Linear);
- compute again in backward with the forward's bits: ``FusedLinears.update_again`` /
  ``again``, ``AttachHandle.output_again``;
- the checkpoint policy (``checkpointed``, ``run_block``) and the block self-check's comparison
  (``first_disagreement``).

Nothing here knows a model family or a framework: names are the hosts' module names.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .modulation import block_agrees

if TYPE_CHECKING:
    from .adapter import LoRAAdapter

# ---------------------------------------------------------------- low-rank ops

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


def add_update(base: torch.Tensor, u: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``base + u @ b^T`` out of place in one addmm: ``add_rows`` where ``u`` and ``b`` are in
    base's dtype already (the step's factors in the compute dtype), else ``add_low_rank``."""
    return add_rows(base, u, b) if base.dtype == u.dtype else add_low_rank(base, u, b)


# ---------------------------------------------------------------- per-step factors


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



# ---------------------------------------------------------------- device memos


class StackedDowns:
    """Frozen Down matrices stacked, (sum r1, in), in a dtype on a device: built once while they stay
    unchanged (``_version`` and storage) and then held for the run, like a weight."""

    def __init__(self) -> None:
        self._hits: dict[tuple, tuple] = {}  # (key, dtype, device) -> (state of the Downs, stacked)

    def get(self, key: Any, downs: Sequence[torch.Tensor], dtype: torch.dtype | None = None,
            device: torch.device | None = None) -> torch.Tensor:
        """``downs`` stacked in their order, in ``dtype`` on ``device`` (None: their own), without
        autograd (a Down that trains is no cache: see ``FusedLinears.factors``)."""
        state = tuple((id(d), d._version, d.data_ptr(), d.device) for d in downs)
        slot = (key, dtype, device)
        hit = self._hits.get(slot)
        if hit is None or hit[0] != state:
            with torch.no_grad():
                d = downs[0] if len(downs) == 1 else torch.cat(downs)
                hit = (state, d.to(device=device, dtype=dtype))
            self._hits[slot] = hit
        return hit[1]

    def tensors(self) -> list[torch.Tensor]:
        return [hit[1] for hit in self._hits.values()]

    def clear(self) -> None:
        self._hits.clear()


class DeviceMemo:
    """Tensors copied to a device and dtype once while their sources stay the same (a caption's
    conditioning: one copy per caption, not one per step). ``None`` entries stay ``None``."""

    def __init__(self) -> None:
        self._memo: tuple | None = None

    def get(self, tensors: Sequence[torch.Tensor | None], device: torch.device | str,
            dtype: torch.dtype) -> tuple[torch.Tensor | None, ...]:
        src = tuple(tensors)
        key = (tuple(id(t) for t in src), tuple(-1 if t is None else t._version for t in src), device, dtype)
        memo = self._memo
        if memo is not None and memo[0] == key:
            return memo[2]
        out = tuple(None if t is None else t.to(device, dtype) for t in src)
        self._memo = (key, src, out)  # src held: the ids stay theirs while memoised
        return out


class StepSilu:
    """``silu(t)`` of the time embedding, computed once per step for every block's modulation
    Linear: they then read one tensor, which the adapters project once for all of them."""

    def __init__(self) -> None:
        self._hit: tuple | None = None  # (t, t._version, grad mode, silu)

    def __call__(self, t: torch.Tensor, view: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """``silu(view(t))`` (``view``: a reshape the blocks read it in); a compiled block computes its own."""
        if torch.compiler.is_compiling():
            return F.silu(t if view is None else view(t))
        grad = torch.is_grad_enabled()
        hit = self._hit
        if hit is None or hit[0] is not t or hit[1] != t._version or hit[2] != grad:
            self._hit = hit = (t, t._version, grad, F.silu(t if view is None else view(t)))
        return hit[3]

    def made(self, x: torch.Tensor) -> bool:
        """``x`` is this step's silu."""
        return self._hit is not None and x is self._hit[3]

    def clear(self) -> None:
        self._hit = None

    @contextlib.contextmanager
    def aside(self) -> Iterator[None]:
        """A fresh memo inside (a self-check's forwards), this step's back afterwards."""
        hit, self._hit = self._hit, None
        try:
            yield
        finally:
            self._hit = hit


# ---------------------------------------------------------------- checkpoint policy, self-check


def checkpointed(index: int, every: int) -> bool:
    """Block ``index`` (all blocks counted from 0, double then single) is recomputed in backward
    with every-``every``-th-block checkpointing (0: none, 1: every block)."""
    return every > 0 and index % every == 0


def run_block(index: int, every: int, fn: Callable, *args: Any) -> Any:
    """``fn(*args)``, checkpointed (non-reentrant) where ``checkpointed`` says so and autograd records."""
    if torch.is_grad_enabled() and checkpointed(index, every):
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def first_disagreement(mine: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor]) -> tuple[str, float] | None:
    """The first output (name, largest difference) in which a block's training forward disagrees
    with the framework's own block (``modulation.block_agrees``), or None where all agree."""
    for key, m in mine.items():
        agrees, worst = block_agrees(m, ref[key])
        if not agrees:
            return key, worst
    return None


# ---------------------------------------------------------------- the step of one attachment


@dataclass(frozen=True)
class RowSlot:
    """One adapter writing rows ``start:start + size`` of a Linear's output (frameworks that fuse
    q/k/v into one Linear hold several canonical layers' outputs side by side)."""

    adapter: LoRAAdapter
    start: int  # first output row this adapter writes
    size: int  # number of rows


def padded_up(slot: RowSlot, out_features: int) -> torch.Tensor:
    """``scale * Up`` of ``slot``'s adapter in its own rows of an ``out_features``-row matrix:
    (out_features, r), zeros elsewhere."""
    b = slot.adapter.up_factor()  # (size, r)
    return b if slot.size == out_features else F.pad(b, (0, 0, slot.start, out_features - slot.start - slot.size))


class FusedLinears:
    """The adapters of one attachment on the Linears they write, by module name, and what one
    training step of them builds and keeps. Both ways of reaching a model use it: hooks on its
    Linears (``attach_hooks``) and a host's own block forwards calling ``forward``.

    A module whose adapters are all Stage-2 Meta-LoRA (``fast``) computes
    ``base + (x @ Down^T) @ B^T`` in one addmm: ``Down`` its adapters' Downs stacked in the compute
    dtype (``StackedDowns``), ``B`` their ``scale * Up @ Mid`` (``StepFactors``), block-diagonal in
    their row slices where several adapters write one Linear (``factor``). Modules that read one
    input share one Down projection (``project``): ``groups`` (the layers of one block reading
    one input: one projection while that input is the latest), ``held`` (layers of several
    blocks reading one small tensor, such as every block's modulation Linear reading
    ``silu(temb)``: kept until the end of the forward, whatever the other layers read between).

    Args:
        slots: module name -> the adapters writing its output rows.
        out_features: module name -> the Linear's output width.
        fast: the modules all of whose adapters are Stage-2 Meta-LoRA (``lora.adapter.frozen_meta``).
        groups, held: tuples of module names, as above.
        prebuild: compiled blocks read this step's factors, built eagerly by ``new_step`` (``Prebuilt``).
    """

    def __init__(self, slots: Mapping[str, Sequence[RowSlot]], out_features: Mapping[str, int], fast: Iterable[str],
                 groups: Iterable[tuple[str, ...]] = (), held: Iterable[tuple[str, ...]] = (),
                 prebuild: bool = False) -> None:
        self.slots = {n: list(ss) for n, ss in slots.items()}
        self.out_features = dict(out_features)
        fast = [n for n in fast if n in self.slots]
        self.fast = set(fast)
        self._rows = {n: sorted(self.slots[n], key=lambda x: x.start) for n in fast}  # the fast ops' order
        self._whole = {n: ss[0].adapter for n, ss in self._rows.items()
                       if len(ss) == 1 and ss[0].start == 0 and ss[0].size == self.out_features[n]}
        self.group: dict[str, tuple[str, ...]] = {}
        held = [tuple(n for n in g if n in self.fast) for g in held]
        for g in [*groups, *held]:
            g = tuple(n for n in g if n in self.fast)
            widths = {(self._rows[n][0].adapter.in_features, self._rows[n][0].adapter.down.device) for n in g}
            if len(g) > 1 and len(widths) == 1:
                for n in g:
                    self.group[n] = g
        for n in fast:
            self.group.setdefault(n, (n,))
        self.held_groups = {g for g in held if len(g) > 1 and self.group[g[0]] == g}
        self.step_factors = StepFactors([x.adapter for n in fast for x in self.slots[n]])
        self.downs = StackedDowns()
        self.silu = StepSilu()
        self._step: dict[tuple, tuple] = {}  # this step's block-diagonal B and general factors
        self.slot: tuple | None = None  # (x, x._version, alias or None, {member: x @ Down^T})
        self.held: dict[tuple[str, ...], tuple] = {}  # a held group's own slot
        self.prebuild = prebuild
        self.prebuilt = {n: Prebuilt() for n in self._whole}

    # -- one step

    def new_step(self, dtype: torch.dtype | None = None, build: bool = False) -> None:
        """Starts a forward (and its backward). ``build``: every module's factors in ``dtype`` are
        built now, before the blocks run, so none of it happens inside a checkpointed block. With
        ``prebuild``, autograd on and ``dtype`` known, each adapter's Down and factor are built for
        the compiled blocks to read (``Prebuilt``)."""
        self._step.clear()
        self.step_factors.new_step()
        self.silu.clear()
        self.end_forward()
        if build and dtype is not None:
            for name in self.slots:
                self.factors(name, dtype)
        if self.prebuild:  # eager blocks never read them
            ready = dtype is not None and torch.is_grad_enabled()
            for n, pb in self.prebuilt.items():
                pb.down, pb.b = (self.down((n,), dtype), self.factor(n, dtype)) if ready else (None, None)

    def end_forward(self) -> None:
        self.slot = None
        self.held.clear()

    def release(self) -> None:
        self.new_step()
        self.downs.clear()

    # -- factors

    def _r1(self, name: str) -> int:
        return sum(x.adapter.down.shape[0] for x in self._rows[name])

    def down(self, group: tuple[str, ...], dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
        """The frozen Downs of ``group``'s modules stacked (sum r1, in), each module's in its rows'
        order, in ``dtype`` on ``device`` (None: theirs)."""
        downs = [x.adapter.down for n in group for x in self._rows[n]]
        return self.downs.get(group, downs, dtype, downs[0].device if device is None else device)

    def factor(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """Fast module ``name``'s ``B`` (out, R1) in ``dtype`` for this step: its adapter's
        ``StepFactors`` factor, or, for several adapters, theirs placed block-diagonally in their
        row slices (built once per step)."""
        whole = self._whole.get(name)
        if whole is not None:
            return self.step_factors.get(whole, dtype)
        key = (name, dtype, torch.is_grad_enabled())
        hit = self._step.get(key)
        if hit is None:
            parts, row, dev = [], 0, self._rows[name][0].adapter.down.device
            for x in self._rows[name]:
                if x.start > row:  # rows no adapter writes
                    parts.append(torch.zeros(x.start - row, 0, dtype=dtype, device=dev))
                parts.append(self.step_factors.get(x.adapter, dtype))
                row = x.start + x.size
            if row < self.out_features[name]:
                parts.append(torch.zeros(self.out_features[name] - row, 0, dtype=dtype, device=dev))
            self._step[key] = hit = (parts[0] if len(parts) == 1 else torch.block_diag(*parts),)
        return hit[0]

    def built(self, name: str, dtype: torch.dtype) -> torch.Tensor | None:
        """Module ``name``'s ``B`` in ``dtype`` as this step's forward built it (its Ups and Mids
        unchanged since), detached, or None."""
        whole = self._whole.get(name)
        if whole is not None:
            return self.step_factors.built(whole, dtype)
        hit = self._step.get((name, dtype, True))
        return None if hit is None else hit[0].detach()

    def fast_now(self, name: str) -> bool:
        """Module ``name`` takes the fast step now (not a Down made trainable since attaching)."""
        return name in self.fast and not any(x.adapter.down.requires_grad for x in self.slots[name])

    def factors(self, name: str, dtype: torch.dtype, general: bool = False) -> tuple:
        """Module ``name``'s factors for this step: (Down, B) for a fast module (``down``,
        ``factor``); otherwise, or with ``general``, (Down, Mid block-diagonal (R2, R1) or None,
        B (out, R2)), each ``scale * Up`` padded to its own row slice (the small B matrices, not the
        (tokens, out) activations), built once per step; a Down that trains is stacked again at
        every call."""
        if not general and self.fast_now(name):
            return self.down((name,), dtype), self.factor(name, dtype)
        slots, out = self.slots[name], self.out_features[name]
        key = (name, dtype, torch.is_grad_enabled(), "general")
        hit = self._step.get(key)
        if hit is not None:
            return hit
        downs = [x.adapter.down for x in slots]
        if any(d.requires_grad for d in downs):  # plain LoRA: its graph is this call's
            down = downs[0] if len(downs) == 1 else torch.cat(downs)
        else:
            down = self.downs.get(name, downs)
        mids = [x.adapter.mid for x in slots]
        mid = None if mids[0] is None else (mids[0] if len(mids) == 1 else torch.block_diag(*mids))
        b_parts = [padded_up(x, out) for x in slots]
        b = (b_parts[0] if len(b_parts) == 1 else torch.cat(b_parts, dim=1)).to(dtype)
        self._step[key] = hit = (down, mid, b)
        return hit

    # -- projections

    def project(self, name: str, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(x for the Linear, {member: x @ Down^T}) of ``name``'s group, shared while x is the same;
        the Linear reads the first (``shared_down``: its backward adds the low-rank input gradient)."""
        group = self.group[name]
        held = group in self.held_groups
        s = self.held.get(group) if held else self.slot
        if s is not None and (x is s[0] or x is s[2]) and x._version == s[1] and name in s[3]:
            return (x if s[2] is None else s[2]), s[3]
        alias, u = shared_down(x, self.down(group, x.dtype, x.device))
        parts = dict(zip(group, u.split([self._r1(n) for n in group], dim=-1) if len(group) > 1 else (u,)))
        s = (x, x._version, alias if alias is not x else None, parts)
        if held:
            self.held[group] = s
        else:
            self.slot = s
        return alias, parts

    def _projection(self, name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x for the Linear, x @ Down^T) for a call of ``forward``: through ``project`` where the
        group shares it, else one ``shared_down`` kept by nobody (a host's block forward calls each
        Linear once, so there is nothing to share, and no input held past its use)."""
        group = self.group[name]
        if len(group) > 1:
            alias, parts = self.project(name, x)
            return alias, parts[name]
        return shared_down(x, self.down(group, x.dtype, x.device))

    # -- a host's own block forwards

    def forward(self, name: str, base: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``base(x)`` (the frozen Linear ``name``, its output never modified) plus its adapters'
        update: one addmm from the step's factors, the low-rank input gradient added to the
        Linear's in its backward (``shared_down``); the general three-factor path otherwise."""
        slots = self.slots.get(name)
        if slots and x.is_floating_point() and self.fast_now(name):
            down = self.down((name,), x.dtype)
            if down.device == x.device:
                x_lin, u = self._projection(name, x)
                return add_update(base(x_lin), u, self.factor(name, x.dtype))
        y = base(x)
        return self._general(name, y, x) if slots else y

    def _general(self, name: str, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``y`` plus module ``name``'s update in three factors (``factors``' general form)."""
        down, mid, b = self.factors(name, y.dtype, general=True)
        h = down_project(x, down)  # (..., R1) float32; a frozen Down keeps nothing of x for backward
        if mid is not None:
            h = F.linear(h, mid)  # (..., R2)
        return add_low_rank(y, h, b)

    def update_again(self, name: str, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        """``y`` plus the update the fast step added to module ``name``'s output for input ``x``,
        computed again without autograd from this step's factors with the forward's ops, so with
        its bits; None where the step built none (then the caller takes its general path)."""
        if name not in self.fast or not x.is_floating_point():
            return None
        b = self.built(name, x.dtype)
        if b is None or b.device != x.device:  # adapters on another device take the general path
            return None
        group = self.group[name]
        with torch.no_grad():
            u = F.linear(x, self.down(group, x.dtype, x.device))
            if len(group) > 1:
                u = u.split([self._r1(n) for n in group], dim=-1)[group.index(name)]
            return add_update(y, u, b)

    def again(self, name: str, base: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``forward(name, base, x)`` computed again without autograd (for a backward that recomputes
        a Linear's output instead of keeping it), with the forward's bits where the forward took
        the fast step (``update_again``)."""
        with torch.no_grad():
            y = base(x)
            if not self.slots.get(name):
                return y
            out = self.update_again(name, y, x)
            return out if out is not None else self._general(name, y, x)


class Prebuilt:
    """One frozen-Down adapter's ``(Down, B)`` in the step's compute dtype, built eagerly at the start
    of the step. A compiled block reads them as graph inputs (``torch.compile`` cannot trace the
    caches), so its call is ``base + (x @ Down^T) @ B^T`` as in eager mode."""

    def __init__(self) -> None:
        self.down: torch.Tensor | None = None  # (r1, in)
        self.b: torch.Tensor | None = None  # (out, r1), ``scale * Up @ Mid``


# ---------------------------------------------------------------- hooks on a model's Linears


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


def _bypass_pre_hook(name: str, step: FusedLinears, adapter: LoRAAdapter):
    def hook(module: nn.Module, args: tuple):
        x = args[0]
        if torch.compiler.is_compiling():  # no shared projection; nothing per layer (a name) traced
            return None
        if not (torch.is_grad_enabled() and x.requires_grad and _fast(x, adapter)):
            return None
        alias, _ = step.project(name, x)  # the Linear reads the alias: backward adds the low-rank input gradient
        return (alias, *args[1:])

    return hook


def _bypass_hook(name: str, adapter: nn.Module, step: FusedLinears | None):
    pb = step.prebuilt[name] if step is not None else None

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        # Out-of-place: base weights and base output tensors are never modified.
        x = args[0]
        if torch.compiler.is_compiling():  # nothing per layer (a name) traced: the prebuilt factors
            if (pb is not None and pb.b is not None and torch.is_grad_enabled()
                    and output.dtype == x.dtype == pb.b.dtype):
                return add_rows(output, F.linear(x, pb.down), pb.b)
            return adapter.add_to(output, x)
        if step is not None and output.dtype == x.dtype and _fast(x, adapter):
            _, parts = step.project(name, x)
            return add_rows(output, parts[name], step.factor(name, output.dtype))
        return adapter.add_to(output, x)

    return hook


class AttachHandle:
    """Removes attached adapters; usable as a context manager."""

    def __init__(self, handles: list[torch.utils.hooks.RemovableHandle], step: FusedLinears | None = None,
                 adapters: Mapping[str, LoRAAdapter] | None = None) -> None:
        self._handles = handles
        self._step = step
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
        bits: ``FusedLinears.update_again``), else ``add_to``."""
        with torch.no_grad():
            y = module.forward(x)
            a = self._adapters.get(name) if name is not None else None
            if a is None:
                return y
            if self._step is not None and y.dtype == x.dtype and _fast(x, a):
                out = self._step.update_again(name, y, x)
                if out is not None:
                    return out
            return a.add_to(y, x)

    def cached_tensors(self) -> list[torch.Tensor]:
        """What the attachment keeps for the whole run (the frozen Downs in the compute dtype):
        like the weights, they exist anyway, so a graph that saves them keeps nothing more."""
        return [] if self._step is None else self._step.downs.tensors()

    def add(self, removable: Any) -> None:
        """Removes ``removable`` (anything with ``.remove()``) too, before what was attached earlier."""
        self._handles.append(removable)

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()
        if self._step is not None:
            self._step.release()

    def __enter__(self) -> "AttachHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def attach_hooks(root: nn.Module, modules: Mapping[str, tuple[nn.Module, LoRAAdapter]], fast: Iterable[str],
                 groups: Iterable[tuple[str, ...]] = (), held_groups: Iterable[tuple[str, ...]] = (),
                 compiled: bool = False) -> AttachHandle:
    """Hooks each named ``(Linear, adapter)`` of ``modules`` in bypass form (what ``attach_adapters``
    does once it has checked them): the adapters named in ``fast`` (Stage-2 Meta-LoRA) take the
    fused step (``FusedLinears``, with its ``groups`` and ``held_groups``), the others their
    ``add_to``. ``compiled``: each step prebuilds the factors compiled blocks read (``Prebuilt``)."""
    fast = [n for n in fast if n in modules]
    step = None
    if fast:
        step = FusedLinears({n: [RowSlot(modules[n][1], 0, modules[n][1].out_features)] for n in fast},
                            {n: modules[n][1].out_features for n in fast}, fast, groups, held_groups,
                            prebuild=compiled)
    handles = []
    try:
        for name, (mod, adapter) in modules.items():
            if step is not None and name in step.fast:
                handles.append(mod.register_forward_pre_hook(_bypass_pre_hook(name, step, adapter)))
            handles.append(mod.register_forward_hook(
                _bypass_hook(name, adapter, step if step is not None and name in step.fast else None)))
        if step is not None:  # each forward of the root is a step: new factors, no stale projection kept
            handles.append(root.register_forward_pre_hook(lambda m, a, kw: step.new_step(_float_input(a, kw)),
                                                          with_kwargs=True))
            handles.append(root.register_forward_hook(lambda m, a, o: step.end_forward()))
    except Exception:
        for h in handles:
            h.remove()
        raise
    return AttachHandle(handles, step, adapters={n: a for n, (_, a) in modules.items()})
