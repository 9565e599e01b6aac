"""One identity-folder reader, one grid drawer, one cosine, one missing-face rule."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from metalora_core.data.identities import read_identity_folders
from metalora_core.draw.sheets import draw_grid, draw_labelled_grid, labelled_sheet
from metalora_core.eval import metrics
from metalora_core.faces import embed


def test_one_identity_folder_reader_for_training_and_eval(tmp_path):
    for name, files in {"ann": ("b.png", "a.jpg", ".hidden.png", "notes.md"), "bob": ("x.webp",), "empty": ()}.items():
        (tmp_path / name).mkdir()
        for f in files:
            if f.endswith(".md"):
                (tmp_path / name / f).write_text("not a photo")
            else:
                Image.new("RGB", (8, 8)).save(tmp_path / name / f)
    (tmp_path / ".cache").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / ".cache" / "z.png")
    (tmp_path / "ann" / "b.txt").write_text("a photo of ann smiling\n")
    (tmp_path / "ann" / "reference.txt").write_text("b.png\n")
    (tmp_path / "ann" / "gender.txt").write_text("woman\n")
    got = read_identity_folders(tmp_path)
    assert list(got) == ["ann", "bob"]  # sorted; hidden and photo-less folders skipped
    ann = got["ann"]
    assert [p.name for p in ann.photos] == ["a.jpg", "b.png"]  # hidden files and other suffixes skipped
    assert ann.reference.name == "b.png" and [p.name for p in ann.test] == ["a.jpg"] and ann.gender == "woman"
    assert ann.captions == {tmp_path / "ann" / "b.png": "a photo of ann smiling"}
    assert got["bob"].reference.name == "x.webp" and got["bob"].test == [] and got["bob"].gender is None
    assert [p.name for p in read_identity_folders(tmp_path, max_per_identity=1)["ann"].photos] == ["a.jpg"]
    (tmp_path / "ann" / "reference.txt").write_text("nope.png\n")
    with pytest.raises(ValueError, match="nope.png"):
        read_identity_folders(tmp_path)
    with pytest.raises(FileNotFoundError, match="no identities folder"):
        read_identity_folders(tmp_path / "missing")


def test_one_grid_drawer_behind_every_sheet():
    imgs = [Image.new("RGB", (64, 80), (200, 40, 40)), Image.new("RGB", (50, 50), (10, 90, 10)),
            Image.new("RGB", (30, 60), (10, 10, 200))]
    sheet = labelled_sheet(imgs, ["a", "b", "c"], [(5.0, 5.0, 40.0, 60.0), None, None], tile=64, columns=2)
    same = draw_grid([imgs[:2], imgs[2:]], captions=[["a", "b"], ["c"]], boxes=[[(5.0, 5.0, 40.0, 60.0), None], [None]],
                     tile=64, dark=True)
    assert sheet.size == (128, 2 * (64 + 16)) and np.array_equal(np.asarray(sheet), np.asarray(same))
    grid = draw_labelled_grid([imgs[:2], imgs[2:]], ["base", "tuned"], ["p0", "p1"], tile=64)
    assert grid.size[0] == 140 + 2 * 64 and grid.size[1] > 2 * 64
    assert np.array_equal(np.asarray(grid), np.asarray(draw_grid([imgs[:2], imgs[2:]], row_labels=["base", "tuned"],
                                                                 column_labels=["p0", "p1"], tile=64)))
    with pytest.raises(ValueError, match="captions must give one entry per image"):
        draw_grid([imgs], captions=[["only one"]])


def test_one_cosine_and_one_missing_face_rule():
    assert metrics.cosine is embed.cosine
    assert embed.cosine(np.array([3.0, 0.0]), np.array([1.0, 1.0])) == pytest.approx(2 ** -0.5)
    with pytest.raises(ValueError, match="sizes differ"):
        embed.cosine(np.ones(3), np.ones(4))
    assert metrics.counted(0.7, False, "exclude") == 0.7
    assert metrics.counted(None, True, "exclude") is None  # no face: left out of the mean
    assert metrics.counted(None, True, "zero") == 0.0  # no face: counted as 0
    assert metrics.counted(None, False, "zero") is None  # missing image / no held-out face: never counted
