"""Parametric faces: an identity is a fixed set of traits, a view is pose, scale, position,
expression and a background colour (the context).

Everything is drawn with PIL at 4x supersampling and downsampled, so renders are smooth and
deterministic in the generator that drew the view.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# Context colours (RGB); the prompt names one: "... on a <name> background".
CONTEXTS: dict[str, tuple[int, int, int]] = {
    "red": (205, 45, 45),
    "green": (45, 165, 70),
    "blue": (45, 85, 205),
    "yellow": (225, 205, 55),
}
SKIN = ((241, 204, 176), (224, 172, 130), (190, 134, 96), (150, 100, 70), (105, 70, 50), (250, 220, 200))
HAIR = ((30, 25, 20), (95, 60, 30), (200, 160, 90), (150, 60, 30), (160, 160, 160), (240, 235, 220))
EYES = ((40, 90, 170), (80, 50, 25), (60, 130, 60), (30, 30, 30), (120, 120, 140))
HAIR_STYLES = 4  # 0 short cap, 1 long sides, 2 fringe, 3 bald
SUPERSAMPLE = 4

# Identity index ranges: base-model faces, Stage-1 (training) identities and held-out identities
# come from disjoint ranges, so no held-out identity is ever drawn for training.
BASE_OFFSET = 0
TRAIN_OFFSET = 10_000_000
HELDOUT_OFFSET = 20_000_000
CALIBRATION_OFFSET = 30_000_000  # identities that only choose the learning rate; never scored


@dataclass(frozen=True)
class Identity:
    """The traits that make one face recognisable (fractions are of the head size)."""

    index: int
    head_w: float  # head width, fraction of the canvas' shorter side
    head_h: float  # head height, same unit
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    hair_style: int
    eyes: tuple[int, int, int]
    eye_gap: float  # distance between the eyes / head width
    eye_size: float  # eye radius / head width
    eye_y: float  # eye height below the head centre / head height (negative: above)
    nose_len: float  # / head height
    mouth_w: float  # / head width
    brows: bool  # thick dark eyebrows
    cheeks: bool  # red cheek spots
    glasses: bool = False  # dark round rims around both eyes (domain 2)
    beard: bool = False  # hair-coloured lower face (domain 2)
    domain: int = 1  # 1: the first domain's traits and views; 2: traits that survive 32x32, less nuisance


# Domain 2: identity lives in discrete traits that survive a 32x32 frame (colours from small
# palettes, hair style, large irises, glasses, beard, head aspect); views vary little.
HEAD_ASPECTS = ((0.50, 0.58), (0.46, 0.64), (0.54, 0.66))  # (head_w, head_h)
DOMAINS = (1, 2)


def make_identity(index: int, domain: int = 1) -> Identity:
    """The identity with this index in ``domain``; the same index always gives the same traits."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; choose one of {DOMAINS}")
    if domain == 2:
        return _make_identity_2(index)
    g = np.random.default_rng(np.random.SeedSequence([0x5F4CE, int(index)]))

    def pick(palette):
        base = np.asarray(palette[int(g.integers(len(palette)))], dtype=np.float64)
        return tuple(int(v) for v in np.clip(base + g.normal(0, 8, 3), 0, 255))

    return Identity(
        index=int(index),
        head_w=float(g.uniform(0.42, 0.56)),
        head_h=float(g.uniform(0.54, 0.68)),
        skin=pick(SKIN),
        hair=pick(HAIR),
        hair_style=int(g.integers(HAIR_STYLES)),
        eyes=pick(EYES),
        eye_gap=float(g.uniform(0.30, 0.50)),
        eye_size=float(g.uniform(0.07, 0.12)),
        eye_y=float(g.uniform(-0.18, -0.02)),
        nose_len=float(g.uniform(0.08, 0.2)),
        mouth_w=float(g.uniform(0.25, 0.5)),
        brows=bool(g.integers(2)),
        cheeks=bool(g.integers(2)),
    )


