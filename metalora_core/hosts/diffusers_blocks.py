"""Training forwards of diffusers' FLUX blocks for the diffusers host.

While adapters are attached and autograd records, every ``FluxTransformerBlock`` and
``FluxSingleTransformerBlock`` runs ``double_forward`` / ``single_forward`` instead of its own
forward. They compute what diffusers' block code computes, step for step, with four changes to
what backward keeps and how many ops run (the values agree to rounding: one sample's affine
LayerNorm rounds once where the plain ops round twice):

- FLUX's modulated LayerNorms go through ``lora.modulation.modulated_norm``: one sample's trained
  modulation is one affine LayerNorm, and nothing keeps the normalised input;
- the gated sum before a double block's MLP LayerNorm is recomputed in backward
  (``gated_modulated_norm``), and gated residuals take one op forward (``gated_residual``);
- ``silu(temb)`` is computed once per step for every block's modulation Linear, so those
  Linears read one tensor (the adapters project it once for all of them);
- with trained gates, a double block's attention output projections (``to_out``,
  ``to_add_out``) are computed again in backward for the attention gates' gradients, from the
  attention kernel's output, instead of kept (``modulation.Recompute``): the double block runs
  ``FluxAttnProcessor``'s code itself to reach that output (``joint_attention``).

Without autograd (sampling) the blocks run diffusers' own forward; blocks of another class, whose
forward takes other arguments or whose forward something else wraps keep theirs. The first
training call of each block kind, once per host, is compared with diffusers' own forward on the
same inputs; a kind that computes differently (another diffusers release changed its code) keeps
diffusers' forward, with a warning, so training stays correct.
"""
from __future__ import annotations

import inspect
import logging
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..lora.fused import AttachHandle, StepSilu, first_disagreement
from ..lora.modulation import Recompute, gated_modulated_norm, gated_residual, modulated_norm, plain_layer_norm

log = logging.getLogger(__name__)

MODULATION_SUFFIXES = ("norm1.linear", "norm1_context.linear", "norm.linear")  # canonical names' endings


_PARAMETERS = ("self", "hidden_states", "encoder_hidden_states", "temb", "image_rotary_emb", "joint_attention_kwargs")


def _block_kind(block: nn.Module) -> str | None:
    """"double" / "single" for diffusers' FLUX blocks this module can run, else None."""
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    if "forward" in block.__dict__:  # someone else wraps this block's forward (offloading hooks, ...)
        return None
    if tuple(inspect.signature(type(block).forward).parameters) != _PARAMETERS:  # a diffusers that calls it otherwise
        return None
    if type(block) is FluxTransformerBlock:
        norms = (block.norm1, block.norm1_context)
        if (all(getattr(n, "emb", None) is None and isinstance(getattr(n, "linear", None), nn.Linear)
                and plain_layer_norm(n.norm) is not None for n in norms)
                and plain_layer_norm(block.norm2) is not None and plain_layer_norm(block.norm2_context) is not None):
            return "double"
    if type(block) is FluxSingleTransformerBlock:
        if isinstance(getattr(block.norm, "linear", None), nn.Linear) and plain_layer_norm(block.norm.norm) is not None:
            return "single"
    return None


