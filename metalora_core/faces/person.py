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
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from .augment import AugmentConfig, Crop, make_crops, whole_photo_crop
from .detect import get_detector
from .image import contact_sheet, load_image
from .crops import FaceCrops

log = logging.getLogger(__name__)

OTHER_FACES = ("blur", "drop", "keep")
MIN_FACE = 64  # px: below this the identity detail is poor (and detectors disagree between sizes)
_OVERLAP = 1e-3  # an other face counts when any of its box (above rounding) lies inside the crop
_GROW = 0.35  # blur a box this much larger than the detector's (hair, ears, chin)


@dataclass
class PhotoReport:
    size: tuple[int, int]
    faces: int
    used: int  # index into the faces, largest first
    face_size: tuple[int, int]
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


@dataclass
class PersonCrops(FaceCrops):
    """``FaceCrops`` that remember the other people's faces, so a crop cut again keeps them hidden."""

    others: str = "keep"
    other_boxes: list = field(default_factory=list)  # per source photo: the other faces' boxes (source px)

    def at_resolution(self, side: int) -> "PersonCrops":
        if side * side == self.augment.bucket_area:
            return self
        config = replace(self.augment, bucket_area=side * side)
        crops, _ = _cut(self.sources, self.faces, self.other_boxes, config, self.seed, self.grid, self.others)
        log.info("crops cut again at %dx%d area, other faces %s as before", side, side, self.others)
        return PersonCrops(crops=crops, faces=self.faces, detector=self.detector, sources=self.sources,
                           augment=config, seed=self.seed, grid=self.grid, others=self.others,
                           other_boxes=self.other_boxes)


def box_in_crop(crop: Crop, box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    """A source-pixel box in the crop's output pixels (resize, then the flip), not clipped."""
    x0, y0, x1, y1 = crop.box
    w, h = crop.size
    sx, sy = w / (x1 - x0), h / (y1 - y0)
    bx0, by0, bx1, by1 = (box[0] - x0) * sx, (box[1] - y0) * sy, (box[2] - x0) * sx, (box[3] - y0) * sy
    if crop.flipped:
        bx0, bx1 = w - bx1, w - bx0
    return bx0, by0, bx1, by1


def _inside_share(crop: Crop, box: tuple[float, float, float, float]) -> float:
    x0, y0, x1, y1 = crop.box
    ix = max(0.0, min(x1, box[2]) - max(x0, box[0]))
    iy = max(0.0, min(y1, box[3]) - max(y0, box[1]))
    area = max(1e-6, (box[2] - box[0]) * (box[3] - box[1]))
    return ix * iy / area


def blur_faces(crop: Crop, boxes: list[tuple[float, float, float, float]]) -> Crop:
    """The crop with each (source-pixel) box blurred beyond recognition."""
    img = crop.image.copy()
    w, h = img.size
    for box in boxes:
        bx0, by0, bx1, by1 = box_in_crop(crop, box)
        gw, gh = (bx1 - bx0) * _GROW / 2, (by1 - by0) * _GROW / 2
        r = (max(0, int(bx0 - gw)), max(0, int(by0 - gh)), min(w, int(bx1 + gw) + 1), min(h, int(by1 + gh) + 1))
        if r[2] <= r[0] or r[3] <= r[1]:
            continue
        region = img.crop(r)
        # down to 3x3 colours and smoothly back up: the colours stay, no face structure does
        smooth = region.resize((3, 3), Image.Resampling.BOX).resize(region.size, Image.Resampling.BILINEAR)
        img.paste(smooth.filter(ImageFilter.GaussianBlur(max(2.0, min(region.size) / 8))), r[:2])
    return replace(crop, image=img)


def _cut(sources: list, faces: list, other_boxes: list, config: AugmentConfig, seed: int, grid: bool,
         others: str) -> tuple[list[Crop], list[tuple[int, int, int]]]:
    """The crops of every photo with other faces blurred or dropped; per photo (made, blurred, dropped).

    Which crops show another face depends only on the crop boxes (not on the bucket size), so cutting
    again at another resolution blurs and drops the same crops.
    """
    gen = torch.Generator().manual_seed(seed)
    crops: list[Crop] = []
    counts = []
    for im, face, rest in zip(sources, faces, other_boxes):
        made = make_crops(im, face, config, gen) if grid else [whole_photo_crop(im, face, config.bucket_area, config.multiple)]
        blurred = dropped = 0
        for c in made:
            near = [b for b in rest if _inside_share(c, b) >= _OVERLAP]
            if not near or others == "keep":
                crops.append(c)
            elif others == "drop":
                dropped += 1
            else:
                crops.append(blur_faces(c, near))
                blurred += 1
        counts.append((len(made), blurred, dropped))
    return crops, counts


def person_crops(images: list[Any], *, detector: str = "auto", face_index: int = 0, others: str = "blur",
                 augment: AugmentConfig | None = None, seed: int = 0, insightface_root: str | None = None,
                 grid: bool = True, min_face: int = MIN_FACE):
    """Crops of one person from one or more photos (any sizes), with a :class:`PersonReport`.

    Returns:
        (:class:`PersonCrops`, a ``train.recipe.FaceCrops`` that cuts again at another resolution
        with the same faces blurred or dropped; ``PersonReport``).

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
    det = get_detector(detector, insightface_root=insightface_root)
    config = augment or AugmentConfig()
    report = PersonReport(detector=det.name, others=others)
    sources, faces, other_boxes = [], [], []
    for i, im in enumerate(images):
        im = load_image(im)
        found = det.detect(im)  # largest first
        where = f"photo {i + 1} of {len(images)} ({im.size[0]}x{im.size[1]})"
        if not found:
            raise ValueError(f"{where}: no face found by {det.name!r}; use a photo where the face is clearly "
                             f"visible and at least {min_face} px tall, or a closer crop")
        if face_index >= len(found):
            raise ValueError(f"{where}: face_index {face_index} but only {len(found)} face(s) found; "
                             f"use 0..{len(found) - 1} (0 = the largest)")
        face = found[face_index]
        pr = PhotoReport(size=im.size, faces=len(found), used=face_index,
                         face_size=(round(face.width), round(face.height)))
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
    crops, counts = _cut(sources, faces, other_boxes, config, seed, grid, others)
    for pr, (made, blurred, dropped) in zip(report.photos, counts):
        pr.crops, pr.blurred, pr.dropped = made - dropped, blurred, dropped
    if not crops:
        raise ValueError("every crop shows another face and other_faces is 'drop'; use 'blur', or photos "
                         "of the person alone")
    for line in report.lines():
        log.info("%s", line)
    result = PersonCrops(crops=crops, faces=faces, detector=det.name, sources=sources, augment=config, seed=seed,
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
