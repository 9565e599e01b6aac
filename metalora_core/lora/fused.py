"""The fused training step of frozen-Down Meta-LoRA adapters, written once for every host.

A Stage-2 adapter (frozen Down, trained Mid and Up, ``lora.adapter``) runs as
``base + (x @ Down^T) @ B^T`` with ``B = scale * Up @ Mid`` built once per step. What makes that
cheap in memory and kernels lives here, used by the diffusers host (hooks on the model's Linears,
``attach``) and by ComfyUI's fast FLUX path (Linears whose output rows several adapters write,
``SlicedLinears``):

- the low-rank ops that keep little for backward (``down_project``, ``shared_down``,
  ``add_rows``, ``add_low_rank``);
- the per-step factor caches (``StepFactors``; ``SlicedLinears.factors`` for row-sliced modules;
  ``Prebuilt`` for compiled blocks);
- the device memos: frozen Downs stacked in the compute dtype (``StackedDowns``), a caption's
  conditioning on the device (``DeviceMemo``), one ``silu`` of the time embedding per step
  (``StepSilu``) and its Down projection shared by every modulation Linear;
- compute again in backward: an adapted Linear's output from the step's factors with the
  forward's ops, so with its bits (``AttachHandle.output_again``, ``SlicedLinears.again``);
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
        autograd (a Down that trains is no cache: see ``SlicedLinears.down``)."""
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


