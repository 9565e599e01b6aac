"""Writing and summarising ``metalora eval`` results: scores.csv, summary.json, scatter.png, a text summary."""
from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .score import RunScores

CSV_FIELDS = ("run", "identity", "prompt_index", "file", "prompt", "r_face_sim", "face_sim", "clip_t", "status",
              "faces_found", "n_test", "embedder", "detector", "clip_model")
METRIC_NOTES = {
    "r_face_sim": "Algorithm 3 (Meta-LoRA paper, appendix F): mean over identities and prompts of the mean "
                  "cosine between the generated face and every held-out photo; reference excluded",
    "face_sim": "conventional FaceSim: cosine between the generated face and the reference photo's face",
    "clip_t": "cosine of CLIP image and prompt embeddings (raw, not x100)",
}
FILES = {"scores": "scores.csv", "summary": "summary.json", "scatter": "scatter.png"}


def _short(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def scores_csv(runs: Sequence[RunScores]) -> bytes:
    """One CSV row per run x identity x prompt."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CSV_FIELDS), lineterminator="\n")
    writer.writeheader()
    for run in runs:
        writer.writerows(run.rows)
    return buf.getvalue().encode("utf-8")


def summarise(runs: Sequence[RunScores], *, setup: Mapping[str, Any]) -> dict[str, Any]:
    """summary.json: the metric definitions, the setup (embedder, detector, prompts, identities) and per run."""
    from .. import __version__

    return {"metalora_version": __version__, "metric_notes": dict(METRIC_NOTES), **setup,
            "runs": {r.label: r.summary() for r in runs}, "files": dict(FILES)}


def summary_lines(runs: Sequence[RunScores]) -> list[str]:
    """One line per run for the terminal."""
    return [
        f"{r.label}: R-FaceSim {_short(r.r_face_sim)}, FaceSim {_short(r.face_sim)}, CLIP-T {_short(r.clip_t)} "
        f"({r.n_scored}/{r.n_pairs} pairs scored, {len(r.no_face_generated)} generated without a face)"
        for r in runs
    ]


def scatter(runs: Sequence[RunScores], *, embedder: str, detector: str, clip_note: str = "", has_clip: bool):
    """R-FaceSim vs CLIP-T: a big point per run mean, a small one per identity (paper Fig. 3, left)."""
    from ..draw.eval_figures import ScatterPoint, draw_scatter

    points: list[ScatterPoint] = []
    for pos, r in enumerate(runs):
        run_x = r.clip_t if r.clip_t is not None else float(pos)
        for v in r.identities.values():
            if v["r_face_sim"] is not None:
                x = v["clip_t"] if has_clip else run_x
                points.append(ScatterPoint(x if x is not None else math.nan, v["r_face_sim"], r.label, "", 3))
        if r.r_face_sim is not None:
            points.append(ScatterPoint(run_x, r.r_face_sim, r.label, r.label, 7))
    return draw_scatter(
        points, "CLIP-T (prompt adherence)" if has_clip else "run (CLIP-T not computed)", f"R-FaceSim ({embedder})",
        title=f"R-FaceSim vs CLIP-T: big dot = run mean, small = identity (detector {detector})",
        note=clip_note, x_ticks=None if has_clip else [(float(i), r.label) for i, r in enumerate(runs)],
    )


def write_report(out_dir: str | Path, runs: Sequence[RunScores], *, setup: Mapping[str, Any], embedder: str,
                 detector: str, clip_note: str = "", has_clip: bool) -> list[Path]:
    """Writes scores.csv, summary.json and scatter.png atomically into ``out_dir``; returns their paths."""
    from ..formats.files import atomic_save_png, atomic_write_bytes

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / FILES["scores"], scores_csv(runs))
    summary = summarise(runs, setup=setup)
    atomic_write_bytes(out / FILES["summary"], (json.dumps(summary, indent=2) + "\n").encode("utf-8"))
    atomic_save_png(scatter(runs, embedder=embedder, detector=detector, clip_note=clip_note, has_clip=has_clip),
                    out / FILES["scatter"])
    return [out / f for f in FILES.values()]


__all__ = ["CSV_FIELDS", "scatter", "scores_csv", "summarise", "summary_lines", "write_report"]
