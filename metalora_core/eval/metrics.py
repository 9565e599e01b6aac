"""Evaluation metrics of the Meta-LoRA paper (section 4.3, appendix F): CLIP-T, FaceSim, R-FaceSim.

- ``clip_t``: cosine similarity of the CLIP image embedding of a generated image and the CLIP
  text embedding of its prompt (the paper uses CLIP ViT-B/32), from a local transformers model
  folder only (never downloaded).
- ``face_sim``: conventional FaceSim, cosine similarity of the identity embeddings of each
  generated face and the reference face (the photo used for personalization).
- ``r_face_sim``: Robust FaceSim, Algorithm 3: per identity the reference is left out and each
  generated face is compared with every other (held-out) photo of that person.

Faces come from a detector and an embedder of ``metalora_core.faces`` (any object with
``.name`` and ``.detect(image) -> list[Face]`` largest first, resp. ``.name`` and
``.embed(image, face) -> (D,) float32``). Every result records the embedder and detector names,
so numbers from different embedders are never mixed up. A generated image without a face is
never dropped silently: its index is reported and ``missing_face`` says whether it was left out
of the mean ("exclude", the default) or counted as similarity 0 ("zero").
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from ..faces.embed import cosine
from .names import MISSING_FACE_POLICIES

logger = logging.getLogger(__name__)

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels
CLIP_T_MODEL_HINT = "openai/clip-vit-base-patch32"  # the paper's CLIP ViT-B/32 on the Hugging Face Hub


class _Detector(Protocol):
    name: str

    def detect(self, image: Image.Image) -> Sequence[Any]: ...


class _Embedder(Protocol):
    name: str

    def embed(self, image: Image.Image, face: Any) -> np.ndarray: ...


# --------------------------------------------------------------------------------------------
# Small helpers


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(np.asarray(values, dtype=np.float64))) if values else None


def _fmt(v: float | None, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _round(v: float | None) -> float | None:
    return None if v is None else round(float(v), 6)


def _check_policy(missing_face: str) -> None:
    if missing_face not in MISSING_FACE_POLICIES:
        raise ValueError(f"missing_face must be one of {MISSING_FACE_POLICIES}, got {missing_face!r}")


def counted(score: float | None, no_face: bool, missing_face: str) -> float | None:
    """The missing-face rule, written once: what one image adds to a mean.

    A scored image adds its score. An image in which no face was found adds 0 under
    ``missing_face="zero"`` and nothing under "exclude". Anything else without a score (a missing
    generation, no usable held-out face) adds nothing.
    """
    if score is not None:
        return score
    return 0.0 if no_face and missing_face == "zero" else None


def _counted_mean(items: Sequence[tuple[float | None, bool]], missing_face: str) -> tuple[float | None, int]:
    """(mean, count) of ``counted`` over (score, no_face) items."""
    values = [v for s, nf in items if (v := counted(s, nf, missing_face)) is not None]
    return _mean(values), len(values)


def _check_image(img: Any, what: str) -> Image.Image:
    if not isinstance(img, Image.Image):
        raise ValueError(f"{what} must be a PIL image, got {type(img).__name__}; load files with faces.load_image")
    return img


@dataclass(frozen=True)
class _Observed:
    """One image seen by the detector and embedder (internal)."""

    faces_found: int
    box: Box | None
    embedding: np.ndarray | None  # (D,) or None when no face


def _observe(image: Image.Image, detector: _Detector, embedder: _Embedder) -> _Observed:
    """Algorithm 3's C (face cropper) then E (embedder): the largest face of the image."""
    faces = list(detector.detect(image))
    if not faces:
        return _Observed(0, None, None)
    face = faces[0]  # detectors return faces largest first
    emb = np.asarray(embedder.embed(image, face), dtype=np.float32).reshape(-1)
    return _Observed(len(faces), tuple(float(v) for v in face.box), emb)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# FaceSim


