"""Evaluation metrics: FaceSim on real photos, R-FaceSim = Algorithm 3, CLIP-T on a tiny CLIP, the CLI."""
from __future__ import annotations

import argparse
import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from metalora_core.cli.eval import register
from metalora_core.data.identities import read_identity_folders
from metalora_core.draw.eval_figures import ScatterPoint, draw_scatter
from metalora_core.draw.sheets import labelled_sheet, layout_grid
from metalora_core.eval.metrics import clip_t, face_sim, load_clip, r_face_sim, split_reference
from metalora_core.faces import get_detector, get_embedder, load_image
from metalora_core.data.prompts import PROMPT_TABLES, expand_prompt, is_template, load_prompts
from sample_photos import sample_photo


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def detector():
    return get_detector("yunet")


@pytest.fixture(scope="module")
def embedder():
    return get_embedder("sface")


def _photo(name: str, max_side: int = 640) -> Image.Image:
    img = load_image(sample_photo(name))
    img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return img


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    return {n: _photo(n) for n in ("obama", "obama2", "obama3", "biden", "coffee")}


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A randomly initialised transformers CLIPModel + byte-level tokenizer + image processor, saved."""
    from tiny_clip import write_tiny_clip

    return write_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


# ---------------------------------------------------------------------------------------------
# FaceSim on real photos


def test_face_sim_same_person_beats_different_person(photos, detector, embedder):
    res = face_sim([photos["obama2"], photos["biden"], photos["coffee"]], photos["obama"], detector, embedder)
    same, other, nothing = res.scores
    assert same is not None and other is not None
    assert same > other + 0.2, res.table()
    assert nothing is None and res.no_face == (2,)  # the coffee cup has no face: reported, not dropped silently
    assert res.mean == pytest.approx((same + other) / 2)
    assert res.embedder == "sface" and res.detector == "yunet"
    zero = face_sim([photos["obama2"], photos["biden"], photos["coffee"]], photos["obama"], detector, embedder,
                    missing_face="zero")
    assert zero.mean == pytest.approx((same + other) / 3)
    d = res.to_dict()
    assert d["no_face"] == [2] and d["embedder"] == "sface" and json.dumps(d)
    assert "no face" in res.table() and len(res.labels()) == 3


def test_face_sim_reference_without_face_raises(photos, detector, embedder):
    with pytest.raises(ValueError, match="no face found in the reference"):
        face_sim(photos["obama"], photos["coffee"], detector, embedder)


def test_r_face_sim_real_photos_identity_ordering(photos, detector, embedder):
    # Reference obama, held out obama2/obama3: a generated obama scores higher than a generated biden.
    res = r_face_sim(
        {"obama": [photos["obama"], photos["biden"]]},
        {"obama": [photos["obama2"], photos["obama3"]]},
        detector, embedder,
    )
    s_same, s_other = (p.score for p in res.pairs)
    assert s_same > s_other + 0.2, res.table()
    assert all(p.n_test == 2 for p in res.pairs)


# ---------------------------------------------------------------------------------------------
# R-FaceSim arithmetic = Algorithm 3 (deterministic embedder fixture, only for this check)


@dataclass(frozen=True)
class _KeyFace:
    box: tuple[float, float, float, float]


class _ColourDetector:
    """One face covering the image unless the image is pure black (then no face)."""

    name = "colour-test"

    def detect(self, image):
        if max(image.getextrema()[c][1] for c in range(3)) == 0:
            return []
        return [_KeyFace((0.0, 0.0, float(image.width), float(image.height)))]


class _ColourEmbedder:
    """Embedding = the image's RGB colour of pixel (0, 0), L2-normalised."""

    name = "colour-test"
    dim = 3

    def embed(self, image, face):
        v = np.asarray(image.getpixel((0, 0)), dtype=np.float32)
        return v / np.linalg.norm(v)


def _solid(rgb) -> Image.Image:
    return Image.new("RGB", (8, 8), rgb)


