"""Core subcommands: demo, inspect, personalize, export."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..faces.names import OTHER_FACES

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="one photo of the small trained face domain -> Stage-2 with its prior -> a "
                       "comparison picture (--photo: your photo on a tiny random-weight FLUX); CPU, no download")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--steps", type=int, default=None,
                   help="Stage-2 steps (default: the gated assay's Stage-2 length; 375 with --photo or on the "
                        "first domain's artefacts)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--photo", help="photo of one person: the real-photo path (face detection, the paper's crop grid, "
                                   "export) on a tiny random-weight FLUX; without it the demo runs the small trained "
                                   "face domain with its meta-learned prior")
    p.add_argument("--artefacts", help="small-domain artefact folder (default: the repository's experiments/artefacts)")
    p.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier demo in --out")
    p.set_defaults(func=_demo)

    p = sub.add_parser("inspect", help="print a prior's or LoRA's metadata and layer count as JSON")
    p.add_argument("file")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("personalize", help="Stage-2 on a local diffusers FLUX.1-dev, FLUX.2 or Z-Image model: "
                       "photo -> LoRA")
    p.add_argument("--model", required=True, help="local diffusers folder: FLUX.1-dev (FluxPipeline), FLUX.2 "
                   "(Flux2KleinPipeline, Flux2Pipeline) or Z-Image (ZImagePipeline)")
    p.add_argument("--transformer", help="optional single-file transformer (.safetensors) of the folder's family "
                   "overriding the folder's")
    p.add_argument("--prior", help="Meta-Down prior (.safetensors); omit to train a plain LoRA baseline")
    p.add_argument("--image", required=True, nargs="+", help="photo(s) of the person")
    p.add_argument("--out", required=True, help="LoRA file to write (.safetensors)")
    p.add_argument("--state", help="also save the three-layer adapter state here (for 'metalora export')")
    p.add_argument("--caption", default=None,
                   help="training caption, e.g. 'a photo of a woman' (default: 'a photo of a <class noun>')")
    p.add_argument("--class-noun", default=None,
                   help="what the subject is (woman, man, person, ...); the caption becomes 'a photo of a <noun>'")
    p.add_argument("--steps", type=int, default=375)
    p.add_argument("--rank", type=int, default=1, help="r2 (Meta-LoRA) or r (plain LoRA)")
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default=None,
                   help="target layers for a plain LoRA: attn, attn_mlp or all (default all, as ai-toolkit trains)")
    p.add_argument("--no-augment", action="store_true", help="train on the photo alone (paper's plain-LoRA baseline)")
    p.add_argument("--resolution", type=int, default=512, help="training bucket side (area = side^2)")
    p.add_argument("--detector", default="auto")
    p.add_argument("--face", type=int, default=0, help="face index when a photo shows several (0 = largest)")
    p.add_argument("--other-faces", default="blur", choices=OTHER_FACES,
                   help="crops that show other people's faces: blur those faces (default), drop the crop, or keep it")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--guidance", type=float, default=1.0, help="distilled guidance input while training")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="replace --out / --state if they exist")
    p.set_defaults(func=_personalize)

    p = sub.add_parser("export", help="merge a saved adapter state (Up*Mid*Down) into a standard LoRA")
    p.add_argument("state", help="adapter state written by 'metalora personalize --state'")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_export)


def _demo(args: argparse.Namespace) -> str:
    from .checks import check_demo
    from .demo import run_demo

    check_demo(args)  # both demos: before any work
    if not args.photo:
        return _domain_demo(args)
    report = run_demo(args.out, steps=375 if args.steps is None else args.steps, seed=args.seed, photo=args.photo)
    lines = [f"demo finished in {report['total_seconds']} s: loss {report['first_loss']:.4f} -> "
             f"{report['last_loss']:.4f} over {report['steps']} steps ({report['crops']} crops, "
             f"detector {report['detector']})"]
    lines += [f"  {k:8s} {v}" for k, v in report["files"].items()]
    lines.append(f"  report   {Path(args.out) / 'report.json'}")
    return "\n".join(lines)


def _domain_demo(args: argparse.Namespace) -> str:
    import torch

    from ..synthfaces.demo import run_domain_demo

    torch.set_num_threads(1)  # tiny matrices: threads only add spin-wait on a shared machine
    report = run_domain_demo(args.out, steps=args.steps, seed=args.seed, artefacts=args.artefacts)
    lines = [f"demo finished in {report['total_seconds']} s: one photo of held-out identity "
             f"{report['identity_index']}, {report['crops']} crops, {report['steps']} Stage-2 steps with the prior; "
             f"identity score base {report['identity_score_base_mean']:.3f} -> plain LoRA "
             f"{report['identity_score_lora_mean']:.3f}, LoRA + augmentation "
             f"{report['identity_score_lora_aug_mean']:.3f}, Meta-LoRA {report['identity_score_metalora_mean']:.3f}"]
    lines += [f"  {k:10s} {v}" for k, v in report["files"].items()]
    lines.append(f"  report     {Path(args.out) / 'report.json'}")
    return "\n".join(lines)


def _inspect(args: argparse.Namespace) -> dict:
    from ..formats.describe import describe_file

    return describe_file(args.file)


def training_caption(caption: str | None, class_noun: str | None) -> str:
    """The Stage-2 caption: ``caption`` as given, else "a photo of a <class_noun>".

    The paper states no caption; the subject's class comes from the user, never a default.

    Raises:
        ValueError: neither is given (or both are blank).
    """
    if caption and caption.strip():
        return caption.strip()
    if class_noun and class_noun.strip():
        from ..train.recipe import class_caption

        return class_caption(class_noun.strip())
    raise ValueError("personalize needs the subject's class: pass --class-noun woman|man|person|... (caption "
                     "'a photo of a <noun>') or --caption 'a photo of a ...'")


def _personalize(args: argparse.Namespace) -> str:
    import torch

    from ..faces import load_image
    from ..faces.person import person_crops
    from ..formats.lora import save_adapter_state, save_lora
    from ..hosts.diffusers_family import diffusers_host, encode_caption, load_pipeline
    from ..train.recipe import run_stage2
    from ..lora.layers import DEFAULT_PRESET
    from ..train.stage2 import Stage2Config
    from .checks import check_personalize
    from .progress import StepLog

    prior = check_personalize(args)  # inputs and outputs (the prior fitted to the model), before loading it
    caption = training_caption(args.caption, args.class_noun)
    pipe = load_pipeline(args.model, dtype=args.dtype, device=args.device, transformer=args.transformer)
    images = [load_image(p) for p in args.image]
    made, _ = person_crops(images, detector=args.detector, face_index=args.face, others=args.other_faces,
                           resolution=args.resolution, seed=args.seed, grid=not args.no_augment)
    config = Stage2Config(steps=args.steps, lr=args.lr, rank=args.rank, seed=args.seed,
                          preset=args.preset or DEFAULT_PRESET)
    host = diffusers_host(pipe.transformer, vae=pipe.vae, pipe=pipe, checkpoint_every=int(args.gradient_checkpointing))
    cond = encode_caption(pipe, caption, guidance=args.guidance)
    progress = StepLog(args.steps, log)

    with torch.random.fork_rng(devices=[]):
        run = run_stage2(host, made, cond, prior, config, progress, caption=caption,
                         prior_source=str(args.prior))
    meta = run.metadata
    family = host.dims.family
    out = save_lora(run.adapters, args.out, family=family, **meta)
    if args.state:
        save_adapter_state(run.adapters, args.state, family=family, **meta)
    adapters = run.adapters
    return (f"wrote {out} ({len(adapters.names)} layers, rank {adapters.rank}, "
            f"loss {run.losses[0]:.4f} -> {run.losses[-1]:.4f})")


def _export(args: argparse.Namespace) -> str:
    from ..formats.lora import load_adapter_state, save_lora
    from .checks import check_export
    from ..hosts.diffusers_flux import DTYPES
    from ..lora.families import DEFAULT_FAMILY, family_named
    from ..train.recipe import Provenance

    check_export(args)
    adapters, meta = load_adapter_state(args.state)
    try:
        provenance = Provenance.from_metadata(meta)
    except ValueError as e:
        raise ValueError(f"{args.state}: {e}; make the state again with 'metalora personalize --state'") from e
    family = family_named(meta.get("base_model", "")) or DEFAULT_FAMILY  # the state names its model's family
    out = save_lora(adapters, args.out, dtype=DTYPES[args.dtype], family=family, **provenance.to_metadata())
    return f"wrote {out} ({len(adapters.names)} layers, rank {adapters.rank})"