def _make_identity_2(index: int) -> Identity:
    g = np.random.default_rng(np.random.SeedSequence([0x5F4CE, 2, int(index)]))

    def pick(palette):
        return tuple(int(v) for v in palette[int(g.integers(len(palette)))])

    head_w, head_h = HEAD_ASPECTS[int(g.integers(len(HEAD_ASPECTS)))]
    return Identity(
        index=int(index), head_w=head_w, head_h=head_h, skin=pick(SKIN), hair=pick(HAIR),
        hair_style=int(g.integers(HAIR_STYLES)), eyes=pick(EYES), eye_gap=float(g.choice((0.34, 0.46))),
        eye_size=0.12, eye_y=-0.08, nose_len=0.14, mouth_w=float(g.choice((0.28, 0.45))),
        brows=bool(g.integers(2)), cheeks=False, glasses=bool(g.integers(2)), beard=bool(g.integers(2)), domain=2)


@dataclass(frozen=True)
class View:
    """How one image shows its identity."""

    yaw: float  # -1..1: features shift sideways, the head narrows
    roll: float  # degrees
    scale: float  # head size multiplier
    dx: float  # head centre offset, fraction of the canvas width
    dy: float  # same, of the height
    smile: float  # -1 (frown) .. 1 (smile)
    eye_open: float  # 0.3 .. 1
    context: str  # key of CONTEXTS


def random_view(g: np.random.Generator, context: str | None = None, scale: tuple[float, float] = (0.75, 1.2),
                domain: int = 1) -> View:
    """A random view; ``context`` None draws one of CONTEXTS. Domain 2 varies little (small yaw
    and roll, 1.2 x the middle of ``scale`` x 0.92..1.05, small shifts, mild expressions)."""
    ctx = context if context is not None else list(CONTEXTS)[int(g.integers(len(CONTEXTS)))]
    if ctx not in CONTEXTS:
        raise ValueError(f"unknown context {ctx!r}; choose one of {list(CONTEXTS)}")
    if domain == 2:
        mid = (scale[0] + scale[1]) / 2
        return View(yaw=float(g.uniform(-0.3, 0.3)), roll=float(g.uniform(-4, 4)),
                    scale=float(1.2 * mid * g.uniform(0.92, 1.05)), dx=float(g.uniform(-0.03, 0.03)),
                    dy=float(g.uniform(-0.03, 0.03)), smile=float(g.uniform(-0.5, 0.5)),
                    eye_open=float(g.uniform(0.75, 1.0)), context=ctx)
    return View(yaw=float(g.uniform(-1, 1)), roll=float(g.uniform(-15, 15)), scale=float(g.uniform(*scale)),
                dx=float(g.uniform(-0.08, 0.08)), dy=float(g.uniform(-0.06, 0.06)), smile=float(g.uniform(-1, 1)),
                eye_open=float(g.uniform(0.3, 1.0)), context=ctx)


def _ellipse(d: ImageDraw.ImageDraw, cx: float, cy: float, rx: float, ry: float, fill) -> None:
    d.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=fill)


def face_box(identity: Identity, view: View, size: tuple[int, int]) -> tuple[float, float, float, float]:
    """The head's box (x0, y0, x1, y1) in output pixels (rotation ignored: it is small)."""
    w, h = size
    unit = min(w, h) * view.scale
    cx, cy = w * (0.5 + view.dx), h * (0.5 + view.dy)
    hw = identity.head_w * unit * (1 - 0.12 * abs(view.yaw)) / 2
    hh = identity.head_h * unit / 2
    return (cx - hw, cy - hh * 1.1, cx + hw, cy + hh)


