"""Model families: everything about a base model that Meta-LoRA depends on, in one frozen description.

Meta-LoRA is three factors on Linear layers; what differs between models is which Linears, their
widths and names, how latents become tokens and the flow's resolution shift. A ``ModelFamily``
holds that, and every package asks it (hosts, priors, exports, the CLI and the nodes):

- adapted layers and presets, per group of blocks, with their widths as kinds of the family's
  dims type (``FluxDims``, ``Flux2Dims``, ``ZImageDims``), read from a diffusers config or a
  ComfyUI state dict;
- shared-input groups (layers whose Down projections can run as one matmul);
- name tables: canonical names are diffusers module names; ComfyUI/BFL module names map onto
  one or more canonical names (a fused Linear, in the order of its output slices); LoRA keys:
  diffusers/peft ``transformer.<canonical>.lora_A.weight``, kohya ``lora_unet_<comfy name>`` /
  ``lora_transformer_<canonical name>`` with ``_`` for ``.``;
- patch and token constants, the flow's resolution shift, base-model and ``modelspec`` strings.

This module sits at the bottom and imports neither torch nor another package of the pack (``flow``
only when a shift is computed), so every package can import it, torch-free code included.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

PRESET_NAMES = ("attn", "attn_mlp", "all")  # every family offers these three
DEFAULT_PRESET = "all"

Layer = tuple[str, str, str]  # (suffix, in kind, out kind); kinds are resolved by the dims type


def _get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def _count(keys: Iterable[str], prefix: str) -> int:
    """Number of numbered blocks ``<prefix>.N.`` in state-dict keys."""
    pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := pat.match(k))}
    return max(found) + 1 if found else 0


def _split(module: str, prefix: str, sep: str, numbered: bool) -> tuple[int, str | None]:
    """(block index, suffix) of ``module`` under ``prefix`` (``<prefix><sep>N<sep><suffix>`` when numbered)."""
    if numbered:
        m = re.fullmatch(re.escape(prefix + sep) + r"(\d+)" + re.escape(sep) + r"(.+)", module)
        return (int(m.group(1)), m.group(2)) if m else (0, None)
    if not prefix:
        return 0, module
    return (0, module[len(prefix) + 1:]) if module.startswith(prefix + sep) else (0, None)


class ModelDims:
    """Widths and depth of one family's transformer (the base of ``FluxDims``, ``Flux2Dims``, ...):
    widths positive, depths >= 0; ``family`` names the family, ``width(kind)`` sizes its layers."""

    family_name: ClassVar[str]
    _depths: ClassVar[tuple[str, ...]]

    def __post_init__(self) -> None:
        name = type(self).__name__
        for f in fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if f.name in self._depths:
                if v < 0:
                    raise ValueError(f"{name}.{f.name} must be >= 0, got {v}")
            elif v <= 0:
                raise ValueError(f"{name}.{f.name} must be positive, got {v}")

    @property
    def family(self) -> "ModelFamily":
        return FAMILIES[self.family_name]

    def width(self, kind: str) -> int:
        raise NotImplementedError

    def depth_text(self) -> str:
        """The depth in words, for messages ("19 double and 38 single blocks")."""
        raise NotImplementedError


@dataclass(frozen=True)
class FluxDims(ModelDims):
    """Widths and depth of a FLUX.1 transformer, enough to name and size its layers."""

    hidden: int = 3072  # inner width (heads x head dim); FLUX.1-dev: 24 x 128
    mlp_hidden: int = 12288  # feed-forward width; FLUX uses 4 x hidden
    num_double: int = 19  # double-stream (MM-DiT) blocks
    num_single: int = 38  # single-stream blocks

    family_name: ClassVar[str] = "flux.1-dev"
    _depths: ClassVar[tuple[str, ...]] = ("num_double", "num_single")

    def depth_text(self) -> str:
        return f"{self.num_double} double and {self.num_single} single blocks"

    def width(self, kind: str) -> int:
        h, m = self.hidden, self.mlp_hidden
        return {"h": h, "m": m, "hm": h + m, "6h": 6 * h, "3h": 3 * h}[kind]

    @classmethod
    def from_diffusers_config(cls, config: Any) -> "FluxDims":
        """Reads the dims from a diffusers ``FluxTransformer2DModel.config``."""
        hidden = int(_get(config, "num_attention_heads")) * int(_get(config, "attention_head_dim"))
        return cls(hidden=hidden, mlp_hidden=4 * hidden, num_double=int(_get(config, "num_layers")),
                   num_single=int(_get(config, "num_single_layers")))

    @classmethod
    def from_comfy_state_dict(cls, sd: Mapping[str, Any], prefix: str = "") -> "FluxDims":
        """Reads the dims from the weights of a ComfyUI (BFL-named) FLUX.1 model."""
        proj = sd[f"{prefix}double_blocks.0.img_mlp.0.weight"]  # (mlp_hidden, hidden)
        return cls(hidden=int(proj.shape[1]), mlp_hidden=int(proj.shape[0]),
                   num_double=_count(sd, f"{prefix}double_blocks"), num_single=_count(sd, f"{prefix}single_blocks"))


@dataclass(frozen=True)
class Flux2Dims(ModelDims):
    """Widths and depth of a FLUX.2 transformer (SiLU-gated MLPs, fused single blocks)."""

    hidden: int = 6144  # inner width; FLUX.2-dev: 48 x 128
    mlp_hidden: int = 18432  # feed-forward width after the gate; mlp_ratio 3
    num_double: int = 8  # double-stream blocks
    num_single: int = 48  # single-stream blocks

    family_name: ClassVar[str] = "flux.2"
    _depths: ClassVar[tuple[str, ...]] = ("num_double", "num_single")

    def depth_text(self) -> str:
        return f"{self.num_double} double and {self.num_single} single blocks"

    def width(self, kind: str) -> int:
        h, m = self.hidden, self.mlp_hidden
        return {"h": h, "m": m, "2m": 2 * m, "hm": h + m, "3h2m": 3 * h + 2 * m, "6h": 6 * h, "3h": 3 * h}[kind]

    @classmethod
    def from_diffusers_config(cls, config: Any) -> "Flux2Dims":
        """Reads the dims from a diffusers ``Flux2Transformer2DModel.config``."""
        hidden = int(_get(config, "num_attention_heads")) * int(_get(config, "attention_head_dim"))
        return cls(hidden=hidden, mlp_hidden=int(hidden * float(_get(config, "mlp_ratio", 3.0))),
                   num_double=int(_get(config, "num_layers")), num_single=int(_get(config, "num_single_layers")))

    @classmethod
    def from_comfy_state_dict(cls, sd: Mapping[str, Any], prefix: str = "") -> "Flux2Dims":
        """Reads the dims from the weights of a ComfyUI FLUX.2 model."""
        out = sd[f"{prefix}double_blocks.0.img_mlp.2.weight"]  # (hidden, mlp_hidden)
        return cls(hidden=int(out.shape[0]), mlp_hidden=int(out.shape[1]),
                   num_double=_count(sd, f"{prefix}double_blocks"), num_single=_count(sd, f"{prefix}single_blocks"))


@dataclass(frozen=True)
class ZImageDims(ModelDims):
    """Widths and depth of a Z-Image transformer (single-stream, refiners before the main layers)."""

    hidden: int = 3840  # model width; Z-Image: 30 x 128
    ffn_hidden: int = 10240  # SwiGLU width (8/3 x hidden)
    kv: int = 3840  # key/value width (kv heads x head dim)
    adaln_in: int = 256  # input width of the per-block modulation (min(hidden, 256))
    num_layers: int = 30  # main layers
    num_refiner: int = 2  # noise_refiner and context_refiner blocks each

    family_name: ClassVar[str] = "z-image"
    _depths: ClassVar[tuple[str, ...]] = ("num_layers", "num_refiner")

    def depth_text(self) -> str:
        return f"{self.num_layers} layers, {self.num_refiner} noise and {self.num_refiner} context refiner blocks"

    def width(self, kind: str) -> int:
        h = self.hidden
        return {"h": h, "f": self.ffn_hidden, "kv": self.kv, "a": self.adaln_in, "4h": 4 * h}[kind]

    @classmethod
    def from_diffusers_config(cls, config: Any) -> "ZImageDims":
        """Reads the dims from a diffusers ``ZImageTransformer2DModel.config``."""
        dim = int(_get(config, "dim"))
        # diffusers' Z-Image attention gives k and v the full width whatever n_kv_heads says
        # (Z-Image itself has as many kv heads as heads); ComfyUI's follows n_kv_heads
        return cls(hidden=dim, ffn_hidden=int(dim / 3 * 8), kv=dim,
                   adaln_in=min(dim, 256), num_layers=int(_get(config, "n_layers")),
                   num_refiner=int(_get(config, "n_refiner_layers")))

    @classmethod
    def from_comfy_state_dict(cls, sd: Mapping[str, Any], prefix: str = "") -> "ZImageDims":
        """Reads the dims from the weights of a ComfyUI Z-Image (Lumina2-type) model."""
        p = f"{prefix}layers.0."
        hidden = int(sd[f"{p}attention.out.weight"].shape[0])
        return cls(hidden=hidden, ffn_hidden=int(sd[f"{p}feed_forward.w2.weight"].shape[1]),
                   kv=(int(sd[f"{p}attention.qkv.weight"].shape[0]) - hidden) // 2,
                   adaln_in=int(sd[f"{p}adaLN_modulation.0.weight"].shape[1]),
                   num_layers=_count(sd, f"{prefix}layers"), num_refiner=_count(sd, f"{prefix}noise_refiner"))


@dataclass(frozen=True)
class BlockGroup:
    """A run of numbered blocks (or, with ``depth`` None, the model's top level)."""

    prefix: str  # canonical (diffusers) module prefix: "transformer_blocks"; "" for top-level layers
    comfy_prefix: str  # the same modules in ComfyUI/BFL naming: "double_blocks"
    depth: str | None  # the dims field giving the number of blocks; None: one, unnumbered

    def module(self, index: int, suffix: str, comfy: bool = False) -> str:
        prefix = self.comfy_prefix if comfy else self.prefix
        if self.depth is None:
            return f"{prefix}.{suffix}" if prefix else suffix
        return f"{prefix}.{index}.{suffix}"


@dataclass(frozen=True)
class FlowShift:
    """A resolution-dependent sigma shift ``exp(mu)``, mu linear in the image token count."""

    base_seq: int  # token count of the base shift
    max_seq: int  # token count of the max shift
    base_shift: float
    max_shift: float

    def at(self, seq_len: int) -> float:
        from .flow import resolution_shift  # here: flow imports torch, and this module must not

        return resolution_shift(seq_len, self.base_seq, self.max_seq, self.base_shift, self.max_shift)


@dataclass(frozen=True, eq=False)
class ModelFamily:
    """One model family: layers, dims, names, token constants and identity strings (see the module doc).

    Families compare and hash by identity: there is one object per family (``FAMILIES``).
    """

    name: str  # the base-model string priors and LoRAs carry: "flux.1-dev"
    title: str  # how messages name it: "FLUX.1-dev"
    dims_type: type  # FluxDims, Flux2Dims, ZImageDims
    diffusers_class: str  # the diffusers transformer class
    groups: tuple[BlockGroup, ...]  # in model (and prior-file) order
    presets: Mapping[str, tuple[tuple[Layer, ...], ...]]  # preset -> layers per group
    shared_inputs: tuple[tuple[str, ...], ...]  # suffixes of one block that read the same input
    comfy_names: tuple[Mapping[str, tuple[str, ...]], ...]  # per group: ComfyUI suffix -> canonical suffixes
    latent_channels: int  # channels of the VAE latent
    vae_scale: int  # pixels per latent cell along a side
    patch_size: int  # latent cells per token along a side
    shift: FlowShift | None  # the resolution shift of the flow; None: the family has no token-count rule
    modelspec_architecture: str  # modelspec.architecture of an exported LoRA
    modelspec_implementation: str  # modelspec.implementation of an exported LoRA
    aliases: tuple[str, ...] = ()  # other base-model strings that name this family
    diffusers_pipelines: tuple[str, ...] = ()  # diffusers pipeline classes (model_index.json) of the family
    # Elements of the compute dtype autograd keeps per image token, per block and per unit of
    # ``dims.hidden`` in one Stage-2 step of the ComfyUI host, every layer adapted: (no block
    # checkpointed, every block checkpointed). None: not measured for this family.
    activation_widths: tuple[float, float] | None = None

    @property
    def pixels_per_token(self) -> int:
        """Image pixels per token along a side (FLUX.1: VAE 8 x patch 2 = 16): image sides are multiples of it."""
        return self.vae_scale * self.patch_size

    def image_tokens(self, latent_h: int, latent_w: int) -> int:
        """Image tokens of a (h, w) latent."""
        return latent_h * latent_w // (self.patch_size * self.patch_size)

    def shift_for(self, latent_h: int, latent_w: int) -> float:
        """The resolution shift for a (h, w) latent.

        Raises:
            ValueError: the family has no resolution-shift rule.
        """
        if self.shift is None:
            raise ValueError(f"{self.title} has no resolution-shift rule; turn resolution_shift off")
        return self.shift.at(self.image_tokens(latent_h, latent_w))

    def block_count(self, dims: Any) -> int:
        """Number of transformer blocks (every numbered group)."""
        return sum(getattr(dims, g.depth) for g in self.groups if g.depth is not None)

    def names(self) -> tuple[str, ...]:
        """Every base-model string that names this family."""
        return (self.name, *self.aliases)

    def resolve(self, preset: str, dims: Any) -> dict[str, tuple[int, int]]:
        """Canonical layer name -> (in_features, out_features) of ``preset``, in model order.

        Raises:
            ValueError: unknown preset, or dims of another family.
        """
        if preset not in self.presets:
            raise ValueError(f"unknown target preset {preset!r}; choose one of {sorted(self.presets)}")
        if not isinstance(dims, self.dims_type):
            raise ValueError(f"{type(dims).__name__} are not {self.title} dims ({self.dims_type.__name__})")
        out: dict[str, tuple[int, int]] = {}
        for group, layers in zip(self.groups, self.presets[preset]):
            for i in range(1 if group.depth is None else getattr(dims, group.depth)):
                for suffix, kin, kout in layers:
                    out[group.module(i, suffix)] = (dims.width(kin), dims.width(kout))
        return out

    def comfy_modules(self, dims: Any, preset: str = "all") -> dict[str, tuple[str, ...]]:
        """ComfyUI module name -> the canonical names it holds (slice order), for ``preset``'s layers."""
        wanted = self.resolve(preset, dims)
        out: dict[str, tuple[str, ...]] = {}
        for group, table in zip(self.groups, self.comfy_names):
            for i in range(1 if group.depth is None else getattr(dims, group.depth)):
                for comfy, canon in table.items():
                    names = tuple(group.module(i, s) for s in canon)
                    if any(n in wanted for n in names):
                        out[group.module(i, comfy, comfy=True)] = names
        return out

    def canonical(self, module: str) -> tuple[str, ...]:
        """Canonical names for one module name in dotted form, diffusers or ComfyUI/BFL (``()``: not a target)."""
        for g, group in enumerate(self.groups):
            diffusers = {s: (s,) for s, _, _ in self.presets["all"][g]}
            for prefix, table in ((group.prefix, diffusers), (group.comfy_prefix, self.comfy_names[g])):
                idx, rest = _split(module, prefix, ".", group.depth is not None)
                if rest in table:
                    return tuple(group.module(idx, s) for s in table[rest])
        return ()

    def kohya_canonical(self, stem: str) -> tuple[str, ...]:
        """Canonical names for a kohya key stem (``lora_unet_double_blocks_0_img_attn_qkv``,
        ``lora_transformer_single_transformer_blocks_0_proj_out``): dots written as ``_``."""
        m = re.fullmatch(r"lora_(?:unet|transformer)_(.+)", stem)
        if not m:
            return ()
        for g, group in enumerate(self.groups):
            diffusers = {s: (s,) for s, _, _ in self.presets["all"][g]}
            for prefix, table in ((group.prefix, diffusers), (group.comfy_prefix, self.comfy_names[g])):
                idx, rest = _split(m.group(1), prefix.replace(".", "_"), "_", group.depth is not None)
                for suffix, names in table.items():
                    if rest is not None and suffix.replace(".", "_") == rest:
                        return tuple(group.module(idx, s) for s in names)
        return ()

    def order(self, name: str) -> tuple[int, int, int, str]:
        """Sort key of a canonical name in model order (what ``resolve`` lists); unknown names last."""
        for g, group in enumerate(self.groups):
            for p, (suffix, _, _) in enumerate(self.presets["all"][g]):
                if group.depth is None:
                    if name == group.module(0, suffix):
                        return (g, 0, p, suffix)
                else:
                    m = re.fullmatch(re.escape(group.prefix) + r"\.(\d+)\." + re.escape(suffix), name)
                    if m:
                        return (g, int(m.group(1)), p, suffix)
        return (len(self.groups), 0, 0, name)

    def dims_from_diffusers_config(self, config: Any) -> Any:
        return self.dims_type.from_diffusers_config(config)

    def dims_from_comfy_state_dict(self, sd: Mapping[str, Any], prefix: str = "") -> Any:
        return self.dims_type.from_comfy_state_dict(sd, prefix)


# ---------------------------------------------------------------------------------------------
# FLUX.1 (diffusers FluxTransformer2DModel; ComfyUI/BFL comfy/ldm/flux)

_F1_DOUBLE_ATTN: tuple[Layer, ...] = (
    ("attn.to_q", "h", "h"),
    ("attn.to_k", "h", "h"),
    ("attn.to_v", "h", "h"),
    ("attn.to_out.0", "h", "h"),
    ("attn.add_q_proj", "h", "h"),
    ("attn.add_k_proj", "h", "h"),
    ("attn.add_v_proj", "h", "h"),
    ("attn.to_add_out", "h", "h"),
)
_F1_DOUBLE_MLP: tuple[Layer, ...] = (
    ("ff.net.0.proj", "h", "m"),
    ("ff.net.2", "m", "h"),
    ("ff_context.net.0.proj", "h", "m"),
    ("ff_context.net.2", "m", "h"),
)
_F1_DOUBLE_MOD: tuple[Layer, ...] = (("norm1.linear", "h", "6h"), ("norm1_context.linear", "h", "6h"))
_F1_SINGLE_ATTN: tuple[Layer, ...] = (("attn.to_q", "h", "h"), ("attn.to_k", "h", "h"), ("attn.to_v", "h", "h"))
_F1_SINGLE_MLP: tuple[Layer, ...] = (("proj_mlp", "h", "m"), ("proj_out", "hm", "h"))
_F1_SINGLE_MOD: tuple[Layer, ...] = (("norm.linear", "h", "3h"),)

_BFL_DOUBLE_ATTN = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn.proj": ("attn.to_add_out",),
}
_BFL_DOUBLE_MOD = {"img_mod.lin": ("norm1.linear",), "txt_mod.lin": ("norm1_context.linear",)}

