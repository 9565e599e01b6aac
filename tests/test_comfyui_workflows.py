"""The shipped workflows against a real ComfyUI (in-process): the node snapshot is current, every
workflow converted by ``tools/to_api.py`` passes ComfyUI's own ``execution.validate_prompt``,
and the one-click workflows run end to end on tiny models of their families (FLUX.1-dev, FLUX.2
Klein, Z-Image Turbo) stored under the workflows' file names.

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

from comfy_fixtures import (CLIP_L_CONFIG, SKIP_REASON, TINY_FLUX2_CONFIG, TINY_ZIMAGE_CONFIG, comfy_module_state_dict,
                            comfyui_path, load_comfy_in_process, object_info, output_files, pack, register_v3_nodes,
                            run_prompt, tiny_flux2_vae_state_dict, tiny_zimage_detection, write_tiny_flux_models)
from tiny_clip import write_tiny_clip

REPO = pathlib.Path(__file__).resolve().parents[1]
if comfyui_path() is None:
    pytest.skip(f"SKIPPED: {SKIP_REASON}", allow_module_level=True)
sys.path.insert(0, str(REPO / "tools"))
import build_workflows as bw  # noqa: E402
import to_api  # noqa: E402

FILES = sorted((REPO / "example_workflows").glob("*.json"))


# The tiny FLUX.2 (Klein: no guidance embedding) and Z-Image read the tiny CLIP-L's 768-wide states:
# the run swaps the 4B Qwen3 text encoder for it, as it swaps FLUX.1's T5-XXL.
TEXT_WIDTH = CLIP_L_CONFIG["hidden_size"]
TINY_KLEIN = dict(TINY_FLUX2_CONFIG, context_in_dim=TEXT_WIDTH, guidance_embed=False)
TINY_ZIMAGE = dict(TINY_ZIMAGE_CONFIG, cap_feat_dim=TEXT_WIDTH)
FAMILY_WORKFLOWS = {"flux2": "06_one_click_flux2_klein", "zimage": "07_one_click_z_image_turbo"}


def _write_family_files(state, models: pathlib.Path) -> None:
    """The FLUX.2 Klein and Z-Image Turbo workflows' files: tiny models under the real names, a
    Meta-Down prior of each sized by the Train node's own reading of the loaded model, and the Qwen3
    text encoder as a placeholder (validated only). Needs the tiny Z-Image detection row."""
    from safetensors.torch import save_file

    save_file(comfy_module_state_dict("flux", TINY_KLEIN, seed=0), str(models / "diffusion_models" / bw.KLEIN_UNET))
    save_file(tiny_flux2_vae_state_dict(1), str(models / "vae" / bw.FLUX2_VAE))
    save_file(comfy_module_state_dict("lumina", TINY_ZIMAGE, seed=0), str(models / "diffusion_models" / bw.ZIMAGE_UNET))
    (models / "text_encoders" / bw.QWEN3_4B).write_bytes(b"")
    state.folder_paths.filename_list_cache.clear()
    prior_mod, training = pack("metalora_core.formats.prior"), pack("nodes.training")
    for unet, name in ((bw.KLEIN_UNET, bw.KLEIN_PRIOR), (bw.ZIMAGE_UNET, bw.ZIMAGE_PRIOR)):
        dims = training.generic_family_dims(state.nodes.UNETLoader().load_unet(unet, "default")[0])
        prior = prior_mod.make_prior(dims, r1=4, preset="all", generator=torch.Generator().manual_seed(0))
        prior_mod.save_prior(prior, models / "meta_lora" / name)


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
    with tiny_zimage_detection(TINY_ZIMAGE):
        _write_family_files(state, models)
        state.folder_paths.filename_list_cache.clear()
        yield state


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
    """A one-click API prompt, scaled down for CPU: tiny sizes and steps, the tiny CLIP-L as the text
    encoder (the tiny models read 768-wide context: DualCLIPLoader's T5-XXL half and the Qwen3 4B of
    CLIPLoader are replaced by it)."""
    for node in prompt.values():
        t, i = node["class_type"], node["inputs"]
        if t == "DualCLIPLoader":
            node["class_type"] = "CLIPLoader"
            node["inputs"] = {"clip_name": i["clip_name1"], "type": "stable_diffusion"}
        elif t == "CLIPLoader":
            i.update(clip_name=bw.CLIP_L, type="stable_diffusion")
        elif t == "MetaLoRATrain":
            i.update(steps=2, resolution=64, preview_every=1)
        elif t == "MetaLoRAFaceAugment":
            i.update(bucket_resolution=64, detector="yunet")
        elif t in ("KSampler", "Flux2Scheduler"):
            i.update(steps=2)
        if t in ("EmptySD3LatentImage", "EmptyFlux2LatentImage", "Flux2Scheduler"):
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
    loras = list((env.base_dir / "models" / "loras" / "metalora").glob("person_[0-9]*.safetensors"))
    assert len(loras) == 1
    from safetensors import safe_open

    with safe_open(str(loras[0]), "pt") as f:
        keys = list(f.keys())
    assert any(k.endswith("lora_A.weight") for k in keys) and any(k.endswith("lora_B.weight") for k in keys)


@pytest.mark.parametrize("family", sorted(FAMILY_WORKFLOWS))
def test_family_one_click_workflow_runs_end_to_end(env, live_info, family):
    """The FLUX.2 Klein and Z-Image Turbo one-click graphs as shipped (tiny sizes and steps, the tiny
    CLIP-L for Qwen3): ComfyUI loads the family's tiny model from the workflow's file name, the Train
    node trains it, every prompt branch saves its image, and the saved LoRA names the family."""
    import comfy.model_base
    import comfy.supported_models
    from safetensors import safe_open

    from metalora_core.lora.families import family_named

    name = FAMILY_WORKFLOWS[family]
    unet_file = bw.KLEIN_UNET if family == "flux2" else bw.ZIMAGE_UNET
    model = env.nodes.UNETLoader().load_unet(unet_file, "default")[0]  # what the graph's loader gives
    assert type(model.model) is (comfy.model_base.Flux2 if family == "flux2" else comfy.model_base.Lumina2)
    assert family == "flux2" or type(model.model.model_config) is comfy.supported_models.ZImage
    wf = json.loads((REPO / "example_workflows" / f"{name}.json").read_text(encoding="utf-8"))
    prompt = tiny_overrides(to_api.workflow_to_api(wf, live_info))
    res = run_prompt(prompt, comfy=env)
    assert res["success"]
    files = output_files(res, env.base_dir)
    samplers = sum(n["class_type"] in ("KSampler", "SamplerCustomAdvanced") for n in prompt.values())
    saved = [f for f in files if f.parent.name == "metalora" and "_prompt_" in f.name]
    assert len(saved) == samplers >= 3 and all(f.is_file() for f in saved)
    prefix = next(n["inputs"]["filename_prefix"] for n in prompt.values() if n["class_type"] == "MetaLoRASave")
    (lora,) = (env.base_dir / "models" / "loras" / "metalora").glob(f"{prefix}_[0-9]*.safetensors")
    with safe_open(str(lora), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert meta["base_model"] == family_named(family).name
    assert any(k.endswith("lora_A.weight") for k in keys) and any(k.endswith("lora_B.weight") for k in keys)
