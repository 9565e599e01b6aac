"""Image grids, drawn with PIL only: the one grid drawer (``draw_grid``) behind the labelled
comparison grid (the Meta-LoRA paper's Figures 4, 7 and 8: one row per method, one column per
prompt), the captioned sheets of scores and the crops' contact sheet."""
from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

_BG = (255, 255, 255)
_INK = (0, 0, 0)
_DARK_BG = (32, 32, 32)
_DARK_INK = (235, 235, 235)
Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in the image's pixels


def _wrap(text: str, width_px: int, char_px: int = 6) -> list[str]:
    """Greedy word wrap for PIL's default bitmap font (about 6 px per character)."""
    per_line = max(4, width_px // char_px)
    lines: list[str] = []
    for para in text.splitlines() or [""]:
        line = ""
        for word in para.split():
            if line and len(line) + 1 + len(word) > per_line:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}" if line else word
        lines.append(line[: per_line * 2])
    return lines


def _thumb(img: Image.Image, box: Box | None, tile: int) -> Image.Image:
    out = img.convert("RGB")
    if box is not None:
        out = out.copy()
        width = max(2, round(max(out.size) / 300))  # drawn at full size, so it survives the thumbnail
        ImageDraw.Draw(out).rectangle(tuple(float(v) for v in box), outline="lime", width=width)
    out.thumbnail((tile, tile), Image.Resampling.LANCZOS)
    return out


def draw_grid(
    rows: Sequence[Sequence[Image.Image]],
    *,
    row_labels: Sequence[str] = (),
    column_labels: Sequence[str] = (),
    captions: Sequence[Sequence[str]] | None = None,
    boxes: Sequence[Sequence[Box | None]] | None = None,
    tile: int = 256,
    dark: bool = False,
) -> Image.Image:
    """Lays out rows of images in square cells, with optional row, column and per-cell labels.

    Args:
        rows: one list of PIL images per row (rows may differ in length; missing cells stay blank).
        row_labels: one label per row, drawn left of it (fewer: the rest are blank).
        column_labels: one label per column, drawn above it (fewer: blank).
        captions: per row, one caption per image, drawn under its cell (None: no caption band).
        boxes: per row, one box (or None) per image, outlined on the image (e.g. a face).
        tile: bounding square of each cell in pixels (>= 32); images keep their aspect ratio.
        dark: light text on a dark background instead of black on white.

    Returns:
        An RGB image of size (label column + columns * tile, header + rows * (tile + caption band)).

    Raises:
        ValueError: no image, tile < 32, more labels than rows / columns, or captions / boxes
            that do not match the rows one to one.
    """
    if not rows or not any(len(r) for r in rows):
        raise ValueError("draw_grid needs at least one row with an image")
    if tile < 32:
        raise ValueError(f"tile must be >= 32 pixels, got {tile}")
    n_cols = max(len(r) for r in rows)
    if len(row_labels) > len(rows):
        raise ValueError(f"{len(row_labels)} row labels for {len(rows)} row(s); give at most one per row")
    if len(column_labels) > n_cols:
        raise ValueError(f"{len(column_labels)} column labels for {n_cols} column(s); give at most one per column")
    for name, per_cell in (("captions", captions), ("boxes", boxes)):
        if per_cell is not None and [len(c) for c in per_cell] != [len(r) for r in rows]:
            raise ValueError(f"{name} must give one entry per image of every row, got {[len(c) for c in per_cell]} "
                             f"for rows of {[len(r) for r in rows]}")
    font = ImageFont.load_default()
    bg, ink = (_DARK_BG, _DARK_INK) if dark else (_BG, _INK)
    left = 140 if any(row_labels) else 0
    col_lines = [_wrap(t, tile - 8) for t in column_labels]
    top = 8 + 12 * max((len(c) for c in col_lines), default=0) if any(column_labels) else 0
    band = 16 if captions is not None else 0
    sheet = Image.new("RGB", (left + n_cols * tile, top + len(rows) * (tile + band)), bg)
    draw = ImageDraw.Draw(sheet)
    for c, lines in enumerate(col_lines):
        for k, line in enumerate(lines):
            draw.text((left + c * tile + 4, 4 + 12 * k), line, fill=ink, font=font)
    for r, images in enumerate(rows):
        y = top + r * (tile + band)
        if r < len(row_labels):
            for k, line in enumerate(_wrap(row_labels[r], left - 8)):
                draw.text((4, y + tile // 2 - 6 + 12 * k), line, fill=ink, font=font)
        for c, img in enumerate(images):
            x = left + c * tile
            thumb = _thumb(img, None if boxes is None else boxes[r][c], tile)
            sheet.paste(thumb, (x + (tile - thumb.width) // 2, y + (tile - thumb.height) // 2))
            if captions is not None:
                draw.text((x + 4, y + tile + 2), captions[r][c][: max(8, tile // 6)], fill=ink, font=font)
    return sheet


def draw_labelled_grid(
    rows: Sequence[Sequence[Image.Image]],
    row_labels: Sequence[str] = (),
    column_labels: Sequence[str] = (),
    tile: int = 256,
) -> Image.Image:
    """A comparison grid: a label left of each row and above each column, white background
    (``draw_grid``'s arguments)."""
    return draw_grid(rows, row_labels=row_labels, column_labels=column_labels, tile=tile)


def labelled_sheet(
    images: Sequence[Image.Image],
    labels: Sequence[str],
    boxes: Sequence[Box | None] | None = None,
    tile: int = 256,
    columns: int = 4,
) -> Image.Image:
    """Images in rows of ``columns``, each with its box (if any) and a label under it, on dark grey.

    Raises:
        ValueError: counts differ, or tile/columns out of range.
    """
    if tile < 32 or columns < 1:
        raise ValueError(f"tile must be >= 32 and columns >= 1, got tile={tile}, columns={columns}")
    if len(labels) != len(images) or (boxes is not None and len(boxes) != len(images)):
        raise ValueError(
            f"got {len(images)} image(s), {len(labels)} label(s) and "
            f"{'no' if boxes is None else len(boxes)} box list entries; give one of each per image"
        )
    if not images:
        return Image.new("RGB", (tile, tile + 16), _DARK_BG)
    cols = min(columns, len(images))
    cut = [slice(i, i + cols) for i in range(0, len(images), cols)]
    return draw_grid([list(images[s]) for s in cut], captions=[list(labels[s]) for s in cut],
                     boxes=None if boxes is None else [list(boxes[s]) for s in cut], tile=tile, dark=True)


__all__ = ["draw_grid", "draw_labelled_grid", "labelled_sheet"]
