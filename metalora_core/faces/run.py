"""``run_crops``: photo in, crop PNGs + contact sheet + crops.json out (the ``metalora crops`` command)."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..formats.files import atomic_save_png, atomic_write_bytes
from .augment import AugmentConfig, make_crops
from .detect import Face, FaceDetector, get_detector, select_face
from .image import contact_sheet, draw_faces, load_image

logger = logging.getLogger(__name__)


def run_crops(
    image_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    detector: str | FaceDetector = "auto",
    seed: int = 0,
    config: AugmentConfig | None = None,
    *,
    face_index: int | None = None,
    insightface_root: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Detects the face in a photo and writes the paper's augmented crops.

    Writes into ``out_dir`` (each file atomically): ``crop_NN_<w>x<h>_s<scale>[_flip].png``,
    ``faces.png`` (the source with every detected face drawn), ``contact_sheet.png`` (all crops
    with their face boxes drawn) and ``crops.json`` (detector, face box and landmarks in the
    source, per-crop ratio, scale, flip, size, file).

    Args:
        image_path: the photo.
        out_dir: output folder (created).
        detector: a backend name for ``get_detector`` or a ready ``FaceDetector``.
        seed: seed of the flip generator.
        config: grid settings (default ``AugmentConfig()``).
        face_index: which face when there are several (default: largest).
        insightface_root: see ``get_detector``.

    Returns:
        The crops.json content, plus ``"out_dir"``.

    Raises:
        ValueError: no face found, or a bad index.
        FileNotFoundError: no such photo, or a requested insightface pack is missing.
    """
    config = config or AugmentConfig()
    image = load_image(image_path)
    det = detector if isinstance(detector, FaceDetector) else get_detector(detector, insightface_root=insightface_root)
    t0 = time.perf_counter()
    faces = det.detect(image)
    detect_s = time.perf_counter() - t0
    face = select_face(image, _Fixed(det, faces), index=face_index)
    crops = make_crops(image, face, config, torch.Generator().manual_seed(seed))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, crop in enumerate(crops):
        flip = "_flip" if crop.flipped else ""
        name = f"crop_{i:02d}_{crop.ratio[0]}x{crop.ratio[1]}_s{crop.requested_scale:g}{flip}.png"
        atomic_save_png(crop.image, out / name)
        entries.append({"file": name, **crop.to_dict()})
    atomic_save_png(draw_faces(image, faces), out / "faces.png")
    atomic_save_png(contact_sheet(crops), out / "contact_sheet.png")
    report: dict[str, Any] = {
        "image": str(Path(image_path)),
        "image_size": list(image.size),
        "detector": det.name,
        "detect_seconds": round(detect_s, 4),
        "faces_found": len(faces),
        "face": face.to_dict(),
        "seed": seed,
        "config": config.to_dict(),
        "crops": entries,
    }
    atomic_write_bytes(out / "crops.json", (json.dumps(report, indent=2) + "\n").encode())
    logger.info("wrote %d crops to %s", len(crops), out)
    return {**report, "out_dir": str(out)}


class _Fixed(FaceDetector):
    """Replays already computed detections so select_face does not detect twice."""

    def __init__(self, inner: FaceDetector, faces: list[Face]) -> None:
        self.name = inner.name
        self._faces = faces

    def detect(self, image: Image.Image) -> list[Face]:
        return list(self._faces)