def test_r_face_sim_follows_algorithm_3_by_hand():
    det, emb = _ColourDetector(), _ColourEmbedder()
    x, y, z, xy = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)
    black = (0, 0, 0)
    generated = {
        "a": [_solid(x), _solid(xy), _solid(black)],  # prompt 2: no face in the generated image
        "b": [_solid(z), _solid(y), None],  # prompt 2: missing
    }
    tests = {
        "a": [_solid(x), _solid(y), _solid(black)],  # held-out photo 2 has no face: left out of T
        "b": [_solid(z)],
    }
    refs = {"a": _solid(xy), "b": _solid(z)}
    res = r_face_sim(generated, tests, det, emb, references=refs)
    r2 = 1 / math.sqrt(2)
    # S(a,0) = mean(cos(x,x), cos(x,y)) = 0.5; S(a,1) = mean(cos(xy,x), cos(xy,y)) = r2
    # S(b,0) = cos(z,z) = 1; S(b,1) = cos(y,z) = 0
    expected = {("a", 0): 0.5, ("a", 1): r2, ("b", 0): 1.0, ("b", 1): 0.0}
    got = {(p.identity, p.prompt_index): p.score for p in res.pairs if p.status == "ok"}
    assert got == pytest.approx(expected)
    assert res.score == pytest.approx((0.5 + r2 + 1.0 + 0.0) / 4)
    assert res.n_scored == 4 and len(res.pairs) == 6
    assert res.no_face_generated == (("a", 2),)
    assert res.no_face_test == (("a", 2),)
    assert [(p.identity, p.prompt_index) for p in res.pairs if p.status == "missing"] == [("b", 2)]
    assert [p.n_test for p in res.pairs if p.status == "ok"] == [2, 2, 1, 1]
    assert res.identity_scores() == pytest.approx({"a": (0.5 + r2) / 2, "b": 0.5})
    # Conventional FaceSim against the reference: cos(x,xy)=r2, cos(xy,xy)=1, cos(z,z)=1, cos(y,z)=0.
    assert res.face_sim == pytest.approx((r2 + 1 + 1 + 0) / 4)
    assert res.embedder == "colour-test"

    zero = r_face_sim(generated, tests, det, emb, missing_face="zero")
    assert zero.score == pytest.approx((0.5 + r2 + 0.0 + 1.0 + 0.0) / 5)  # the faceless one counts as 0
    assert zero.n_scored == 5 and zero.face_sim is None
    d = res.to_dict()
    assert d["no_face_generated"] == [["a", 2]] and d["missing"] == [["b", 2]] and d["n_pairs"] == 6
    json.dumps(d)
    assert "no_face" in res.table()


def test_r_face_sim_identity_without_usable_test_face():
    det, emb = _ColourDetector(), _ColourEmbedder()
    res = r_face_sim({"a": [_solid((9, 9, 9))]}, {"a": [_solid((0, 0, 0))]}, det, emb)
    assert res.score is None and res.pairs[0].status == "no_test_face" and res.n_scored == 0
    with pytest.raises(ValueError, match="no held-out test photos"):
        r_face_sim({"a": [_solid((9, 9, 9))]}, {"a": []}, det, emb)
    with pytest.raises(ValueError, match="missing_face"):
        r_face_sim({"a": [_solid((9, 9, 9))]}, {"a": [_solid((1, 1, 1))]}, det, emb, missing_face="drop")


def test_split_reference():
    assert split_reference(["r", "t1", "t2"]) == ("r", ["t1", "t2"])
    assert split_reference(["t1", "r", "t2"], 1) == ("r", ["t1", "t2"])
    with pytest.raises(ValueError, match="at least two photos"):
        split_reference(["only"])


# ---------------------------------------------------------------------------------------------
# CLIP-T on a tiny random CLIP


def test_clip_t_matches_manual_cosine(tiny_clip_dir):
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    images = [Image.new("RGB", (64, 48), (200, 10, 10)), Image.new("RGB", (40, 40), (0, 0, 255))]
    prompts = ["a red square", load_prompts("ffhq_female")[0] * 3]  # the second is longer than 77 tokens
    res = clip_t(images, prompts, tiny_clip_dir)
    assert len(res.scores) == 2 and all(-1.0 <= s <= 1.0 for s in res.scores)
    assert res.mean == pytest.approx(sum(res.scores) / 2)
    assert res.model == tiny_clip_dir.name

    # The same numbers from the towers by hand.
    model = CLIPModel.from_pretrained(tiny_clip_dir, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(tiny_clip_dir, local_files_only=True)
    proc = CLIPImageProcessor.from_pretrained(tiny_clip_dir, local_files_only=True)
    with torch.no_grad():
        pix = proc(images=images, return_tensors="pt")["pixel_values"]
        ids = tok(prompts, padding=True, truncation=True, return_tensors="pt")
        img = model.visual_projection(model.vision_model(pixel_values=pix).pooler_output).double()
        txt = model.text_projection(
            model.text_model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).pooler_output
        ).double()
    manual = torch.nn.functional.cosine_similarity(img, txt, dim=-1).numpy()
    np.testing.assert_allclose(res.scores, manual, rtol=1e-5, atol=1e-6)

    # Loaded once, reused; one prompt for all images; batches of one give the same numbers.
    scorer = load_clip(tiny_clip_dir)
    again = clip_t(images, prompts, scorer, batch_size=1)
    np.testing.assert_allclose(again.scores, res.scores, rtol=1e-5, atol=1e-6)
    assert len(clip_t(images, "a photo", scorer).prompts) == 2
    with pytest.raises(ValueError, match="2 image"):
        clip_t(images, ["a", "b", "c"], scorer)
    assert json.dumps(res.to_dict()) and "CLIP-T" in res.table()


