"""One person's crops from real photos: other people's faces blurred or dropped, face choice, any sizes, report."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from metalora_core.faces import AugmentConfig, get_detector
from metalora_core.faces.crops import box_in_crop, inside_share
from metalora_core.faces.person import labelled_preview, person_crops

SMALL = AugmentConfig(bucket_area=160 * 160)


@pytest.fixture(scope="module")
def group(sample):
    return Image.open(sample("t1")).convert("RGB")  # six people


def _crops(group, others, **kw):
    return person_crops([group], detector="yunet", others=others, augment=SMALL, seed=0, **kw)


def test_box_in_crop_maps_the_face_like_the_grid(group):
    fc, _ = _crops(group, "keep")
    face = fc.faces[0]
    for c in fc.crops:
        got = box_in_crop(c, face.box)
        clipped = (max(got[0], 0), max(got[1], 0), min(got[2], c.size[0]), min(got[3], c.size[1]))
        assert np.allclose(clipped, c.face_box, atol=1e-6), (c.flipped, clipped, c.face_box)


def test_other_faces_are_blurred_and_the_person_is_not(group):
    keep, rk = _crops(group, "keep")
    blur, rb = _crops(group, "blur")
    det = get_detector("yunet")
    others = [f.box for f in det.detect(group)][1:]
    assert len(others) == 5
    assert len(keep.crops) == len(blur.crops) == rb.crops
    showing = [i for i, c in enumerate(keep.crops) if any(inside_share(c, b) > 1e-3 for b in others)]
    assert rb.photos[0].blurred == len(showing) >= 7, (rb.photos[0].blurred, len(showing))
    seen_before = seen_after = 0
    for i in showing:
        a, b = np.asarray(keep.crops[i].image, dtype=np.int16), np.asarray(blur.crops[i].image, dtype=np.int16)
        x0, y0, x1, y1 = (int(round(v)) for v in keep.crops[i].face_box)
        inner = (slice(y0 + 2, y1 - 2), slice(x0 + 2, x1 - 2))
        assert np.array_equal(a[inner], b[inner]), "the person's own face must stay untouched"
        assert np.abs(a - b).sum() > 0
        # faces a detector still finds with confidence besides the person (real faces here score 0.8-0.95;
        # a smoothed block at a crop's edge can draw a weak false detection)
        seen_before += sum(f.score >= 0.7 for f in det.detect(keep.crops[i].image)) - 1
        seen_after += sum(f.score >= 0.7 for f in det.detect(blur.crops[i].image)) - 1
    assert seen_before >= len(showing) // 2 and seen_after == 0, (seen_before, seen_after)
    assert f"{len(showing)} with other faces blurred" in rb.text()


def test_drop_leaves_only_crops_without_other_faces(group):
    keep, _ = _crops(group, "keep")
    drop, rd = _crops(group, "drop")
    others = [f.box for f in get_detector("yunet").detect(group)][1:]
    assert len(drop.crops) == len(keep.crops) - rd.photos[0].dropped and rd.photos[0].dropped >= 7
    assert all(inside_share(c, b) <= 1e-3 for c in drop.crops for b in others)
    assert f"{rd.photos[0].dropped} dropped (other faces)" in rd.text()


def test_face_index_picks_another_person_and_is_checked(group):
    first, r0 = _crops(group, "blur")
    third, r2 = _crops(group, "blur", face_index=2)
    assert first.faces[0].box != third.faces[0].box and r2.photos[0].used == 2
    assert "using face 2" in r2.text() and "6 faces found; using the largest" in r0.text()
    with pytest.raises(ValueError, match="face_index 6 but only 6 face"):
        _crops(group, "blur", face_index=6)


def test_photos_of_different_sizes_are_one_person_and_small_faces_warn(sample):
    a = Image.open(sample("obama")).convert("RGB")
    b = Image.open(sample("obama2")).convert("RGB")
    tiny = a.resize((a.width // 6, a.height // 6))
    assert a.size != b.size
    fc, rep = person_crops([a, b, tiny], detector="yunet", augment=SMALL, seed=0)
    assert len(rep.photos) == 3 and len(fc.faces) == 3 and rep.crops == len(fc.crops)
    assert not rep.photos[0].warnings and rep.photos[2].warnings
    assert "photo 3: the face is small" in rep.text()
    sheet = labelled_preview(fc.crops, rep)
    assert sheet.height > 0 and sheet.getpixel((3, 3)) == (255, 255, 255)  # the label band on top


def test_bad_arguments():
    with pytest.raises(ValueError, match="no photo"):
        person_crops([], detector="yunet")
    with pytest.raises(ValueError, match="other_faces 'hide'"):
        person_crops([Image.new("RGB", (64, 64))], detector="yunet", others="hide")
    with pytest.raises(ValueError, match="no face found"):
        person_crops([Image.new("RGB", (256, 256), (128, 128, 128))], detector="yunet")


def test_cut_again_at_another_resolution_keeps_other_faces_hidden(group):
    drop, _ = _crops(group, "drop")
    again = drop.at_resolution(96)
    assert len(again.crops) == len(drop.crops) and again.crops[0].size != drop.crops[0].size
    assert [c.box for c in again.crops] == [c.box for c in drop.crops]  # the same crops, the dropped ones still out
    blur, _ = _crops(group, "blur")
    hidden = blur.at_resolution(96)
    shown = _crops(group, "keep")[0].at_resolution(96)
    assert [c.box for c in hidden.crops] == [c.box for c in shown.crops]
    assert sum(a.image.tobytes() != b.image.tobytes() for a, b in zip(hidden.crops, shown.crops)) >= 7
    direct, _ = person_crops([group], detector="yunet", others="blur", resolution=96, seed=0)
    assert [c.image.tobytes() for c in hidden.crops] == [c.image.tobytes() for c in direct.crops]
    assert blur.at_resolution(160) is blur and hidden.resolution == 96


@pytest.mark.parametrize("others", ["blur", "drop"])
def test_cli_crops_and_the_face_augment_node_cut_the_same_crops(group, sample, tmp_path, others):
    """`metalora crops` and the Face Augment node's core (``person_crops``) give the same crops of a group photo."""
    import json

    from metalora_core.cli import main

    out = tmp_path / "cli"
    assert main(["crops", str(sample("t1")), "--out", str(out), "--detector", "yunet", "--seed", "3",
                 "--resolution", "160", "--other-faces", others]) == 0
    listed = json.loads((out / "crops.json").read_text())
    node, report = person_crops([group], detector="yunet", seed=3, face_index=0, others=others, resolution=160)
    assert len(listed["crops"]) == len(node.crops) == report.crops
    assert report.photos[0].blurred + report.photos[0].dropped >= 7  # the photo does show other people
    assert listed["blurred"] == report.photos[0].blurred and listed["dropped"] == report.photos[0].dropped
    for entry, crop in zip(listed["crops"], node.crops):
        with Image.open(out / entry["file"]) as im:
            assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(crop.image))


def test_stage1_crop_grid_is_stage2s_crops_unflipped_with_other_faces_blurred(group):
    from metalora_core.data.identities import DatasetConfig, _prepare_images

    images, mode = _prepare_images(group, DatasetConfig(augment=True, bucket_area=SMALL.bucket_area), get_detector("yunet"))
    stage2, _ = person_crops([group], detector="yunet", augment=AugmentConfig(bucket_area=SMALL.bucket_area, flip_prob=0.0))
    assert mode == "face-grid" and len(images) == len(stage2.crops) and not any(c.flipped for c in stage2.crops)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, stage2.images))
    kept, report = person_crops([group], detector="yunet", others="keep",
                                augment=AugmentConfig(bucket_area=SMALL.bucket_area, flip_prob=0.0))
    differ = sum(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, kept.images))
    assert differ >= 7, differ  # the other five people's faces are not in Stage-1's data either
