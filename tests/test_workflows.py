"""The shipped example workflows (``example_workflows/*.json``), checked without ComfyUI.

Node definitions come from ``tools/node_schemas.json`` (a snapshot of ComfyUI's
``/object_info`` that ``tests/test_comfyui_workflows.py`` compares with a real ComfyUI) and the
declared third-party list; our node ids and input names are also read from the node sources
statically, so a renamed node or input fails here even without ComfyUI.
"""
from __future__ import annotations

import ast
import json
import math
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "example_workflows"
sys.path.insert(0, str(REPO / "tools"))
import build_workflows as bw  # noqa: E402
import to_api  # noqa: E402

FILES = sorted(WORKFLOWS.glob("*.json"))
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def source_nodes() -> dict[str, list[str]]:
    """node_id -> input names, read from the V3 schemas in nodes/*.py by AST (no ComfyUI needed)."""
    out: dict[str, list[str]] = {}
    for py in ("definitions.py", "eval_nodes.py"):
        tree = ast.parse((REPO / "nodes" / py).read_text(encoding="utf-8"))
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
            node_id, inputs = None, []
            for call in (n for n in ast.walk(cls) if isinstance(n, ast.Call)):
                for kw in call.keywords:
                    if kw.arg == "node_id" and isinstance(kw.value, ast.Constant):
                        node_id = kw.value.value
                f = call.func
                if isinstance(f, ast.Attribute) and f.attr == "Input" and call.args:
                    arg = call.args[0]
                    if isinstance(arg, ast.Constant):
                        inputs.append(arg.value)
                    elif isinstance(arg, ast.JoinedStr):  # f"row_{i}" in the grid node
                        inputs.append("row_*")
            if node_id:
                out[node_id] = inputs
    return out


@pytest.fixture(scope="module")
def info() -> dict:
    return bw.load_schemas()


def test_expected_workflows_are_shipped_and_parse():
    assert [p.name for p in FILES] == sorted(bw.WORKFLOW_BUILDERS)
    for p in FILES:
        wf = load(p)
        assert {"last_node_id", "last_link_id", "nodes", "links", "groups", "version"} <= set(wf), p.name
        assert wf["last_node_id"] >= max(n["id"] for n in wf["nodes"])
        assert wf["last_link_id"] >= max((ln[0] for ln in wf["links"]), default=0)
        assert len({n["id"] for n in wf["nodes"]}) == len(wf["nodes"]), f"{p.name}: duplicate node ids"
        assert wf["groups"] and any(n["type"] == "Note" for n in wf["nodes"]), f"{p.name}: needs groups and a note"


def test_shipped_files_match_the_generator():
    assert bw.main(["--check"]) == 0, "run: python tools/build_workflows.py"


def test_snapshot_matches_the_node_sources():
    src = source_nodes()
    assert set(src) == set(bw.OUR_NODES), f"node ids in nodes/*.py: {sorted(src)}"
    snap = json.loads(bw.SCHEMAS_FILE.read_text(encoding="utf-8"))
    for node_id, names in src.items():
        snap_names = {n for n, *_ in snap[node_id]["inputs"] if not re.fullmatch(r"row_\d+", n)}
        assert snap_names == set(names) - {"row_*"}, f"{node_id}: snapshot is stale (see test_comfyui_workflows.py)"


def test_every_node_type_is_known(info):
    third = {t for p in bw.third_party_packs().values() for t in p["node_types"]}
    for p in FILES:
        for n in load(p)["nodes"]:
            t = n["type"]
            assert t in bw.OUR_NODES or t in bw.CORE_NODES or t in third or t in bw.FRONTEND_ONLY, f"{p.name}: {t}"
            if t in bw.FRONTEND_ONLY:
                continue
            assert t in info, f"{p.name}: no definition for {t}"
            props = n["properties"]
            if t in bw.OUR_NODES:
                assert (props["cnr_id"], props["ver"]) == (bw.PACK_ID, bw.PACK_VERSION), f"{p.name}: node {n['id']}"
            elif t in third:
                assert props.get("aux_id") or props.get("cnr_id"), f"{p.name}: {t} has no pack id"
            else:
                assert props["cnr_id"] == "comfy-core"


