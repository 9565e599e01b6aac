"""The evaluation nodes (CLIP-T, R-FaceSim / FaceSim, labelled grid) in a real ComfyUI, in-process.

Graphs are validated and executed by ComfyUI itself; scores come back through core
``PreviewAny`` nodes fed by the nodes' FLOAT outputs. Needs ``COMFYUI_PATH``; skips otherwise.
"""
from __future__ import annotations

import importlib
import math
import pathlib
import shutil

import pytest

from comfy_fixtures import (SKIP_REASON, comfyui_path, load_comfy_in_process, output_files, register_v3_nodes,
                            run_prompt)
from tiny_clip import write_tiny_clip

REPO = pathlib.Path(__file__).resolve().parents[1]
if comfyui_path() is None:
    pytest.skip(f"SKIPPED: {SKIP_REASON}", allow_module_level=True)

EVAL_IDS = ["MetaLoRAClipT", "MetaLoRAFaceSim", "MetaLoRAImageGrid"]


@pytest.fixture(scope="module")
def env(tmp_path_factory, sample):
    base = tmp_path_factory.mktemp("comfy_eval")
    state = load_comfy_in_process(base, custom_node_paths=[REPO])
    mod = importlib.import_module(f"{REPO}.nodes.eval_nodes")  # as ComfyUI imported the pack
    importlib.import_module(f"{REPO}.nodes.folders").register_folders()
    # Until the extension lists EVAL_NODES, register them as load_custom_node would (no-op after).
    register_v3_nodes(state, mod.EVAL_NODES)
    write_tiny_clip(base / "models" / "metalora_clip" / "tiny-clip")
    for name in ("obama", "obama2", "obama3", "biden"):
        src = sample(name)
        shutil.copy(src, base / "input" / f"{name}{src.suffix}")
    state.eval_module = mod
    return state


def load(name: str) -> dict:
    return {"class_type": "LoadImage", "inputs": {"image": name}}


def preview(src: str, slot: int) -> dict:
    return {"class_type": "PreviewAny", "inputs": {"source": [src, slot]}}


def text_of(result: dict, node: str) -> str:
    return result["outputs"][node]["text"][0]


def test_eval_nodes_registered_with_schema(env):
    for node_id in EVAL_IDS:
        cls = env.nodes.NODE_CLASS_MAPPINGS[node_id]
        schema = cls.GET_SCHEMA()
        assert schema.category == "MetaLoRA/eval"
        missing = [i.id for i in schema.inputs if not i.tooltip]
        assert not missing, f"{node_id}: inputs without tooltip: {missing}"
    info = env.nodes.NODE_CLASS_MAPPINGS["MetaLoRAClipT"].GET_NODE_INFO_V1()
    assert info["input"]["required"]["clip_model"][1]["options"] == ["tiny-clip"]  # the registered folder is listed


def test_r_face_sim_same_person_beats_different_person(env):
    graph = {
        "ref": load("obama.jpg"), "o2": load("obama2.jpg"), "o3": load("obama3.jpg"), "bid": load("biden.jpg"),
        "same": {"class_type": "MetaLoRAFaceSim",
                 "inputs": {"generated": ["o2", 0], "held_out": ["o3", 0], "reference": ["ref", 0],
                            "detector": "yunet", "embedder": "sface", "missing_face": "exclude"}},
        "other": {"class_type": "MetaLoRAFaceSim",
                  "inputs": {"generated": ["bid", 0], "held_out": ["o3", 0], "reference": ["ref", 0],
                             "detector": "yunet", "embedder": "sface", "missing_face": "exclude"}},
        "p_same": preview("same", 0), "p_other": preview("other", 0),
        "f_same": preview("same", 1), "f_other": preview("other", 1),
        "save": {"class_type": "SaveImage", "inputs": {"images": ["same", 3], "filename_prefix": "rfs"}},
    }
    res = run_prompt(graph, comfy=env)
    r_same, r_other = float(text_of(res, "p_same")), float(text_of(res, "p_other"))
    f_same, f_other = float(text_of(res, "f_same")), float(text_of(res, "f_other"))
    assert r_same > r_other + 0.1, (r_same, r_other)
    assert f_same > f_other + 0.1, (f_same, f_other)
    table = text_of(res, "same")  # the node's own UI text: the table with embedder and detector named
    assert "R-FaceSim" in table and "sface" in table and "yunet" in table and "FaceSim" in table
    (png,) = output_files(res, env.base_dir)
    assert png.is_file() and png.stat().st_size > 1000


def test_face_sim_reports_generated_images_without_a_face(env):
    graph = {
        "o2": load("obama2.jpg"), "o3": load("obama3.jpg"),
        "blank": {"class_type": "EmptyImage", "inputs": {"width": 256, "height": 256, "batch_size": 1, "color": 0}},
        "gens": {"class_type": "ImageBatch", "inputs": {"image1": ["o2", 0], "image2": ["blank", 0]}},
        "fs": {"class_type": "MetaLoRAFaceSim",
               "inputs": {"generated": ["gens", 0], "held_out": ["o3", 0], "detector": "yunet",
                          "embedder": "sface", "missing_face": "exclude"}},
        "p_r": preview("fs", 0), "p_f": preview("fs", 1),
    }
    res = run_prompt(graph, comfy=env)
    table = text_of(res, "fs")
    assert "no_face" in table and "1 generated image(s) without a face" in table
    assert float(text_of(res, "p_r")) > 0.3  # the faceless image is excluded, not averaged in as 0
    assert math.isnan(float(text_of(res, "p_f")))  # no reference connected: FaceSim undefined
    assert "no reference photo connected" in table


def test_clip_t_and_grid_run_in_a_graph(env):
    graph = {
        "a": load("obama.jpg"), "b": load("biden.jpg"),
        "batch": {"class_type": "ImageBatch", "inputs": {"image1": ["a", 0], "image2": ["b", 0]}},
        "clip": {"class_type": "MetaLoRAClipT",
                 "inputs": {"images": ["batch", 0], "prompts": "a photo of a man\n# comment\na painting of a man",
                            "clip_model": "tiny-clip"}},
        "p": preview("clip", 0),
        "grid": {"class_type": "MetaLoRAImageGrid",
                 "inputs": {"row_1": ["batch", 0], "row_2": ["clip", 2], "row_labels": "photos\nscored",
                            "column_labels": "first\nsecond", "tile": 128}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["grid", 0], "filename_prefix": "grid"}},
    }
    res = run_prompt(graph, comfy=env)
    score = float(text_of(res, "p"))
    assert -1.0 <= score <= 1.0
    table = text_of(res, "clip")
    assert "tiny-clip" in table and "a painting of a man" in table and "comment" not in table
    (png,) = output_files(res, env.base_dir)
    from PIL import Image

    with Image.open(png) as im:
        assert im.width == 140 + 2 * 128 and im.height > 2 * 128  # label column + 2 columns; header + 2 rows


def test_clip_t_prompt_count_mismatch_is_an_error(env):
    from comfy_fixtures import ComfyPromptError

    graph = {
        "a": load("obama.jpg"),
        "clip": {"class_type": "MetaLoRAClipT",
                 "inputs": {"images": ["a", 0], "prompts": "one\ntwo\nthree", "clip_model": "tiny-clip"}},
    }
    with pytest.raises(ComfyPromptError, match="prompt"):
        run_prompt(graph, comfy=env)