@dataclass(frozen=True)
class FaceSimResult:
    """Conventional FaceSim of generated images against one reference photo."""

    mean: float | None  # mean over scored images; None when no generated image has a face
    scores: tuple[float | None, ...]  # per generated image; None: no face (see no_face)
    no_face: tuple[int, ...]  # indices of generated images in which no face was found
    faces_found: tuple[int, ...]  # faces the detector found per generated image (the largest is used)
    boxes: tuple[Box | None, ...]  # the face used per generated image
    reference_box: Box  # the face used in the reference photo
    embedder: str  # identity embedder name: scores from different embedders are not comparable
    detector: str  # face detector name
    missing_face: str  # "exclude": faceless images left out of mean; "zero": counted as 0

    @property
    def n_scored(self) -> int:
        """Images that entered the mean."""
        return _counted_mean([(s, s is None) for s in self.scores], self.missing_face)[1]

    def labels(self) -> list[str]:
        """One short label per generated image, for ``draw.sheets.labelled_sheet``."""
        return ["no face" if s is None else f"FaceSim {s:.3f}" for s in self.scores]

    def table(self) -> str:
        """A plain-text table: one row per generated image, then the mean and the bookkeeping."""
        lines = [f"FaceSim (embedder {self.embedder}, detector {self.detector})", "image  faces  face_sim"]
        for i, (s, n) in enumerate(zip(self.scores, self.faces_found)):
            lines.append(f"{i:5d}  {n:5d}  {_fmt(s) if s is not None else 'no face'}")
        lines.append(
            f"mean {_fmt(self.mean)} over {self.n_scored} of {len(self.scores)} image(s); "
            f"{len(self.no_face)} without a face ({self.missing_face})"
        )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": "face_sim",
            "mean": _round(self.mean),
            "scores": [_round(s) for s in self.scores],
            "no_face": list(self.no_face),
            "faces_found": list(self.faces_found),
            "boxes": [None if b is None else [round(v, 2) for v in b] for b in self.boxes],
            "reference_box": [round(v, 2) for v in self.reference_box],
            "n_scored": self.n_scored,
            "embedder": self.embedder,
            "detector": self.detector,
            "missing_face": self.missing_face,
        }


def face_sim(
    generated: Image.Image | Sequence[Image.Image],
    reference: Image.Image,
    detector: _Detector,
    embedder: _Embedder,
    *,
    missing_face: str = "exclude",
) -> FaceSimResult:
    """Conventional FaceSim (appendix F): cosine of each generated face with the reference face.

    Args:
        generated: one PIL image or a list of them (the largest face of each is used).
        reference: the photo used for personalization.
        detector: a face detector (``faces.get_detector``).
        embedder: an identity embedder (``faces.get_embedder``).
        missing_face: "exclude" leaves generated images without a face out of the mean,
            "zero" counts them as similarity 0; either way they are listed in ``no_face``.

    Returns:
        A ``FaceSimResult``.

    Raises:
        ValueError: no face in the reference photo, an empty list, or a bad ``missing_face``.
    """
    _check_policy(missing_face)
    images = [generated] if isinstance(generated, Image.Image) else list(generated)
    if not images:
        raise ValueError("face_sim needs at least one generated image")
    images = [_check_image(im, f"generated image {i}") for i, im in enumerate(images)]
    ref = _observe(_check_image(reference, "reference"), detector, embedder)
    if ref.embedding is None:
        w, h = reference.size
        raise ValueError(
            f"no face found in the reference photo ({w}x{h}) by detector {detector.name!r}; "
            "FaceSim needs the reference face: use a photo where the face is clearly visible"
        )
    scores: list[float | None] = []
    obs_all = [_observe(im, detector, embedder) for im in images]
    for obs in obs_all:
        scores.append(None if obs.embedding is None else cosine(obs.embedding, ref.embedding))
    no_face = tuple(i for i, s in enumerate(scores) if s is None)
    if no_face:
        logger.warning("FaceSim: no face in %d of %d generated image(s): %s (%s)",
                       len(no_face), len(images), list(no_face), missing_face)
    return FaceSimResult(
        mean=_counted_mean([(s, s is None) for s in scores], missing_face)[0],
        scores=tuple(scores),
        no_face=no_face,
        faces_found=tuple(o.faces_found for o in obs_all),
        boxes=tuple(o.box for o in obs_all),
        reference_box=ref.box,  # type: ignore[arg-type]
        embedder=embedder.name,
        detector=detector.name,
        missing_face=missing_face,
    )


# --------------------------------------------------------------------------------------------
# R-FaceSim (Algorithm 3)