def render(identity: Identity, view: View, size: tuple[int, int] = (32, 32)) -> Image.Image:
    """Draws one image (RGB, ``size`` = (width, height))."""
    w, h = size
    s = SUPERSAMPLE
    W, H = w * s, h * s
    top = np.asarray(CONTEXTS[view.context], dtype=np.float64)
    img = Image.new("RGB", (W, H), tuple(int(v) for v in top))
    d = ImageDraw.Draw(img)
    for y in range(0, H, s):  # a soft vertical gradient: the "style" of the background
        c = tuple(int(v) for v in np.clip(top * (1.0 - 0.25 * y / H), 0, 255))
        d.rectangle([0, y, W, y + s], fill=c)
    unit = min(W, H) * view.scale
    cx, cy = W * (0.5 + view.dx), H * (0.5 + view.dy)
    hw = identity.head_w * unit * (1 - 0.12 * abs(view.yaw)) / 2
    hh = identity.head_h * unit / 2
    shift = view.yaw * hw * 0.35  # features move towards the side the face turns to
    # hair behind the head
    if identity.hair_style == 1:
        d.rectangle([cx - hw * 1.15, cy - hh * 0.6, cx + hw * 1.15, cy + hh * 0.9], fill=identity.hair)
    if identity.hair_style in (0, 1, 2):
        _ellipse(d, cx, cy - hh * 0.2, hw * 1.12, hh * 1.02, identity.hair)
    _ellipse(d, cx, cy, hw, hh, identity.skin)  # head
    if identity.hair_style == 2:  # fringe
        d.chord([cx - hw * 1.05, cy - hh * 1.1, cx + hw * 1.05, cy - hh * 0.05], 180, 360, fill=identity.hair)
    elif identity.hair_style == 0:
        d.chord([cx - hw * 1.02, cy - hh * 1.05, cx + hw * 1.02, cy - hh * 0.35], 180, 360, fill=identity.hair)
    ey = cy + identity.eye_y * hh * 2
    gap = identity.eye_gap * hw
    er = identity.eye_size * hw * 2
    for side in (-1, 1):
        ex = cx + shift + side * gap * (1 - 0.25 * view.yaw * side)
        _ellipse(d, ex, ey, er * 1.25, er * view.eye_open, (250, 250, 250))
        _ellipse(d, ex + shift * 0.2, ey, er * 0.7, er * 0.7 * view.eye_open, identity.eyes)
        if identity.brows:
            d.rectangle([ex - er * 1.3, ey - er * 2.0, ex + er * 1.3, ey - er * 1.4], fill=(40, 30, 25))
        if identity.glasses:
            d.ellipse([ex - er * 1.7, ey - er * 1.5, ex + er * 1.7, ey + er * 1.5], outline=(20, 20, 20),
                      width=max(1, int(er * 0.45)))
    if identity.glasses:
        d.line([(cx + shift - gap + er * 1.7, ey), (cx + shift + gap - er * 1.7, ey)], fill=(20, 20, 20),
               width=max(1, int(er * 0.4)))
    if identity.beard:
        d.chord([cx - hw * 0.95, cy - hh * 0.1, cx + hw * 0.95, cy + hh * 1.02], 0, 180, fill=identity.hair)
    ny = ey + identity.nose_len * hh * 2
    nose = tuple(int(v * 0.8) for v in identity.skin)
    d.polygon([(cx + shift * 1.3, ey + er), (cx + shift * 1.3 - er * 0.7, ny), (cx + shift * 1.3 + er * 0.7, ny)], fill=nose)
    if identity.cheeks:
        for side in (-1, 1):
            _ellipse(d, cx + shift + side * gap * 1.25, ny, er * 0.9, er * 0.6, (230, 110, 110))
    mw = identity.mouth_w * hw
    my = ny + (cy + hh - ny) * 0.45
    bend = view.smile * er * 1.2
    mouth = [(cx + shift - mw, my - bend), (cx + shift, my + bend), (cx + shift + mw, my - bend)]
    d.line(mouth, fill=(150, 40, 50), width=max(1, int(er * 0.6)))
    if abs(view.roll) > 0.1:
        img = img.rotate(view.roll, resample=Image.Resampling.BILINEAR, center=(cx, cy), fillcolor=None)
        # rotation leaves corners empty: repaint them with the background
        mask = Image.new("L", (W, H), 255).rotate(view.roll, resample=Image.Resampling.NEAREST, center=(cx, cy))
        bg = Image.new("RGB", (W, H), tuple(int(v) for v in top * 0.88 + 0.0))
        img = Image.composite(img, bg, mask)
    return img.resize((w, h), Image.Resampling.LANCZOS)


def context_prompt(context: str | None, class_noun: str = "face") -> str:
    """The prompt of a context ("a photo of a face on a red background"); None: the class caption."""
    base = f"a photo of a {class_noun}"
    return base if context is None else f"{base} on a {context} background"


def border_colour(image: Image.Image) -> np.ndarray:
    """Median colour of the outermost pixel ring (the background where the head does not reach)."""
    a = np.asarray(image.convert("RGB"), dtype=np.float64)
    ring = np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])
    return np.median(ring, axis=0)
