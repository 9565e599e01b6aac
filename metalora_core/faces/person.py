"""One person's training crops from photos that may show other people too, with a report a user can read.

:func:`person_crops` detects every face in each photo, takes the one asked for (``face_index``:
0 is the largest), makes the paper's crop grid around it and then looks at every other detected
face: a crop that would show one is blurred there (``others="blur"``), dropped
(``others="drop"``) or kept as it is (``others="keep"``). The :class:`PersonReport` says what was
found and done (faces per photo, which one was used and its size, small-face warnings, crops
made / blurred / dropped), for the node's text and preview labels rather than only the log.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from .augment import AugmentConfig, Crop
from .crops import FaceCrops, bucket_config, cut_crops
from .detect import FaceDetector, get_detector
from .image import contact_sheet, load_image
from .names import OTHER_FACES

log = logging.getLogger(__name__)

MIN_FACE = 64  # px: below this the identity detail is poor (and detectors disagree between sizes)


@dataclass
class PhotoReport:
    size: tuple[int, int]
    faces: int
    used: int  # index into the faces, largest first
    face_size: tuple[int, int]
    found: list = field(default_factory=list)  # every face detected (faces.Face), largest first
    detect_seconds: float = 0.0
    crops: int = 0
    blurred: int = 0
    dropped: int = 0
    warnings: list[str] = field(default_factory=list)


@dataclass
class PersonReport:
    detector: str
    others: str
    photos: list[PhotoReport] = field(default_factory=list)

    @property
    def crops(self) -> int:
        return sum(p.crops for p in self.photos)

    @property
    def warnings(self) -> list[str]:
        return [f"photo {i + 1}: {w}" for i, p in enumerate(self.photos) for w in p.warnings]

    def lines(self) -> list[str]:
        out = [f"{self.crops} crops from {len(self.photos)} photo(s), detector {self.detector}"]
        for i, p in enumerate(self.photos):
            line = (f"photo {i + 1} ({p.size[0]}x{p.size[1]}): {p.faces} face(s), using face {p.used}"
                    f"{' (largest)' if p.used == 0 and p.faces > 1 else ''} {p.face_size[0]}x{p.face_size[1]} px; "
                    f"{p.crops} crops")
            if p.blurred:
                line += f", {p.blurred} with other faces blurred"
            if p.dropped:
                line += f", {p.dropped} dropped (other faces)"
            out.append(line)
        out += [f"warning: {w}" for w in self.warnings]
        return out

    def text(self) -> str:
        return "\n".join(self.lines())


def person_crops(images: list[Any], *, detector: str | FaceDetector = "auto", face_index: int = 0,
                 others: str = "blur", resolution: int | None = None, augment: AugmentConfig | None = None,
                 seed: int = 0, insightface_root: str | None = None, grid: bool = True,
                 min_face: int = MIN_FACE) -> tuple[FaceCrops, PersonReport]:
    """Crops of one person from one or more photos (any sizes), with a :class:`PersonReport`.

    The one crop pipeline: ``metalora crops``, ``metalora personalize``, the demo and the Face
    Augment node all cut their crops here.

    Args:
        images: photos (paths or PIL images) of one person.
        detector: a backend name for ``get_detector`` or a ready ``FaceDetector``.
        face_index: which face when a photo shows several (0: the largest).
        others: what to do with crops that show other faces: "blur", "drop" or "keep".
        resolution: crop side (about ``resolution`` x ``resolution`` pixels); None: ``augment``'s bucket.
        augment: grid settings (None: the paper's).
        seed: seed of the random flips.
        grid: False takes each photo as it is (one crop per photo, never flipped).

    Returns:
        (:class:`FaceCrops`, which cuts again at another resolution with the same faces blurred
        or dropped; ``PersonReport``).

    Raises:
        ValueError: no photo, unknown ``others``, no face in a photo, ``face_index`` out of range, or
            every crop dropped.
    """
    if not images:
        raise ValueError("no photo given; pass one photo of the person (or a few)")
    if others not in OTHER_FACES:
        raise ValueError(f"other_faces {others!r}: choose one of {list(OTHER_FACES)}")
    if face_index < 0:
        raise ValueError(f"face_index must be >= 0 (0 = the largest face), got {face_index}")
    det = detector if isinstance(detector, FaceDetector) else get_detector(detector, insightface_root=insightface_root)
    config = bucket_config(resolution, augment)
    report = PersonReport(detector=det.name, others=others)
    sources, faces, other_boxes = [], [], []
    for i, im in enumerate(images):
        im = load_image(im)
        t0 = time.perf_counter()
        found = det.detect(im)  # largest first
        seconds = time.perf_counter() - t0
        where = f"photo {i + 1} of {len(images)} ({im.size[0]}x{im.size[1]})"
        if not found:
            raise ValueError(f"{where}: no face found by {det.name!r}; use a photo where the face is clearly "
                             f"visible and at least {min_face} px tall, or a closer crop")
        if face_index >= len(found):
            raise ValueError(f"{where}: face_index {face_index} but only {len(found)} face(s) found; "
                             f"use 0..{len(found) - 1} (0 = the largest)")
        face = found[face_index]
        pr = PhotoReport(size=im.size, faces=len(found), used=face_index,
                         face_size=(round(face.width), round(face.height)), found=found, detect_seconds=seconds)
        if min(face.width, face.height) < min_face:
            pr.warnings.append(f"the face is small ({pr.face_size[0]}x{pr.face_size[1]} px, under {min_face}): "
                               "identity detail will be poor and the detector may pick a different person; "
                               "use a closer or larger photo")
        if len(found) > 1 and face_index == 0:
            pr.warnings.append(f"{len(found)} faces found; using the largest (set face_index to pick another)")
        sources.append(im)
        faces.append(face)
        other_boxes.append([f.box for j, f in enumerate(found) if j != face_index])
        report.photos.append(pr)
    crops, counts = cut_crops(sources, faces, other_boxes, config, seed, grid, others)
    for pr, (made, blurred, dropped) in zip(report.photos, counts):
        pr.crops, pr.blurred, pr.dropped = made - dropped, blurred, dropped
    if not crops:
        raise ValueError("every crop shows another face and other_faces is 'drop'; use 'blur', or photos "
                         "of the person alone")
    for line in report.lines():
        log.info("%s", line)
    result = FaceCrops(crops=crops, faces=faces, detector=det.name, sources=sources, augment=config, seed=seed,
                       grid=grid, others=others, other_boxes=other_boxes)
    return result, report


def labelled_preview(crops: list[Crop], report: PersonReport, columns: int = 5) -> Image.Image:
    """The crop contact sheet with the report's lines above it."""
    sheet = contact_sheet(crops, columns=columns)
    lines = report.lines()
    font = ImageFont.load_default()
    band = 8 + 14 * len(lines)
    out = Image.new("RGB", (sheet.width, sheet.height + band), (255, 255, 255))
    out.paste(sheet, (0, band))
    d = ImageDraw.Draw(out)
    for k, line in enumerate(lines):
        d.text((6, 4 + 14 * k), line, fill=(170, 0, 0) if line.startswith("warning") else (20, 20, 20), font=font)
    return out
