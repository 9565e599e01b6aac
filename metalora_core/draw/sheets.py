"""Image grids, drawn with PIL only: the one grid drawer (``draw_grid``) behind the labelled
comparison grid (the Meta-LoRA paper's Figures 4, 7 and 8: one row per method, one column per
prompt), the captioned sheets of scores and the crops' contact sheet."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw

from .text import LINE, draw_words, label_font, wrap_text

_BG = (255, 255, 255)
_INK = (0, 0, 0)
_DARK_BG = (32, 32, 32)
_DARK_INK = (235, 235, 235)
_ROW_LABELS = 140  # width of the row-label column, when there are row labels
_MARGIN = 2  # pixels kept free around each image in its cell, so neighbours never touch
Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in the image's pixels


@dataclass(frozen=True)
class TextLine:
    """One line of text ``draw_grid`` draws: its top-left corner and the width it must stay in."""

    x: float
    y: float
    text: str
    room: float  # pixels available from x; the line's ``text_width`` never exceeds it


@dataclass(frozen=True)
class GridLayout:
    """Where ``draw_grid`` puts things: sheet size, label column, header and caption band, text."""

    size: tuple[int, int]
    left: int  # width of the row-label column
    top: int  # height of the column-label header
    band: int  # height of the caption band under each row of cells
    lines: tuple[TextLine, ...]

    def cell(self, r: int, c: int, tile: int) -> tuple[int, int]:
        """Top-left corner of row ``r``, column ``c``."""
        return self.left + c * tile, self.top + r * (tile + self.band)


def fit_size(size: tuple[int, int], box: int) -> tuple[int, int]:
    """The size of an image of ``size`` scaled to fit a ``box`` x ``box`` square, aspect ratio kept
    (the long side becomes ``box``; the short side is rounded, so the ratio holds within a pixel)."""
    w, h = size
    scale = box / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def _thumb(img: Image.Image, box: Box | None, tile: int) -> Image.Image:
    """The image fitted to the cell (inside its margin), aspect ratio kept, ``box`` outlined on it.
    Small images are enlarged pixel for pixel (nearest), large ones shrunk smoothly."""
    out = img.convert("RGB")
    size = fit_size(out.size, tile - 2 * _MARGIN)
    scale = size[0] / out.width
    out = out.resize(size, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS)
    if box is not None:
        ImageDraw.Draw(out).rectangle(tuple(float(v) * scale for v in box), outline="lime", width=2)
    return out


def layout_grid(
    row_lengths: Sequence[int],
    *,
    row_labels: Sequence[str] = (),
    column_labels: Sequence[str] = (),
    captions: Sequence[Sequence[str]] | None = None,
    tile: int = 256,
) -> GridLayout:
    """``draw_grid``'s layout: every label wrapped to the room it has (no word cut off or running
    past its cell), the header and caption band as tall as their longest label."""
    font = label_font()
    n_cols = max(row_lengths)
    left = _ROW_LABELS if any(row_labels) else 0
    col_lines = [wrap_text(t, tile - 8, font) for t in column_labels]
    top = 8 + LINE * max((len(c) for c in col_lines), default=0) if any(column_labels) else 0
    cap_lines = None if captions is None else [[wrap_text(t, tile - 8, font) for t in row] for row in captions]
    band = 4 + LINE * max([len(c) for row in cap_lines for c in row] or [1]) if cap_lines is not None else 0
    lines: list[TextLine] = []
    for c, wrapped in enumerate(col_lines):
        lines += [TextLine(left + c * tile + 4, 4 + LINE * k, t, tile - 8) for k, t in enumerate(wrapped)]
    for r in range(len(row_lengths)):
        y = top + r * (tile + band)
        if r < len(row_labels):
            wrapped = wrap_text(row_labels[r], left - 8, font)
            y0 = y + max(0, (tile - LINE * len(wrapped)) // 2)  # centred beside the row
            lines += [TextLine(4, y0 + LINE * k, t, left - 8) for k, t in enumerate(wrapped)]
        if cap_lines is not None:
            for c, wrapped in enumerate(cap_lines[r]):
                lines += [TextLine(left + c * tile + 4, y + tile + 2 + LINE * k, t, tile - 8)
                          for k, t in enumerate(wrapped)]
    return GridLayout((left + n_cols * tile, top + len(row_lengths) * (tile + band)), left, top, band, tuple(lines))


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
        tile: side of each square cell in pixels (>= 32); each image is scaled to fit it with its
            aspect ratio kept (letterboxed), labels are wrapped to fit (``layout_grid``).
        dark: light text on a dark background instead of black on white.

    Returns:
        An RGB image of ``layout_grid(...).size``: (label column + columns * tile,
        header + rows * (tile + caption band)).

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
    layout = layout_grid([len(r) for r in rows], row_labels=row_labels, column_labels=column_labels,
                         captions=captions, tile=tile)
    font = label_font()
    bg, ink = (_DARK_BG, _DARK_INK) if dark else (_BG, _INK)
    sheet = Image.new("RGB", layout.size, bg)
    draw = ImageDraw.Draw(sheet)
    for r, images in enumerate(rows):
        for c, img in enumerate(images):
            x, y = layout.cell(r, c, tile)
            thumb = _thumb(img, None if boxes is None else boxes[r][c], tile)
            sheet.paste(thumb, (x + (tile - thumb.width) // 2, y + (tile - thumb.height) // 2))
    for line in layout.lines:
        draw_words(draw, (line.x, line.y), line.text, font, ink)
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


__all__ = ["GridLayout", "TextLine", "draw_grid", "draw_labelled_grid", "fit_size", "labelled_sheet", "layout_grid"]
