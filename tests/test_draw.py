"""The pictures a person reads: images keep their shape in their cells, labels fit, charts say what
their axes are."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from metalora_core.draw.charts import line_plot, moving_average, smoothing_window
from metalora_core.draw.sheets import draw_grid, fit_size, labelled_sheet, layout_grid
from metalora_core.draw.text import LINE, WORD_GAP, draw_words, label_font, text_width, wrap_text


def _ink_box(arr: np.ndarray, colour: tuple[int, int, int]) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero((arr == colour).all(axis=-1))
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def test_a_tall_or_wide_crop_fills_its_tile_at_its_own_aspect_ratio():
    tall, wide = Image.new("RGB", (24, 40), (250, 0, 0)), Image.new("RGB", (40, 24), (0, 0, 250))
    sheet = np.asarray(labelled_sheet([tall, wide], ["24x40", "40x24"], tile=96, columns=2))
    for colour, (w, h), x0 in (((250, 0, 0), (24, 40), 0), ((0, 0, 250), (40, 24), 96)):
        bx0, by0, bx1, by1 = _ink_box(sheet, colour)
        assert max(bx1 - bx0, by1 - by0) == 92  # the long side fills the tile (2 px margin each side)
        assert abs((bx1 - bx0) / (by1 - by0) * h - w) * 92 / max(w, h) <= 1  # the shape within a pixel
        assert abs((bx0 - x0) - (x0 + 96 - bx1)) <= 1  # centred in its tile
    assert fit_size((24, 40), 92) == (55, 92) and fit_size((1000, 10), 50) == (50, 1)


def test_labels_wrap_to_their_cell_and_keep_every_word():
    label = "base: a photo of a woman as an astronaut on the moon"
    layout = layout_grid([2], captions=[[label, "short"]], row_labels=["Meta-LoRA after 375 steps, same prompts"],
                         tile=128)
    font = label_font()
    caption = [t for t in layout.lines if t.y >= layout.top + 128 and t.x < layout.left + 128]
    assert " ".join(t.text for t in caption) == label and len(caption) >= 2
    for t in layout.lines:
        assert text_width(t.text, font) <= t.room
    for t in caption:
        assert layout.left + 4 <= t.x and t.x + t.room <= layout.left + 128 - 4  # inside its own cell
    assert layout.band >= 4 + LINE * len(caption) and layout.size == (140 + 2 * 128, 128 + layout.band)
    sheet = draw_grid([[Image.new("RGB", (64, 64))] * 2], captions=[[label, "short"]],
                      row_labels=["Meta-LoRA after 375 steps, same prompts"], tile=128)
    assert sheet.size == layout.size
    band = np.asarray(sheet)[128 + 2 + LINE * (len(caption) - 1):, 140:268]
    assert (band != 255).any()  # the last line of the caption is drawn, inside the sheet
    assert wrap_text("Supercalifragilistic", 40, font)[0] != "Supercalifragilistic"  # a long word is cut, not lost
    assert "".join(wrap_text("Supercalifragilistic", 40, font)) == "Supercalifragilistic"


def test_words_are_drawn_apart():
    """The built-in font's own space (2 px) runs "Meta-LoRA after" together; drawn words keep a gap."""
    font = label_font()

    def ink_columns(text: str) -> np.ndarray:
        strip = Image.new("L", (200, 16), 255)
        draw_words(ImageDraw.Draw(strip), (2, 2), text, font, 0)
        return np.nonzero((np.asarray(strip) < 200).any(axis=0))[0]

    first_word_ends = ink_columns("Meta-LoRA").max()
    both = ink_columns("Meta-LoRA after")
    assert both[both > first_word_ends].min() - first_word_ends - 1 >= WORD_GAP - 1
    assert text_width("Meta-LoRA after", font) == font.getlength("Meta-LoRA") + WORD_GAP + font.getlength("after")


def test_loss_chart_has_axis_titles_and_a_smoothed_line_over_the_raw_one():
    values = [1.0 + 0.3 * math.sin(7 * i) + 0.5 * math.exp(-i / 40) for i in range(200)]
    titled, bare = (np.asarray(line_plot(values, **kw)).astype(int)
                    for kw in ({}, {"x_label": "", "y_label": ""}))
    differ = (titled != bare).any(axis=-1)
    h, w = differ.shape
    assert differ[h - 20:, w // 3: 2 * w // 3].any()  # "step" under the x axis
    assert differ[h // 3: 2 * h // 3, :20].any()  # "loss" beside the y axis
    assert not differ[30: h - 45, 70: w - 15].any()  # nothing else moves
    chart = np.asarray(line_plot(values))
    count = lambda rgb: int((chart == rgb).all(axis=-1).sum())  # noqa: E731
    assert count((20, 60, 160)) > 200 and count((180, 200, 235)) > 200  # smoothed line over the lighter raw one
    plain = np.asarray(line_plot(values, smooth=0))
    assert not (plain == (180, 200, 235)).all(axis=-1).any()  # not smoothed: the values in the dark colour
    assert [smoothing_window(n) for n in (5, 30, 200, 5000)] == [0, 3, 20, 50]
    assert moving_average([1.0, math.nan, 3.0, 5.0], 2) == [1.0, 1.0, 3.0, 4.0]