def test_links_connect_matching_socket_types(info):
    for p in FILES:
        wf = load(p)
        nodes = {n["id"]: n for n in wf["nodes"]}
        for link_id, src, s_slot, dst, d_slot, kind in wf["links"]:
            a, b = nodes[src], nodes[dst]
            out_type = info[a["type"]]["output"][s_slot]
            inp = b["inputs"][d_slot]
            declared = {name: k for name, k, o in to_api.input_specs(info[b["type"]])}
            assert kind == out_type == a["outputs"][s_slot]["type"], f"{p.name}: link {link_id}"
            assert declared[inp["name"]] == kind == inp["type"], f"{p.name}: link {link_id} into {b['type']}.{inp['name']}"
            assert inp["link"] == link_id and link_id in a["outputs"][s_slot]["links"], f"{p.name}: link {link_id}"
        for n in wf["nodes"]:  # every required socket is connected
            if n["type"] in bw.FRONTEND_ONLY:
                continue
            required = info[n["type"]]["input"]["required"]
            for inp in n["inputs"]:
                if inp["name"] in required:
                    assert inp["link"] is not None, f"{p.name}: {n['type']} #{n['id']}.{inp['name']} is not connected"


def _check_value(where: str, name: str, kind: str, opts: dict, value) -> None:
    if kind == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), f"{where}.{name}={value!r}"
    elif kind == "FLOAT":
        assert isinstance(value, (int, float)) and math.isfinite(value), f"{where}.{name}={value!r}"
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), f"{where}.{name}={value!r}"
    elif kind == "STRING":
        assert isinstance(value, str), f"{where}.{name}={value!r}"
    elif kind == "COMBO" and opts.get("options"):
        assert value in opts["options"], f"{where}.{name}={value!r} not in {opts['options']}"
    if kind in ("INT", "FLOAT"):
        assert opts.get("min", -math.inf) <= value <= opts.get("max", math.inf), f"{where}.{name}={value} out of range"


def test_widget_values_fit_the_definitions(info):
    for p in FILES:
        for n in load(p)["nodes"]:
            if n["type"] in bw.FRONTEND_ONLY:
                continue
            slots = to_api.widget_slots(info[n["type"]])
            values = n.get("widgets_values") or []
            assert len(values) == len(slots), f"{p.name}: {n['type']} #{n['id']}: {values} for {slots}"
            for (name, kind, opts), v in zip(slots, values):
                if name is None:
                    assert v in CONTROL_VALUES | {"image"}, f"{p.name}: {n['type']} extra widget {v!r}"
                else:
                    _check_value(f"{p.name}: {n['type']} #{n['id']}", name, kind, opts, v)


def test_paper_settings_in_the_one_click_workflow(info):
    api = to_api.workflow_to_api(load(WORKFLOWS / "01_one_click_meta_lora.json"), info)
    by_type: dict[str, list[dict]] = {}
    for node in api.values():
        by_type.setdefault(node["class_type"], []).append(node["inputs"])
    (train,) = by_type["MetaLoRATrain"]
    assert (train["steps"], train["rank"], train["learning_rate"]) == (375, 1, 4e-4)
    assert "prior" in train and len(by_type["MetaLoRASave"]) == 1
    assert len(by_type["KSampler"]) >= 3 and len(by_type["SaveImage"]) == len(by_type["KSampler"])
    for ks in by_type["KSampler"]:
        assert (ks["steps"], ks["cfg"], ks["sampler_name"], ks["scheduler"]) == (30, 1.0, "euler", "simple")
    assert all(g["guidance"] == 3.5 for g in by_type["FluxGuidance"])
    assert all((e["width"], e["height"]) == (1024, 1024) for e in by_type["EmptySD3LatentImage"])
    (clip,) = by_type["DualCLIPLoader"]
    assert (clip["clip_name1"], clip["clip_name2"], clip["type"]) == ("clip_l.safetensors", "t5xxl_fp16.safetensors", "flux")


def _by_type(api: dict) -> dict[str, list[dict]]:
    by_type: dict[str, list[dict]] = {}
    for node in api.values():
        by_type.setdefault(node["class_type"], []).append(node["inputs"])
    return by_type


