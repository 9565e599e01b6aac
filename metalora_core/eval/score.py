"""Scoring of ``metalora eval`` runs: R-FaceSim (Algorithm 3), FaceSim and CLIP-T per generated image.

A run is a folder ``<run>/<identity>/<prompt index>.<ext>`` of generations; the identities come
from ``data.identities.read_identity_folders`` (reference photo, held-out photos, gender).
"""
from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.identities import IMAGE_EXTS, IdentityFolder
from .metrics import ClipScorer, face_sim, r_face_sim

log = logging.getLogger(__name__)

_INDEX_NAME = re.compile(r"^(\d+)(?:_\d{5}_)?$")  # "3.png", or ComfyUI SaveImage's "3_00001_.png"


class LazyImages(Sequence):
    """A list of image paths (or None) that loads each image only when it is read."""

    def __init__(self, paths: Sequence[Path | None]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return LazyImages(self.paths[i])
        from ..faces.image import load_image

        p = self.paths[i]
        return None if p is None else load_image(p)


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
            for f in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS):
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


@dataclass
class RunScores:
    """Every score of one run: one row per (identity, prompt), per-identity means, run means."""

    label: str
    generated_dir: Path
    rows: list[dict[str, Any]]  # scores.csv rows (strings and numbers)
    identities: dict[str, dict[str, Any]]  # identity -> r_face_sim, clip_t, generated
    r_face_sim: float | None
    face_sim: float | None
    clip_t: float | None
    n_pairs: int
    n_scored: int
    n_clip_t: int
    no_face_generated: list[list[Any]]
    no_face_test: list[list[Any]]
    missing: list[list[Any]]
    single_photo_identities: list[str]
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The run's entry of summary.json."""
        return {
            "generated_dir": str(self.generated_dir), "r_face_sim": self.r_face_sim, "face_sim": self.face_sim,
            "clip_t": None if self.clip_t is None else round(self.clip_t, 6), "n_pairs": self.n_pairs,
            "n_scored": self.n_scored, "n_clip_t": self.n_clip_t, "no_face_generated": self.no_face_generated,
            "no_face_test": self.no_face_test, "missing": self.missing,
            "single_photo_identities": self.single_photo_identities, "identities": self.identities,
            "notes": self.notes,
        }


def _num(v: float | None) -> str:
    return "" if v is None else f"{v:.6f}"


def score_run(
    label: str,
    run_dir: str | Path,
    identities: Mapping[str, IdentityFolder],
    prompt_sets: Mapping[str, Sequence[str]],
    detector: Any,
    embedder: Any,
    *,
    clip: ClipScorer | None = None,
    missing_face: str = "exclude",
    batch_size: int = 16,
) -> RunScores:
    """Scores one run of generations against the identities' photos.

    Args:
        label: the run's name in the outputs.
        run_dir: ``<run_dir>/<identity>/<prompt index>.png``.
        identities: from ``read_identity_folders``; identities with held-out photos get
            R-FaceSim (Algorithm 3), the others FaceSim against their only photo.
        prompt_sets: identity -> its prompts (templates expanded), list position = prompt index.
        detector, embedder: face backends (``faces.get_detector`` / ``faces.get_embedder``).
        clip: a CLIP scorer for CLIP-T (None: no CLIP-T).
        missing_face: "exclude" or "zero" (see ``metrics.r_face_sim``).
        batch_size: CLIP-T images per batch.
    """
    from ..faces.image import load_image

    names = list(identities)
    n_prompts = len(next(iter(prompt_sets.values())))
    gen_paths, notes = read_generated(run_dir, names, n_prompts)
    for n in notes:
        log.warning("%s", n)
    refs = {k: load_image(v.reference) for k, v in identities.items()}
    multi = [k for k, v in identities.items() if v.test]
    single = [k for k, v in identities.items() if not v.test]
    rfs = None
    if multi:  # Algorithm 3 over the identities that have held-out photos
        rfs = r_face_sim({k: LazyImages(gen_paths[k]) for k in multi}, {k: LazyImages(identities[k].test) for k in multi},
                         detector, embedder, references={k: refs[k] for k in multi}, missing_face=missing_face)
    pair_by_key = {(p.identity, p.prompt_index): p for p in (rfs.pairs if rfs else ())}
    single_fs: dict[tuple[str, int], float | None] = {}
    for k in single:
        present = [(i, p) for i, p in enumerate(gen_paths[k]) if p is not None]
        if present:
            fsr = face_sim([load_image(p) for _, p in present], refs[k], detector, embedder, missing_face=missing_face)
            single_fs.update({(k, i): s for (i, _), s in zip(present, fsr.scores)})
    clip_scores: dict[tuple[str, int], float] = {}
    if clip is not None:  # CLIP-T of every generated image against its (expanded) prompt
        keys = [(k, i) for k in names for i, p in enumerate(gen_paths[k]) if p is not None]
        for start in range(0, len(keys), batch_size):
            chunk = keys[start : start + batch_size]
            vals = clip.score([load_image(gen_paths[k][i]) for k, i in chunk], [prompt_sets[k][i] for k, i in chunk])
            clip_scores.update({key: float(v) for key, v in zip(chunk, vals)})

    rows: list[dict[str, Any]] = []
    per_ident: dict[str, dict[str, Any]] = {}
    ident_rfs = rfs.identity_scores() if rfs else {}
    for k in names:
        for i in range(n_prompts):
            pair, path = pair_by_key.get((k, i)), gen_paths[k][i]
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
                "detector": detector.name, "clip_model": clip.name if clip else "",
            })
        ck = [v for (kk, _), v in clip_scores.items() if kk == k]
        per_ident[k] = {
            "r_face_sim": None if ident_rfs.get(k) is None else round(ident_rfs[k], 6),
            "clip_t": round(sum(ck) / len(ck), 6) if ck else None,
            "generated": sum(p is not None for p in gen_paths[k]),
        }
    rd = rfs.to_dict() if rfs else {}
    return RunScores(
        label=label, generated_dir=Path(run_dir), rows=rows, identities=per_ident,
        r_face_sim=rd.get("r_face_sim"), face_sim=rd.get("face_sim"),
        clip_t=sum(clip_scores.values()) / len(clip_scores) if clip_scores else None,
        n_pairs=rd.get("n_pairs", 0), n_scored=rd.get("n_scored", 0), n_clip_t=len(clip_scores),
        no_face_generated=rd.get("no_face_generated", []), no_face_test=rd.get("no_face_test", []),
        missing=[[k, i] for k in names for i, p in enumerate(gen_paths[k]) if p is None],
        single_photo_identities=single, notes=notes,
    )


__all__ = ["LazyImages", "RunScores", "read_generated", "score_run"]
