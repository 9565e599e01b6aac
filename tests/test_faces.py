"""Faces on real photos: detection, the paper's crop grid, identity embeddings, input hygiene.

Photos come from registry packages (see tests/sample_photos.py); no detector is mocked.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metalora_core.faces import (
    AugmentConfig,
    Face,
    bucket_size,
    contact_sheet,
    draw_faces,
    get_detector,
    get_embedder,
    grid_boxes,
    load_image,
    make_crops,
    run_crops,
    select_face,
)
from metalora_core.faces.embed import align_face

# Face boxes (x0, y0, x1, y1) read off the photos by eye after drawing the detector's boxes.
EXPECTED_BOXES = {
    "obama": (370, 90, 610, 420),
    "obama2": (200, 230, 475, 635),
    "obama3": (645, 270, 910, 620),
    "biden": (425, 175, 715, 575),
    "astronaut": (178, 63, 268, 176),
}


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


@pytest.fixture(scope="module")
def detector():
    return get_detector("yunet")


@pytest.fixture(scope="module")
def photo(sample):
    return lambda name: load_image(sample(name))


# ---------------------------------------------------------------- detection


@pytest.mark.parametrize("name", sorted(EXPECTED_BOXES))
def test_single_face_photos_give_one_box_on_the_face(detector, photo, name: str) -> None:
    faces = detector.detect(photo(name))
    assert len(faces) == 1, [f.box for f in faces]
    face = faces[0]
    assert iou(face.box, EXPECTED_BOXES[name]) >= 0.5
    assert face.score > 0.6
    assert face.landmarks[0][0] < face.landmarks[1][0], "landmark 0 is the eye on the image's left"
    for x, y in face.landmarks:
        assert face.box[0] <= x <= face.box[2] and face.box[1] <= y <= face.box[3]


def test_group_photo_gives_at_least_five_faces_largest_first(detector, photo) -> None:
    faces = detector.detect(photo("t1"))
    assert len(faces) >= 5
    areas = [f.area for f in faces]
    assert areas == sorted(areas, reverse=True)


def test_no_face_is_a_clear_error(detector, photo) -> None:
    with pytest.raises(ValueError, match=r"no face found in the image \(600x400\).*'yunet'.*closer crop"):
        select_face(photo("coffee"), detector)


def test_select_face_index_and_range(detector, photo) -> None:
    image = photo("t1")
    faces = detector.detect(image)
    assert select_face(image, detector) == faces[0]
    assert select_face(image, detector, index=1) == faces[1]
    with pytest.raises(ValueError, match=r"face index 99 is out of range: \d+ face"):
        select_face(image, detector, index=99)


def test_tiny_face_warns(detector, photo, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        select_face(photo("astronaut"), detector, min_size=200)
    assert "small" in caplog.text and "512x512" in caplog.text


def test_backend_selection(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ValueError, match="unknown face detector 'mtcnn'"):
        get_detector("mtcnn")
    with pytest.raises(FileNotFoundError, match=r"buffalo_l.*models.*yunet"):
        get_detector("buffalo_l", insightface_root=tmp_path)
    with pytest.raises(FileNotFoundError, match="embedder 'insightface'"):
        get_embedder("insightface", insightface_root=tmp_path)
    with pytest.raises(ValueError, match="unknown face embedder 'facenet'"):
        get_embedder("facenet")
    with caplog.at_level(logging.INFO):
        det = get_detector("auto", insightface_root=tmp_path)
        emb = get_embedder("Insightface:AUTO", insightface_root=tmp_path)
    assert det.name == "yunet" and "face detector: yunet (no insightface pack in" in caplog.text
    assert emb.name == "sface" and "face embedder: sface (no insightface pack in" in caplog.text


# ---------------------------------------------------------------- input hygiene


def test_exif_rotation_is_applied(detector, photo, tmp_path: Path) -> None:
    upright = photo("obama")
    stored = upright.rotate(90, expand=True)  # pixels on disk lie on their side
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    stored.save(path, quality=95, exif=exif.tobytes())
    loaded = load_image(path)
    assert loaded.size == upright.size
    assert iou(detector.detect(loaded)[0].box, EXPECTED_BOXES["obama"]) >= 0.5


def test_rgba_greyscale_and_16bit(detector, photo, tmp_path: Path) -> None:
    rgb = photo("astronaut")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(200)
    grey16 = (np.asarray(rgb.convert("L")).astype(np.uint16) * 257).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    rgb.convert("L").save(tmp_path / "grey.png")
    cases = {"rgba": rgba, "grey": tmp_path / "grey.png", "16bit": tmp_path / "g16.png"}
    for label, src in cases.items():
        img = load_image(src)
        assert img.mode == "RGB" and img.size == (512, 512), label
        faces = detector.detect(img)
        assert faces and iou(faces[0].box, EXPECTED_BOXES["astronaut"]) >= 0.5, label
    # 16-bit values are scaled, not clipped: mid-grey stays mid-grey.
    assert (
        abs(float(np.asarray(load_image(tmp_path / "g16.png")).mean()) - float(np.asarray(rgb.convert("L")).mean()))
        < 1.0
    )


def test_large_image_boxes_come_back_in_original_pixels(detector, photo) -> None:
    big = photo("astronaut").resize((4096, 4096), Image.Resampling.BILINEAR)
    faces = detector.detect(big)
    assert len(faces) == 1
    expected = tuple(v * 8 for v in EXPECTED_BOXES["astronaut"])
    assert iou(faces[0].box, expected) >= 0.5
    assert faces[0].width > 500


# ---------------------------------------------------------------- the crop grid


def _check_grid(image: Image.Image, face: Face, crops, config: AugmentConfig) -> None:
    img_w, img_h = image.size
    f_long = max(face.width, face.height)
    fx0, fy0 = max(0.0, face.box[0]), max(0.0, face.box[1])
    fx1, fy1 = min(img_w, face.box[2]), min(img_h, face.box[3])
    assert 1 <= len(crops) <= len(config.ratios) * len(config.scales)
    keys = {(c.ratio, c.box) for c in crops}
    assert len(keys) == len(crops), "duplicates collapse"
    for c in crops:
        x0, y0, x1, y1 = c.box
        cw, ch = x1 - x0, y1 - y0
        # inside the image and holding the whole face box
        assert 0 <= x0 and 0 <= y0 and x1 <= img_w and y1 <= img_h
        assert x0 <= fx0 and y0 <= fy0 and x1 >= fx1 and y1 >= fy1, (c.box, face.box)
        # ratio within rounding (1 px on each side)
        a, b = c.ratio
        assert abs(cw * b - ch * a) <= max(a, b) * 1.0 + 1e-9, (c.ratio, cw, ch)
        # scale: the shorter side is f_long * scale; a shrunk crop touches the image's limit
        assert abs(min(cw, ch) - f_long * c.scale) <= 1.0
        if c.scale < c.requested_scale - 0.01:
            assert cw == img_w or ch == img_h or abs(cw - img_w) <= 1 or abs(ch - img_h) <= 1
        else:
            assert abs(min(cw, ch) - f_long * c.requested_scale) <= 1.0
        # output bucket: multiples of 16, area about bucket_area, same ratio
        ow, oh = c.size
        assert c.image.size == c.size and c.image.mode == "RGB"
        assert ow % config.multiple == 0 and oh % config.multiple == 0
        assert abs(ow * oh / config.bucket_area - 1) < 0.1
        assert abs(ow / oh - a / b) / (a / b) < 0.05
        # face box in crop pixels lies inside the crop
        bx0, by0, bx1, by1 = c.face_box
        assert 0 <= bx0 < bx1 <= ow and 0 <= by0 < by1 <= oh


@pytest.mark.parametrize("name", ["obama", "obama2", "biden", "astronaut", "t1"])
def test_grid_on_real_photos(detector, photo, name: str) -> None:
    image = photo(name)
    face = select_face(image, detector)
    config = AugmentConfig()
    crops = make_crops(image, face, config, torch.Generator().manual_seed(0))
    _check_grid(image, face, crops, config)


def test_grid_is_the_paper_table_when_the_image_is_large() -> None:
    config = AugmentConfig()
    face = (1950.0, 1940.0, 2050.0, 2060.0)  # 100 x 120, f_long = 120, in a 6000 x 6000 image
    boxes = grid_boxes((6000, 6000), face, config)
    assert len(boxes) == 25
    for (a, b), requested, scale, (x0, y0, x1, y1) in boxes:
        assert scale == pytest.approx(requested, abs=1 / 120)
        short = min(x1 - x0, y1 - y0)
        assert short == round(120 * requested)
        assert ((x1 - x0) >= (y1 - y0)) == (a >= b)
        # face centred (within a pixel)
        assert abs((x0 + x1) / 2 - 2000) <= 1 and abs((y0 + y1) / 2 - 2000) <= 1


def test_grid_shifts_then_shrinks_at_the_border() -> None:
    config = AugmentConfig()
    face = (10.0, 20.0, 110.0, 140.0)  # near the top-left corner of an 800 x 600 image
    boxes = grid_boxes((800, 600), face, config)
    assert 1 <= len(boxes) < 25  # some sizes collapse after shrinking
    for *_, (x0, y0, x1, y1) in boxes:
        assert x0 <= 10 and y0 <= 20 and x1 >= 110 and y1 >= 140
        assert x1 <= 800 and y1 <= 600
    shrunk = [b for b in boxes if b[2] < b[1] - 0.01]
    assert shrunk, "4.5 x 120 = 540 px short side cannot fit 16:9 in 800 x 600"


def test_face_wider_than_image_ratio_is_skipped_not_cut() -> None:
    # A 9:16 crop cannot hold a face box as wide as this short image, so it is left out.
    face = (0.0, 0.0, 300.0, 300.0)
    boxes = grid_boxes((320, 310), face, AugmentConfig())
    assert all(b[3][2] - b[3][0] >= 300 and b[3][3] - b[3][1] >= 300 for b in boxes)
    assert boxes and {b[0] for b in boxes} == {(1, 1)}


def test_flips_follow_the_generator(detector, photo) -> None:
    image = photo("astronaut")
    face = select_face(image, detector)
    cfg = AugmentConfig(bucket_area=128 * 128)  # small buckets: fast

    def flips(seed: int) -> list[bool]:
        return [c.flipped for c in make_crops(image, face, cfg, torch.Generator().manual_seed(seed))]

    assert flips(0) == flips(0)
    assert len({tuple(flips(s)) for s in range(4)}) > 1
    with pytest.raises(ValueError, match="torch.Generator"):
        make_crops(image, face, cfg, None)

    never = make_crops(
        image, face, AugmentConfig(bucket_area=128 * 128, flip_prob=0.0), torch.Generator().manual_seed(1)
    )
    always = make_crops(
        image, face, AugmentConfig(bucket_area=128 * 128, flip_prob=1.0), torch.Generator().manual_seed(1)
    )
    assert not any(c.flipped for c in never) and all(c.flipped for c in always)
    for n, a in zip(never, always, strict=True):
        assert n.box == a.box
        mirrored = np.asarray(n.image)[:, ::-1]
        assert np.array_equal(mirrored, np.asarray(a.image))
        w = n.size[0]
        assert a.face_box == pytest.approx((w - n.face_box[2], n.face_box[1], w - n.face_box[0], n.face_box[3]))


def test_bucket_sizes() -> None:
    assert bucket_size((1, 1), 512 * 512, 16) == (512, 512)
    assert bucket_size((16, 9), 512 * 512, 16) == (688, 384)
    assert bucket_size((9, 16), 1024 * 1024, 16) == (768, 1360)


def test_config_validation_names_the_bad_value() -> None:
    with pytest.raises(ValueError, match="scale must be a number >= 1.*0.5"):
        AugmentConfig(scales=(0.5,))
    with pytest.raises(ValueError, match="flip_prob must be in \\[0, 1\\], got 2"):
        AugmentConfig(flip_prob=2)
    with pytest.raises(ValueError, match="ratio must be two positive ints"):
        AugmentConfig(ratios=((16, 0),))
    with pytest.raises(ValueError, match="bucket_area"):
        AugmentConfig(bucket_area=10)
    with pytest.raises(ValueError, match="5 \\(x, y\\) landmarks"):
        Face(box=(0, 0, 1, 1), landmarks=((0, 0),), score=1.0)


# ---------------------------------------------------------------- identity embeddings


@pytest.fixture(scope="module")
def embeddings(detector, photo):
    embedder = get_embedder("sface")
    out = {}
    for name in ("obama", "obama2", "obama3", "biden"):
        image = photo(name)
        out[name] = embedder.embed(image, select_face(image, detector))
    return embedder, out


def test_embeddings_separate_identities(embeddings) -> None:
    embedder, e = embeddings
    assert embedder.name == "sface" and embedder.dim == 128
    for v in e.values():
        assert v.dtype == np.float32 and v.shape == (128,)
        assert float(np.linalg.norm(v)) == pytest.approx(1.0, abs=1e-5)
    obama = ["obama", "obama2", "obama3"]
    same = [float(e[a] @ e[b]) for i, a in enumerate(obama) for b in obama[i + 1 :]]
    diff = [float(e[a] @ e["biden"]) for a in obama]
    assert min(same) - max(diff) > 0.3, (same, diff)


def test_alignment_matches_opencv_reference(detector, photo, embeddings) -> None:
    import cv2

    embedder, _ = embeddings
    image = photo("obama2")
    f = select_face(image, detector)
    row = np.array([[f.box[0], f.box[1], f.width, f.height, *np.ravel(f.landmarks), f.score]], np.float32)
    recognizer = cv2.FaceRecognizerSF.create(str(embedder.model_path), "")  # OpenCV's own alignment
    ref = recognizer.alignCrop(np.ascontiguousarray(np.asarray(image)[:, :, ::-1]), row)[:, :, ::-1]
    mine = np.asarray(align_face(image, f))
    assert np.abs(ref.astype(int) - mine.astype(int)).mean() < 1.5


def test_sface_embedding_is_opencvs_on_every_opencv(detector, photo, embeddings) -> None:
    """The same vector on OpenCV 4 and 5: the reference is FaceRecognizerSF.feature on OpenCV 4.14.
    Where FaceRecognizerSF still accepts the model (OpenCV 4), the bits are its own."""
    import cv2

    embedder, e = embeddings
    ref = json.loads((Path(__file__).parent / "data" / "sface_obama2.json").read_text())
    assert np.abs(e["obama2"] - np.array(ref["embedding"], np.float32)).max() < 1e-4, cv2.__version__
    aligned = align_face(photo("obama2"), select_face(photo("obama2"), detector))
    try:
        recognizer = cv2.FaceRecognizerSF.create(str(embedder.model_path), "")
        own = recognizer.feature(np.ascontiguousarray(np.asarray(aligned)[:, :, ::-1])).reshape(-1)
    except cv2.error:  # OpenCV 5: its FaceRecognizerSF rejects this model
        assert int(cv2.__version__.split(".")[0]) >= 5, cv2.__version__
        return
    assert np.array_equal(own, embedder._embed_aligned(aligned))


# ---------------------------------------------------------------- outputs and CLI


def test_run_crops_writes_pngs_sheet_and_json(sample, tmp_path: Path) -> None:
    result = run_crops(sample("astronaut"), tmp_path / "out", detector="yunet", seed=3)
    out = Path(result["out_dir"])
    meta = json.loads((out / "crops.json").read_text())
    assert meta["detector"] == "yunet" and meta["seed"] == 3
    assert len(meta["face"]["landmarks"]) == 5 and iou(meta["face"]["box"], EXPECTED_BOXES["astronaut"]) >= 0.5
    assert 1 <= len(meta["crops"]) <= 25
    for c in meta["crops"]:
        with Image.open(out / c["file"]) as im:
            assert list(im.size) == c["size"]
        assert set(c) >= {"ratio", "scale", "flipped", "size", "box", "face_box"}
    assert (out / "contact_sheet.png").is_file() and (out / "faces.png").is_file()
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))
    again = run_crops(sample("astronaut"), tmp_path / "again", detector="yunet", seed=3)
    assert [c["flipped"] for c in again["crops"]] == [c["flipped"] for c in meta["crops"]]


def test_crops_subcommand(sample, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`metalora crops` through the real entry point prints the output folder and nothing else."""
    from metalora_core.cli import main

    assert main(["crops", str(sample("obama")), "--out", str(tmp_path / "c"), "--detector", "yunet",
                 "--seed", "1"]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'c'}\n"
    assert (tmp_path / "c" / "crops.json").is_file()


