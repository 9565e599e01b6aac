"""Input and output checks every command runs first, before any expensive work.

Each check raises ``ValueError`` / ``FileNotFoundError`` / ``FileExistsError`` naming the flag,
the value and the fix; the top-level handler turns it into one ``error:`` line (exit 2).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any

from ..formats.files import remove_stale_temps
from ..formats.outputs import check_distinct, check_output_file, check_output_folder, used_by

log = logging.getLogger(__name__)

_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def check_device(name: str | None, flag: str = "--device") -> None:
    """Refuses a device this torch cannot use (``cuda`` on a CPU build, a missing GPU index)."""
    if name is None:
        return
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{flag} {name!r} is not a torch device; use cpu, cuda, cuda:1 or mps") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"{flag} {name}: {why} (torch {torch.__version__}); pass {flag} cpu, "
                             "or install a CUDA build of torch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{flag} {name}: only {torch.cuda.device_count()} CUDA device(s) here; "
                             f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"{flag} {name}: MPS is not available here; pass {flag} cpu")


def check_finite(flag: str, value: float | None, *, positive: bool = False) -> None:
    """A float flag must be a finite number (and > 0 with ``positive``)."""
    if value is None:
        return
    if not math.isfinite(value):
        raise ValueError(f"{flag} {value} is not a finite number; give a number such as 1.0")
    if positive and value <= 0:
        raise ValueError(f"{flag} {value} must be greater than 0")


def check_positive_int(flag: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{flag} {value} must be at least 1")


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the {what} is damaged, re-download or re-save it") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object; the {what} is damaged, "
                         "re-download or re-save it")
    return data


# config.json fields a family's dims are read from (``ModelDims.from_diffusers_config``)
_CONFIG_FIELDS = {
    "flux.1-dev": ("num_layers", "num_single_layers", "num_attention_heads", "attention_head_dim"),
    "flux.2": ("num_layers", "num_single_layers", "num_attention_heads", "attention_head_dim"),
    "z-image": ("dim", "n_layers", "n_refiner_layers", "n_heads"),
}


def _folder_word(family: Any) -> str:
    """How messages name a family's folder ("FLUX" for FLUX.1, as before there were families)."""
    from ..lora.families import FLUX1

    return "FLUX" if family is None or family is FLUX1 else family.title


def _supported_folders() -> str:
    from ..lora.families import FAMILIES

    return ", ".join(f"{f.title} ({' or '.join(f.diffusers_pipelines)})" for f in FAMILIES.values())


def check_model_folder(model: str | Path, *, transformer: str | None = None, flag: str = "--model") -> dict[str, Any]:
    """A local diffusers folder of a supported family (FLUX.1-dev, FLUX.2, Z-Image): model_index.json
    naming the family's pipeline, a transformer config of the same family (and weights unless
    ``transformer`` replaces them). Returns the transformer's config.json content."""
    from ..lora.families import FLUX1, family_of_diffusers_config, family_of_pipeline

    model = Path(model)
    if not model.is_dir():
        raise FileNotFoundError(f"{flag} {model}: no such folder; pass a local diffusers model folder "
                                "(the one that holds model_index.json)")
    index = model / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{flag} {model} is not a diffusers model folder (no model_index.json); "
                                "pass the folder that holds model_index.json")
    info = _read_json(index, "model folder")
    cls = str(info.get("_class_name", ""))
    by_pipeline = family_of_pipeline(cls)
    if by_pipeline is None and "Flux" in cls and not cls.startswith("Flux2"):
        by_pipeline = FLUX1  # any FLUX.1 pipeline folder loads as a FluxPipeline
    if by_pipeline is None:
        raise ValueError(f"{flag} {model} holds a {cls or 'unnamed'} pipeline (model_index.json), which MetaLoRA does "
                         f"not train; pass a diffusers folder of {_supported_folders()}")
    tdir = model / "transformer"
    if not (tdir / "config.json").is_file():
        raise FileNotFoundError(f"{flag} {model} has no transformer/config.json; the folder is incomplete, "
                                f"download the whole {_folder_word(by_pipeline)} folder (transformer/ included)")
    config = _read_json(tdir / "config.json", "transformer config")
    tcls = str(config.get("_class_name", ""))
    try:
        family = family_of_diffusers_config(config) if tcls else None
    except ValueError:
        family = None
    if family is None:
        raise ValueError(f"{flag} {model}: transformer/config.json names {tcls or 'no class'}, not "
                         f"{by_pipeline.diffusers_class}; pass a diffusers folder of {_supported_folders()}")
    if family is not by_pipeline:
        raise ValueError(f"{flag} {model}: model_index.json names a {by_pipeline.title} pipeline ({cls}) but "
                         f"transformer/config.json a {family.title} transformer ({tcls}); the folder is mixed up, "
                         "download it again")
    missing = [k for k in _CONFIG_FIELDS[family.name] if not isinstance(config.get(k), int)]
    if missing:
        raise ValueError(f"{flag} {model}: transformer/config.json lacks {missing}; the config is damaged")
    if transformer is None and not any(tdir.glob("*.safetensors")):
        raise FileNotFoundError(f"{flag} {model}: transformer/ holds no .safetensors weights; download them, "
                                "or pass --transformer FILE.safetensors")
    return config