def _source(api: dict, link: list) -> str:
    return api[link[0]]["class_type"]


@pytest.mark.parametrize("name", ["06_one_click_flux2_klein.json", "07_one_click_z_image_turbo.json"])
def test_family_one_click_workflows_train_and_sample_as_comfyuis_templates(info, name):
    """FLUX.2 Klein 4B and Z-Image Turbo: the FLUX.1-dev one-click's training, the family's files, and
    sampling as ComfyUI's own templates for them (Klein 4B distilled: 4 steps, cfg 1; Z-Image Turbo:
    shift 3, 8 steps, cfg 1, res_multistep / simple)."""
    api = to_api.workflow_to_api(load(WORKFLOWS / name), info)
    by_type = _by_type(api)
    klein = "klein" in name
    (train,) = by_type["MetaLoRATrain"]
    assert (train["steps"], train["rank"], train["learning_rate"]) == (375, 1, 4e-4)
    assert _source(api, train["model"]) == "UNETLoader" and len(by_type["MetaLoRASave"]) == 1
    (prior,) = by_type["MetaLoRAPriorLoader"]
    assert prior["prior_name"] == (bw.KLEIN_PRIOR if klein else bw.ZIMAGE_PRIOR) and "prior" in train
    ((unet,), (clip,), (vae,)) = by_type["UNETLoader"], by_type["CLIPLoader"], by_type["VAELoader"]
    assert "DualCLIPLoader" not in by_type and "FluxGuidance" not in by_type
    assert (unet["unet_name"], clip["clip_name"], clip["type"], vae["vae_name"]) == (
        (bw.KLEIN_UNET, bw.QWEN3_4B, "flux2", bw.FLUX2_VAE) if klein else
        (bw.ZIMAGE_UNET, bw.QWEN3_4B, "lumina2", bw.FLUX_VAE))
    if klein:
        runs = by_type["SamplerCustomAdvanced"]
        assert "KSampler" not in by_type
        (sigmas,), (latent,), (sampler,) = by_type["Flux2Scheduler"], by_type["EmptyFlux2LatentImage"], by_type["KSamplerSelect"]
        assert sigmas["steps"] == 4 and sampler["sampler_name"] == "euler"
        assert (sigmas["width"], sigmas["height"]) == (latent["width"], latent["height"]) == (1024, 1024)
        for run in runs:
            guider = api[run["guider"][0]]
            assert guider["class_type"] == "CFGGuider" and guider["inputs"]["cfg"] == 1.0
            assert _source(api, guider["inputs"]["model"]) == "MetaLoRAApply"
            assert _source(api, guider["inputs"]["negative"]) == "ConditioningZeroOut"
            assert [_source(api, run[k]) for k in ("noise", "sampler", "sigmas", "latent_image")] == [
                "RandomNoise", "KSamplerSelect", "Flux2Scheduler", "EmptyFlux2LatentImage"]
    else:
        runs = by_type["KSampler"]
        (shift,), (latent,) = by_type["ModelSamplingAuraFlow"], by_type["EmptySD3LatentImage"]
        assert shift["shift"] == 3.0 and _source(api, shift["model"]) == "MetaLoRAApply"
        assert (latent["width"], latent["height"]) == (1024, 1024)
        for ks in runs:
            assert (ks["steps"], ks["cfg"], ks["sampler_name"], ks["scheduler"]) == (8, 1.0, "res_multistep", "simple")
            assert _source(api, ks["model"]) == "ModelSamplingAuraFlow"
            assert _source(api, ks["negative"]) == "ConditioningZeroOut"
    assert len(runs) >= 3 and len(by_type["SaveImage"]) == len(runs)


def test_comparison_rows_follow_the_paper(info):
    api = to_api.workflow_to_api(load(WORKFLOWS / "02_comparison_fig4.json"), info)
    trains = sorted((n["inputs"]["steps"], "prior" in n["inputs"]) for n in api.values()
                    if n["class_type"] == "MetaLoRATrain")
    assert trains == [(375, True), (625, False), (625, False)]
    seeds = {n["inputs"]["seed"] for n in api.values() if n["class_type"] == "KSampler"}
    assert len(seeds) == 1, "one seed for every image"
    (grid,) = [n for n in api.values() if n["class_type"] == "MetaLoRAImageGrid"]
    assert sum(k[4:].isdigit() for k in grid["inputs"] if k.startswith("row_")) == 4


