"""Meta-Down prior files: save, load, validate against a host model.

A prior is a safetensors file with one Down matrix (r1 x in) per canonical layer
(key ``<canonical name>.meta_down``) and string metadata: format name and version,
r1, preset, base model family, domain label and a JSON training summary.
A LoRA file (diffusers/peft ``lora_A`` or kohya ``lora_down``) is also accepted as
a source of Down matrices; r1 is then read from the shapes.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .files import atomic_save_safetensors, content_sha256, read_safetensors
from ..lora.layers import PRESETS, FluxDims, resolve_targets

PRIOR_FORMAT = "metalora.prior"
PRIOR_VERSION = 1
_SUFFIX = ".meta_down"


@dataclass
class Prior:
    """Meta-Down matrices plus their description."""

    downs: dict[str, torch.Tensor]  # canonical name -> (r1, in)
    r1: int
    preset: str | None = None  # None when read from a LoRA file of unknown preset
    base_model: str = "flux.1-dev"
    domain: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    source: str = "prior"  # "prior" or the LoRA flavour it was read from
    provenance: dict[str, str] = field(default_factory=dict)  # source_* metadata (where the file was downloaded from)
    path: str = ""  # the file it was loaded from ("" when made in memory): named in errors
    file_sha256: str = ""  # content_sha256 of that file

    @property
    def sha256(self) -> str:
        """The prior's identity: ``content_sha256`` of its file (of the file ``save_prior`` would
        write, for a prior made in memory), the same hash ``metalora inspect`` shows."""
        if self.file_sha256:
            return self.file_sha256
        return content_sha256(_file_tensors(self.downs), self.metadata())

    @property
    def label(self) -> str:
        """How errors name this prior: its file, or "prior"."""
        return f"prior {self.path}" if self.path else "prior"

    def metadata(self) -> dict[str, str]:
        return {
            "format": PRIOR_FORMAT,
            "format_version": str(PRIOR_VERSION),
            "r1": str(self.r1),
            "preset": self.preset or "",
            "base_model": self.base_model,
            "domain": self.domain,
            "training": json.dumps(self.training, sort_keys=True),
            "layers": str(len(self.downs)),
            **self.provenance,
        }


def save_prior(prior: Prior, path: str | os.PathLike) -> Path:
    """Writes a prior atomically."""
    _check_ranks(prior.downs, prior.r1, str(path))
    return atomic_save_safetensors(_file_tensors(prior.downs), path, prior.metadata())


def _file_tensors(downs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{k}{_SUFFIX}": v.detach().to("cpu", torch.float32).contiguous() for k, v in downs.items()}


def _meta_int(meta: Mapping[str, str], key: str, path: Any, default: str | None = None) -> int:
    raw = meta.get(key, default)
    try:
        return int(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{path}: metadata {key}={raw!r} is not a whole number; the prior file is damaged, "
                         "re-create it with 'metalora meta-train'") from None


def _check_values(tensors: Mapping[str, torch.Tensor], path: Any) -> None:
    """A prior's Down matrices must be floating-point numbers (NaN/inf: ``validate_prior``)."""
    for k, t in tensors.items():
        if not t.is_floating_point():
            raise ValueError(f"{path}: tensor {k!r} is {str(t.dtype).replace('torch.', '')}, not floating point; "
                             "quantized or integer priors are not supported, use a float32/bf16/fp16 prior")


def _check_ranks(downs: Mapping[str, torch.Tensor], r1: int, where: str) -> None:
    for name, t in downs.items():
        if t.ndim != 2 or t.shape[0] != r1:
            raise ValueError(f"{where}: layer {name!r} has Down shape {tuple(t.shape)}, expected ({r1}, in)")


def load_prior(path: str | os.PathLike) -> Prior:
    """Loads a prior file, or a LoRA file used as a source of Down matrices.

    Raises:
        FileNotFoundError: no file.
        ValueError: corrupt file, unknown format version, mixed ranks, no usable keys.
    """
    tensors, meta = read_safetensors(path)
    prior = prior_from_tensors(tensors, meta, path)
    prior.path = os.fspath(path)
    prior.file_sha256 = content_sha256(tensors, meta)
    return prior