def _module_of(key: str) -> str:
    """A state-dict key's module name without the usual prefixes and the parameter name."""
    for prefix in ("model.diffusion_model.", "diffusion_model.", "transformer."):
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    return key.rsplit(".", 1)[0]


def check_transformer_file(path: str | Path, flag: str = "--transformer", *, family: Any = None) -> None:
    """A single-file transformer of ``family`` (default FLUX.1): exists, is safetensors (never a
    pickle), has the family's layer keys (diffusers or original/ComfyUI names)."""
    from ..lora.families import FLUX1

    family = family or FLUX1
    word = _folder_word(family)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {path}: no such file; pass a {word} transformer .safetensors file")
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(_PICKLE_MAGIC):
        raise ValueError(f"{flag} {path} is a pickle (PyTorch .ckpt/.pt/.bin) file, which can run code when "
                         "loaded, so it is not read; convert it to .safetensors")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{flag} {path} is not a readable safetensors file ({e}); re-download it") from e
    sample = ", ".join(keys[:2]) or "no tensors"
    if family is FLUX1:
        flux = (any(".transformer_blocks." in f".{k}" for k in keys)
                and any("single_transformer_blocks." in k for k in keys))
        bfl = any("double_blocks." in k for k in keys) and any("single_blocks." in k for k in keys)
        if not (flux or bfl):
            raise ValueError(f"{flag} {path} is not a FLUX transformer (no double/single block keys; it holds e.g. "
                             f"{sample}); pass a FLUX.1 transformer file")
        return
    if not any(family.canonical(_module_of(k)) for k in keys):
        raise ValueError(f"{flag} {path} is not a {family.title} transformer (no key names one of its layers; it "
                         f"holds e.g. {sample}); pass a {family.title} transformer file")


def lora_file_bytes(shapes: dict[str, tuple[int, int]], rank: int, *, r1: int | None = None,
                    state: bool = False) -> int:
    """Expected size of a float32 LoRA (or adapter-state) file over ``shapes`` (name -> (in, out))."""
    n = 0
    for fin, fout in shapes.values():
        if state:
            n += (r1 or rank) * fin + (rank * r1 if r1 else 0) + fout * rank
        else:
            n += rank * (fin + fout)
    return 4 * n + 200 * len(shapes) + 4096


def check_personalize(args: argparse.Namespace) -> Any:
    """Everything ``personalize`` can check before it loads the model and trains.

    Returns:
        The ``--prior`` loaded and fitted to the model folder's dims (``train.recipe.FittedPrior``,
        which the run uses as it is), or None without ``--prior``.
    """
    from ..faces import load_image
    from ..faces.augment import check_resolution
    from ..formats.prior import check_rank, load_prior
    from ..lora.families import family_of_diffusers_config
    from ..lora.layers import DEFAULT_PRESET, resolve_targets
    from ..train.recipe import fit_prior
    from .commands import training_caption

    check_device(args.device)
    check_finite("--guidance", args.guidance)
    check_finite("--lr", args.lr, positive=True)
    for flag in ("steps", "rank"):
        check_positive_int(f"--{flag}", getattr(args, flag))
    check_resolution(args.resolution, "--resolution")
    if (Path(args.model) / "model_index.json").is_file():
        training_caption(args.caption, args.class_noun)  # the subject's class is required
    config = check_model_folder(args.model, transformer=args.transformer)
    family = family_of_diffusers_config(config)
    if args.transformer:
        check_transformer_file(args.transformer, family=family)
    dims = family.dims_from_diffusers_config(config)
    for p in args.image:
        load_image(p)  # missing or unreadable photo: a clear error now, not after loading the model
    fitted = None
    if args.prior:
        prior = load_prior(args.prior)
        fitted = fit_prior(prior, dims, source=f"--prior {args.prior}")
        shapes = fitted.shapes
        check_rank(args.rank, prior, "--rank")
        r1 = prior.r1
    else:
        shapes, r1 = resolve_targets(args.preset or DEFAULT_PRESET, dims), None
    inputs = {"--prior": args.prior, "--image": args.image, "--transformer": args.transformer}
    overwrite = bool(getattr(args, "overwrite", False))
    check_output_file(args.out, overwrite=overwrite, inputs=inputs, expected_bytes=lora_file_bytes(shapes, args.rank),
                      suffix=".safetensors")
    if args.state:
        check_distinct("--out", args.out, "--state", args.state)
        check_output_file(args.state, what="--state", overwrite=overwrite, inputs=inputs,
                          expected_bytes=lora_file_bytes(shapes, args.rank, r1=r1, state=True), suffix=".safetensors")
    return fitted


