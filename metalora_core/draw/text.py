"""Text in the pictures: Pillow's built-in font, words drawn with a visible gap, lines wrapped to a
width in pixels (measured with the font, so a label never runs past its cell)."""
from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

LINE = 12  # pixels from one line of text to the next
# Pixels between words. The built-in font's own space is 2 px wide, which at its size runs words
# together ("Meta-LoRAafter"); words are drawn one by one with this gap instead.
WORD_GAP = 4


def label_font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's built-in font at its default size (no font file needed)."""
    return ImageFont.load_default()


def text_width(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> float:
    """Width in pixels of one line as ``draw_words`` draws it."""
    words = text.split()
    return sum(font.getlength(w) for w in words) + WORD_GAP * max(0, len(words) - 1)


def _pieces(word: str, width: float, font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> list[str]:
    """``word`` itself, or cut into pieces no wider than ``width`` when it is wider."""
    if font.getlength(word) <= width:
        return [word]
    pieces, piece = [], ""
    for ch in word:
        if piece and font.getlength(piece + ch) > width:
            pieces.append(piece)
            piece = ch
        else:
            piece += ch
    return pieces + [piece]


def wrap_text(text: str, width: float, font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> list[str]:
    """Greedy word wrap: lines no wider than ``width`` pixels (``text_width``), every word kept, in
    order; a word wider than ``width`` on its own is cut across lines. Line breaks in ``text`` are
    kept; an empty text gives one empty line."""
    lines: list[str] = []
    for para in text.splitlines() or [""]:
        line = ""
        for word in para.split():
            for piece in _pieces(word, width, font):
                if line and text_width(f"{line} {piece}", font) > width:
                    lines.append(line)
                    line = piece
                else:
                    line = f"{line} {piece}" if line else piece
        lines.append(line)
    return lines


def draw_words(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str,
               font: ImageFont.FreeTypeFont | ImageFont.ImageFont, fill: tuple[int, ...] | str) -> float:
    """Draws one line word by word, ``WORD_GAP`` pixels apart; returns the x where it ends."""
    x, y = xy
    for k, word in enumerate(text.split()):
        if k:
            x += WORD_GAP
        draw.text((x, y), word, fill=fill, font=font)
        x += font.getlength(word)
    return x


def vertical_label(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
                   background: tuple[int, int, int] = (255, 255, 255),
                   fill: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """``text`` on its own strip, turned to read bottom to top (an axis title beside a y axis; the
    built-in font has no vertical text)."""
    strip = Image.new("RGB", (int(text_width(text, font)) + 8, LINE + 4), background)
    draw_words(ImageDraw.Draw(strip), (4, 2), text, font, fill)
    return strip.rotate(90, expand=True)


__all__ = ["LINE", "WORD_GAP", "draw_words", "label_font", "text_width", "vertical_label", "wrap_text"]