def test_to_api_conversion_offline(info, tmp_path):
    for p in FILES:
        wf = load(p)
        api = to_api.workflow_to_api(wf, info)
        real = [n for n in wf["nodes"] if n["type"] not in bw.FRONTEND_ONLY]
        assert len(api) == len(real)
        for node in api.values():
            for v in node["inputs"].values():
                if isinstance(v, list):
                    assert v[0] in api, f"{p.name}: link to a dropped node {v}"
    # third-party nodes are unknown to a ComfyUI without the pack: a clear error
    core_only = {k: v for k, v in info.items() if k in bw.OUR_NODES or k in bw.CORE_NODES}
    with pytest.raises(to_api.ConversionError, match="ApplyPulidFlux"):
        to_api.workflow_to_api(load(WORKFLOWS / "05_pulid_flux_comparison.json"), core_only)
    # the CLI: --object-info file, --set by title, -o
    oi = tmp_path / "object_info.json"
    oi.write_text(json.dumps(info))
    out = tmp_path / "api.json"
    assert to_api.main([str(WORKFLOWS / "01_one_click_meta_lora.json"), "--object-info", str(oi), "-o", str(out),
                        "--set", "Meta-LoRA Train (375 steps, rank 1).steps=7", "--set", "2.weight_dtype=fp8_e4m3fn"]) == 0
    api = json.loads(out.read_text())
    assert [n["inputs"]["steps"] for n in api.values() if n["class_type"] == "MetaLoRATrain"] == [7]
    assert api["2"]["inputs"]["weight_dtype"] == "fp8_e4m3fn"


def test_to_api_follows_reroutes_and_drops_muted_nodes(info):
    wf = {"nodes": [
        {"id": 1, "type": "LoadImage", "mode": 0, "inputs": [], "widgets_values": ["a.png", "image"],
         "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [1]}]},
        {"id": 2, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*", "link": 1}],
         "outputs": [{"name": "", "type": "IMAGE", "links": [2]}]},
        {"id": 3, "type": "SaveImage", "mode": 0, "inputs": [{"name": "images", "type": "IMAGE", "link": 2}],
         "widgets_values": ["x"]},
        {"id": 4, "type": "PreviewImage", "mode": 2, "inputs": [{"name": "images", "type": "IMAGE", "link": None}],
         "widgets_values": []},
    ], "links": [[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 3, 0, "IMAGE"]]}
    api = to_api.workflow_to_api(wf, info)
    assert api == {"1": {"class_type": "LoadImage", "inputs": {"image": "a.png"}, "_meta": {"title": "Load Image"}},
                   "3": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x", "images": ["1", 0]},
                         "_meta": {"title": "Save Image"}}}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_layout_is_readable(path):
    """No node covers another (title bars included) and groups overlap only when one holds the other."""
    wf = json.loads(path.read_text())
    title = 30
    boxes = [(n["id"], n["pos"][0], n["pos"][1] - title, n["size"][0], n["size"][1] + title) for n in wf["nodes"]]

    def overlap(a, b):
        return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]

    clashes = [(a[0], b[0]) for i, a in enumerate(boxes) for b in boxes[i + 1:] if overlap(a[1:], b[1:])]
    assert not clashes, f"overlapping nodes: {clashes[:5]}"

    def inside(x, y):
        return x[0] >= y[0] and x[1] >= y[1] and x[0] + x[2] <= y[0] + y[2] and x[1] + x[3] <= y[1] + y[3]

    groups = [g["bounding"] for g in wf["groups"]]
    bad = [(i, j) for i, a in enumerate(groups) for j, b in enumerate(groups[i + 1:], i + 1)
           if overlap(a, b) and not inside(a, b) and not inside(b, a)]
    assert not bad, f"overlapping groups: {bad}"
    left = min(min(b[1] for b in boxes), min((g[0] for g in groups), default=0))
    top = min(min(b[2] for b in boxes), min((g[1] for g in groups), default=0))
    off = wf["extra"]["ds"]["offset"]
    assert left + off[0] >= 0 and top + off[1] >= 0, "the graph opens with its top left in view"


