"""The shipped workflows against a real ComfyUI (in-process): the node snapshot is current, every
workflow converted by ``tools/to_api.py`` passes ComfyUI's own ``execution.validate_prompt``,
and the one-click workflow runs end to end on tiny FLUX-format models.

Needs ``COMFYUI_PATH``; skips otherwise. ``METALORA_UPDATE_SNAPSHOT=1`` rewrites
``tools/node_schemas.json`` from the live definitions instead of failing.
"""
from __future__ import annotations

import asyncio
import importlib
import json
import os
import pathlib
import shutil
import sys
import uuid

import pytest
import torch

from comfy_fixtures import (SKIP_REASON, comfyui_path, load_comfy_in_process, object_info, output_files,
                            register_v3_nodes, run_prompt, write_tiny_flux_models)
from tiny_clip import write_tiny_clip

REPO = pathlib.Path(__file__).resolve().parents[1]
if comfyui_path() is None:
    pytest.skip(f"SKIPPED: {SKIP_REASON}", allow_module_level=True)
sys.path.insert(0, str(REPO / "tools"))
import build_workflows as bw  # noqa: E402
import to_api  # noqa: E402

FILES = sorted((REPO / "example_workflows").glob("*.json"))


@pytest.fixture(scope="module")
def env(tmp_path_factory, sample):
    base = tmp_path_factory.mktemp("comfy_workflows")
    models = base / "models"
    tiny = write_tiny_flux_models(models, seed=0)
    # the workflows' real file names, backed by the tiny files where a graph runs them
    (models / "text_encoders").mkdir(parents=True, exist_ok=True)
    os.replace(models / "diffusion_models" / tiny["unet"], models / "diffusion_models" / bw.FLUX_UNET)
    os.replace(models / "vae" / tiny["vae"], models / "vae" / bw.FLUX_VAE)
    os.replace(models / "clip" / tiny["clip"], models / "text_encoders" / bw.CLIP_L)
    (models / "text_encoders" / bw.T5XXL).write_bytes(b"")  # placeholder: only validated, never loaded
    state = load_comfy_in_process(base, custom_node_paths=[REPO])
    evals = importlib.import_module(f"{REPO}.nodes.eval_nodes")
    importlib.import_module(f"{REPO}.nodes.folders").register_folders()
    register_v3_nodes(state, evals.EVAL_NODES)  # no-op once the extension lists them
    write_tiny_clip(models / "metalora_clip" / bw.CLIP_T_FOLDER)
    from metalora_core.lora.layers import FluxDims
    from metalora_core.formats.prior import make_prior, save_prior

    dims = FluxDims(hidden=256, mlp_hidden=1024, num_double=2, num_single=2)  # the tiny FLUX
    prior = make_prior(dims, r1=4, preset="attn_mlp", generator=torch.Generator().manual_seed(0))
    (models / "meta_lora").mkdir(exist_ok=True)
    save_prior(prior, models / "meta_lora" / bw.PRIOR_FILE)
    for name, photo in ((bw.PHOTO, "obama"), (bw.HELD_OUT[0], "obama2"), (bw.HELD_OUT[1], "obama3")):
        shutil.copy(sample(photo), base / "input" / name)
    state.folder_paths.filename_list_cache.clear()
    return state


@pytest.fixture(scope="module")
def live_info(env) -> dict:
    return object_info(env)


def test_core_node_types_exist(env):
    missing = [t for t in bw.CORE_NODES if t not in env.nodes.NODE_CLASS_MAPPINGS]
    assert not missing, f"core node types not in this ComfyUI: {missing}"


def test_node_snapshot_is_current(live_info):
    live = bw.snapshot(live_info)
    assert set(live) == {*bw.CORE_NODES, *bw.OUR_NODES}
    if os.environ.get("METALORA_UPDATE_SNAPSHOT") == "1":
        bw.SCHEMAS_FILE.write_text(json.dumps(live, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    stored = json.loads(bw.SCHEMAS_FILE.read_text(encoding="utf-8"))
    assert json.loads(json.dumps(live)) == stored, (
        "tools/node_schemas.json is stale: rerun with METALORA_UPDATE_SNAPSHOT=1, then "
        "python tools/build_workflows.py")


def _without_third_party(prompt: dict) -> tuple[dict, set[str]]:
    """Drops third-party nodes and everything fed by them (they are not installed here)."""
    third = {t for p in bw.third_party_packs().values() for t in p["node_types"]}
    gone = {k for k, v in prompt.items() if v["class_type"] in third}
    changed = True
    while changed:
        changed = False
        for k, v in prompt.items():
            if k not in gone and any(isinstance(x, list) and x[0] in gone for x in v["inputs"].values()):
                gone.add(k)
                changed = True
    return {k: v for k, v in prompt.items() if k not in gone}, gone


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_workflow_passes_comfyui_validation(env, live_info, path):
    wf = json.loads(path.read_text(encoding="utf-8"))
    third = {t for p in bw.third_party_packs().values() for t in p["node_types"]}
    info = dict(live_info)
    for pack in bw.third_party_packs().values():  # declared, not installed: convert with the declaration
        info.update(bw.as_object_info(pack["node_types"]))
    prompt, dropped = _without_third_party(to_api.workflow_to_api(wf, info))
    if any(n["type"] in third for n in wf["nodes"]):
        assert dropped, "third-party nodes should have been set aside"
    valid, error, outputs, node_errors = asyncio.run(env.execution.validate_prompt(str(uuid.uuid4()), prompt, None))
    assert valid, f"{path.name}: {error} {json.dumps(node_errors)[:2000]}"
    assert outputs, f"{path.name}: no output node left to run"


def tiny_overrides(prompt: dict) -> dict:
    """The one-click API prompt, scaled down for CPU: tiny sizes and steps, CLIP-L only (the tiny FLUX
    reads 768-wide context, so the T5-XXL half of DualCLIPLoader is replaced by CLIPLoader)."""
    for node in prompt.values():
        t, i = node["class_type"], node["inputs"]
        if t == "DualCLIPLoader":
            node["class_type"] = "CLIPLoader"
            node["inputs"] = {"clip_name": i["clip_name1"], "type": "stable_diffusion"}
        elif t == "MetaLoRATrain":
            i.update(steps=2, resolution=64, preview_every=1)
        elif t == "MetaLoRAFaceAugment":
            i.update(bucket_resolution=64, detector="yunet")
        elif t == "KSampler":
            i.update(steps=2)
        elif t == "EmptySD3LatentImage":
            i.update(width=64, height=64)
    return prompt


def test_one_click_workflow_runs_end_to_end(env, live_info):
    wf = json.loads((REPO / "example_workflows" / "01_one_click_meta_lora.json").read_text(encoding="utf-8"))
    prompt = tiny_overrides(to_api.workflow_to_api(wf, live_info))
    res = run_prompt(prompt, comfy=env)
    assert res["success"]
    files = output_files(res, env.base_dir)
    saved = [f for f in files if f.parent.name == "metalora" and f.name.startswith("prompt_")]
    n_samplers = sum(n["class_type"] == "KSampler" for n in prompt.values())
    assert len(saved) == n_samplers >= 3 and all(f.is_file() for f in saved)
    loras = list((env.base_dir / "models" / "loras" / "metalora").glob("person_*.safetensors"))
    assert len(loras) == 1
    from safetensors import safe_open

    with safe_open(str(loras[0]), "pt") as f:
        keys = list(f.keys())
    assert any(k.endswith("lora_A.weight") for k in keys) and any(k.endswith("lora_B.weight") for k in keys)