FLUX1 = ModelFamily(
    name="flux.1-dev",
    title="FLUX.1-dev",
    dims_type=FluxDims,
    diffusers_class="FluxTransformer2DModel",
    groups=(BlockGroup("transformer_blocks", "double_blocks", "num_double"),
            BlockGroup("single_transformer_blocks", "single_blocks", "num_single")),
    presets={
        # attention projections only
        "attn": (_F1_DOUBLE_ATTN, _F1_SINGLE_ATTN),
        # attention + feed-forward
        "attn_mlp": (_F1_DOUBLE_ATTN + _F1_DOUBLE_MLP, _F1_SINGLE_ATTN + _F1_SINGLE_MLP),
        # every Linear of the transformer blocks, modulation included: what ai-toolkit trains on FLUX
        # by default (the paper names no target set; it says it was implemented with ai-toolkit).
        # FLUX.1-dev: 494 layers (attn_mlp: 418)
        "all": (_F1_DOUBLE_ATTN + _F1_DOUBLE_MLP + _F1_DOUBLE_MOD, _F1_SINGLE_ATTN + _F1_SINGLE_MLP + _F1_SINGLE_MOD),
    },
    # q, k and v of each stream; in a single block proj_mlp too
    shared_inputs=(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
                   ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    comfy_names=(
        {**_BFL_DOUBLE_ATTN,
         "img_mlp.0": ("ff.net.0.proj",), "img_mlp.2": ("ff.net.2",),
         "txt_mlp.0": ("ff_context.net.0.proj",), "txt_mlp.2": ("ff_context.net.2",),
         **_BFL_DOUBLE_MOD},
        {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear2": ("proj_out",),
         "modulation.lin": ("norm.linear",)},
    ),
    latent_channels=16,
    vae_scale=8,
    patch_size=2,
    # FluxPipeline's scheduler: base_image_seq_len 256, max_image_seq_len 4096, shifts 0.5 / 1.15
    shift=FlowShift(base_seq=256, max_seq=4096, base_shift=0.5, max_shift=1.15),
    modelspec_architecture="flux-1-dev/lora",
    modelspec_implementation="https://github.com/black-forest-labs/flux",
    aliases=("flux", "flux.1", "flux-1-dev"),
    diffusers_pipelines=("FluxPipeline",),
    # Measured with bench/gpu_stage2.py (--comfy-compute bf16, as on a GPU; PyTorch attention; tiny
    # width, 57 blocks; tests/test_comfyui_perf.py holds it there) at 17.4, with every block
    # checkpointed 1.06. (Computed in float32, as ComfyUI does on a CPU: 14.4 and 1.05.) Set above
    # those figures on purpose: a memory plan must not under-estimate (running out of memory mid-run
    # loses the run; one checkpointed block too many only costs time), the figures come from one tiny
    # model shape, and the checkpointed figure leaves out backward recomputing a checkpointed block,
    # whose activations are then held in full.
    activation_widths=(20, 2),
)

# ---------------------------------------------------------------------------------------------
# FLUX.2 (diffusers Flux2Transformer2DModel; ComfyUI comfy/ldm/flux with global_modulation and
# mlp_silu_act, model_base.Flux2). Modulation Linears are shared by all blocks, at the top level;
# ComfyUI 0.33's diffusers key map has no entry for them, so there a LoRA reaches them by their
# ComfyUI names only (tests/test_comfyui_families.py).

_F2_DOUBLE_MLP: tuple[Layer, ...] = (
    ("ff.linear_in", "h", "2m"),  # gate and value in one Linear
    ("ff.linear_out", "m", "h"),
    ("ff_context.linear_in", "h", "2m"),
    ("ff_context.linear_out", "m", "h"),
)
# q, k, v and the MLP input are one fused Linear, attention and MLP output another: both belong to "attn"
_F2_SINGLE: tuple[Layer, ...] = (("attn.to_qkv_mlp_proj", "h", "3h2m"), ("attn.to_out", "hm", "h"))
_F2_MOD: tuple[Layer, ...] = (
    ("double_stream_modulation_img.linear", "h", "6h"),
    ("double_stream_modulation_txt.linear", "h", "6h"),
    ("single_stream_modulation.linear", "h", "3h"),
)

FLUX2 = ModelFamily(
    name="flux.2",
    title="FLUX.2",
    dims_type=Flux2Dims,
    diffusers_class="Flux2Transformer2DModel",
    groups=(BlockGroup("transformer_blocks", "double_blocks", "num_double"),
            BlockGroup("single_transformer_blocks", "single_blocks", "num_single"),
            BlockGroup("", "", None)),
    presets={
        "attn": (_F1_DOUBLE_ATTN, _F2_SINGLE, ()),
        "attn_mlp": (_F1_DOUBLE_ATTN + _F2_DOUBLE_MLP, _F2_SINGLE, ()),
        "all": (_F1_DOUBLE_ATTN + _F2_DOUBLE_MLP, _F2_SINGLE, _F2_MOD),
    },
    shared_inputs=(("attn.to_q", "attn.to_k", "attn.to_v"), ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    comfy_names=(
        {**_BFL_DOUBLE_ATTN,
         "img_mlp.0": ("ff.linear_in",), "img_mlp.2": ("ff.linear_out",),
         "txt_mlp.0": ("ff_context.linear_in",), "txt_mlp.2": ("ff_context.linear_out",)},
        {"linear1": ("attn.to_qkv_mlp_proj",), "linear2": ("attn.to_out",)},
        {"double_stream_modulation_img.lin": ("double_stream_modulation_img.linear",),
         "double_stream_modulation_txt.lin": ("double_stream_modulation_txt.linear",),
         "single_stream_modulation.lin": ("single_stream_modulation.linear",)},
    ),
    latent_channels=32,  # the VAE's channels; the transformer reads them packed 2 x 2 (128)
    vae_scale=8,
    patch_size=2,
    shift=None,  # Flux2Pipeline fits mu to token count and step count together (compute_empirical_mu)
    modelspec_architecture="flux-2/lora",
    modelspec_implementation="https://github.com/black-forest-labs/flux2",
    aliases=("flux2", "flux.2-dev", "flux-2"),
    diffusers_pipelines=("Flux2KleinPipeline", "Flux2Pipeline"),  # Klein (Qwen3 text encoder), dev (Mistral)
)

# ---------------------------------------------------------------------------------------------
# Z-Image (diffusers ZImageTransformer2DModel; ComfyUI comfy/ldm/lumina, model_base.Lumina2).
# The refiners run before the main layers; the context refiner has no modulation.

_Z_ATTN: tuple[Layer, ...] = (
    ("attention.to_q", "h", "h"),
    ("attention.to_k", "h", "kv"),
    ("attention.to_v", "h", "kv"),
    ("attention.to_out.0", "h", "h"),
)
_Z_MLP: tuple[Layer, ...] = (("feed_forward.w1", "h", "f"), ("feed_forward.w2", "f", "h"), ("feed_forward.w3", "h", "f"))
_Z_MOD: tuple[Layer, ...] = (("adaLN_modulation.0", "a", "4h"),)
_Z_COMFY = {
    "attention.qkv": ("attention.to_q", "attention.to_k", "attention.to_v"),
    "attention.out": ("attention.to_out.0",),
    "feed_forward.w1": ("feed_forward.w1",),
    "feed_forward.w2": ("feed_forward.w2",),
    "feed_forward.w3": ("feed_forward.w3",),
}

ZIMAGE = ModelFamily(
    name="z-image",
    title="Z-Image",
    dims_type=ZImageDims,
    diffusers_class="ZImageTransformer2DModel",
    groups=(BlockGroup("noise_refiner", "noise_refiner", "num_refiner"),
            BlockGroup("context_refiner", "context_refiner", "num_refiner"),
            BlockGroup("layers", "layers", "num_layers")),
    presets={
        "attn": (_Z_ATTN, _Z_ATTN, _Z_ATTN),
        "attn_mlp": (_Z_ATTN + _Z_MLP, _Z_ATTN + _Z_MLP, _Z_ATTN + _Z_MLP),
        "all": (_Z_ATTN + _Z_MLP + _Z_MOD, _Z_ATTN + _Z_MLP, _Z_ATTN + _Z_MLP + _Z_MOD),
    },
    shared_inputs=(("attention.to_q", "attention.to_k", "attention.to_v"), ("feed_forward.w1", "feed_forward.w3")),
    comfy_names=({**_Z_COMFY, "adaLN_modulation.0": ("adaLN_modulation.0",)}, dict(_Z_COMFY),
                 {**_Z_COMFY, "adaLN_modulation.0": ("adaLN_modulation.0",)}),
    latent_channels=16,  # the FLUX.1 VAE
    vae_scale=8,
    patch_size=2,
    shift=None,  # a fixed shift (ComfyUI samples it with shift 3.0), no token-count rule
    modelspec_architecture="z-image/lora",
    modelspec_implementation="https://github.com/Tongyi-MAI/Z-Image",
    aliases=("zimage", "z-image-turbo", "z_image"),
    diffusers_pipelines=("ZImagePipeline",),
)

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (FLUX1, FLUX2, ZIMAGE)}
DEFAULT_FAMILY = FLUX1


def family_named(base_model: str) -> ModelFamily | None:
    """The family a base-model string names (its name or an alias, any case), or None."""
    key = base_model.strip().lower()
    return next((f for f in FAMILIES.values() if key in f.names()), None)


def family_of_diffusers_config(config: Any) -> ModelFamily:
    """The family of a diffusers transformer config: by ``_class_name`` (saved configs), else by the
    fields only that class has (a model's in-memory config); FLUX.1 when neither tells.

    Raises:
        ValueError: a class no family describes.
    """
    cls = _get(config, "_class_name")
    if cls is None:
        if _get(config, "n_refiner_layers") is not None:
            return ZIMAGE
        if _get(config, "timestep_guidance_channels") is not None:
            return FLUX2
        return DEFAULT_FAMILY
    found = next((f for f in FAMILIES.values() if f.diffusers_class == cls), None)
    if found is None:
        known = ", ".join(f"{f.diffusers_class} ({f.title})" for f in FAMILIES.values())
        raise ValueError(f"transformer class {cls!r} is not a supported model; supported: {known}")
    return found


def family_of_pipeline(class_name: str) -> ModelFamily | None:
    """The family whose diffusers pipeline class (``model_index.json``'s ``_class_name``) this is, or None."""
    return next((f for f in FAMILIES.values() if class_name in f.diffusers_pipelines), None)


def shared_input_groups(names: Iterable[str], family: ModelFamily | None = None) -> list[tuple[str, ...]]:
    """Groups of canonical layer names that read one input (the family's ``shared_inputs``), 2+ each.

    With no family the suffix sets of every family are used (they agree where they overlap).
    """
    tables = [s for f in ([family] if family else FAMILIES.values()) for s in f.shared_inputs]
    tables = list(dict.fromkeys(tables))
    groups: dict[tuple[str, int], list[str]] = {}
    for name in names:
        for i, suffixes in enumerate(tables):
            hit = next((s for s in suffixes if name.endswith("." + s)), None)
            if hit is not None:
                groups.setdefault((name[: -len(hit)], i), []).append(name)
                break
    return [tuple(g) for g in groups.values() if len(g) > 1]