@dataclass(frozen=True)
class PairScore:
    """S(i, p) of Algorithm 3: one identity, one prompt, one generated image."""

    identity: str
    prompt_index: int
    score: float | None  # mean cosine against the identity's test faces; None: not scored (see status)
    status: str  # "ok" | "no_face" (none in the generated image) | "no_test_face" (no usable test photo) | "missing"
    faces_found: int  # faces found in the generated image (the largest is used)
    box: Box | None  # the face used in the generated image
    n_test: int  # test faces averaged over (Algorithm 3's count)
    face_sim: float | None = None  # conventional FaceSim against the reference, when references were given

    def to_dict(self) -> dict[str, Any]:
        return {
            "identity": self.identity,
            "prompt_index": self.prompt_index,
            "r_face_sim": _round(self.score),
            "face_sim": _round(self.face_sim),
            "status": self.status,
            "faces_found": self.faces_found,
            "box": None if self.box is None else [round(v, 2) for v in self.box],
            "n_test": self.n_test,
        }


@dataclass(frozen=True)
class HeldOutPhoto:
    """One held-out photo of an identity (Algorithm 3's T)."""

    identity: str
    index: int  # position in the identity's test list
    faces_found: int  # 0: no face, left out of T (reported in RFaceSimResult.no_face_test)
    box: Box | None


@dataclass(frozen=True)
class RFaceSimResult:
    """R-FaceSim (Algorithm 3) with every S(i, p) and the faces that were or were not found."""

    score: float | None  # R-FaceSim: mean of the counted S(i, p); None when nothing could be scored
    pairs: tuple[PairScore, ...]  # every (identity, prompt), in input order
    test_photos: tuple[HeldOutPhoto, ...]  # every held-out photo, with its face count
    embedder: str  # identity embedder name: scores from different embedders are not comparable
    detector: str  # face detector name
    missing_face: str  # "exclude" or "zero" (generated images without a face)
    face_sim: float | None = None  # conventional FaceSim over the same generated images, if references given

    @property
    def n_scored(self) -> int:
        """S(i, p) values that entered the mean."""
        return _counted_mean([(p.score, p.status == "no_face") for p in self.pairs], self.missing_face)[1]

    @property
    def no_face_generated(self) -> tuple[tuple[str, int], ...]:
        """(identity, prompt index) of generated images in which no face was found."""
        return tuple((p.identity, p.prompt_index) for p in self.pairs if p.status == "no_face")

    @property
    def no_face_test(self) -> tuple[tuple[str, int], ...]:
        """(identity, test index) of held-out photos in which no face was found (left out of T)."""
        return tuple((t.identity, t.index) for t in self.test_photos if t.faces_found == 0)

    def identity_scores(self) -> dict[str, float | None]:
        """Mean of the counted S(i, p) per identity (None when none counted)."""
        out: dict[str, list[tuple[float | None, bool]]] = {}
        for p in self.pairs:
            out.setdefault(p.identity, []).append((p.score, p.status == "no_face"))
        return {k: _counted_mean(v, self.missing_face)[0] for k, v in out.items()}

    def labels(self) -> list[str]:
        """One short label per pair, for ``draw.sheets.labelled_sheet``."""
        out = []
        for p in self.pairs:
            head = f"{p.identity} #{p.prompt_index}"
            out.append(f"{head}: R {p.score:.3f}" if p.score is not None else f"{head}: {p.status.replace('_', ' ')}")
        return out

    def table(self) -> str:
        """A plain-text table: one row per S(i, p), then per-identity means and the bookkeeping."""
        lines = [
            f"R-FaceSim (Algorithm 3; embedder {self.embedder}, detector {self.detector})",
            f"{'identity':<16} {'prompt':>6} {'r_face_sim':>10} {'face_sim':>8} {'n_test':>6}  status",
        ]
        for p in self.pairs:
            lines.append(
                f"{p.identity[:16]:<16} {p.prompt_index:>6} {_fmt(p.score):>10} {_fmt(p.face_sim):>8} {p.n_test:>6}  {p.status}"
            )
        for ident, mean in self.identity_scores().items():
            lines.append(f"identity {ident}: {_fmt(mean)}")
        lines.append(
            f"R-FaceSim {_fmt(self.score)} over {self.n_scored} of {len(self.pairs)} (identity, prompt) pair(s); "
            f"{len(self.no_face_generated)} generated image(s) without a face ({self.missing_face}), "
            f"{len(self.no_face_test)} held-out photo(s) without a face (left out)"
            + (f"; FaceSim vs reference {_fmt(self.face_sim)}" if self.face_sim is not None else "")
        )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": "r_face_sim",
            "r_face_sim": _round(self.score),
            "face_sim": _round(self.face_sim),
            "n_scored": self.n_scored,
            "n_pairs": len(self.pairs),
            "identities": {k: _round(v) for k, v in self.identity_scores().items()},
            "no_face_generated": [list(x) for x in self.no_face_generated],
            "no_face_test": [list(x) for x in self.no_face_test],
            "missing": [[p.identity, p.prompt_index] for p in self.pairs if p.status == "missing"],
            "pairs": [p.to_dict() for p in self.pairs],
            "embedder": self.embedder,
            "detector": self.detector,
            "missing_face": self.missing_face,
        }