class Plan:
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
        self.downs = StackedDowns()
        self.slot: tuple | None = None  # (x, x._version, alias or None, {member: x @ Down^T})
        self.held_groups = {g for g in held if len(g) > 1 and self.group[g[0]] == g}
        self.held: dict[tuple[str, ...], tuple] = {}  # a held group's own slot
        self.prebuild = prebuild
        self.prebuilt = {n: Prebuilt() for n in self.adapters}

    def new_step(self, dtype: torch.dtype | None = None) -> None:
        """Starts a step. With ``prebuild`` (compiled blocks), autograd on and the step's compute
        ``dtype`` known (the root's input), every adapter's Down and factor in that dtype are built
        now, eagerly, for the compiled blocks to read (``Prebuilt``)."""
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
        self.downs.clear()

    def down(self, group: tuple[str, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The group's Down matrices stacked, (sum r1, in), in ``dtype`` on ``device``."""
        return self.downs.get(group, [self.adapters[n].down for n in group], dtype, device)

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


class Prebuilt:
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


def _bypass_pre_hook(name: str, plan: Plan):
    def hook(module: nn.Module, args: tuple):
        x = args[0]
        if torch.compiler.is_compiling():  # no shared projection; nothing per layer (a name) traced
            return None
        if not (torch.is_grad_enabled() and x.requires_grad and _fast(x, plan.adapters[name])):
            return None
        alias, _ = plan.project(name, x)  # the Linear reads the alias: backward adds the low-rank input gradient
        return (alias, *args[1:])

    return hook


def _bypass_hook(name: str, adapter: nn.Module, plan: Plan | None):
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

    def __init__(self, handles: list[torch.utils.hooks.RemovableHandle], plan: Plan | None = None,
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
        return [] if self._plan is None else self._plan.downs.tensors()

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



def attach_hooks(root: nn.Module, modules: Mapping[str, tuple[nn.Module, Any]], fast: Mapping[str, LoRAAdapter],
                 groups: Iterable[tuple[str, ...]], held_groups: Iterable[tuple[str, ...]] = (),
                 compiled: bool = False) -> AttachHandle:
    """Hooks each named ``(Linear, adapter)`` of ``modules`` in bypass form (what ``attach_adapters``
    does once it has checked them): the adapters in ``fast`` (Stage-2 Meta-LoRA) take the fused
    step, with the shared-input ``groups`` and ``held_groups`` of ``Plan``; the others their
    ``add_to``. ``compiled``: each step prebuilds the factors compiled blocks read (``Prebuilt``)."""
    handles = []
    plan = Plan(fast, groups, held_groups, prebuild=compiled) if fast else None
    try:
        for name, (mod, adapter) in modules.items():
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
    return AttachHandle(handles, plan, adapters={n: a for n, (_, a) in modules.items()})


# ---------------------------------------------------------------- Linears that several adapters write


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


class SlicedLinears:
    """Adapters on the Linears of a model that calls them itself (a host's own block forwards):
    each Linear's adapters, in their row slices, act as one low-rank update, computed in one addmm
    from factors built once per step.

    Args:
        slots: module name -> the adapters writing its output rows.
        out_features: module name -> the Linear's output width.
        fast: the modules all of whose adapters are Stage-2 Meta-LoRA (``lora.adapter.frozen_meta``).
        modulation: the fast modules that read ``silu`` of the time embedding (``self.silu``,
            computed once per step): one Down projection for all of them per step.
    """

    def __init__(self, slots: Mapping[str, list[RowSlot]], out_features: Mapping[str, int],
                 fast: Iterable[str], modulation: Iterable[str] = ()) -> None:
        self.slots, self.out_features = dict(slots), dict(out_features)
        self.fast = set(fast)
        self.step_factors = StepFactors([x.adapter for name in self.fast for x in self.slots[name]])
        self.modulation = [n for n in sorted(self.fast) if n in set(modulation)]
        self.downs = StackedDowns()
        self.silu = StepSilu()
        self._step: dict[tuple, tuple] = {}  # (name, dtype, grad mode, fast) -> the module's factors
        self._mod_u: tuple | None = None  # (x, x._version, {module: x @ Down^T})

    def new_step(self, dtype: torch.dtype | None) -> None:
        """Starts a forward (and its backward); with ``dtype``, builds every module's factors in it
        now, before the blocks run, so none of it happens inside a checkpointed block."""
        self._step.clear()
        self.step_factors.new_step()
        self.silu.clear()
        self._mod_u = None
        if dtype is not None:
            for name in self.slots:
                self.factors(name, dtype)

    def down(self, key: Any, slots: Sequence[RowSlot], dtype: torch.dtype | None = None) -> torch.Tensor:
        """The slots' Down matrices stacked (R1, in), in ``dtype`` (None: their own): held while they
        stay frozen, stacked again each call while one trains (plain LoRA), with its graph."""
        downs = [s.adapter.down for s in slots]
        if any(d.requires_grad for d in downs):
            return downs[0] if len(downs) == 1 else torch.cat(downs)
        return self.downs.get(key, downs, dtype)

    def _fast(self, name: str) -> bool:
        return name in self.fast and not any(x.adapter.down.requires_grad for x in self.slots[name])

    def factors(self, name: str, dtype: torch.dtype, fast: bool = True) -> tuple:
        """The factors of module ``name`` for this step, built once per step and reused by every
        call in it, checkpoint recompute included.

        Fast modules: (Down (R1, in), B (out, R1)) in ``dtype``: Downs stacked, and the adapters'
        ``scale * Up @ Mid`` (``StepFactors``) placed block-diagonally in their row slices, so a
        call is one addmm. Otherwise (a trainable Down): (Down, Mid block-diagonal (R2, R1) or
        None, B (out, R2)): each ``scale * Up`` padded to its own row slice (the small B matrices,
        not the (tokens, out) activations).
        """
        slots, out_features = self.slots[name], self.out_features[name]
        fast = fast and self._fast(name)
        key = (name, dtype, torch.is_grad_enabled(), fast)
        hit = self._step.get(key)
        if hit is not None:
            return hit
        if fast:
            order = sorted(slots, key=lambda x: x.start)
            down = self.down(name, order, dtype)
            parts, row = [], 0
            for x in order:
                if x.start > row:  # rows no adapter writes
                    parts.append(torch.zeros(x.start - row, 0, dtype=dtype, device=down.device))
                parts.append(self.step_factors.get(x.adapter, dtype))
                row = x.start + x.size
            if row < out_features:
                parts.append(torch.zeros(out_features - row, 0, dtype=dtype, device=down.device))
            b = parts[0] if len(parts) == 1 else torch.block_diag(*parts)
            self._step[key] = hit = (down, b)
            return hit
        down = self.down(name, slots)
        mids = [s.adapter.mid for s in slots]
        mid = None if mids[0] is None else (mids[0] if len(mids) == 1 else torch.block_diag(*mids))
        b_parts = [padded_up(s, out_features) for s in slots]
        b = (b_parts[0] if len(b_parts) == 1 else torch.cat(b_parts, dim=1)).to(dtype)
        self._step[key] = hit = (down, mid, b)
        return hit

    def forward(self, name: str, base: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``base(x)`` (the frozen Linear ``name``, its output never modified) plus its adapters'
        update: one addmm from the step's factors, the low-rank input gradient added to the
        Linear's in its backward (``shared_down``); the general three-factor path otherwise."""
        slots = self.slots.get(name)
        if slots and x.is_floating_point() and self._fast(name):
            down, b = self.factors(name, x.dtype)
            if down.device == x.device:
                if name in self.modulation and self.silu.made(x) and not x.requires_grad:
                    x_lin, u = x, self._modulation_projection(name, x)
                else:
                    x_lin, u = shared_down(x, down)  # (..., R1); backward adds the low-rank input gradient to x's
                return add_update(base(x_lin), u, b)
        y = base(x)
        if not slots:
            return y
        down, mid, b = self.factors(name, y.dtype, fast=False)
        h = down_project(x, down)  # (..., R1) float32; a frozen Down keeps nothing of x for backward
        if mid is not None:
            h = F.linear(h, mid)  # (..., R2)
        return add_low_rank(y, h, b)

    def again(self, name: str, base: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``forward(name, base, x)`` computed again without autograd (for a backward that recomputes
        a Linear's output instead of keeping it), from the step's factors with the forward's ops
        where the forward used them, so with its bits."""
        with torch.no_grad():
            y = base(x)
            slots = self.slots.get(name)
            if not slots:
                return y
            fast = self._step.get((name, x.dtype, True, True))  # the forward's
            if fast is not None and fast[0].device == x.device:
                return add_update(y, F.linear(x, fast[0]), fast[1].detach())
            down, mid, b = self.factors(name, y.dtype, fast=False)
            h = down_project(x, down)
            if mid is not None:
                h = F.linear(h, mid)
            return add_low_rank(y, h, b)

    def _modulation_projection(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``x @ Down^T`` of the modulation Linear ``name``: one matmul against the stacked Downs of
        all of them (they read the same ``silu``, which needs no gradient), once per step."""
        hit = self._mod_u
        if hit is None or hit[0] is not x or hit[1] != x._version:
            slots = [s for n in self.modulation for s in sorted(self.slots[n], key=lambda s: s.start)]
            u = F.linear(x, self.down("<modulation>", slots, x.dtype))
            sizes = [sum(s.adapter.down.shape[0] for s in self.slots[n]) for n in self.modulation]
            self._mod_u = hit = (x, x._version, dict(zip(self.modulation, u.split(sizes, dim=-1))))
        return hit[2][name]
