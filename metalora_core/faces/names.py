"""Backend names of the face detectors and embedders (no heavy imports: the CLI's help reads them)."""
from __future__ import annotations

DETECTOR_NAMES: tuple[str, ...] = ("auto", "yunet", "insightface", "antelopev2", "buffalo_l")
EMBEDDER_NAMES: tuple[str, ...] = ("auto", "sface", "insightface", "antelopev2", "buffalo_l")
OTHER_FACES: tuple[str, ...] = ("blur", "drop", "keep")  # what the crops do with other people's faces