class TrainingBlocks:
    """The training forwards of one transformer's blocks while one set of adapters is attached.

    ``install`` sets them on the blocks (an instance attribute; the classes are untouched),
    ``remove`` gives every block its own forward back.
    """

    def __init__(self, blocks: list[nn.Module], own: dict[str, bool] | None = None) -> None:
        self.blocks = [(b, _block_kind(b)) for b in blocks]
        self._again: set[int] = set()  # ids of the double blocks that ``_projections_again`` allows
        self._handle: AttachHandle | None = None
        self._names: dict[nn.Module, str] = {}
        # block kind -> compared with diffusers' forward, and agrees; a host passes one dict to all
        # its attachments, so each kind is compared once per host
        self.own: dict[str, bool] = {} if own is None else own
        self.silu = StepSilu()  # silu(temb), one tensor for every block of this step
        self._installed: list[nn.Module] = []

    @property
    def every_block(self) -> bool:
        """Every block runs a training forward (so all modulation Linears read one ``silu(temb)``)."""
        return bool(self.blocks) and all(k is not None for _, k in self.blocks)

    def install(self, handle: AttachHandle | None = None,
                names: dict[nn.Module, str] | None = None) -> "TrainingBlocks":
        """Sets the training forwards. ``handle``: the adapters' attachment, ``names``: their
        layers' names by module; a double block whose attention output projections carry no hooks
        but the attachment's computes those projections again in backward (``_projections_again``)."""
        self._handle, self._names = handle, dict(names or {})
        self._again = set() if handle is None else {
            id(b) for b, k in self.blocks if k == "double" and _projections_again(b, handle)}
        forwards = {k: _TrainingForward(self, k) for k in ("double", "single")}
        for block, kind in self.blocks:
            if kind is not None:
                block.forward = types.MethodType(forwards[kind], block)
                self._installed.append(block)
        return self

    def remove(self) -> None:
        while self._installed:
            self._installed.pop().__dict__.pop("forward", None)
        self.silu.clear()
        self._again, self._handle, self._names = set(), None, {}

    def end_step(self) -> None:
        self.silu.clear()

    def output_again(self, linear: nn.Module, rows: slice) -> Callable[[torch.Tensor], torch.Tensor]:
        """``linear``'s output computed again, in backward, from the joint attention output's
        tokens ``rows`` (``AttachHandle.output_again``)."""
        handle, name = self._handle, self._names.get(linear)
        return lambda joint: handle.output_again(name, linear, joint[:, rows].contiguous())

    def check(self, kind: str, block: nn.Module, args: tuple) -> None:
        """Compares ``kind``'s training forward with diffusers' own on ``args``.

        Both run on detached inputs with autograd on, as training does (the adapters and the
        modulated norms take their training paths), under pass-through saved-tensor hooks: what
        they keep is dropped with them and never reaches an enclosing checkpoint's (which would
        count it in forward and miss it in the recompute).
        """
        fn = _forward_of(kind)
        inputs = tuple(a.detach() if torch.is_tensor(a) else a for a in args)
        with self.silu.aside(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            ref = type(block).forward(block, *inputs)
            mine = fn(self, block, *inputs)
        names = ("encoder_hidden_states", "hidden_states")
        worst = first_disagreement(dict(zip(names, mine)), dict(zip(names, ref)))
        self.own[kind] = worst is None
        if worst is not None:
            log.warning("diffusers' FLUX %s block computes differently from MetaLoRA's training forward "
                        "(largest difference %.3g in %s); training runs diffusers' own forward, with more "
                        "memory kept for backward", kind, worst[1], worst[0])


class _TrainingForward:
    """The forward of the blocks of one kind: the training forward where the check agreed and
    autograd records, else diffusers' own.

    ``prepare`` runs the check (once per kind, eagerly); a compiled block's caller runs it before
    the compiled call (``diffusers_flux.compiled_blocks``), so no check is ever traced.
    """

    def __init__(self, blocks: TrainingBlocks, kind: str) -> None:
        self.blocks, self.kind = blocks, kind
        self.fn = _forward_of(kind)

    def prepare(self, block: nn.Module, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                joint_attention_kwargs=None) -> None:
        if torch.is_grad_enabled() and self.kind not in self.blocks.own:
            self.blocks.check(self.kind, block, (hidden_states, encoder_hidden_states, temb, image_rotary_emb,
                                                 joint_attention_kwargs))

    def __call__(self, block: nn.Module, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                 joint_attention_kwargs=None):
        args = (hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs)
        if not torch.compiler.is_compiling():
            self.prepare(block, *args)
        if torch.is_grad_enabled() and self.blocks.own.get(self.kind, False):
            return self.fn(self.blocks, block, *args)
        return type(block).forward(block, *args)


def _forward_of(kind: str) -> Callable:
    return double_forward if kind == "double" else single_forward


def _mod(linear: nn.Module, silu: torch.Tensor, n: int) -> list[torch.Tensor]:
    """The modulation Linear's output in ``n`` chunks, each (B, 1, width) to broadcast over tokens."""
    return [t[:, None] for t in linear(silu).chunk(n, dim=1)]


def _joint_attention_applies(block: nn.Module, joint_attention_kwargs: dict | None) -> bool:
    """The double block's attention (its layout checked by ``_projections_again``) is diffusers'
    ``FluxAttnProcessor`` called plainly, so ``joint_attention`` computes what it computes."""
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    return not joint_attention_kwargs and type(getattr(block.attn, "processor", None)) is FluxAttnProcessor


def joint_attention(attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                    image_rotary_emb: Any) -> torch.Tensor:
    """``FluxAttnProcessor``'s code up to its output projections: the attention kernel's output
    (B, text + image tokens, width), flattened over the heads (a view of the kernel's output
    where its layout allows, as with SDPA's kernels, which keep that output for backward)."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import _get_qkv_projections

    processor = attn.processor
    query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
        attn, hidden_states, encoder_hidden_states)
    query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (query, key, value))
    query, key = attn.norm_q(query), attn.norm_k(key)
    encoder_query, encoder_key, encoder_value = (
        t.unflatten(-1, (-1, attn.head_dim)) for t in (encoder_query, encoder_key, encoder_value))
    encoder_query, encoder_key = attn.norm_added_q(encoder_query), attn.norm_added_k(encoder_key)
    query = torch.cat([encoder_query, query], dim=1)
    key = torch.cat([encoder_key, key], dim=1)
    value = torch.cat([encoder_value, value], dim=1)
    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
    out = dispatch_attention_fn(query, key, value, attn_mask=None, backend=processor._attention_backend,
                                parallel_config=processor._parallel_config)
    return out.flatten(2, 3).to(query.dtype)


def _projections_again(block: nn.Module, handle: AttachHandle) -> bool:
    """A double block's attention output projections can be computed again in backward: a joint
    attention (text and image projections, ``to_out`` a Linear and a dropout), a deterministic
    ``to_out[1]`` (FLUX's dropout of 0) and no hooks on the projections but the attachment's
    (``AttachHandle.output_again``). Else their outputs are kept for the gates' gradients."""
    attn = getattr(block, "attn", None)
    out = getattr(attn, "to_out", None)
    if not (getattr(attn, "added_kv_proj_dim", None) is not None and isinstance(out, nn.ModuleList)
            and len(out) == 2 and isinstance(out[0], nn.Linear)
            and isinstance(getattr(attn, "to_add_out", None), nn.Linear)):
        return False
    drop = out[1]
    if not (isinstance(drop, nn.Identity) or (type(drop) is nn.Dropout and (drop.p == 0 or not drop.training))):
        return False
    return handle.only_ours(out[0]) and handle.only_ours(attn.to_add_out)


def double_forward(blocks: TrainingBlocks, block: nn.Module, hidden_states: torch.Tensor,
                   encoder_hidden_states: torch.Tensor, temb: torch.Tensor, image_rotary_emb: Any = None,
                   joint_attention_kwargs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``FluxTransformerBlock.forward`` (see the module docstring); returns (text, image) states."""
    silu = blocks.silu(temb)
    i_sh1, i_sc1, i_g1, i_sh2, i_sc2, i_g2 = _mod(block.norm1.linear, silu, 6)
    t_sh1, t_sc1, t_g1, t_sh2, t_sc2, t_g2 = _mod(block.norm1_context.linear, silu, 6)
    img_n = modulated_norm(block.norm1.norm, hidden_states, i_sh1, i_sc1)
    txt_n = modulated_norm(block.norm1_context.norm, encoder_hidden_states, t_sh1, t_sc1)
    i_again = t_again = None
    # eager only: a compiled graph would specialise on the block (its id) and compile once per block
    if (not torch.compiler.is_compiling() and id(block) in blocks._again and i_g1.requires_grad
            and _joint_attention_applies(block, joint_attention_kwargs)):
        attn, n_txt = block.attn, encoder_hidden_states.shape[1]
        image, text = slice(n_txt, None), slice(None, n_txt)
        joint = joint_attention(attn, img_n, txt_n, image_rotary_emb)
        outs = (attn.to_out[1](attn.to_out[0](joint[:, image].contiguous())),
                attn.to_add_out(joint[:, text].contiguous()))
        i_again = Recompute(joint, blocks.output_again(attn.to_out[0], image))
        t_again = Recompute(joint, blocks.output_again(attn.to_add_out, text))
    else:
        outs = block.attn(hidden_states=img_n, encoder_hidden_states=txt_n, image_rotary_emb=image_rotary_emb,
                          **(joint_attention_kwargs or {}))
    img, i_n2 = gated_modulated_norm(block.norm2, hidden_states, i_g1, outs[0], i_sh2, i_sc2, i_again)
    img = gated_residual(img, i_g2, block.ff(i_n2))
    if len(outs) == 3:  # IP-Adapter attention output
        img = img + outs[2]
    txt, t_n2 = gated_modulated_norm(block.norm2_context, encoder_hidden_states, t_g1, outs[1], t_sh2, t_sc2,
                                     t_again)
    txt = gated_residual(txt, t_g2, block.ff_context(t_n2))
    if txt.dtype == torch.float16:
        txt = txt.clip(-65504, 65504)
    return txt, img


def single_forward(blocks: TrainingBlocks, block: nn.Module, hidden_states: torch.Tensor,
                   encoder_hidden_states: torch.Tensor, temb: torch.Tensor, image_rotary_emb: Any = None,
                   joint_attention_kwargs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``FluxSingleTransformerBlock.forward`` (see the module docstring); returns (text, image) states."""
    text_len = encoder_hidden_states.shape[1]
    x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    shift, scale, gate = _mod(block.norm.linear, blocks.silu(temb), 3)
    n = modulated_norm(block.norm.norm, x, shift, scale)
    mlp = block.act_mlp(block.proj_mlp(n))
    attn = block.attn(hidden_states=n, image_rotary_emb=image_rotary_emb, **(joint_attention_kwargs or {}))
    x = gated_residual(x, gate, block.proj_out(torch.cat([attn, mlp], dim=2)))
    if x.dtype == torch.float16:
        x = x.clip(-65504, 65504)
    return x[:, :text_len], x[:, text_len:]
