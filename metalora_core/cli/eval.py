"""``metalora eval``: CLIP-T, FaceSim and R-FaceSim (Algorithm 3) over folders of photos and generations.

Folder layouts::

    identities/                  one subfolder per person
      alice/
        photo_a.jpg ...          >= 2 photos for R-FaceSim; the first in sorted order is the
        reference.txt            reference unless this file names another one (optional)
        gender.txt               "man" or "woman" for [man/woman] prompt templates (optional)
    generated/                   one --generated folder per run (checkpoint, rank, method...)
      alice/
        0.png 1.png ...          <prompt index>.<png|jpg|jpeg|webp|bmp>, 0-based over the prompt
                                 file's prompts (comment lines not counted); zero padding is fine

Writes ``scores.csv`` (one row per run x identity x prompt), ``summary.json`` and
``scatter.png`` (R-FaceSim vs CLIP-T, one big point per run and a small one per identity).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def _parse_run(value: str) -> tuple[str, Path]:
    """``DIR`` or ``LABEL=DIR`` -> (label, folder)."""
    if "=" in value and not Path(value).exists():
        label, _, folder = value.partition("=")
        return label.strip(), Path(folder)
    return Path(value).name or value, Path(value)


def run_eval(args: argparse.Namespace) -> str:
    """Runs ``metalora eval`` (see the module docstring); returns a short text summary."""
    from ..data.identities import read_identity_folders
    from ..data.prompts import expand_prompt, is_template, load_prompts
    from ..eval.metrics import load_clip
    from ..eval.report import summary_lines, write_report
    from ..eval.score import score_run
    from ..faces import get_detector, get_embedder

    from .checks import check_eval

    check_eval(args)  # --out usable, earlier scores not replaced without --overwrite, --device usable
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    identities = read_identity_folders(args.identities)
    prompts = load_prompts(args.prompts)
    templated = any(is_template(p) for p in prompts)
    prompt_sets: dict[str, list[str]] = {}
    for ident, folder in identities.items():
        gender = folder.gender or args.gender
        if templated and gender is None:
            raise ValueError(
                f"{args.prompts} holds [man/woman] templates but identity {ident!r} has no gender: pass "
                f"--gender man|woman or write 'man' or 'woman' into {Path(args.identities) / ident / 'gender.txt'}"
            )
        prompt_sets[ident] = [expand_prompt(p, gender) for p in prompts] if gender else list(prompts)
    runs = [_parse_run(v) for v in args.generated]
    labels = [r[0] for r in runs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"--generated runs need distinct labels, got {labels}; use LABEL=DIR")
    detector, embedder = get_detector(args.detector), get_embedder(args.embedder)
    clip, clip_note = None, ""
    if args.clip_model:
        clip = load_clip(args.clip_model, args.device)
    else:
        clip_note = "CLIP-T skipped: no --clip-model folder given (a transformers CLIP ViT-B/32, e.g. openai/clip-vit-base-patch32)"
        log.warning(clip_note)
    single = [k for k, v in identities.items() if not v.test]
    if single:
        log.warning("identities with one photo get no R-FaceSim (Algorithm 3 needs held-out photos): %s", single)

    scored = [score_run(label, run_dir, identities, prompt_sets, detector, embedder, clip=clip,
                        missing_face=args.missing_face, batch_size=args.batch_size) for label, run_dir in runs]
    setup = {
        "embedder": embedder.name,
        "detector": detector.name,
        "clip_model": clip.name if clip else None,
        "clip_t_note": clip_note or None,
        "missing_face": args.missing_face,
        "prompts": {"source": str(args.prompts), "count": len(prompts), "templated": templated},
        "identities": {k: {"reference": v.reference.name, "test": [p.name for p in v.test], "gender": v.gender or args.gender}
                       for k, v in identities.items()},
    }
    files = write_report(args.out, scored, setup=setup, embedder=embedder.name, detector=detector.name,
                         clip_note=clip_note, has_clip=clip is not None)
    return "\n".join(summary_lines(scored) + [f"wrote {', '.join(str(f) for f in files)}"])


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds ``eval`` to a CLI's subparsers (``func`` returns the text summary)."""
    from ..eval.names import MISSING_FACE_POLICIES
    from ..faces import DETECTOR_NAMES, EMBEDDER_NAMES
    from ..data.prompts import PROMPT_TABLES

    p = subparsers.add_parser(
        "eval",
        help="score generated images: R-FaceSim (Algorithm 3), FaceSim and CLIP-T",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--identities", required=True, help="folder with one subfolder of photos per person")
    p.add_argument(
        "--prompts", required=True,
        help=f"prompt file (one per line, '#' comments) or a built-in table: {', '.join(PROMPT_TABLES)}",
    )
    p.add_argument(
        "--generated", required=True, action="append",
        help="folder of generations, <identity>/<prompt index>.png; repeat for several runs, as DIR or LABEL=DIR",
    )
    p.add_argument("--out", required=True, help="output folder for scores.csv, summary.json, scatter.png")
    p.add_argument("--clip-model", default=None, help="local transformers CLIP folder (ViT-B/32); omitted: no CLIP-T")
    p.add_argument("--gender", default=None, choices=("man", "woman"), help="fills [man/woman] prompt templates "
                   "(an identity's gender.txt wins)")
    p.add_argument("--detector", default="auto", choices=DETECTOR_NAMES, help="face detector backend")
    p.add_argument("--embedder", default="auto", choices=EMBEDDER_NAMES, help="identity embedder backend")
    p.add_argument("--missing-face", default="exclude", choices=MISSING_FACE_POLICIES,
                   help="generated images without a face: left out of the mean (exclude) or scored 0 (zero); always reported")
    p.add_argument("--device", default="cpu", help="torch device for CLIP (cpu, cuda)")
    p.add_argument("--batch-size", type=int, default=16, help="CLIP-T images per batch")
    p.add_argument("--overwrite", action="store_true", help="replace scores of an earlier eval in --out")
    p.set_defaults(func=run_eval)
    return p


__all__ = ["register", "run_eval"]
