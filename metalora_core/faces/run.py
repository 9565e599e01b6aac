"""``run_crops``: photo in, crop PNGs + contact sheet + crops.json out (the ``metalora crops`` command)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from ..formats.files import atomic_save_png, atomic_write_bytes
from .augment import AugmentConfig
from .detect import FaceDetector
from .image import contact_sheet, draw_faces, load_image
from .person import person_crops

logger = logging.getLogger(__name__)


def run_crops(
    image_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    detector: str | FaceDetector = "auto",
    seed: int = 0,
    config: AugmentConfig | None = None,
    *,
    face_index: int | None = None,
    others: str = "blur",
    resolution: int | None = None,
    insightface_root: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Detects the face in a photo and writes the paper's augmented crops (``person_crops``, the
    same crops the Face Augment node makes from the same photo and settings).

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
        others: crops showing other people's faces: "blur" those faces, "drop" the crop or "keep" it.
        resolution: crop side in pixels (None: ``config``'s bucket, 512 by default).
        insightface_root: see ``get_detector``.

    Returns:
        The crops.json content, plus ``"out_dir"``.

    Raises:
        ValueError: no face found, or a bad index.
        FileNotFoundError: no such photo, or a requested insightface pack is missing.
    """
    image = load_image(image_path)
    made, report = person_crops([image], detector=detector, face_index=face_index or 0, others=others,
                                resolution=resolution, augment=config, seed=seed,
                                insightface_root=None if insightface_root is None else str(insightface_root))
    photo = report.photos[0]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, crop in enumerate(made.crops):
        flip = "_flip" if crop.flipped else ""
        name = f"crop_{i:02d}_{crop.ratio[0]}x{crop.ratio[1]}_s{crop.requested_scale:g}{flip}.png"
        atomic_save_png(crop.image, out / name)
        entries.append({"file": name, **crop.to_dict()})
    atomic_save_png(draw_faces(image, photo.found), out / "faces.png")
    atomic_save_png(contact_sheet(made.crops), out / "contact_sheet.png")
    result: dict[str, Any] = {
        "image": str(Path(image_path)),
        "image_size": list(image.size),
        "detector": made.detector,
        "detect_seconds": round(photo.detect_seconds, 4),
        "faces_found": photo.faces,
        "face": made.faces[0].to_dict(),
        "other_faces": others,
        "blurred": photo.blurred,
        "dropped": photo.dropped,
        "seed": seed,
        "config": made.augment.to_dict(),
        "crops": entries,
    }
    atomic_write_bytes(out / "crops.json", (json.dumps(result, indent=2) + "\n").encode())
    logger.info("wrote %d crops to %s", len(made.crops), out)
    return {**result, "out_dir": str(out)}
