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
import csv
import io
import json
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_INDEX_NAME = re.compile(r"^(\d+)(?:_\d{5}_)?$")  # "3.png", or ComfyUI SaveImage's "3_00001_.png"


class _LazyImages(Sequence):
    """A list of image paths (or None) that loads each image only when it is read."""

    def __init__(self, paths: Sequence[Path | None]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return _LazyImages(self.paths[i])
        from ..faces.image import load_image

        p = self.paths[i]
        return None if p is None else load_image(p)


def _photos(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_identities(root: str | Path) -> dict[str, dict[str, Any]]:
    """Reads ``root/<identity>/`` folders: reference photo, held-out photos, optional gender.

    Returns:
        identity -> {"reference": Path, "test": [Path, ...], "gender": str | None}, sorted by name.

    Raises:
        FileNotFoundError: no such folder, or no identity subfolder with photos.
        ValueError: ``reference.txt`` names a photo that is not in the folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no identities folder at {root}; make one subfolder of photos per person")
    out: dict[str, dict[str, Any]] = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        photos = _photos(sub)
        if not photos:
            log.warning("identity folder %s has no photos (%s); skipped", sub, "/".join(IMAGE_SUFFIXES))
            continue
        ref = photos[0]
        ref_file = sub / "reference.txt"
        if ref_file.is_file():
            lines = [ln.strip() for ln in ref_file.read_text(encoding="utf-8").splitlines() if ln.strip()]
            name = lines[0] if lines else ""
            hit = [p for p in photos if p.name == name]
            if not hit:
                raise ValueError(
                    f"{ref_file} names {name!r}, which is not a photo in {sub}; write one of "
                    f"{[p.name for p in photos]}"
                )
            ref = hit[0]
        gender_file = sub / "gender.txt"
        gender = gender_file.read_text(encoding="utf-8").strip() if gender_file.is_file() else None
        out[sub.name] = {"reference": ref, "test": [p for p in photos if p != ref], "gender": gender or None}
    if not out:
        raise FileNotFoundError(f"{root} has no identity subfolder with photos; expected {root}/<person>/<photo>.jpg")
    return out


def read_generated(run_dir: str | Path, identities: Sequence[str], n_prompts: int) -> tuple[dict[str, list[Path | None]], list[str]]:
    """Maps ``run_dir/<identity>/<prompt index>.<ext>`` to identity -> [path or None per prompt].

    Returns:
        (identity -> list of length n_prompts, warnings about ignored files and folders).

    Raises:
        FileNotFoundError: no such folder, or none of its subfolders is a known identity.
        ValueError: two files for one prompt index (e.g. ``1.png`` and ``001.png``).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no generated-images folder at {run_dir}; expected {run_dir}/<identity>/<prompt index>.png")
    notes: list[str] = []
    known = set(identities)
    for sub in sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name not in known):
        notes.append(f"{sub}: not an identity of --identities, ignored")
    out: dict[str, list[Path | None]] = {}
    for ident in identities:
        slots: list[Path | None] = [None] * n_prompts
        folder = run_dir / ident
        if folder.is_dir():
            for f in _photos(folder):
                m = _INDEX_NAME.match(f.stem)
                if m is None:
                    notes.append(f"{f}: name is not a prompt index, ignored")
                    continue
                k = int(m.group(1))
                if k >= n_prompts:
                    notes.append(f"{f}: prompt index {k} but only {n_prompts} prompt(s), ignored")
                    continue
                if slots[k] is not None:
                    raise ValueError(f"two generated images for prompt {k} of {ident!r}: {slots[k]} and {f}; keep one")
                slots[k] = f
        out[ident] = slots
    if not any(any(s is not None for s in v) for v in out.values()):
        raise FileNotFoundError(
            f"{run_dir} has no generated image for any identity; expected {run_dir}/<identity>/<prompt index>.png "
            f"with identities {sorted(known)}"
        )
    return out, notes


def _parse_run(value: str) -> tuple[str, Path]:
    """``DIR`` or ``LABEL=DIR`` -> (label, folder)."""
    if "=" in value and not Path(value).exists():
        label, _, folder = value.partition("=")
        return label.strip(), Path(folder)
    return Path(value).name or value, Path(value)


def _num(v: float | None) -> str:
    return "" if v is None else f"{v:.6f}"


def _short(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def run_eval(args: argparse.Namespace) -> str:
    """Runs ``metalora eval`` (see the module docstring); returns a short text summary."""
    from .. import __version__
    from ..draw.eval_figures import ScatterPoint, draw_scatter
    from ..eval.metrics import face_sim, load_clip, r_face_sim
    from ..faces import get_detector, get_embedder, load_image
    from ..formats.files import atomic_save_png, atomic_write_bytes
    from ..data.prompts import expand_prompt, is_template, load_prompts

    from .checks import check_eval

    check_eval(args)  # --out usable, earlier scores not replaced without --overwrite, --device usable
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    identities = read_identities(args.identities)
    prompts = load_prompts(args.prompts)
    templated = any(is_template(p) for p in prompts)
    prompt_sets: dict[str, list[str]] = {}
    for ident, info in identities.items():
        gender = info["gender"] or args.gender
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
    detector = get_detector(args.detector)
    embedder = get_embedder(args.embedder)
    scorer = None
    clip_note = ""
    if args.clip_model:
        scorer = load_clip(args.clip_model, args.device)
    else:
        clip_note = "CLIP-T skipped: no --clip-model folder given (a transformers CLIP ViT-B/32, e.g. openai/clip-vit-base-patch32)"
        log.warning(clip_note)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    refs = {k: load_image(v["reference"]) for k, v in identities.items()}
    multi = [k for k, v in identities.items() if v["test"]]
    single = [k for k, v in identities.items() if not v["test"]]
    if single:
        log.warning("identities with one photo get no R-FaceSim (Algorithm 3 needs held-out photos): %s", single)

    rows: list[dict[str, Any]] = []
    summary_runs: dict[str, Any] = {}
    points: list[ScatterPoint] = []
    text: list[str] = []
    for label, run_dir in runs:
        gen_paths, notes = read_generated(run_dir, list(identities), len(prompts))
        for n in notes:
            log.warning("%s", n)
        # Algorithm 3 over the identities that have held-out photos.
        rfs = None
        if multi:
            rfs = r_face_sim(
                {k: _LazyImages(gen_paths[k]) for k in multi},
                {k: _LazyImages(identities[k]["test"]) for k in multi},
                detector,
                embedder,
                references={k: refs[k] for k in multi},
                missing_face=args.missing_face,
            )
        pair_by_key = {(p.identity, p.prompt_index): p for p in (rfs.pairs if rfs else ())}
        single_fs: dict[tuple[str, int], float | None] = {}
        for k in single:
            present = [(i, p) for i, p in enumerate(gen_paths[k]) if p is not None]
            if present:
                fsr = face_sim([load_image(p) for _, p in present], refs[k], detector, embedder, missing_face=args.missing_face)
                single_fs.update({(k, i): s for (i, _), s in zip(present, fsr.scores)})
        # CLIP-T of every generated image against its (expanded) prompt.
        clip_scores: dict[tuple[str, int], float] = {}
        if scorer is not None:
            keys = [(k, i) for k in identities for i, p in enumerate(gen_paths[k]) if p is not None]
            for start in range(0, len(keys), args.batch_size):
                chunk = keys[start : start + args.batch_size]
                vals = scorer.score([load_image(gen_paths[k][i]) for k, i in chunk], [prompt_sets[k][i] for k, i in chunk])
                clip_scores.update({key: float(v) for key, v in zip(chunk, vals)})

        per_ident: dict[str, dict[str, Any]] = {}
        ident_rfs = rfs.identity_scores() if rfs else {}
        for k in identities:
            for i in range(len(prompts)):
                pair = pair_by_key.get((k, i))
                path = gen_paths[k][i]
                if pair is not None:
                    status, rf, fs, nf, nt = pair.status, pair.score, pair.face_sim, pair.faces_found, pair.n_test
                else:
                    fs = single_fs.get((k, i))
                    status = "missing" if path is None else ("single_photo" if fs is not None else "single_photo_no_face")
                    rf, nf, nt = None, None, 0
                rows.append({
                    "run": label, "identity": k, "prompt_index": i, "file": "" if path is None else str(path),
                    "prompt": prompt_sets[k][i], "r_face_sim": _num(rf), "face_sim": _num(fs),
                    "clip_t": _num(clip_scores.get((k, i))), "status": status,
                    "faces_found": "" if nf is None or status == "missing" else nf, "n_test": nt, "embedder": embedder.name,
                    "detector": detector.name, "clip_model": scorer.name if scorer else "",
                })
            ck = [v for (kk, _), v in clip_scores.items() if kk == k]
            per_ident[k] = {
                "r_face_sim": None if ident_rfs.get(k) is None else round(ident_rfs[k], 6),
                "clip_t": round(sum(ck) / len(ck), 6) if ck else None,
                "generated": sum(p is not None for p in gen_paths[k]),
            }
        clip_mean = sum(clip_scores.values()) / len(clip_scores) if clip_scores else None
        rd = rfs.to_dict() if rfs else {}
        summary_runs[label] = {
            "generated_dir": str(run_dir),
            "r_face_sim": rd.get("r_face_sim"),
            "face_sim": rd.get("face_sim"),
            "clip_t": None if clip_mean is None else round(clip_mean, 6),
            "n_pairs": rd.get("n_pairs", 0),
            "n_scored": rd.get("n_scored", 0),
            "n_clip_t": len(clip_scores),
            "no_face_generated": rd.get("no_face_generated", []),
            "no_face_test": rd.get("no_face_test", []),
            "missing": [[k, i] for k in identities for i, p in enumerate(gen_paths[k]) if p is None],
            "single_photo_identities": single,
            "identities": per_ident,
            "notes": notes,
        }
        r_mean = rd.get("r_face_sim")
        text.append(
            f"{label}: R-FaceSim {_short(r_mean)}, FaceSim {_short(rd.get('face_sim'))}, CLIP-T {_short(clip_mean)} "
            f"({rd.get('n_scored', 0)}/{rd.get('n_pairs', 0)} pairs scored, "
            f"{len(rd.get('no_face_generated', []))} generated without a face)"
        )
        run_x = clip_mean if clip_mean is not None else float(len(summary_runs) - 1)
        for k, v in per_ident.items():
            if v["r_face_sim"] is not None:
                x = v["clip_t"] if scorer is not None else run_x
                points.append(ScatterPoint(x if x is not None else math.nan, v["r_face_sim"], label, "", 3))
        if r_mean is not None:
            points.append(ScatterPoint(run_x, r_mean, label, label, 7))

    fields = ["run", "identity", "prompt_index", "file", "prompt", "r_face_sim", "face_sim", "clip_t", "status",
              "faces_found", "n_test", "embedder", "detector", "clip_model"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(out_dir / "scores.csv", buf.getvalue().encode("utf-8"))

    summary = {
        "metalora_version": __version__,
        "metric_notes": {
            "r_face_sim": "Algorithm 3 (Meta-LoRA paper, appendix F): mean over identities and prompts of the mean "
                          "cosine between the generated face and every held-out photo; reference excluded",
            "face_sim": "conventional FaceSim: cosine between the generated face and the reference photo's face",
            "clip_t": "cosine of CLIP image and prompt embeddings (raw, not x100)",
        },
        "embedder": embedder.name,
        "detector": detector.name,
        "clip_model": scorer.name if scorer else None,
        "clip_t_note": clip_note or None,
        "missing_face": args.missing_face,
        "prompts": {"source": str(args.prompts), "count": len(prompts), "templated": templated},
        "identities": {
            k: {"reference": v["reference"].name, "test": [p.name for p in v["test"]], "gender": v["gender"] or args.gender}
            for k, v in identities.items()
        },
        "runs": summary_runs,
        "files": {"scores": "scores.csv", "summary": "summary.json", "scatter": "scatter.png"},
    }
    atomic_write_bytes(out_dir / "summary.json", (json.dumps(summary, indent=2) + "\n").encode("utf-8"))

    x_label = "CLIP-T (prompt adherence)" if scorer is not None else "run (CLIP-T not computed)"
    plot = draw_scatter(
        points, x_label, f"R-FaceSim ({embedder.name})",
        title=f"R-FaceSim vs CLIP-T: big dot = run mean, small = identity (detector {detector.name})",
        note=clip_note,
        x_ticks=None if scorer is not None else [(float(i), lab) for i, lab in enumerate(summary_runs)],
    )
    atomic_save_png(plot, out_dir / "scatter.png")
    text.append(f"wrote {out_dir / 'scores.csv'}, {out_dir / 'summary.json'}, {out_dir / 'scatter.png'}")
    return "\n".join(text)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds ``eval`` to a CLI's subparsers (``func`` returns the text summary)."""
    from ..eval.metrics import MISSING_FACE_POLICIES
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


__all__ = ["read_generated", "read_identities", "register", "run_eval"]