def r_face_sim(
    generated: Mapping[str, Sequence[Image.Image | None]],
    test_photos: Mapping[str, Sequence[Image.Image]],
    detector: _Detector,
    embedder: _Embedder,
    *,
    references: Mapping[str, Image.Image] | None = None,
    missing_face: str = "exclude",
) -> RFaceSimResult:
    """Robust FaceSim, Algorithm 3 of the Meta-LoRA paper (section 4.3, appendix F).

    For each identity i and prompt p: the face of the generated image g is cropped and embedded
    (e_g), and S(i, p) = mean over the held-out photos t in T of cosine(e_g, e_t). R-FaceSim is
    the mean of S(i, p) over all identities and prompts. The reference photo used for
    personalization must NOT be among ``test_photos`` (T = i minus {ref}); use
    ``split_reference`` to make that split.

    Args:
        generated: identity -> one generated image per prompt, list position = prompt index;
            ``None`` marks a missing generation (reported as status "missing", not scored).
        test_photos: identity -> held-out real photos of that person (>= 1 each).
        detector: a face detector (``faces.get_detector``); the largest face of each image is used.
        embedder: an identity embedder (``faces.get_embedder``).
        references: identity -> reference photo; when given, every pair also gets the
            conventional FaceSim against it and the result its mean (the paper's Table 4).
        missing_face: generated images without a face are "exclude"d from the mean (default)
            or counted as S = 0 ("zero"); either way they are listed. Held-out photos without a
            face are always left out of T and listed; an identity with no usable held-out face
            gets status "no_test_face" and is not scored.

    Returns:
        An ``RFaceSimResult``.

    Raises:
        ValueError: an identity of ``generated`` has no test photos or is missing from
            ``references``, a reference has no face, or ``missing_face`` is unknown.
    """
    _check_policy(missing_face)
    if not generated:
        raise ValueError("r_face_sim needs at least one identity with generated images")
    for ident in generated:
        if not test_photos.get(ident):
            raise ValueError(
                f"identity {ident!r} has no held-out test photos; Algorithm 3 needs at least two photos per "
                "person (one reference, the rest as test images)"
            )
        if references is not None and ident not in references:
            raise ValueError(f"identity {ident!r} has no reference photo in references")

    pairs: list[PairScore] = []
    tests_out: list[HeldOutPhoto] = []
    face_sims: list[tuple[float | None, bool]] = []  # (FaceSim vs the reference, no face) per generated image
    for ident, gens in generated.items():
        # Algorithm 3 re-embeds every t inside the prompt loop; the embeddings do not depend on
        # p, so they are computed once per identity.
        test_emb: list[np.ndarray] = []
        for j, photo in enumerate(test_photos[ident]):
            obs = _observe(_check_image(photo, f"test photo {j} of {ident!r}"), detector, embedder)
            tests_out.append(HeldOutPhoto(ident, j, obs.faces_found, obs.box))
            if obs.embedding is None:
                logger.warning("R-FaceSim: no face in held-out photo %d of %r; left out of its test set", j, ident)
            else:
                test_emb.append(obs.embedding)
        ref_emb = None
        if references is not None:
            ref_obs = _observe(_check_image(references[ident], f"reference of {ident!r}"), detector, embedder)
            if ref_obs.embedding is None:
                raise ValueError(
                    f"no face found in the reference photo of {ident!r} by detector {detector.name!r}; "
                    "pick another reference (reference.txt) or a photo with a clearly visible face"
                )
            ref_emb = ref_obs.embedding
        for p, g in enumerate(gens):
            if g is None:
                pairs.append(PairScore(ident, p, None, "missing", 0, None, 0))
                continue
            obs = _observe(_check_image(g, f"generated image {p} of {ident!r}"), detector, embedder)
            fs = None if obs.embedding is None or ref_emb is None else cosine(obs.embedding, ref_emb)
            face_sims.append((fs, obs.embedding is None))
            if obs.embedding is None:
                logger.warning("R-FaceSim: no face in generated image %d of %r (%s)", p, ident, missing_face)
                pairs.append(PairScore(ident, p, None, "no_face", 0, None, 0, None))
                continue
            if not test_emb:
                pairs.append(PairScore(ident, p, None, "no_test_face", obs.faces_found, obs.box, 0, fs))
                continue
            sims = [cosine(obs.embedding, e_t) for e_t in test_emb]  # Algorithm 3: sumsim / count
            pairs.append(PairScore(ident, p, sum(sims) / len(sims), "ok", obs.faces_found, obs.box, len(sims), fs))

    result = RFaceSimResult(
        score=_counted_mean([(p.score, p.status == "no_face") for p in pairs], missing_face)[0],
        pairs=tuple(pairs),
        test_photos=tuple(tests_out),
        embedder=embedder.name,
        detector=detector.name,
        missing_face=missing_face,
        face_sim=_counted_mean(face_sims, missing_face)[0] if references is not None else None,
    )
    unscored = sorted({p.identity for p in pairs if p.status == "no_test_face"})
    if unscored:
        logger.warning("R-FaceSim: identities %s have no held-out photo with a face and were not scored", unscored)
    return result