def test_drawing_helpers(photo) -> None:
    image = photo("astronaut")
    drawn = draw_faces(image, [EXPECTED_BOXES["astronaut"]])
    assert drawn.size == image.size and drawn is not image
    assert not np.array_equal(np.asarray(drawn), np.asarray(image))
    face = Face(
        box=(178.0, 63.0, 268.0, 176.0),
        landmarks=((200, 102), (247, 103), (220, 125), (199, 143), (240, 144)),
        score=0.9,
    )
    crops = make_crops(image, face, AugmentConfig(bucket_area=64 * 64), torch.Generator().manual_seed(0))
    sheet = contact_sheet(crops, tile=64)
    rows = math.ceil(len(crops) / 5)
    assert sheet.size[0] == 64 * min(5, len(crops)) and sheet.size[1] % rows == 0
    assert sheet.size[1] // rows >= 64 + 16  # each row: its cells and a caption band of one line or more


def test_resize_to_bucket_snaps_to_the_closest_paper_ratio(photo) -> None:
    from metalora_core.faces import fit_to_ratio, resize_to_bucket

    image = photo("obama2")  # 626 x 1200 (0.52): closest of the paper's ratios is 9:16
    out = resize_to_bucket(image, 512 * 512)
    assert out.size == bucket_size((9, 16), 512 * 512, 16)  # the crop grid's bucket: they batch together
    assert out.size[0] % 16 == 0 and out.size[1] % 16 == 0
    assert abs(out.size[0] * out.size[1] / (512 * 512) - 1) < 0.1
    ratio, box = fit_to_ratio(image.size)
    assert ratio == (9, 16) and box == (0, 43, 626, 1156)  # the centred 9:16 box, full width
    reference = image.resize(out.size, Image.Resampling.LANCZOS, box=box)
    assert np.array_equal(np.asarray(out), np.asarray(reference))


def test_whole_photo_crop_maps_the_face_box(detector, photo) -> None:
    from metalora_core.faces import whole_photo_crop

    image = photo("obama2")  # 626 x 1200: the bucket's ratio differs slightly, so fit crops a little
    face = select_face(image, detector)
    crop = whole_photo_crop(image, face, 256 * 256)
    assert crop.size == crop.image.size and not crop.flipped and crop.scale == 0.0
    assert crop.ratio == (9, 16) and crop.size == bucket_size((9, 16), 256 * 256, 16)  # resize_to_bucket's rule
    # the detector finds the same face in the resized photo, where the mapped box says it is
    again = select_face(crop.image, detector)
    assert iou(again.box, crop.face_box) > 0.8
    x0, y0, x1, y1 = crop.box
    assert 0 <= x0 < x1 <= image.size[0] and 0 <= y0 < y1 <= image.size[1]