def test_clip_t_missing_model_names_the_folder(tmp_path):
    missing = tmp_path / "clip-vit-base-patch32"
    with pytest.raises(FileNotFoundError, match="clip-vit-base-patch32") as e:
        clip_t(Image.new("RGB", (8, 8)), "x", missing)
    assert "openai/clip-vit-base-patch32" in str(e.value) and "does not exist" in str(e.value)
    missing.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_clip(missing)


# ---------------------------------------------------------------------------------------------
# Prompt tables


def test_prompt_tables_match_the_paper():
    male, female, unsplash = (load_prompts(n) for n in ("ffhq_male", "ffhq_female", "unsplash"))
    assert len(male) == 20 and len(female) == 20 and len(unsplash) == 10
    assert male[0] == "A man in a firefighter uniform, standing in front of a firetruck, looking straight ahead."
    assert female[-1].startswith("A mysterious woman witcher at night")
    assert not any("woman" in p for p in male) and all("woman" in p for p in female)
    assert all(is_template(p) for p in unsplash) and set(PROMPT_TABLES) == {"ffhq_male", "ffhq_female", "unsplash"}
    her = load_prompts("unsplash", gender="woman")[8]
    assert her == ("A woman in a modern, casual look, standing in a contemporary indoor space with artistic "
                   "lighting, her face fully visible and rendered with intricate detail as she looks at the camera.")
    assert expand_prompt(unsplash[8], "male").startswith("A man in a modern") and " he looks" in expand_prompt(unsplash[8], "m")
    assert not any(is_template(p) for p in load_prompts("unsplash", gender="man"))
    with pytest.raises(ValueError, match="unknown gender"):
        expand_prompt("A [man/woman]", "cat")
    with pytest.raises(FileNotFoundError, match="built-in table"):
        load_prompts("no_such_table")


# ---------------------------------------------------------------------------------------------
# Drawing


def test_score_grid_and_scatter_draw():
    imgs = [Image.new("RGB", (64, 80), (90, 90, 90)), Image.new("RGB", (50, 50), (10, 90, 10))]
    grid = labelled_sheet(imgs, ["FaceSim 0.700", "no face"], [(5.0, 5.0, 40.0, 60.0), None], tile=64, columns=2)
    assert grid.size == layout_grid([2], captions=[["FaceSim 0.700", "no face"]], tile=64).size and grid.mode == "RGB"
    with pytest.raises(ValueError, match="one of each"):
        labelled_sheet(imgs, ["only one"])
    pts = [ScatterPoint(0.30, 0.70, "run a", "a", 7), ScatterPoint(0.31, 0.75, "run b", "b"), ScatterPoint(math.nan, 0.1, "run b")]
    plot = draw_scatter(pts, "CLIP-T", "R-FaceSim", title="t", size=(400, 300))
    assert plot.size == (400, 300)
    arr = np.asarray(plot)
    assert (arr != 255).any(axis=-1).sum() > 500  # axes, ticks, points and text were drawn


# ---------------------------------------------------------------------------------------------
# CLI


