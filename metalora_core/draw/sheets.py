"""A labelled comparison grid (the Meta-LoRA paper's Figures 4, 7 and 8): one row per method,
one column per prompt, drawn with PIL only."""
from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

_BG = (255, 255, 255)
_INK = (0, 0, 0)


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


def draw_labelled_grid(
    rows: Sequence[Sequence[Image.Image]],
    row_labels: Sequence[str] = (),
    column_labels: Sequence[str] = (),
    tile: int = 256,
) -> Image.Image:
    """Lays out rows of images with a label left of each row and above each column.

    Args:
        rows: one list of PIL images per row (rows may differ in length; missing cells stay blank).
        row_labels: one label per row (fewer: the rest are blank; more: ValueError).
        column_labels: one label per column (fewer: blank; more: ValueError).
        tile: bounding square of each cell in pixels (>= 32); images keep their aspect ratio.

    Returns:
        An RGB image of size (label column + columns * tile, header + rows * tile).

    Raises:
        ValueError: no rows, tile < 32, or more labels than rows / columns.
    """
    if not rows or not any(len(r) for r in rows):
        raise ValueError("draw_labelled_grid needs at least one row with an image")
    if tile < 32:
        raise ValueError(f"tile must be >= 32 pixels, got {tile}")
    n_cols = max(len(r) for r in rows)
    if len(row_labels) > len(rows):
        raise ValueError(f"{len(row_labels)} row labels for {len(rows)} row(s); give at most one per row")
    if len(column_labels) > n_cols:
        raise ValueError(f"{len(column_labels)} column labels for {n_cols} column(s); give at most one per column")
    font = ImageFont.load_default()
    left = 140 if any(row_labels) else 0
    col_lines = [_wrap(t, tile - 8) for t in column_labels]
    top = 8 + 12 * max((len(c) for c in col_lines), default=0) if any(column_labels) else 0
    sheet = Image.new("RGB", (left + n_cols * tile, top + len(rows) * tile), _BG)
    draw = ImageDraw.Draw(sheet)
    for c, lines in enumerate(col_lines):
        for k, line in enumerate(lines):
            draw.text((left + c * tile + 4, 4 + 12 * k), line, fill=_INK, font=font)
    for r, images in enumerate(rows):
        y = top + r * tile
        if r < len(row_labels):
            for k, line in enumerate(_wrap(row_labels[r], left - 8)):
                draw.text((4, y + tile // 2 - 6 + 12 * k), line, fill=_INK, font=font)
        for c, img in enumerate(images):
            thumb = img.convert("RGB")
            thumb.thumbnail((tile, tile), Image.Resampling.LANCZOS)
            sheet.paste(thumb, (left + c * tile + (tile - thumb.width) // 2, y + (tile - thumb.height) // 2))
    return sheet


__all__ = ["draw_labelled_grid"]
