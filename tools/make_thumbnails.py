#!/usr/bin/env python3
"""Draws the template-browser thumbnail of every example workflow: ``example_workflows/NAME.jpg``.

ComfyUI's template browser shows ``NAME.jpg`` beside ``NAME.json``. The workflows run FLUX.1-dev,
FLUX.2 Klein and Z-Image Turbo, whose outputs cannot be made here (and the repository ships no
photos), so each thumbnail is a labelled card: the workflow's title and what it does, over a map
of its own graph (every node at its saved position; this pack's nodes in violet, ComfyUI core's in
grey, third-party in orange; groups outlined). Needs Pillow.

    python tools/make_thumbnails.py          # rewrite example_workflows/*.jpg (and docs/icon.png)
    python tools/make_thumbnails.py --check  # exit 1 if a thumbnail is missing or differs
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).resolve().parent
WORKFLOWS = HERE.parent / "example_workflows"
SIZE = (640, 400)
CARDS = {
    "01_one_click_meta_lora": ("One-click Meta-LoRA", "one photo -> face crops -> Meta-LoRA (375 steps, rank 1) -> FLUX.1-dev images + saved LoRA"),
    "02_comparison_fig4": ("Comparison (paper Fig. 4)", "no ID / plain LoRA / LoRA + augmentation / Meta-LoRA in one labelled grid"),
    "03_rank_iterations_sweep": ("Rank x steps sweep", "one cell of the paper's Fig. 3/5/6 sweep, scored with CLIP-T and R-FaceSim"),
    "04_r_face_sim_evaluation": ("R-FaceSim evaluation", "Algorithm 3 on Table-3 prompts for one identity, held-out photos"),
    "05_pulid_flux_comparison": ("PuLID-FLUX vs Meta-LoRA", "needs the ComfyUI-PuLID-Flux pack"),
    "06_one_click_flux2_klein": ("One-click Meta-LoRA: FLUX.2 Klein", "one photo -> face crops -> Meta-LoRA (375 steps, rank 1) -> FLUX.2 Klein 4B images (4 steps) + saved LoRA"),
    "07_one_click_z_image_turbo": ("One-click Meta-LoRA: Z-Image", "one photo -> face crops -> Meta-LoRA (375 steps, rank 1) -> Z-Image Turbo images (8 steps) + saved LoRA"),
}
_BG, _INK, _DIM = (24, 26, 33), (235, 235, 240), (150, 152, 165)
_OURS, _CORE, _THIRD, _NOTE, _GROUP = (124, 92, 214), (92, 96, 110), (214, 132, 60), (110, 90, 50), (70, 120, 160)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        cand = f"{line} {word}".strip()
        if draw.textlength(cand, font=font) > width and line:
            lines.append(line)
            line = word
        else:
            line = cand
    return lines + ([line] if line else [])


def card(name: str, workflow: dict) -> Image.Image:
    """The thumbnail of one workflow."""
    title, subtitle = CARDS.get(name, (name, ""))
    img = Image.new("RGB", SIZE, _BG)
    d = ImageDraw.Draw(img)
    # graph map in the lower part
    nodes = workflow.get("nodes", [])
    box = (24, 130, SIZE[0] - 24, SIZE[1] - 40)
    xs = [n["pos"][0] for n in nodes] + [n["pos"][0] + n["size"][0] for n in nodes]
    ys = [n["pos"][1] - 30 for n in nodes] + [n["pos"][1] + n["size"][1] for n in nodes]
    for g in workflow.get("groups", []):
        x, y, w, h = g["bounding"]
        xs += [x, x + w]
        ys += [y, y + h]
    if nodes:
        sx = (box[2] - box[0]) / max(1, max(xs) - min(xs))
        sy = (box[3] - box[1]) / max(1, max(ys) - min(ys))
        s = min(sx, sy)
        ox = box[0] + ((box[2] - box[0]) - s * (max(xs) - min(xs))) / 2 - s * min(xs)
        oy = box[1] + ((box[3] - box[1]) - s * (max(ys) - min(ys))) / 2 - s * min(ys)
        for g in workflow.get("groups", []):
            x, y, w, h = g["bounding"]
            d.rectangle([ox + s * x, oy + s * y, ox + s * (x + w), oy + s * (y + h)], outline=_GROUP, width=1)
        for n in nodes:
            props = n.get("properties", {})
            color = (_NOTE if n["type"] in ("Note", "MarkdownNote") else _OURS if props.get("cnr_id") == "comfyui-metalora"
                     else _THIRD if props.get("aux_id") else _CORE)
            x, y = n["pos"]
            w, h = n["size"]
            d.rectangle([ox + s * x, oy + s * (y - 30), ox + s * (x + w), oy + s * (y + h)], fill=color)
    # labels on top
    d.rectangle([0, 0, SIZE[0], 118], fill=_BG)
    d.text((24, 16), "ComfyUI-MetaLoRA template", fill=_DIM, font=_font(15))
    d.text((24, 38), title, fill=_INK, font=_font(30))
    for k, line in enumerate(_wrap(d, subtitle, _font(15), SIZE[0] - 48)[:2]):
        d.text((24, 78 + 18 * k), line, fill=_DIM, font=_font(15))
    legend = [("Meta-LoRA nodes", _OURS), ("ComfyUI core", _CORE), ("third-party", _THIRD), ("notes", _NOTE)]
    x = 24
    for label, color in legend:
        d.rectangle([x, SIZE[1] - 26, x + 12, SIZE[1] - 14], fill=color)
        d.text((x + 18, SIZE[1] - 28), label, fill=_DIM, font=_font(13))
        x += 30 + int(d.textlength(label, font=_font(13)))
    return img


def icon() -> Image.Image:
    """The Registry icon (docs/icon.png): a LoRA's three layers, Down shared (violet), Mid and Up per person."""
    img = Image.new("RGB", (256, 256), _BG)
    d = ImageDraw.Draw(img)
    d.rounded_rectangle([40, 44, 216, 92], radius=10, fill=_OURS)  # Meta-Down: the prior
    d.rounded_rectangle([92, 112, 164, 144], radius=8, fill=_GROUP)  # Mid
    d.rounded_rectangle([60, 164, 196, 212], radius=10, fill=_THIRD)  # Up
    d.text((128, 232), "Meta-LoRA", fill=_INK, font=_font(18), anchor="mm")
    return img


def jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=88)
    return buf.getvalue()


def build_all() -> dict[str, Image.Image]:
    out = {}
    for path in sorted(WORKFLOWS.glob("*.json")):
        out[path.stem] = card(path.stem, json.loads(path.read_text(encoding="utf-8")))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Draw example_workflows/*.jpg")
    ap.add_argument("--check", action="store_true", help="only check that every thumbnail exists and is current")
    args = ap.parse_args(argv)
    stale = []
    for name, img in build_all().items():
        path = WORKFLOWS / f"{name}.jpg"
        if args.check:
            if not path.is_file():
                stale.append(name)
                continue
            with Image.open(path) as have:
                if have.format != "JPEG" or have.size != img.size or _mean_diff(have.convert("RGB"), img) > 3.0:
                    stale.append(name)
        else:
            path.write_bytes(jpeg_bytes(img))
    if not args.check:
        (HERE.parent / "docs").mkdir(exist_ok=True)
        icon().save(HERE.parent / "docs" / "icon.png", format="PNG")
    if stale:
        print(f"thumbnails missing or out of date (run tools/make_thumbnails.py): {stale}", file=sys.stderr)
        return 1
    return 0


def _mean_diff(a: Image.Image, b: Image.Image) -> float:
    pa, pb = a.tobytes(), b.tobytes()
    return sum(abs(x - y) for x, y in zip(pa[::97], pb[::97])) / max(1, len(pa[::97]))


if __name__ == "__main__":
    sys.exit(main())
