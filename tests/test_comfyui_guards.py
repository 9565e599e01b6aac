"""Bad inputs on the nodes fail early with one clear message, in a real ComfyUI (in-process):
Save's name when the prompt is queued (and Train refusing to start for a Save that would refuse
it), a rank above the prior's r1, a LoRA of another family in the Prior Loader, an ignored cache
entry said on the node, and no hidden file offered as a prior.

Needs ``COMFYUI_PATH``; skips with a message otherwise.
"""
from __future__ import annotations

import pathlib

import pytest
import torch

from comfy_fixtures import SKIP_REASON, comfyui_path, new_executor, pack, pack_env, run_prompt, train_graph

if comfyui_path() is None:
    pytest.skip(f"SKIPPED: {SKIP_REASON}", allow_module_level=True)


@pytest.fixture(scope="module")
def env(tmp_path_factory, sample):
    return pack_env(tmp_path_factory.mktemp("comfy_guards"), photo=sample("obama"))


def graph(env, *, prefix: str = "person", steps: int = 2, rank: int = 1, seed: int = 0, force: bool = True) -> dict:
    return train_graph(env, train_seed=seed, steps=steps, rank=rank, force=force, prefix=prefix)


def texts(result: dict, node: str) -> list[str]:
    return [d["text"] for e, d, _ in result["messages"] if e == "progress_text" and d["node_id"] == node]


def error_of(result: dict) -> dict:
    assert not result["success"]
    err = [d for e, d in result["status_messages"] if e == "execution_error"][0]
    return {**err, "exception_message": err["exception_message"].strip()}  # ComfyUI appends a newline


def loras(env) -> pathlib.Path:
    return pathlib.Path(env.folder_paths.get_folder_paths("loras")[0])


def test_a_bad_save_name_fails_the_prompt_when_it_is_queued(env):
    result = run_prompt(graph(env, prefix=".."), executor=new_executor(), raise_on_error=False)
    assert result["error"]["type"] == "prompt_outputs_failed_validation"  # nothing ran
    errors = result["node_errors"]["8"]["errors"]  # ComfyUI files it under each input the check reads
    assert {e["type"] for e in errors} == {"custom_validation_failed"}
    assert {e["details"].split(" - ", 1)[1] for e in errors} == {
        "filename_prefix '..': '..' is not a name (it would leave the folder); use a plain name such as 'person'"}
    assert result["messages"] == []


def test_train_does_not_start_for_a_save_that_would_refuse_its_name(env):
    prompt = graph(env, prefix="a\x00b")
    prompt["9"] = {"class_type": "PreviewImage", "inputs": {"images": ["7", 1]}}  # a valid output beside Save
    result = run_prompt(prompt, executor=new_executor(), raise_on_error=False)
    assert "8" in result["node_errors"]  # reported at queue time; ComfyUI still runs the preview output
    err = error_of(result)
    assert err["node_id"] == "7"
    assert err["exception_message"].startswith("Meta-LoRA Save (node 8) would refuse its name, so nothing was "
                                               "trained: filename_prefix 'a\\x00b' holds '\\x00'")
    assert not [t for t in texts(result, "7") if t.startswith("step ")]  # not one training step


def test_save_accepts_what_save_image_accepts_and_an_ignored_cache_entry_is_said_on_the_node(env):
    cache = pathlib.Path(env.folder_paths.get_folder_paths("meta_lora_cache")[0])
    before = set(cache.glob("*.safetensors")) if cache.exists() else set()
    first = run_prompt(graph(env, prefix="Zoë test", seed=21, force=False), executor=new_executor())
    assert first["outputs"]["8"]["text"] == ["metalora/Zoë test_00001.safetensors"]
    assert (loras(env) / "metalora" / "Zoë test_00001.safetensors").is_file()
    (entry,) = set(cache.glob("*.safetensors")) - before
    entry.write_bytes(b"damaged")  # e.g. a disk error since
    second = run_prompt(graph(env, prefix="Zoë test", seed=21, force=False), executor=new_executor())
    said = texts(second, "7")
    assert said[0] == (f"ignoring unreadable training cache entry {entry.name} ({entry} is not a readable safetensors "
                       "file (" + said[0].split(" is not a readable safetensors file (", 1)[1])
    assert said[0].endswith("; training again")
    assert [t for t in said if t.startswith("step ")]  # trained again
    assert (loras(env) / "metalora" / "Zoë test_00002.safetensors").is_file()


