"""The generic ComfyUI host: Stage-2 training through a ComfyUI model's own code, for any family.

Implements ``metalora_core.train.host.FlowHost`` on a ComfyUI ``ModelPatcher`` with no copy of
ComfyUI's model code. What it relies on is ComfyUI's public machinery only:

- adapters reach the model through ComfyUI's weight-adapter bypass (``comfy.weight_adapter.bypass``,
  what core TrainLoraNode uses with ``bypass_mode``): every adapted Linear of a *clone* of the
  caller's patcher computes ``base(x) + delta(x)`` while that clone is loaded, where ``delta`` is
  the sum of the canonical adapters mapped onto it, each written into its own row slice (ComfyUI
  fuses q/k/v into one Linear in some families). The injections live on the clone only;
- the forward is the model's own ``apply_model`` (its model sampling, conditioning as
  ``extra_conds`` builds it, its diffusion model); the model's raw output is read through a
  ``diffusion_model`` wrapper (``comfy.patcher_extension``). Flow-matching (CONST) sampling only:
  ``x_t = (1 - sigma) x0 + sigma noise`` and the output is the velocity ``noise - x0``.

ComfyUI's blocks add residuals in place (``img += ...``), which autograd refuses (or, under
checkpointing, gets silently wrong). The forward runs under ``CopyOnWriteSaved``: every tensor
autograd keeps for backward is kept as it was when saved, copied only if ComfyUI then writes into
it in place, and an in-place write that was missed fails loudly in backward. No checkpointing
(nothing is recomputed from inputs that were written into since).
"""
from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import comfy.model_sampling
import comfy.patcher_extension
import comfy.sampler_helpers
import comfy.samplers
from comfy.weight_adapter.bypass import BypassInjectionManager

from ..metalora_core.lora.adapter import AdapterSet
from ..metalora_core.lora.families import ModelDims
from ..metalora_core.lora.fused import RowSlot, padded_up
from .comfy_host import (BlockMismatch, ComfyFluxCond, ComfyFluxHost, ComfyHost, canonical_to_comfy, flux_dims,
                         map_adapters)

INJECTION_KEY = "metalora_train"
_WRAPPER_KEY = "metalora_velocity"

LayerTable = dict[str, tuple[str, int, "int | None"]]  # canonical -> (ComfyUI module, first row, rows)


# ---------------------------------------------------------------- saved tensors, copy on write