def _save(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="metalora")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_eval_writes_scores_summary_and_scatter(tmp_path, photos, tiny_clip_dir):
    ids = tmp_path / "identities"
    _save(photos["obama"], ids / "obama" / "a_obama.jpg")
    _save(photos["obama2"], ids / "obama" / "b_obama2.jpg")
    _save(photos["obama3"], ids / "obama" / "c_obama3.jpg")
    (ids / "obama" / "reference.txt").write_text("b_obama2.jpg\n")  # not the first file
    _save(photos["biden"], ids / "biden" / "a_biden.jpg")
    _save(ImageOps.mirror(photos["biden"]), ids / "biden" / "b_biden_mirrored.png")
    (ids / "biden" / "gender.txt").write_text("man\n")
    _save(photos["obama"], ids / "solo" / "only.jpg")  # one photo: CLIP-T and FaceSim only
    read = read_identity_folders(ids)
    assert read["obama"].reference.name == "b_obama2.jpg"
    assert [p.name for p in read["obama"].test] == ["a_obama.jpg", "c_obama3.jpg"] and read["biden"].gender == "man"

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts\nA [man/woman] in a park, looking at the camera.\nA portrait of a [man/woman].\n")
    good, swapped = tmp_path / "gen_good", tmp_path / "gen_swapped"
    _save(photos["obama3"], good / "obama" / "0.png")
    _save(photos["coffee"], good / "obama" / "001.png")  # no face in it
    _save(photos["biden"], good / "biden" / "0.png")
    _save(photos["biden"], good / "biden" / "1.png")
    _save(photos["obama2"], good / "solo" / "0.png")
    _save(photos["biden"], swapped / "obama" / "0.png")
    _save(photos["obama"], swapped / "biden" / "0.png")  # prompt 1 missing for both

    out = tmp_path / "out"
    args = _parse([
        "eval", "--identities", str(ids), "--prompts", str(prompts), "--generated", f"good={good}",
        "--generated", f"swapped={swapped}", "--clip-model", str(tiny_clip_dir), "--out", str(out),
        "--gender", "man", "--detector", "yunet", "--embedder", "sface",
    ])
    text = args.func(args)
    assert "good:" in text and "swapped:" in text

    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert len(rows) == 2 * 3 * 2  # runs x identities x prompts
    by = {(r["run"], r["identity"], r["prompt_index"]): r for r in rows}
    assert by[("good", "obama", "1")]["status"] == "no_face"
    assert by[("swapped", "obama", "1")]["status"] == "missing"
    assert by[("good", "solo", "0")]["status"] == "single_photo" and by[("good", "solo", "0")]["r_face_sim"] == ""
    assert float(by[("good", "solo", "0")]["face_sim"]) > 0.3
    assert by[("good", "obama", "0")]["prompt"] == "A man in a park, looking at the camera."
    assert all(r["embedder"] == "sface" for r in rows)
    assert float(by[("good", "obama", "0")]["r_face_sim"]) > float(by[("swapped", "obama", "0")]["r_face_sim"]) + 0.2
    assert by[("good", "biden", "1")]["clip_t"] != ""

    summary = json.loads((out / "summary.json").read_text())
    assert summary["embedder"] == "sface" and summary["detector"] == "yunet"
    assert summary["clip_model"] == tiny_clip_dir.name
    good_s, swap_s = summary["runs"]["good"], summary["runs"]["swapped"]
    assert good_s["r_face_sim"] > swap_s["r_face_sim"]
    assert good_s["no_face_generated"] == [["obama", 1]]
    assert good_s["n_pairs"] == 4 and good_s["n_scored"] == 3
    assert swap_s["missing"] == [["biden", 1], ["obama", 1], ["solo", 0], ["solo", 1]]
    assert good_s["n_clip_t"] == 5 and good_s["clip_t"] is not None
    assert summary["identities"]["obama"]["reference"] == "b_obama2.jpg"
    assert summary["identities"]["obama"]["test"] == ["a_obama.jpg", "c_obama3.jpg"]
    with Image.open(out / "scatter.png") as im:
        assert im.format == "PNG" and im.size == (900, 640)


def test_cli_eval_without_clip_model_and_template_needs_gender(tmp_path, photos):
    ids = tmp_path / "identities"
    _save(photos["obama"], ids / "obama" / "1.jpg")
    _save(photos["obama2"], ids / "obama" / "2.jpg")
    gen = tmp_path / "gen"
    _save(photos["obama3"], gen / "obama" / "0.png")
    out = tmp_path / "out"
    args = _parse(["eval", "--identities", str(ids), "--prompts", "unsplash", "--generated", str(gen),
                   "--out", str(out), "--detector", "yunet", "--embedder", "sface"])
    with pytest.raises(ValueError, match="--gender"):
        args.func(args)
    args = _parse(["eval", "--identities", str(ids), "--prompts", "unsplash", "--generated", str(gen),
                   "--out", str(out), "--gender", "man", "--detector", "yunet", "--embedder", "sface"])
    args.func(args)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["clip_model"] is None and "CLIP-T skipped" in summary["clip_t_note"]
    assert summary["runs"]["gen"]["r_face_sim"] > 0.3 and len(summary["runs"]["gen"]["missing"]) == 9
    assert (out / "scores.csv").is_file() and (out / "scatter.png").is_file()


def test_cli_eval_refuses_a_clip_folder_with_only_pickle_weights(tmp_path, photos, tiny_clip_dir, capsys):
    import pickle
    import shutil

    from metalora_core.cli import main

    clip = tmp_path / "clip"
    clip.mkdir()
    shutil.copy(tiny_clip_dir / "config.json", clip / "config.json")
    marker = tmp_path / "pickle_ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (clip / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Payload()}))
    ids, gen, out = tmp_path / "identities", tmp_path / "gen", tmp_path / "out"
    _save(photos["obama"], ids / "obama" / "1.jpg")
    _save(photos["obama2"], ids / "obama" / "2.jpg")
    _save(photos["obama3"], gen / "obama" / "0.png")
    assert main(["eval", "--identities", str(ids), "--prompts", "unsplash", "--generated", str(gen), "--gender", "man",
                 "--clip-model", str(clip), "--out", str(out), "--detector", "yunet", "--embedder", "sface"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"no usable CLIP model in {clip} (it has no .safetensors weights, only pytorch_model.bin: pickle " in err
    assert not marker.exists()  # nothing in the pickle ran
    assert not out.exists() or not any(out.iterdir())  # nothing written
