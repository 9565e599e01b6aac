"""The ComfyUI FLUX host: Stage-2 training through ComfyUI's own FLUX model.

Implements ``metalora_core.train.host.FlowHost`` on a ComfyUI ``ModelPatcher`` of a FLUX model.

How adapters reach the model: nothing is hooked into the (shared) torch modules. Training
works on a *clone* of the caller's patcher and replaces every FLUX block of that clone through
ComfyUI's documented block-replace mechanism (``patches_replace["dit"]``, set with
``ModelPatcher.set_model_patch_replace``). The replacement block is an out-of-place copy of
ComfyUI's ``DoubleStreamBlock`` / ``SingleStreamBlock`` forward (ComfyUI's own blocks add
residuals in place, which breaks autograd and, under checkpointing, silently gives wrong
gradients: the tests measure both against a float64 reference). Inside it every Linear call goes through
``_linear``: the base module's output plus, in bypass form, the delta of each canonical adapter
mapped onto that module, written into its own row slice (ComfyUI fuses q/k/v into ``qkv`` and
q/k/v/mlp into ``linear1``; the slices come from ``comfy.utils.flux_to_diffusers``). The
patches live only in the clone's ``model_options``; the caller's patcher never sees them.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import comfy.model_management
import comfy.utils

from PIL import Image

from ..metalora_core.formats.files import sha256_tensors
from ..metalora_core.formats.store import weights_identity
from ..metalora_core.lora.adapter import AdapterSet, frozen_meta
from ..metalora_core.lora.fused import DeviceMemo, FusedLinears, RowSlot, first_disagreement, run_block
from ..metalora_core.lora.fp8 import FP8_DTYPES, stored_linear
from ..metalora_core.lora.layers import FluxDims, check_checkpoint_every
from ..metalora_core.lora.modulation import (Recompute, gated_modulated_norm, gated_residual, modulated_norm,
                                              plain_modulated_norm)
from .latents import VaeEncoder

log = logging.getLogger(__name__)


@dataclass
class ComfyFluxCond:
    """One caption's conditioning as the FLUX model takes it."""

    context: torch.Tensor  # (1, L, joint_dim) text tokens (T5 states)
    y: torch.Tensor | None  # (1, vec_in_dim) pooled CLIP output
    guidance: float = 1.0  # distilled-guidance input while training

    @classmethod
    def from_conditioning(cls, conditioning: list, guidance: float | None = None) -> "ComfyFluxCond":
        """Reads a ComfyUI CONDITIONING (first entry: [tensor, {"pooled_output": ..., "guidance": ...}]).

        Args:
            guidance: overrides the conditioning's own ``guidance`` entry (set by a FluxGuidance
                node); without either, 1.0 (what ai-toolkit trains FLUX.1-dev at).
        """
        if not conditioning:
            raise ValueError("the positive CONDITIONING is empty; connect a CLIPTextEncode of the class caption")
        context, extra = conditioning[0][0], conditioning[0][1]
        if context.ndim != 3:
            raise ValueError(f"conditioning tensor has shape {tuple(context.shape)}; expected (1, tokens, width)")
        pooled = extra.get("pooled_output")
        if guidance is None:
            guidance = extra.get("guidance")
        # clone(): outside inference mode this makes normal tensors of ComfyUI's inference tensors
        return cls(context=context[:1].detach().float().cpu().clone(),
                   y=None if pooled is None else pooled[:1].detach().float().cpu().clone(),
                   guidance=1.0 if guidance is None else float(guidance))

    def digest(self) -> str:
        """sha256 over the text tokens, the pooled output and the guidance value."""
        t = {"context": self.context, "guidance": torch.tensor([self.guidance], dtype=torch.float64)}
        if self.y is not None:
            t["y"] = self.y
        return sha256_tensors(t)


MODULATION_SUFFIXES = ("_mod.lin", ".modulation.lin")  # ComfyUI's FLUX: img_mod, txt_mod; single blocks' modulation


def flux_dims(model_patcher: Any) -> FluxDims:
    """FluxDims of a ComfyUI FLUX patcher (raises ValueError for other models)."""
    dm = model_patcher.model.diffusion_model
    params = getattr(dm, "params", None)
    if params is None or not hasattr(dm, "double_blocks") or not hasattr(dm, "single_blocks"):
        raise ValueError(f"MetaLoRA trains FLUX models; this MODEL is {type(model_patcher.model).__name__}")
    hidden = int(params.hidden_size)
    return FluxDims(hidden=hidden, mlp_hidden=int(hidden * params.mlp_ratio),
                    num_double=len(dm.double_blocks), num_single=len(dm.single_blocks))