def check_export(args: argparse.Namespace) -> None:
    state = Path(args.state)
    if not state.is_file():
        raise FileNotFoundError(f"no adapter state at {state}; write one with 'metalora personalize --state FILE'")
    check_output_file(args.out, overwrite=bool(getattr(args, "overwrite", False)), inputs={"state": state},
                      expected_bytes=state.stat().st_size, suffix=".safetensors")


META_TRAIN_OUTPUTS = ("checkpoint.safetensors", "prior.safetensors", "summary.json", "loss.png")


def check_meta_train(args: argparse.Namespace) -> None:
    """``meta-train --out`` is a usable folder, not silently a previous run's; flags are sane."""
    from ..faces.augment import check_resolution

    check_device(args.device)
    if getattr(args, "resolution", None) is not None:
        check_resolution(args.resolution, "--resolution")
    check_finite("--guidance", args.guidance)
    check_finite("--lr", args.lr, positive=True)
    out = check_output_folder(args.out)
    used = used_by(out, META_TRAIN_OUTPUTS)
    if used and not args.resume and not getattr(args, "overwrite", False):
        raise FileExistsError(f"--out {out} already holds a meta-train run ({', '.join(used)}); pass --resume to "
                              "continue it, --overwrite to start a new run that replaces it, or choose another folder")
    if args.resume and not (out / "checkpoint.safetensors").is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {out / 'checkpoint.safetensors'}; run without --resume "
                                "to start, or pass the --out folder of the run to continue")
    if not args.tiny and args.model:
        check_model_folder(args.model)
    for name in META_TRAIN_OUTPUTS:
        remove_stale_temps(out / name)


def check_crops(args: argparse.Namespace) -> list[str]:
    """``crops --out``: a usable folder; a previous crops run there needs ``--overwrite``.

    Returns the previous run's files (to clear the ones the new run does not rewrite).
    """
    from ..formats.outputs import previous_crops

    from ..faces.augment import check_resolution

    check_resolution(args.resolution, "--resolution")
    out = check_output_folder(args.out)
    before = previous_crops(out)
    if before and not getattr(args, "overwrite", False):
        n = sum(name.startswith("crop_") for name in before)
        raise FileExistsError(f"--out {out} already holds the outputs of an earlier crops run ({n} crop PNG(s), "
                              f"{', '.join(n for n in before if not n.startswith('crop_'))}); pass --overwrite to "
                              "replace them (only those files are touched), or choose an empty folder")
    return before


# both demos: the small-domain one (comparison.png) and the real-photo one (prior, samples)
DEMO_OUTPUTS = ("prior.safetensors", "crops.png", "lora.safetensors", "samples.png", "comparison.png", "loss.png",
                "report.json")


def check_results_folder(args: argparse.Namespace, names: tuple[str, ...], what: str) -> None:
    """``--out`` is a folder this command may write its ``names`` into: refuses earlier results there
    unless ``--overwrite``, and removes stale temp files of those names."""
    out = check_output_folder(args.out)
    used = used_by(out, names)
    if used and not getattr(args, "overwrite", False):
        raise FileExistsError(f"--out {out} already holds {what} ({', '.join(used)}); pass --overwrite to "
                              "replace them, or choose another folder")
    for name in names:
        remove_stale_temps(out / name)


def check_demo(args: argparse.Namespace) -> None:
    check_positive_int("--steps", args.steps)
    check_results_folder(args, DEMO_OUTPUTS, "demo outputs")


EVAL_OUTPUTS = ("scores.csv", "summary.json", "scatter.png")


def check_eval(args: argparse.Namespace) -> None:
    check_device(getattr(args, "device", None))
    check_results_folder(args, EVAL_OUTPUTS, "eval results")