class _Saved:
    __slots__ = ("tensor", "version", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor, self.version = tensor, _version(tensor)


def _version(t: torch.Tensor) -> int | None:
    return None if t.is_inference() else t._version  # inference tensors have no version counter


def _storage_key(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):  # tensor subclasses without a plain storage
        return None


def _written(func: Callable, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors a torch call writes into in place: ``add_`` and every ``*_`` method (``x += y``
    is ``add_``), ``__setitem__``, ``out=`` and ``inplace=True`` functional forms."""
    name = getattr(func, "__name__", "")
    out: list[torch.Tensor] = []
    if ((name.endswith("_") and not name.endswith("__")) or name == "__setitem__" or kwargs.get("inplace")) \
            and args and torch.is_tensor(args[0]):
        out.append(args[0])
    dest = kwargs.get("out")
    if torch.is_tensor(dest):
        out.append(dest)
    elif isinstance(dest, (tuple, list)):
        out.extend(t for t in dest if torch.is_tensor(t))
    return out


class CopyOnWriteSaved(TorchFunctionMode):
    """Keeps every tensor autograd saves in the forward as it was when saved.

    A saved-tensor hook holds each saved tensor (no copy); a torch-function mode sees every torch
    call and, before one writes into a tensor in place, replaces the held tensors that share its
    storage with copies. A held tensor whose version still moved (a write this mode could not see)
    raises in backward, as autograd itself does. Use as ``with CopyOnWriteSaved().active(): ...``.
    """

    def __init__(self) -> None:
        super().__init__()
        self._held: dict[int, list[weakref.ref]] = {}

    def _pack(self, t: torch.Tensor) -> _Saved:
        s = _Saved(t)
        key = _storage_key(t)
        if key is not None:
            self._held.setdefault(key, []).append(weakref.ref(s))
        return s

    @staticmethod
    def _unpack(s: _Saved) -> torch.Tensor:
        if s.version is not None and s.tensor._version != s.version:
            raise RuntimeError(
                f"a tensor saved for backward ({tuple(s.tensor.shape)}, {s.tensor.dtype}) was modified in place "
                "by an operation the generic ComfyUI host could not see; its gradients would be wrong")
        return s.tensor

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in _written(func, args, kwargs):
            key = _storage_key(t)
            for ref in self._held.pop(key, ()) if key is not None else ():
                s = ref()
                if s is not None:
                    with torch.no_grad():
                        s.tensor = s.tensor.clone()
                    s.version = _version(s.tensor)
        return func(*args, **kwargs)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack), self:
            yield
        self._held.clear()  # writes after the forward are not ours; held tensors stay held


# ---------------------------------------------------------------- adapters through ComfyUI's bypass


class LayerDelta:
    """A ComfyUI bypass adapter (``h(x, base_out)``, ``g(y)``) for one Linear: the sum of the
    canonical adapters mapped onto it, each ``scale * Up(Mid(Down(x)))`` in its own row slice."""

    def __init__(self, slots: list[RowSlot], out_features: int) -> None:
        self.slots, self.out_features = slots, out_features
        self.multiplier = 1.0  # set by BypassForwardHook from the injection's strength

    def h(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        hidden = torch.cat([s.adapter.low_rank(x) for s in self.slots], dim=-1)  # (..., sum r) float32
        b = torch.cat([padded_up(s, self.out_features) for s in self.slots], dim=1)  # (out, sum r): each Up in its rows
        if self.multiplier != 1.0:
            b = b * self.multiplier
        return F.linear(hidden.to(base_out.dtype), b.to(base_out.dtype))

    def g(self, y: torch.Tensor) -> torch.Tensor:
        return y


class _Detach:
    def __init__(self, host: "ComfyGenericHost", plain_forward: list[nn.Module]) -> None:
        self._host, self._plain = host, plain_forward

    def remove(self) -> None:
        host = self._host
        if host.patcher is not None:
            host.patcher.eject_model()  # the shared modules get their own forward back
            for m in self._plain:  # ComfyUI's eject leaves the bound forward on the instance
                m.__dict__.pop("forward", None)
        host.patcher = None  # the clone (and its injections) is dropped


def family_layers(dims: ModelDims) -> LayerTable:
    """The layer table of ``dims``' model family, from its ComfyUI name table: a ComfyUI module
    holds the outputs of its canonical layers side by side, in the table's order."""
    family = dims.family
    widths = family.resolve("all", dims)
    out: LayerTable = {}
    for module, names in family.comfy_modules(dims).items():
        row = 0
        for name in names:
            out[name] = (module, row, widths[name][1])
            row += widths[name][1]
    return out


# ---------------------------------------------------------------- the host


class ComfyGenericHost(ComfyHost):
    """FlowHost on any flow-matching ComfyUI ``ModelPatcher``; the caller's patcher is never modified.

    Args:
        model: the caller's MODEL; only a clone of it gets the adapters.
        dims: the widths and depth the canonical layer names and the prior are sized by.
        layers: canonical layer name -> (ComfyUI module name under ``diffusion_model``, first output
            row, rows or None for all): the family's layer table (FLUX.1: ``canonical_to_comfy``).
        vae: the ComfyUI VAE that ``encode_images`` uses (and previews decode with).

    Raises:
        ValueError: the model's sampling is not flow matching as the trainer draws it.
    """

    def __init__(self, model: Any, *, dims: ModelDims, layers: LayerTable, vae: Any = None) -> None:
        super().__init__(model, vae=vae)
        sampling = model.get_model_object("model_sampling")  # with a sampling node's override
        if not isinstance(sampling, comfy.model_sampling.CONST) or getattr(sampling, "noise_scale", 1.0) != 1.0:
            kind = "/".join(c.__name__ for c in type(sampling).__mro__[1:3])
            raise ValueError(f"MetaLoRA trains flow-matching models (x_t = (1 - sigma) x0 + sigma noise); this MODEL "
                             f"({type(model.model).__name__}) samples with {kind}")
        self.dims, self.layers = dims, layers
        self.checkpoint_every = 0  # no checkpointing on this path: see the module docstring

    @classmethod
    def flux(cls, model: Any, *, vae: Any = None) -> "ComfyGenericHost":
        """The generic host on a ComfyUI FLUX.1 MODEL, with the fast host's layer table."""
        return cls(model, dims=flux_dims(model), layers=canonical_to_comfy(model), vae=vae)

    @classmethod
    def of_family(cls, model: Any, dims: ModelDims, *, vae: Any = None) -> "ComfyGenericHost":
        """The generic host with the layer table of ``dims``' model family (``family_layers``)."""
        return cls(model, dims=dims, layers=family_layers(dims), vae=vae)

    def attach(self, adapters: AdapterSet) -> _Detach:
        """Clones the patcher and gives the clone a bypass injection per adapted Linear."""
        slots = map_adapters(self.source, adapters, self.layers)
        dm = self.source.model.diffusion_model
        manager = BypassInjectionManager()
        for name, ss in slots.items():
            manager.add_adapter(name, LayerDelta(ss, dm.get_submodule(name).out_features))
        clone = self.source.clone()
        clone.set_injections(INJECTION_KEY, manager.create_injections(dm))
        plain = [dm.get_submodule(n) for n in slots if "forward" not in dm.get_submodule(n).__dict__]
        self.patcher = clone
        return _Detach(self, plain)

    def model_conds(self, cond: Any, x_t: torch.Tensor) -> dict[str, Any]:
        """The conditioning as the model's ``apply_model`` takes it, built by ComfyUI's own
        ``extra_conds`` (what a sampler does): text tokens, pooled output, guidance, ...."""
        entry: dict[str, Any] = {"cross_attn": cond.context}
        if getattr(cond, "y", None) is not None:
            entry["pooled_output"] = cond.y
        entry["guidance"] = float(cond.guidance)
        patcher = self.patcher if self.patcher is not None else self.source
        dev = self.device
        conds = comfy.sampler_helpers.convert_cond([[entry.pop("cross_attn"), entry]])
        conds = comfy.samplers.encode_model_conds(patcher.model.extra_conds, conds, x_t, dev, "positive")
        return {k: c.process_cond(batch_size=x_t.shape[0], area=None).cond for k, c in conds[0]["model_conds"].items()}

    def predict(self, x_t: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        """Flow velocity ``noise - x0`` for (B, C, h, w) model-space latents and (B,) sigmas: the
        model's ``apply_model`` output before its ``calculate_denoised``."""
        patcher = self.patcher if self.patcher is not None else self.source
        dev = self.device
        x = x_t.to(dev)
        if self.patcher is not None and not self.patcher.is_injected:  # ComfyUI unloaded it meanwhile
            self.patcher.inject_model()
        raw: list[torch.Tensor] = []

        def keep_output(executor, *args, **kwargs):
            out = executor(*args, **kwargs)
            raw.append(out)
            return out

        topts = comfy.patcher_extension.copy_nested_dicts(patcher.model_options.get("transformer_options", {}))
        wrappers = topts.setdefault("wrappers", {})
        comfy.patcher_extension.merge_nested_dicts(wrappers, patcher.wrappers, copy_dict1=False)
        wrappers.setdefault(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, {})[_WRAPPER_KEY] = [keep_output]
        conds = self.model_conds(cond, x)
        record = torch.is_grad_enabled()
        with CopyOnWriteSaved().active() if record else contextlib.nullcontext():
            denoised = patcher.model.apply_model(x, sigma.to(dev, x.dtype), transformer_options=topts, **conds)
        if len(raw) != 1 or not torch.is_tensor(raw[0]) or raw[0].shape != x.shape:
            # a family without the wrapper (or with packed outputs): the velocity from the denoised latent
            return (x - denoised) / sigma.to(dev, denoised.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return raw[0]


def flux_host_or_generic(host: ComfyFluxHost, cond: ComfyFluxCond) -> tuple[Any, str | None]:
    """The fast FLUX host when its block copy agrees with this ComfyUI, else the generic host on the
    same MODEL and VAE, with the one line that says so."""
    try:
        host.self_check(cond)
    except BlockMismatch as e:
        note = (f"{e.args[0].split('; ')[0]}: training through ComfyUI's own model instead (more memory: no "
                "gradient checkpointing)")
        return ComfyGenericHost.flux(host.source, vae=host.vae), note
    return host, None