def canonical_to_comfy(model_patcher: Any) -> dict[str, tuple[str, int, int]]:
    """canonical diffusers layer -> (ComfyUI module name, first row, rows) via ComfyUI's own map."""
    unet_config = dict(model_patcher.model.model_config.unet_config)
    out = {}
    for key, target in comfy.utils.flux_to_diffusers(unet_config, output_prefix="").items():
        if not key.endswith(".weight"):
            continue
        if isinstance(target, str) or target[1] is None:  # a whole module (or a non-slice transform)
            if not isinstance(target, str) and len(target) > 2:
                continue
            module, start, size = target if isinstance(target, str) else target[0], 0, None
        else:
            module, (dim, start, size) = target[0], target[1]
            if dim != 0:
                continue
        out[key[: -len(".weight")]] = (module[: -len(".weight")], start, size)
    return out


def map_adapters(model_patcher: Any, adapters: AdapterSet,
                 table: dict[str, tuple[str, int, int | None]] | None = None) -> dict[str, list[RowSlot]]:
    """Groups adapters by the ComfyUI Linear they write to, each with its row slice.

    Args:
        table: canonical layer -> (ComfyUI module name, first row, rows or None for all); None:
            FLUX's (``canonical_to_comfy``).

    Raises:
        ValueError: a canonical layer has no ComfyUI counterpart or the shapes disagree.
    """
    table = canonical_to_comfy(model_patcher) if table is None else table
    dm = model_patcher.model.diffusion_model
    out: dict[str, list[RowSlot]] = {}
    for name, a in adapters.items():
        if name not in table:
            raise ValueError(f"layer {name!r} has no counterpart in this ComfyUI {type(model_patcher.model).__name__} "
                             "model")
        module_name, start, size = table[name]
        mod = dm.get_submodule(module_name)
        size = mod.out_features if size is None else size
        if mod.in_features != a.in_features or size != a.out_features or start + size > mod.out_features:
            raise ValueError(f"layer {name!r} -> {module_name} rows {start}:{start + size} of "
                             f"({mod.in_features} -> {mod.out_features}); adapter is "
                             f"({a.in_features} -> {a.out_features})")
        out.setdefault(module_name, []).append(RowSlot(a, start, size))
    return out


class BlockMismatch(RuntimeError):
    """This ComfyUI's FLUX block computes differently from the out-of-place training copy."""


