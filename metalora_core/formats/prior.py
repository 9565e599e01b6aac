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
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .files import atomic_save_safetensors, content_sha256, read_safetensors
from ..lora.families import DEFAULT_FAMILY, FAMILIES, ModelFamily, family_named
from ..lora.layers import resolve_targets

PRIOR_FORMAT = "metalora.prior"
PRIOR_VERSION = 1
_SUFFIX = ".meta_down"


@dataclass
class Prior:
    """Meta-Down matrices plus their description."""

    downs: dict[str, torch.Tensor]  # canonical name -> (r1, in)
    r1: int
    preset: str | None = None  # None when read from a LoRA file of unknown preset
    base_model: str = DEFAULT_FAMILY.name
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
        family = family_named(meta.get("base_model", "")) or DEFAULT_FAMILY
        downs = dict(sorted(found.items(), key=lambda kv: family.order(kv[0])))  # model order, as saved
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
    family = family_named(meta.get("base_model", "")) or _lora_family(tensors)
    downs, flavour = downs_from_lora(tensors, family)
    if not downs and lora_downs:
        from .describe import TRAINED, model_family, trained_titles

        other = model_family(list(tensors))
        if other not in (*TRAINED, "unknown"):
            raise ValueError(f"{path}: a LoRA for {other}, not {trained_titles()} (keys such as "
                             f"{min(lora_downs)!r}); Meta-LoRA needs a LoRA of one of those or a prior made by "
                             "'metalora meta-train'")
    if not downs:
        raise ValueError(
            f"{path}: neither a Meta-LoRA prior (metadata format={PRIOR_FORMAT!r}) nor a LoRA of a supported model "
            f"({', '.join(f.title for f in FAMILIES.values())}) with lora_A / lora_down keys; pass a prior made by "
            "'metalora meta-train' or a LoRA file of such a model"
        )
    ranks = {t.shape[0] for t in downs.values()}
    if len(ranks) != 1:
        name = next(n for n, t in downs.items() if t.shape[0] != next(iter(downs.values())).shape[0])
        raise ValueError(f"{path}: LoRA ranks differ between layers ({sorted(ranks)}, e.g. {name!r}); a prior needs one r1")
    return Prior(downs=downs, r1=ranks.pop(), preset=None, base_model=meta.get("base_model", family.name), source=flavour,
                 provenance=_provenance(meta))


def _lora_family(tensors: Mapping[str, torch.Tensor]) -> ModelFamily:
    """The family whose names cover the most of a LoRA's layers (the default family on a tie)."""
    return max(FAMILIES.values(), key=lambda f: (len(downs_from_lora(tensors, f)[0]), f is DEFAULT_FAMILY))


def _provenance(meta: Mapping[str, str]) -> dict[str, str]:
    """The ``source_*`` metadata keys a download adds (repo, filename, revision, commit, sha256, url)."""
    return {k: v for k, v in meta.items() if k.startswith("source_")}


# Module names in LoRA files: a family's diffusers or ComfyUI/BFL names (``ModelFamily.canonical``;
# a fused layer shares one Down), under one of these prefixes.
# diffusers' FluxPipeline.lora_state_dict is not used here: it folds kohya's alpha/rank into Down,
# chunks Down of a block-sparse fused Up, hard-codes FLUX.1 widths for kohya files and leaves
# BFL-named peft keys unconverted; tests/test_prior_formats.py pins where it agrees with these tables.
_PREFIXES = ("base_model.model.", "transformer.", "diffusion_model.", "model.diffusion_model.")


def _canonical(module: str, family: ModelFamily) -> tuple[str, ...]:
    """Canonical names for one LoRA module name in dotted form (diffusers or ComfyUI/BFL)."""
    for p in _PREFIXES:
        if module.startswith(p):
            module = module[len(p) :]
            break
    return family.canonical(module)


def downs_from_lora(tensors: Mapping[str, torch.Tensor],
                    family: ModelFamily = DEFAULT_FAMILY) -> tuple[dict[str, torch.Tensor], str]:
    """Extracts Down matrices (canonical name -> (r, in)) from LoRA tensors of a ``family`` model."""
    out: dict[str, torch.Tensor] = {}
    flavour = ""
    for key, t in tensors.items():
        if key.endswith(".lora_A.weight"):
            names, flavour = _canonical(key[: -len(".lora_A.weight")], family), "peft"
        elif key.endswith(".lora_down.weight"):
            stem = key[: -len(".lora_down.weight")]
            names = family.kohya_canonical(stem) or _canonical(stem, family)
            flavour = "kohya"
        else:
            continue
        for n in names:
            out[n] = t.detach().to(torch.float32)
    return dict(sorted(out.items(), key=lambda kv: family.order(kv[0]))), flavour


def validate_prior(prior: Prior, dims: Any, *, source: str = "prior") -> dict[str, tuple[int, int]]:
    """Checks ``prior`` against a host model (its dims: ``FluxDims``, ...): the family its base model
    names, then every layer; fails on the first mismatch.

    Errors start with ``source``; the default names the prior's file when it has one.

    Returns:
        canonical name -> (in, out) for the prior's layers, in model order.

    Raises:
        ValueError: naming both families, or the layer and both shapes (or the missing layer).
    """
    if source == "prior":
        source = prior.label
    family, made_for = dims.family, family_named(prior.base_model)
    if made_for is not None and made_for is not family:
        raise ValueError(f"{source} was made for {made_for.title} (base_model {prior.base_model!r}), this model is "
                         f"{family.title}; use a prior made for {family.title}")
    known = resolve_targets("all", dims)
    if prior.preset is not None:
        for name in resolve_targets(prior.preset, dims):
            if name not in prior.downs:
                raise ValueError(
                    f"{source}: layer {name!r} of preset {prior.preset!r} is missing from the prior; "
                    f"the prior was made for a different model depth (this model has {dims.depth_text()})"
                )
    for name in prior.downs:
        if name not in known:
            raise ValueError(
                f"{source}: layer {name!r} does not exist in this {family.title} model ({dims.depth_text()}); "
                "use a prior made for this model"
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
    dims: Any,
    *,
    r1: int,
    preset: str,
    generator: torch.Generator,
    domain: str = "",
    base_model: str | None = None,
) -> Prior:
    """A deterministic prior with orthonormal Down rows (a starting point, not a learned one);
    ``base_model`` defaults to the name of the family of ``dims``."""
    downs = {}
    for name, (fin, _) in resolve_targets(preset, dims).items():
        g = torch.randn(fin, r1, generator=generator, dtype=torch.float64)
        q, _ = torch.linalg.qr(g)  # (in, r1) orthonormal columns
        downs[name] = q.T.to(torch.float32).contiguous()
    return Prior(downs=downs, r1=r1, preset=preset, base_model=base_model or dims.family.name, domain=domain,
                 training={"kind": "orthonormal-random", "note": "not meta-learned"})