def prior_from_tensors(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str], path: str | os.PathLike) -> Prior:
    """A file's tensors and metadata read as a prior: every check ``load_prior`` makes (``metalora
    inspect`` runs the same). Errors start with ``path``."""
    if meta.get("format") == PRIOR_FORMAT:
        version = _meta_int(meta, "format_version", path, "0")
        if version > PRIOR_VERSION:
            raise ValueError(
                f"{path}: prior format version {version} is newer than this pack reads ({PRIOR_VERSION}); update the pack"
            )
        found = {k[: -len(_SUFFIX)]: v for k, v in tensors.items() if k.endswith(_SUFFIX)}
        downs = dict(sorted(found.items(), key=lambda kv: _order(kv[0])))  # model order, as saved
        if not downs:
            raise ValueError(f"{path}: prior file holds no '*{_SUFFIX}' tensors")
        _check_values({k + _SUFFIX: v for k, v in downs.items()}, path)
        r1 = _meta_int(meta, "r1", path)
        _check_ranks(downs, r1, str(path))
        try:
            training = json.loads(meta.get("training") or "{}")
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: metadata 'training' is not valid JSON ({e}); the prior file is damaged") from e
        return Prior(
            downs=downs,
            r1=r1,
            preset=meta.get("preset") or None,
            base_model=meta.get("base_model", ""),
            domain=meta.get("domain", ""),
            training=training,
            provenance=_provenance(meta),
        )
    lora_downs = {k: t for k, t in tensors.items() if k.endswith((".lora_A.weight", ".lora_down.weight"))}
    _check_values(lora_downs, path)
    for k, t in sorted(lora_downs.items()):
        if t.ndim != 2:
            raise ValueError(f"{path}: tensor {k!r} has shape {tuple(t.shape)}; a LoRA down/A matrix must be 2-D "
                             "(rank, in), so the file is malformed; export the LoRA again")
    downs, flavour = downs_from_lora(tensors)
    if not downs and lora_downs:
        from .describe import model_family

        family = model_family(list(tensors))
        if family not in ("flux", "unknown"):
            raise ValueError(f"{path}: a LoRA for {family}, not FLUX (keys such as {min(lora_downs)!r}); Meta-LoRA "
                             "needs a FLUX LoRA or a prior made by 'metalora meta-train'")
    if not downs:
        raise ValueError(
            f"{path}: neither a Meta-LoRA prior (metadata format={PRIOR_FORMAT!r}) nor a FLUX LoRA with "
            "lora_A / lora_down keys; pass a prior made by 'metalora meta-train' or a FLUX LoRA file"
        )
    ranks = {t.shape[0] for t in downs.values()}
    if len(ranks) != 1:
        name = next(n for n, t in downs.items() if t.shape[0] != next(iter(downs.values())).shape[0])
        raise ValueError(f"{path}: LoRA ranks differ between layers ({sorted(ranks)}, e.g. {name!r}); a prior needs one r1")
    return Prior(downs=downs, r1=ranks.pop(), preset=None, base_model=meta.get("base_model", "flux"), source=flavour,
                 provenance=_provenance(meta))


def _provenance(meta: Mapping[str, str]) -> dict[str, str]:
    """The ``source_*`` metadata keys a download adds (repo, filename, revision, commit, sha256, url)."""
    return {k: v for k, v in meta.items() if k.startswith("source_")}


# BFL / ComfyUI module names -> canonical names (a fused layer shares one Down).
# diffusers' FluxPipeline.lora_state_dict is not used here: it folds kohya's alpha/rank into Down,
# chunks Down of a block-sparse fused Up, hard-codes FLUX.1 widths (3072) for kohya files and leaves
# BFL-named peft keys unconverted; tests/test_prior_formats.py pins where it agrees with these tables.
_BFL_DOUBLE = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "img_mod.lin": ("norm1.linear",),
    "txt_mod.lin": ("norm1_context.linear",),
}
_BFL_SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}
_DIFF_DOUBLE = {s: (s,) for s, _, _ in PRESETS["all"][0]}
_DIFF_SINGLE = {s: (s,) for s, _, _ in PRESETS["all"][1]}
_PREFIXES = ("base_model.model.", "transformer.", "diffusion_model.", "model.diffusion_model.")


def _canonical(module: str) -> tuple[str, ...]:
    """Canonical names for one LoRA module name in dotted form (diffusers or BFL)."""
    for p in _PREFIXES:
        if module.startswith(p):
            module = module[len(p) :]
            break
    m = re.fullmatch(r"(double_blocks|single_blocks|transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)", module)
    if not m:
        return ()
    kind, idx, rest = m.groups()
    table = {
        "double_blocks": (_BFL_DOUBLE, "transformer_blocks"),
        "single_blocks": (_BFL_SINGLE, "single_transformer_blocks"),
        "transformer_blocks": (_DIFF_DOUBLE, "transformer_blocks"),
        "single_transformer_blocks": (_DIFF_SINGLE, "single_transformer_blocks"),
    }[kind]
    return tuple(f"{table[1]}.{idx}.{s}" for s in table[0].get(rest, ()))


def _kohya_module(stem: str) -> tuple[str, ...]:
    """Canonical names for a kohya key stem such as ``lora_unet_double_blocks_0_img_attn_qkv``."""
    m = re.fullmatch(r"lora_(?:unet|transformer)_(double_blocks|single_blocks|transformer_blocks|single_transformer_blocks)_(\d+)_(.+)", stem)
    if not m:
        return ()
    kind, idx, rest = m.groups()
    table = {"double_blocks": _BFL_DOUBLE, "single_blocks": _BFL_SINGLE,
             "transformer_blocks": _DIFF_DOUBLE, "single_transformer_blocks": _DIFF_SINGLE}[kind]
    for suffix in table:
        if suffix.replace(".", "_") == rest:
            return _canonical(f"{kind}.{idx}.{suffix}")
    return ()