class _Blocks:
    """Out-of-place FLUX block forwards with bypass adapters (the ``patches_replace`` targets)."""

    def __init__(self, diffusion_model: nn.Module, slots: dict[str, list[RowSlot]], checkpoint_every: int = 0):
        self.dm, self.slots = diffusion_model, slots
        self.checkpoint_every = check_checkpoint_every(checkpoint_every)
        self.fp8_recast = True  # False: ComfyUI's own cast (keeps a compute-dtype copy of each weight)
        self.adapters_on = True
        self.checked: set[str] = set()  # block kinds already compared with ComfyUI's own block
        # Stage-2 Meta-LoRA modules (every adapter with a frozen Down and a Mid): one addmm per call;
        # every block's modulation Linear reads silu(vec): one silu and one Down projection per step
        fast = [name for name, ss in slots.items() if all(frozen_meta(x.adapter) for x in ss)]
        self.linears = FusedLinears(slots, {n: diffusion_model.get_submodule(n).out_features for n in slots}, fast,
                                    held=[tuple(n for n in sorted(fast) if n.endswith(MODULATION_SUFFIXES))])

    def new_step(self, dtype: torch.dtype) -> None:
        """Builds the fused factors of every adapted module for one forward (and its backward).

        Built here, before the blocks run, so none of it happens inside a checkpointed block.
        """
        self.linears.new_step(dtype if self.adapters_on else None, build=True)

    def _base(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The frozen Linear. Weights stored in another dtype than the compute dtype (fp8, or bf16
        computed in float32) are cast inside an autograd Function that keeps the stored weight for
        backward and casts it again there (ComfyUI's cast would keep a compute-dtype copy of each)."""
        w = getattr(module, "weight", None)
        if (self.fp8_recast and torch.is_grad_enabled() and x.requires_grad and type(w) is nn.Parameter
                and w.dtype != x.dtype and (w.dtype in FP8_DTYPES or w.is_floating_point())
                and w.device == x.device and getattr(module, "comfy_cast_weights", False)
                and not getattr(module, "weight_function", None) and not getattr(module, "bias_function", None)
                and getattr(module, "scale_weight", None) is None and getattr(module, "scale_input", None) is None):
            return stored_linear(x, w, module.bias)
        return module(x)

    def _linear(self, name: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The ComfyUI Linear ``name`` plus its adapters' update (``FusedLinears.forward``)."""
        if not self.adapters_on:
            return self._base(module, x)
        return self.linears.forward(name, lambda x_: self._base(module, x_), x)

    def _linear_again(self, name: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``_linear(name, module, x)`` computed again without autograd (for a backward that
        recomputes it instead of keeping it), with the forward's bits (``FusedLinears.again``)."""
        if not self.adapters_on:
            with torch.no_grad():
                return self._base(module, x)
        return self.linears.again(name, lambda x_: self._base(module, x_), x)

    def _projection_again(self, raw: torch.Tensor | None, name: str, module: nn.Module,
                          tokens: slice) -> Recompute | None:
        """The attention output projection ``name`` of the tokens ``tokens``, computed again in
        backward from the attention kernel's own output ``raw`` (B, H, L, D) for the gate's
        gradient, instead of kept: PyTorch's attention kernels keep ``raw`` for their own backward
        anyway. None (the output is kept) without ``raw`` (none without autograd) or adapters."""
        if raw is None or not self.adapters_on:
            return None

        def fn(r: torch.Tensor) -> torch.Tensor:
            r = r[:, :, tokens]
            return self._linear_again(name, module, r.transpose(1, 2).reshape(r.shape[0], r.shape[2], -1))

        return Recompute(raw, fn)

    @staticmethod
    def _attention(q, k, v, pe, mask, transformer_options) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``comfy.ldm.flux.math.attention``, the same ComfyUI functions, asked for the output before
        its reshape: (the attention kernel's own output (B, H, L, D), or None, the output (B, L,
        H * D)). The kernel's output comes back where PyTorch's fused attention kernels made it:
        they keep it for their own backward (attention that ComfyUI computes in chunks keeps
        nothing of it, so computing a projection again from it would keep as much as it saves)."""
        import comfy.ldm.flux.math as flux_math

        if pe is not None:
            q, k = flux_math.apply_rope(q, k, pe)
        out = flux_math.optimized_attention(q, k, v, q.shape[1], skip_reshape=True, skip_output_reshape=True,
                                            mask=mask, transformer_options=transformer_options)
        if out.ndim != 4:  # an attention without the option
            return None, out
        kernel = type(out.grad_fn).__name__ if out.grad_fn is not None else ""
        kept = kernel.startswith("ScaledDotProduct") and "Math" not in kernel
        return (out if kept else None), out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)

    def _seq(self, name: str, seq: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(seq, nn.Sequential):
            raise ValueError(f"{name}: MLP type {type(seq).__name__} is not supported for training (FLUX.1 only)")
        for i, m in enumerate(seq):
            x = self._linear(f"{name}.{i}", m, x) if hasattr(m, "in_features") else m(x)
        return x

    def _silu_vec(self, vec: torch.Tensor) -> torch.Tensor:
        """``silu(vec)`` (B, 1, width), computed once per step for every block's modulation. With the
        adapters off, once per block, as ComfyUI's own blocks do (the bare step it is measured against)."""
        def view(v: torch.Tensor) -> torch.Tensor:
            return v[:, None, :] if v.ndim == 2 else v

        return self.linears.silu(vec, view) if self.adapters_on else F.silu(view(vec))

    def _gated(self, residual: torch.Tensor, gate: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``residual + gate * out`` out of place: one op forward, three backward while training
        (``gated_residual``); with the adapters off, as ComfyUI's own blocks compute it (the bare
        step measured against)."""
        return gated_residual(residual, gate, out) if self.adapters_on else residual + gate * out

    def _norm(self, norm: nn.Module, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``norm(x) * (1 + scale) + shift``: ``modulated_norm`` while training; with the adapters
        off, the plain ops (the bare step measured against)."""
        return (modulated_norm if self.adapters_on else plain_modulated_norm)(norm, x, shift, scale)

    def _gated_norm(self, norm: nn.Module, residual: torch.Tensor, gate: torch.Tensor, out: torch.Tensor,
                    shift: torch.Tensor, scale: torch.Tensor,
                    again: Recompute | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, norm(y) * (1 + scale) + shift)`` with ``y = residual + gate * out``:
        ``gated_modulated_norm`` while training (``again``: ``out`` computed again in backward);
        with the adapters off, the plain ops."""
        if self.adapters_on:
            return gated_modulated_norm(norm, residual, gate, out, shift, scale, again)
        y = self._gated(residual, gate, out)
        return y, self._norm(norm, y, shift, scale)

    def _mod(self, name: str, mod: nn.Module, vec: torch.Tensor) -> list[torch.Tensor]:
        return self._linear(f"{name}.lin", mod.lin, self._silu_vec(vec)).chunk(mod.multiplier, dim=-1)

    @staticmethod
    def _pe(pe: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
        # rope tables are float32; promote (never demote) so a float64 reference stays float64
        return None if pe is None else pe.to(torch.promote_types(pe.dtype, like.dtype))

    @staticmethod
    def _qkv(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, ...]:
        return qkv.view(qkv.shape[0], qkv.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, D)

    def double(self, i: int, img, txt, vec, pe, attn_mask, transformer_options):
        b, p = self.dm.double_blocks[i], f"double_blocks.{i}"
        if not b.modulation:
            raise ValueError("FLUX models without per-block modulation are not supported for training")
        i_sh1, i_sc1, i_g1, i_sh2, i_sc2, i_g2 = self._mod(f"{p}.img_mod", b.img_mod, vec)
        t_sh1, t_sc1, t_g1, t_sh2, t_sc2, t_g2 = self._mod(f"{p}.txt_mod", b.txt_mod, vec)
        iq, ik, iv = self._qkv(self._linear(f"{p}.img_attn.qkv", b.img_attn.qkv,
                                            self._norm(b.img_norm1, img, i_sh1, i_sc1)), b.num_heads)
        iq, ik = b.img_attn.norm(iq, ik, iv)
        tq, tk, tv = self._qkv(self._linear(f"{p}.txt_attn.qkv", b.txt_attn.qkv,
                                            self._norm(b.txt_norm1, txt, t_sh1, t_sc1)), b.num_heads)
        tq, tk = b.txt_attn.norm(tq, tk, tv)
        q, k, v = torch.cat((tq, iq), 2), torch.cat((tk, ik), 2), torch.cat((tv, iv), 2)  # (B, H, L, D)
        raw, attn = self._attention(q, k, v, self._pe(pe, q), attn_mask, transformer_options)
        text, image = slice(None, txt.shape[1]), slice(txt.shape[1], None)
        i_out = self._linear(f"{p}.img_attn.proj", b.img_attn.proj, attn[:, image])
        img, i_n2 = self._gated_norm(b.img_norm2, img, i_g1, i_out, i_sh2, i_sc2,
                                     self._projection_again(raw, f"{p}.img_attn.proj", b.img_attn.proj, image))
        img = self._gated(img, i_g2, self._seq(f"{p}.img_mlp", b.img_mlp, i_n2))
        t_out = self._linear(f"{p}.txt_attn.proj", b.txt_attn.proj, attn[:, text])
        txt, t_n2 = self._gated_norm(b.txt_norm2, txt, t_g1, t_out, t_sh2, t_sc2,
                                     self._projection_again(raw, f"{p}.txt_attn.proj", b.txt_attn.proj, text))
        txt = self._gated(txt, t_g2, self._seq(f"{p}.txt_mlp", b.txt_mlp, t_n2))
        return img, txt

    def single(self, i: int, x, vec, pe, attn_mask, transformer_options):
        from comfy.ldm.flux.math import attention

        b, p = self.dm.single_blocks[i], f"single_blocks.{i}"
        if b.modulation is None or b.yak_mlp or b.mlp_hidden_dim_first != b.mlp_hidden_dim:
            raise ValueError("only FLUX.1-style single blocks are supported for training")
        shift, scale, gate = self._mod(f"{p}.modulation", b.modulation, vec)
        h = self._linear(f"{p}.linear1", b.linear1, self._norm(b.pre_norm, x, shift, scale))
        qkv, mlp = torch.split(h, [3 * b.hidden_size, b.mlp_hidden_dim_first], dim=-1)
        q, k, v = self._qkv(qkv, b.num_heads)
        q, k = b.norm(q, k, v)
        attn = attention(q, k, v, pe=self._pe(pe, q), mask=attn_mask, transformer_options=transformer_options)
        out = self._linear(f"{p}.linear2", b.linear2, torch.cat((attn, b.mlp_act(mlp)), 2))
        return self._gated(x, gate, out)

    def _run(self, index: int, fn, *args):
        """Runs block ``index`` (double blocks first, then single), checkpointed every k-th block."""
        return run_block(index, self.checkpoint_every, fn, *args)

    def check_against_comfy(self, kind: str, i: int, args: dict, original) -> None:
        """Compares this out-of-place copy (adapters off) with ComfyUI's own block, once per kind.

        The copy mirrors ComfyUI's block code; if a ComfyUI update changes that code, training
        would silently optimise a different model, so the run stops with a clear error instead.
        """
        self.checked.add(kind)
        rest = (args["vec"], args["pe"], args.get("attn_mask"), args.get("transformer_options", {}))
        with torch.no_grad():
            # ComfyUI's blocks add residuals in place: give them copies of the inputs
            ref = original({k: v.clone() if torch.is_tensor(v) else v for k, v in args.items()})
            adapters_on, self.adapters_on = self.adapters_on, False
            try:
                mine = (dict(zip(("img", "txt"), self.double(i, args["img"], args["txt"], *rest))) if kind == "double"
                        else {"img": self.single(i, args["img"], *rest)})
            finally:
                self.adapters_on = adapters_on
        worst = first_disagreement(mine, ref)
        if worst is not None:
            raise BlockMismatch(
                f"this ComfyUI's FLUX {kind} block computes differently from MetaLoRA's training copy "
                f"(largest difference {worst[1]:.3g} in '{worst[0]}'); training would optimise the wrong model, so it "
                "stops here. Update ComfyUI-MetaLoRA to a release made for this ComfyUI version."
            )

    def double_patch(self, i: int):
        def patch(args: dict, extra: dict) -> dict:
            if "double" not in self.checked:
                self.check_against_comfy("double", i, args, extra["original_block"])
            img, txt = self._run(i, lambda *a: self.double(i, *a), args["img"], args["txt"], args["vec"], args["pe"],
                                 args.get("attn_mask"), args.get("transformer_options", {}))
            return {"img": img, "txt": txt}
        return patch

    def single_patch(self, i: int):
        def patch(args: dict, extra: dict) -> dict:
            if "single" not in self.checked:
                self.check_against_comfy("single", i, args, extra["original_block"])
            x = self._run(len(self.dm.double_blocks) + i, lambda *a: self.single(i, *a), args["img"], args["vec"], args["pe"],
                          args.get("attn_mask"), args.get("transformer_options", {}))
            return {"img": x}
        return patch


def release_inference_tensors(module: nn.Module) -> int:
    """Replaces inference-mode weights of ``module`` with equal normal tensors; returns how many.

    ComfyUI loads models inside ``torch.inference_mode()``; autograd refuses to save such
    tensors for backward (``Inference tensors cannot be saved for backward``), even frozen ones.
    The values are unchanged (ComfyUI itself swaps Parameter objects when it patches weights,
    and its weight backups are untouched), so the caller's model computes exactly the same.
    """
    n = 0
    with torch.inference_mode(False), torch.no_grad():
        for m in module.modules():
            for name, p in list(m._parameters.items()):
                if p is not None and p.is_inference():
                    m._parameters[name] = nn.Parameter(p.clone(), requires_grad=False)
                    n += 1
            for name, b in list(m._buffers.items()):
                if b is not None and b.is_inference():
                    m._buffers[name] = b.clone()
                    n += 1
    return n


class _Detach:
    def __init__(self, host: "ComfyFluxHost") -> None:
        self._host = host

    def remove(self) -> None:
        self._host._blocks = None
        self._host.patcher = None  # the clone (and its patches) is dropped


class ComfyHost:
    """What every ComfyUI host shares: the caller's MODEL (never modified), its VAE, latents, identity.

    Args:
        model: the caller's MODEL; training patches only a clone of it.
        vae: the ComfyUI VAE that ``encode_images`` uses (and previews decode with).
    """

    def __init__(self, model: Any, *, vae: Any = None) -> None:
        self.source = model
        self.vae = vae
        self.patcher: Any = None

    @property
    def device(self) -> torch.device:
        return self.source.load_device

    @property
    def dtype(self) -> torch.dtype:
        return self.source.model.get_dtype_inference()

    def encode_images(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        """VAE-encodes images into the model's latent space: (C, h, w) each.

        Images encoded before by the same VAE (equal pixels) come from ``latents.CACHE``.
        """
        return [self.source.model.process_latent_in(z).float() for z in self.encoder(images)]

    @property
    def encoder(self) -> VaeEncoder:
        """The host's VAE as a ``VaeEncoder``: raw VAE latents through ``latents.CACHE``."""
        if self.vae is None:
            raise ValueError(f"this {type(self).__name__} has no VAE; pass vae= (the model's VAE) to encode images")
        if getattr(self, "_encoder", None) is None:
            self._encoder = VaeEncoder(self.vae)
        return self._encoder

    def collate(self, conds: Sequence[Any]) -> Any:
        """The shared conditioning of a batch (ComfyUI's Stage-2 trains one caption)."""
        first = conds[0]
        if any(c is not first for c in conds):
            raise ValueError("the ComfyUI host trains one caption per run; every batch item must share its "
                             "conditioning")
        return first

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        """Loads the attached clone through ComfyUI's memory manager (its injections in place, if
        it has any); ``in_training`` only inside."""
        if self.patcher is None:
            raise RuntimeError("attach adapters before training")
        comfy.model_management.load_models_gpu([self.patcher], force_full_load=True)
        self.patcher.inject_model()  # a no-op when loading injected them, or with no injections
        release_inference_tensors(self.patcher.model.diffusion_model)
        previous = comfy.model_management.in_training
        comfy.model_management.in_training = True
        try:
            with torch.inference_mode(False):
                yield
        finally:
            comfy.model_management.in_training = previous

    def identity(self) -> str:
        """See ``model_identity``."""
        return model_identity(self.source)


class ComfyFluxHost(ComfyHost):
    """FlowHost on a ComfyUI FLUX ``ModelPatcher``; the caller's patcher is never modified.

    Args:
        model: the caller's MODEL (FLUX); only a clone of it is patched.
        vae: the ComfyUI VAE that ``encode_images`` uses (and previews decode with).
        checkpoint_every: recompute blocks in backward (torch.utils.checkpoint, non-reentrant) to
            save activation memory, every k-th block (double blocks then single blocks, counted
            from 0): 0 none, 1 all of them. It may be set after construction (planned from
            ``dims``, see ``nodes.training.checkpoint_plan``); ``attach`` reads it.

    The distilled-guidance input comes from the conditioning (``ComfyFluxCond.guidance``).
    """

    def __init__(self, model: Any, *, vae: Any = None, checkpoint_every: int = 0) -> None:
        super().__init__(model, vae=vae)
        self.checkpoint_every = check_checkpoint_every(checkpoint_every)
        self.dims = flux_dims(model)
        self._blocks: _Blocks | None = None
        self._cond_memo = DeviceMemo()

    def _on_device(self, cond: ComfyFluxCond, dev, dt) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The conditioning on the device, copied once per caption (not once per step)."""
        return self._cond_memo.get((cond.context, cond.y), dev, dt)

    def _patched(self, slots: dict[str, list[RowSlot]]) -> tuple[Any, _Blocks]:
        """A clone of the caller's patcher whose every block is replaced by the out-of-place one."""
        dm = self.source.model.diffusion_model
        clone = self.source.clone()
        blocks = _Blocks(dm, slots, self.checkpoint_every)
        for i in range(len(dm.double_blocks)):
            clone.set_model_patch_replace(blocks.double_patch(i), "dit", "double_block", i)
        for i in range(len(dm.single_blocks)):
            clone.set_model_patch_replace(blocks.single_patch(i), "dit", "single_block", i)
        return clone, blocks

    def attach(self, adapters: AdapterSet) -> _Detach:
        """Clones the patcher and replaces every block of the clone with the adapted one."""
        self.patcher, self._blocks = self._patched(map_adapters(self.source, adapters))
        return _Detach(self)

    def self_check(self, cond: ComfyFluxCond) -> None:
        """Compares each block kind of the training copy with this ComfyUI's own block, before any
        training: one forward without autograd of a small noisy latent (8x8) through a clone whose
        blocks run the comparison (``_Blocks.check_against_comfy``).

        Raises:
            BlockMismatch: a block kind computes differently from ComfyUI's.
        """
        if self.patcher is not None:
            raise RuntimeError("self_check runs before adapters are attached")
        clone, blocks = self._patched({})
        channels = int(self.source.model.latent_format.latent_channels)
        x = torch.randn(1, channels, 8, 8, generator=torch.Generator().manual_seed(0))
        comfy.model_management.load_models_gpu([clone])
        self.patcher, self._blocks = clone, blocks
        previous = comfy.model_management.in_training
        comfy.model_management.in_training = True  # the functions the blocks call while training
        try:
            with torch.no_grad():
                self.predict(x, torch.tensor([0.5]), cond)
        finally:
            self.patcher = self._blocks = None
            comfy.model_management.in_training = previous

    def predict(self, x_t: torch.Tensor, sigma: torch.Tensor, cond: ComfyFluxCond) -> torch.Tensor:
        """Flow velocity ``noise - x0`` for (B, C, h, w) model-space latents and (B,) sigmas."""
        patcher = self.patcher if self.patcher is not None else self.source
        if self._blocks is not None:
            self._blocks.new_step(self.dtype)  # the adapters may have changed since the last forward
        base = patcher.model
        dev, dt = self.device, self.dtype
        b = x_t.shape[0]
        t = base.model_sampling.timestep(sigma.to(dev)).float()  # FLUX: t = sigma
        kwargs = {"guidance": torch.full((b,), cond.guidance, device=dev, dtype=dt)}
        context, y = self._on_device(cond, dev, dt)
        if y is not None:
            kwargs["y"] = y.expand(b, -1)
        topts = dict(patcher.model_options.get("transformer_options", {}))
        out = base.diffusion_model(x_t.to(dev, dt), t, context=context.expand(b, -1, -1),
                                   transformer_options=topts, **kwargs)
        return out  # CONST sampling: denoised = x_t - sigma * out, so out is the velocity


def _patch_digest(value: Any, h: "hashlib._Hash") -> None:
    """Feeds a ComfyUI weight patch (tensors, LoRA adapter objects, tuples, numbers) into ``h``."""
    if torch.is_tensor(value):
        h.update(sha256_tensors({"t": value}).encode())
    elif isinstance(value, (list, tuple)):
        h.update(f"[{len(value)}".encode())
        for v in value:
            _patch_digest(v, h)
    elif hasattr(value, "weights"):  # comfy.weight_adapter adapters (LoRA, LoHa, ...): their tensors
        h.update(type(value).__name__.encode())
        _patch_digest(value.weights, h)
    else:
        h.update(repr(value).encode())


def weights_as_loaded(model: Any, prefix: str = "diffusion_model.") -> dict[str, torch.Tensor]:
    """The weights of a patcher's module under ``prefix`` (the diffusion model; "": the whole
    module, e.g. a VAE's) without the patches a loaded clone applied in place.

    All clones of a model share one ``backup`` (ComfyUI's ``get_clone_model_override``) that
    holds the original of every weight a clone patched in place; it is emptied on unpatch.
    """
    backup = getattr(model, "backup", {}) or {}
    root = model.model.get_submodule(prefix.rstrip(".")) if prefix else model.model
    state = {}
    for k, v in root.state_dict().items():
        bk = backup.get(prefix + k)
        state[k] = bk.weight if bk is not None else v
    return state


def model_identity(model: Any, prefix: str = "diffusion_model.") -> str:
    """Content identity of a ComfyUI MODEL as loaded plus its own weight patches.

    Live ``diffusion_model`` weights are not what identifies it: ComfyUI patches them in place
    while a LoRA-applied clone of the same model is loaded (after an Apply + sample), so they
    change with what ran before. All clones of a model share one ``backup`` of the weights they
    patched; reading each patched weight from it gives the weights as loaded, whatever clone is
    loaded now. The caller's own patches (a LoRA loaded before training) are part of the model
    it trains on: their keys, strengths and tensors are hashed too. ``prefix`` as in
    ``weights_as_loaded`` ("" for a VAE's patcher).
    """
    state = weights_as_loaded(model, prefix)
    h = hashlib.sha256()
    h.update(type(model.model).__name__.encode())
    for k in sorted(model.patches):
        h.update(k.encode())
        for p in model.patches[k]:  # (strength_patch, patch, strength_model, offset, function)
            extras = [getattr(v, "__qualname__", v) for v in p[2:]]
            h.update(f"{p[0]}:{extras};".encode())
            _patch_digest(p[1], h)
    return weights_identity(state, extra=h.hexdigest())