def _place_prior(env, name: str, r1: int = 4) -> pathlib.Path:
    prior_mod, layers = pack("metalora_core.formats.prior"), pack("metalora_core.lora.layers")
    dims = layers.FluxDims(hidden=256, mlp_hidden=1024, num_double=2, num_single=2)
    p = prior_mod.make_prior(dims, r1=r1, preset=layers.DEFAULT_PRESET, generator=torch.Generator().manual_seed(0))
    folder = pathlib.Path(env.folder_paths.get_folder_paths("meta_lora")[0])
    folder.mkdir(parents=True, exist_ok=True)
    return prior_mod.save_prior(p, folder / name)


def test_rank_above_the_priors_r1_is_refused_on_the_node_before_training(env):
    path = _place_prior(env, "r4.safetensors", r1=4)
    prompt = graph(env, rank=5)
    prompt["10"] = {"class_type": "MetaLoRAPriorLoader", "inputs": {"prior_name": "r4.safetensors"}}
    prompt["7"]["inputs"]["prior"] = ["10", 0]
    result = run_prompt(prompt, executor=new_executor(), raise_on_error=False)
    assert error_of(result)["exception_message"] == (
        f"rank 5 is above the prior's r1 = 4 ({path}): the LoRA's real rank can be at most 4, the file would only "
        "be bigger; set rank to 4 or less")
    assert not [t for t in texts(result, "7") if t.startswith("step ")]
    prompt["7"]["inputs"]["rank"] = 4  # at r1 it trains
    assert len([t for t in texts(run_prompt(prompt, executor=new_executor()), "7") if t.startswith("step ")]) == 2


def test_prior_loader_names_a_foreign_loras_family_and_the_path_once(env):
    from safetensors.torch import save_file

    folder = pathlib.Path(env.folder_paths.get_folder_paths("meta_lora")[0])
    folder.mkdir(parents=True, exist_ok=True)
    sdxl = folder / "sdxl_face.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 8),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 2)}, str(sdxl))
    env.folder_paths.filename_list_cache.pop("meta_lora", None)
    prompt = {"1": {"class_type": "MetaLoRAPriorLoader", "inputs": {"prior_name": "sdxl_face.safetensors"}},
              "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
    msg = error_of(run_prompt(prompt, executor=new_executor(), raise_on_error=False))["exception_message"]
    assert msg == (f"prior_name 'sdxl_face.safetensors': {sdxl}: a LoRA for stable-diffusion (unet: SD1.x / SD2 / "
                   "SDXL), not FLUX.1-dev, FLUX.2 or Z-Image (keys such as "
                   "'lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight'); Meta-LoRA needs a LoRA of one "
                   "of those or a prior made by 'metalora meta-train'")
    assert msg.count(str(sdxl)) == 1


def test_prior_loader_lists_no_hidden_file(env):
    _place_prior(env, "visible.safetensors")
    folder = pathlib.Path(env.folder_paths.get_folder_paths("meta_lora")[0])
    legacy = folder / ".metalora-download-abc123"  # what an older version's killed download left
    legacy.mkdir(exist_ok=True)
    _place_prior(env, ".metalora-download-abc123/prior.safetensors")
    _place_prior(env, ".hidden.safetensors")
    env.folder_paths.filename_list_cache.pop("meta_lora", None)
    names = pack("nodes.folders").prior_names()
    assert "visible.safetensors" in names
    assert not [n for n in names if n.startswith(".") or "/." in n.replace("\\", "/")], names