def downs_from_lora(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Extracts Down matrices (canonical name -> (r, in)) from LoRA tensors."""
    out: dict[str, torch.Tensor] = {}
    flavour = ""
    for key, t in tensors.items():
        if key.endswith(".lora_A.weight"):
            names, flavour = _canonical(key[: -len(".lora_A.weight")]), "peft"
        elif key.endswith(".lora_down.weight"):
            stem = key[: -len(".lora_down.weight")]
            names = _kohya_module(stem) or _canonical(stem)
            flavour = "kohya"
        else:
            continue
        for n in names:
            out[n] = t.detach().to(torch.float32)
    return dict(sorted(out.items(), key=lambda kv: _order(kv[0]))), flavour


# Position of each layer inside its block, as resolve_targets lists them (presets share one order).
_POSITION = {**{("transformer_blocks", s): i for i, (s, _, _) in enumerate(PRESETS["all"][0])},
             **{("single_transformer_blocks", s): i for i, (s, _, _) in enumerate(PRESETS["all"][1])}}


def _order(name: str) -> tuple[int, int, int, str]:
    """Model order: double blocks, then single blocks, each layer where resolve_targets puts it."""
    parts = name.split(".", 2)
    if len(parts) != 3 or not parts[1].isdigit():  # not a layer name: last (validate_prior names it)
        return (2, 0, 0, name)
    kind, idx, rest = parts
    return (0 if kind == "transformer_blocks" else 1, int(idx), _POSITION.get((kind, rest), len(_POSITION)), rest)


def validate_prior(prior: Prior, dims: FluxDims, *, source: str = "prior") -> dict[str, tuple[int, int]]:
    """Checks every layer of ``prior`` against a host model; fails on the first mismatch.

    Errors start with ``source``; the default names the prior's file when it has one.

    Returns:
        canonical name -> (in, out) for the prior's layers, in model order.

    Raises:
        ValueError: naming the layer and both shapes (or the missing layer).
    """
    if source == "prior":
        source = prior.label
    known = resolve_targets("all", dims)
    if prior.preset is not None:
        for name in resolve_targets(prior.preset, dims):
            if name not in prior.downs:
                raise ValueError(
                    f"{source}: layer {name!r} of preset {prior.preset!r} is missing from the prior; "
                    f"the prior was made for a different model depth (this model has {dims.num_double} double "
                    f"and {dims.num_single} single blocks)"
                )
    for name in prior.downs:
        if name not in known:
            raise ValueError(
                f"{source}: layer {name!r} does not exist in this FLUX model ({dims.num_double} double, "
                f"{dims.num_single} single blocks); use a prior made for this model"
            )
    shapes: dict[str, tuple[int, int]] = {}
    for name in (n for n in known if n in prior.downs):  # model order
        down = prior.downs[name]
        fin, fout = known[name]
        if tuple(down.shape) != (prior.r1, fin):
            raise ValueError(
                f"{source}: layer {name!r}: prior Down has shape {tuple(down.shape)}, the model needs "
                f"({prior.r1}, {fin}); the prior was made for another model width or rank"
            )
        if not torch.isfinite(down).all():
            raise ValueError(f"{source}: layer {name!r} holds NaN or inf values; the prior file is damaged")
        shapes[name] = (fin, fout)
    return shapes


def check_rank(rank: int, prior: Prior | None, what: str = "rank") -> None:
    """The exported LoRA's rank r2 may not exceed the prior's r1 (its real rank could not be higher;
    the file would only be bigger). ``what`` names the setting in the error (``--rank``, ``rank``)."""
    if prior is not None and rank > prior.r1:
        where = f" ({prior.path})" if prior.path else ""
        raise ValueError(f"{what} {rank} is above the prior's r1 = {prior.r1}{where}: the LoRA's real rank can be "
                         f"at most {prior.r1}, the file would only be bigger; set {what} to {prior.r1} or less")


def make_prior(
    dims: FluxDims,
    *,
    r1: int,
    preset: str,
    generator: torch.Generator,
    domain: str = "",
    base_model: str = "flux.1-dev",
) -> Prior:
    """A deterministic prior with orthonormal Down rows (a starting point, not a learned one)."""
    downs = {}
    for name, (fin, _) in resolve_targets(preset, dims).items():
        g = torch.randn(fin, r1, generator=generator, dtype=torch.float64)
        q, _ = torch.linalg.qr(g)  # (in, r1) orthonormal columns
        downs[name] = q.T.to(torch.float32).contiguous()
    return Prior(downs=downs, r1=r1, preset=preset, base_model=base_model, domain=domain,
                 training={"kind": "orthonormal-random", "note": "not meta-learned"})