def split_reference(
    photos: Sequence[Any], reference: int | None = None
) -> tuple[Any, list[Any]]:
    """Algorithm 3's ``select_one``: splits one identity's photos into (reference, test photos).

    Args:
        photos: the identity's photos (any objects: paths or images), at least two.
        reference: index of the reference; default 0 (the first photo).

    Returns:
        (reference, the other photos in order).

    Raises:
        ValueError: fewer than two photos or an index out of range.
    """
    if len(photos) < 2:
        raise ValueError(
            f"R-FaceSim needs at least two photos of a person (one reference, the rest held out), got {len(photos)}"
        )
    idx = 0 if reference is None else reference
    if not -len(photos) <= idx < len(photos):
        raise ValueError(f"reference index {idx} is out of range for {len(photos)} photos")
    idx %= len(photos)
    return photos[idx], [p for k, p in enumerate(photos) if k != idx]


# --------------------------------------------------------------------------------------------
# CLIP-T


class ClipScorer:
    """A CLIP model, its tokenizer and image processor, loaded from a local folder.

    Build it with ``load_clip`` and pass it to ``clip_t`` to score many batches without
    reloading; the caller owns it (no module-level cache).
    """

    def __init__(self, model: Any, tokenizer: Any, image_processor: Any, name: str, device: torch.device) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.name = name
        self.device = device

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> np.ndarray:
        """Cosine of CLIP image and text embeddings, pairwise by position. Returns (N,) float64."""
        pixel = self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        text = self.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt")
        # CLIP's text tower sees at most 77 tokens; longer prompts (Table 1 has some) are truncated
        # exactly as in the reference CLIP code.
        out = self.model(
            input_ids=text["input_ids"].to(self.device),
            attention_mask=text["attention_mask"].to(self.device),
            pixel_values=pixel.to(self.device, dtype=self.model.dtype),
            return_dict=True,
        )
        img = out.image_embeds.double()  # (N, D), L2-normalised by CLIPModel
        txt = out.text_embeds.double()  # (N, D)
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return (img * txt).sum(-1).cpu().numpy()

    def __repr__(self) -> str:
        return f"ClipScorer(name={self.name!r}, device={str(self.device)!r})"


def _missing_clip(folder: Path, why: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"no usable CLIP model in {folder} ({why}). Put a CLIP ViT-B/32 in transformers format in that "
        f"folder (config.json, model.safetensors, tokenizer files, preprocessor_config.json), e.g. "
        f"'hf download {CLIP_T_MODEL_HINT} --local-dir {folder}'; nothing is downloaded "
        "automatically"
    )