# ------------------------------------------------------------------ the template folder, the ComfyUI way

import make_thumbnails  # noqa: E402

LOADER_FILES = {"UNETLoader": ("unet_name",), "DualCLIPLoader": ("clip_name1", "clip_name2"), "CLIPLoader": ("clip_name",),
                "VAELoader": ("vae_name",)}


def test_template_folder_holds_only_templates_and_their_thumbnails():
    served = sorted(p.name for p in WORKFLOWS.iterdir())
    assert all(p.endswith((".json", ".jpg")) for p in served), served  # ComfyUI serves this folder as it is
    assert not (REPO / "workflows").exists(), "the old folder name is gone (ComfyUI asks for example_workflows)"
    from PIL import Image

    for path in FILES:
        thumb = path.with_suffix(".jpg")
        assert thumb.is_file(), f"{path.name} has no thumbnail"
        with Image.open(thumb) as im:
            assert im.format == "JPEG" and im.size == make_thumbnails.SIZE
    assert make_thumbnails.main(["--check"]) == 0, "run: python tools/make_thumbnails.py"


def test_thumbnail_check_sees_a_stale_card(tmp_path, monkeypatch):
    for p in FILES:
        (tmp_path / p.name).write_bytes(p.read_bytes())
        (tmp_path / p.with_suffix(".jpg").name).write_bytes(p.with_suffix(".jpg").read_bytes())
    monkeypatch.setattr(make_thumbnails, "WORKFLOWS", tmp_path)
    assert make_thumbnails.main(["--check"]) == 0
    first = FILES[0]
    make_thumbnails.card("something else", {"nodes": []}).save(tmp_path / first.with_suffix(".jpg").name, "JPEG")
    assert make_thumbnails.main(["--check"]) == 1
    (tmp_path / FILES[1].with_suffix(".jpg").name).unlink()
    assert make_thumbnails.main(["--check"]) == 1


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_loader_nodes_name_their_model_downloads(path):
    loaders = [n for n in load(path)["nodes"] if n["type"] in LOADER_FILES]
    assert sorted({n["type"] for n in loaders} - {"DualCLIPLoader", "CLIPLoader"}) == ["UNETLoader", "VAELoader"]
    assert len(loaders) == 3, "every template loads one diffusion model, its text encoders and its VAE"
    for n in loaders:
        models = n["properties"].get("models")
        assert models, f"{n['type']} has no properties.models"
        values = dict(zip([s[0] for s in to_api.widget_slots(bw.load_schemas()[n["type"]]) if s[0]], n["widgets_values"]))
        names = [values[k] for k in LOADER_FILES[n["type"]]]
        assert [m["name"] for m in models] == names
        for m in models:
            assert m["url"].startswith("https://huggingface.co/") and m["url"].endswith("/" + m["name"])
            assert m["directory"] in {"diffusion_models", "text_encoders", "vae"}


def test_workflows_saved_before_the_new_optional_widgets_still_convert(info):
    """A graph saved by an earlier version (Face Augment without face_index / other_faces, Train
    without the lora / loss_map outputs) converts to the same prompt minus those inputs."""
    wf = load(WORKFLOWS / "01_one_click_meta_lora.json")
    new = to_api.workflow_to_api(wf, info)
    for n in wf["nodes"]:
        if n["type"] == "MetaLoRAFaceAugment":
            n["widgets_values"] = n["widgets_values"][:-2]
        if n["type"] == "MetaLoRATrain":
            n["outputs"] = n["outputs"][:2]
    old = to_api.workflow_to_api(wf, info)
    aug = next(k for k, v in new.items() if v["class_type"] == "MetaLoRAFaceAugment")
    assert {"face_index", "other_faces"} <= set(new[aug]["inputs"])
    for k in ("face_index", "other_faces"):
        new[aug]["inputs"].pop(k)
    assert old == new
    # a required widget missing is still an error
    n = next(n for n in wf["nodes"] if n["type"] == "MetaLoRAFaceAugment")
    n["widgets_values"] = n["widgets_values"][:-2]
    with pytest.raises(to_api.ConversionError, match="widget value"):
        to_api.workflow_to_api(wf, info)
