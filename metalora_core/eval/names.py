"""Option names of the evaluation metrics (no heavy imports: the CLI's help reads them)."""
from __future__ import annotations

MISSING_FACE_POLICIES: tuple[str, ...] = ("exclude", "zero")