def load_clip(model_dir: str | os.PathLike, device: str | torch.device = "cpu") -> ClipScorer:
    """Loads a transformers ``CLIPModel`` + tokenizer + image processor from a local folder only.

    Args:
        model_dir: folder in transformers format (the paper uses openai/clip-vit-base-patch32).
        device: torch device for the model.

    Returns:
        A ``ClipScorer`` (model in eval mode, no gradients).

    Raises:
        FileNotFoundError: the folder or one of its parts is missing; the message names the folder
            and what to put in it.
    """
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    folder = Path(model_dir).expanduser()
    if not folder.is_dir():
        raise _missing_clip(folder, "the folder does not exist")
    if not (folder / "config.json").is_file():
        raise _missing_clip(folder, "it has no config.json")
    if not any(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        only = f", only {', '.join(pickles)}: pickle files can run code when loaded, so they are never read" if pickles else ""
        raise _missing_clip(folder, f"it has no .safetensors weights{only}")
    try:
        model = CLIPModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
    except (OSError, ValueError) as e:
        raise _missing_clip(folder, f"the weights did not load: {e}") from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise _missing_clip(folder, f"the tokenizer did not load: {e}") from e
    try:
        image_processor = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise _missing_clip(folder, f"preprocessor_config.json did not load: {e}") from e
    dev = torch.device(device)
    model.to(dev).eval().requires_grad_(False)
    name = str(getattr(model.config, "_name_or_path", "") or "")
    name = folder.name if not name or Path(name).expanduser().resolve() == folder.resolve() else name
    cfg = model.config.vision_config
    logger.info("CLIP-T model %s: vision patch %s, image %s px", name, cfg.patch_size, cfg.image_size)
    return ClipScorer(model, tokenizer, image_processor, name, dev)


@dataclass(frozen=True)
class ClipTResult:
    """CLIP-T per image and its mean."""

    mean: float  # mean cosine over all images (CLIP-T; the paper reports it x100)
    scores: tuple[float, ...]  # per image
    prompts: tuple[str, ...]  # the prompt each image was scored against
    model: str  # CLIP model name (folder name or hub id from its config)

    def labels(self) -> list[str]:
        """One short label per image, for ``draw.sheets.labelled_sheet``."""
        return [f"CLIP-T {s:.3f}" for s in self.scores]

    def table(self) -> str:
        lines = [f"CLIP-T (model {self.model})", "image  clip_t  prompt"]
        for i, (s, p) in enumerate(zip(self.scores, self.prompts)):
            lines.append(f"{i:5d}  {s:.4f}  {p[:60] + ('...' if len(p) > 60 else '')}")
        lines.append(f"mean {self.mean:.4f} over {len(self.scores)} image(s)")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": "clip_t",
            "mean": _round(self.mean),
            "scores": [_round(s) for s in self.scores],
            "prompts": list(self.prompts),
            "model": self.model,
        }


def clip_t(
    images: Image.Image | Sequence[Image.Image],
    prompts: str | Sequence[str],
    model_dir: str | os.PathLike | ClipScorer,
    *,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
) -> ClipTResult:
    """CLIP-T (appendix F): cosine similarity of CLIP image and prompt embeddings, per image.

    Args:
        images: one PIL image or a list.
        prompts: one prompt for all images, or one per image (same order).
        model_dir: a local transformers CLIP folder (see ``load_clip``) or an already loaded
            ``ClipScorer``.
        batch_size: images per forward pass.
        device: device used when ``model_dir`` is a folder.

    Returns:
        A ``ClipTResult`` (raw cosines in [-1, 1]; the paper's tables show them x100).

    Raises:
        ValueError: no images, or a prompt count that is neither 1 nor the image count.
        FileNotFoundError: the model folder is missing or incomplete (see ``load_clip``).
    """
    imgs = [images] if isinstance(images, Image.Image) else list(images)
    if not imgs:
        raise ValueError("clip_t needs at least one image")
    imgs = [_check_image(im, f"image {i}") for i, im in enumerate(imgs)]
    texts = [prompts] * len(imgs) if isinstance(prompts, str) else list(prompts)
    if len(texts) == 1 and len(imgs) > 1:
        texts = texts * len(imgs)
    if len(texts) != len(imgs):
        raise ValueError(f"clip_t got {len(imgs)} image(s) but {len(texts)} prompt(s); pass one prompt or one per image")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    scorer = model_dir if isinstance(model_dir, ClipScorer) else load_clip(model_dir, device)
    scores: list[float] = []
    for start in range(0, len(imgs), batch_size):
        scores.extend(float(s) for s in scorer.score(imgs[start : start + batch_size], texts[start : start + batch_size]))
    if any(not math.isfinite(s) for s in scores):
        raise RuntimeError(f"CLIP model {scorer.name} produced non-finite scores; the weights may be corrupt")
    return ClipTResult(mean=float(np.mean(scores)), scores=tuple(scores), prompts=tuple(texts), model=scorer.name)


__all__ = [
    "CLIP_T_MODEL_HINT",
    "ClipScorer",
    "ClipTResult",
    "FaceSimResult",
    "MISSING_FACE_POLICIES",
    "PairScore",
    "RFaceSimResult",
    "HeldOutPhoto",
    "clip_t",
    "cosine",
    "face_sim",
    "load_clip",
    "r_face_sim",
    "split_reference",
]
