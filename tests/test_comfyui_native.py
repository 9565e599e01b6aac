"""The pack as a native ComfyUI pack (in-process, real ComfyUI): the prior download node, seeds that
do not retrain on every queue, and the Train node's outputs on ComfyUI's core training nodes.

Needs ``COMFYUI_PATH``; the Hub is :class:`hub_server.LoopbackHub` on loopback.
"""
from __future__ import annotations

import pathlib
import random
import shutil

import pytest
import torch

from comfy_fixtures import (SKIP_REASON, comfyui_path, new_executor, object_info, pack, pack_env,
                            run_prompt, train_graph)
from hub_server import LoopbackHub

if comfyui_path() is None:
    pytest.skip(f"SKIPPED: {SKIP_REASON}", allow_module_level=True)


@pytest.fixture(scope="module")
def env(tmp_path_factory, sample):
    return pack_env(tmp_path_factory.mktemp("comfy_native"), photo=sample("obama"))


def base_graph(env, *, train_seed: int = 0, augment_seed: int = 0, steps: int = 2) -> dict:
    return train_graph(env, augment_seed=augment_seed, train_seed=train_seed, steps=steps, subfolder="native",
                       prefix="t")


def step_texts(result: dict, node: str) -> list[str]:
    return [d["text"] for e, d, _ in result["messages"]
            if e == "progress_text" and d["node_id"] == node and d["text"].startswith("step ")]


# ------------------------------------------------------------------ seeds: the frontend's widget rule


def frontend_control_mode(name: str, spec: dict) -> str | None:
    """The mode ComfyUI's frontend gives an INT widget's "control after generate" companion.

    The frontend adds the control when the schema sets ``control_after_generate`` or, by the old
    convention, when the input is named ``seed`` / ``noise_seed``; its initial mode is the schema's
    string value, otherwise "randomize".
    """
    flag = spec.get("control_after_generate")
    if flag is None and name not in ("seed", "noise_seed"):
        return None
    if flag is False:
        return None
    return flag if isinstance(flag, str) else "randomize"


def after_queue(prompt: dict, info: dict, rng: random.Random) -> dict:
    """What the frontend does to widget values after it queued a prompt."""
    out = {k: {**v, "inputs": dict(v["inputs"])} for k, v in prompt.items()}
    for node in out.values():
        spec = info.get(node["class_type"])
        if spec is None:
            continue
        inputs = {**spec["input"].get("required", {}), **spec["input"].get("optional", {})}
        for name, value in node["inputs"].items():
            s = inputs.get(name)
            if s is None or s[0] != "INT" or isinstance(value, list):
                continue
            mode = frontend_control_mode(name, s[1])
            if mode == "randomize":
                node["inputs"][name] = rng.randint(s[1].get("min", 0), s[1].get("max", 2**31 - 1))
            elif mode == "increment":
                node["inputs"][name] = value + 1
            elif mode == "decrement":
                node["inputs"][name] = value - 1
    return out


def test_object_info_seeds_are_fixed_and_download_node_is_listed(env):
    info = object_info(env, ["MetaLoRATrain", "MetaLoRAFaceAugment", "MetaLoRAPriorDownload", "KSampler"])
    for node in ("MetaLoRATrain", "MetaLoRAFaceAugment"):
        spec = info[node]["input"]["required"]["seed"][1]
        assert spec.get("control_after_generate") == "fixed", (node, spec)
        assert frontend_control_mode("seed", spec) == "fixed"
    # the rule above is the one that randomizes KSampler's seed
    assert frontend_control_mode("seed", info["KSampler"]["input"]["required"]["seed"][1]) == "randomize"
    dl = info["MetaLoRAPriorDownload"]
    assert list(dl["input"]["required"]) == ["repo_id", "filename", "revision"]
    assert dl["output"][0] == "META_LORA_PRIOR" and dl["category"] == "MetaLoRA/loaders"


def test_a_hand_built_graph_queued_twice_trains_once(env):
    info = object_info(env)
    prompt = base_graph(env)
    prompt["7"]["inputs"]["force_retrain"] = False  # the node's default, as a hand-built graph has it
    executor = new_executor()  # one server: its output cache lives across queues
    rng = random.Random(0)
    first = run_prompt(prompt, executor=executor)
    second_prompt = after_queue(prompt, info, rng)
    second = run_prompt(second_prompt, executor=executor)
    trained = [bool(step_texts(r, "7")) for r in (first, second)]
    assert trained == [True, False], trained
    assert second_prompt["7"]["inputs"]["seed"] == prompt["7"]["inputs"]["seed"]


# ------------------------------------------------------------------ download node


def test_download_node_fetches_a_prior_that_trains(env, monkeypatch, tmp_path):
    prior_mod, layers = pack("metalora_core.formats.prior"), pack("metalora_core.lora.layers")
    dims = layers.FluxDims(hidden=256, mlp_hidden=1024, num_double=2, num_single=2)
    p = prior_mod.make_prior(dims, r1=4, preset=layers.DEFAULT_PRESET, generator=torch.Generator().manual_seed(0))
    data = prior_mod.save_prior(p, tmp_path / "p.safetensors").read_bytes()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with LoopbackHub() as hub:
        repo = hub.add("authors/meta-lora", {"priors/face.safetensors": data})
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        prompt = base_graph(env)
        prompt["20"] = {"class_type": "MetaLoRAPriorDownload",
                        "inputs": {"repo_id": "authors/meta-lora", "filename": "priors/face.safetensors",
                                   "revision": "main"}}
        prompt["7"]["inputs"]["prior"] = ["20", 0]
        result = run_prompt(prompt, executor=new_executor())
    placed = pathlib.Path(env.folder_paths.get_folder_paths("meta_lora")[0]) / "face.safetensors"
    assert placed.is_file()
    assert "face.safetensors" in env.folder_paths.get_filename_list("meta_lora")  # the Prior Loader lists it
    texts = [d["text"] for e, d, _ in result["messages"] if e == "progress_text" and d["node_id"] == "20"]
    assert any(repo.commits["main"][:12] in t and "r1 4" in t for t in texts), texts
    assert len(step_texts(result, "7")) == 2
    line = pack("nodes.interop").describe_prior(pack("metalora_core.formats.prior").load_prior(placed))
    assert "authors/meta-lora/priors/face.safetensors" in line and repo.commits["main"][:12] in line  # loss_curve label
    saved = pathlib.Path(env.folder_paths.get_folder_paths("loras")[0]) / "native"
    from safetensors import safe_open

    with safe_open(str(sorted(saved.glob("*.safetensors"))[-1]), "pt") as f:
        meta = f.metadata()
        # trained on the downloaded prior: the hash of the file placed in models/meta_lora (what inspect and
        # the Prior Loader give for it; its metadata holds the provenance, so not the hash of the Hub's bytes)
        placed_sha = pack("metalora_core.formats.files").file_content_sha256(placed)
        assert meta["prior_sha256"] == placed_sha == pack("metalora_core.formats.prior").load_prior(placed).sha256
        assert meta["modelspec.architecture"] == "flux-1-dev/lora" and meta["modelspec.title"] == "t"
        assert len(meta["modelspec.date"]) == 10


def test_download_node_offline_is_one_clear_error(env, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    prompt = {"1": {"class_type": "MetaLoRAPriorDownload",
                    "inputs": {"repo_id": "authors/meta-lora", "filename": "x.safetensors", "revision": "main"}},
              "9": {"class_type": "PreviewAny", "inputs": {"source": ["1", 1]}}}
    result = run_prompt(prompt, executor=new_executor(), raise_on_error=False)
    assert not result["success"]
    err = [d for e, d in result["status_messages"] if e == "execution_error"][0]
    assert "HF_HUB_OFFLINE is set" in err["exception_message"] and "copy the file into" in err["exception_message"]


# ------------------------------------------------------------------ core training sockets


def test_train_outputs_feed_core_save_lora_loader_and_loss_graph(env):
    prompt = base_graph(env, steps=3, train_seed=4)
    prompt.update({
        "30": {"class_type": "SaveLoRA", "inputs": {"lora": ["7", 2], "prefix": "loras/native_core", "steps": 3}},
        "31": {"class_type": "LossGraphNode", "inputs": {"loss": ["7", 3], "filename_prefix": "native_loss"}},
        "32": {"class_type": "LoraModelLoader",
               "inputs": {"model": ["1", 0], "lora": ["7", 2], "strength_model": 1.0, "bypass": False}},
        "33": {"class_type": "MetaLoRAApply", "inputs": {"model": ["1", 0], "meta_lora": ["7", 0], "strength": 1.0}},
        "40": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    })
    for i, model in (("41", "32"), ("42", "33"), ("43", "1")):
        prompt[i] = {"class_type": "KSampler",
                     "inputs": {"model": [model, 0], "seed": 0, "steps": 2, "cfg": 1.0, "sampler_name": "euler",
                                "scheduler": "simple", "positive": ["4", 0], "negative": ["4", 0],
                                "latent_image": ["40", 0], "denoise": 1.0}}
        prompt[str(int(i) + 10)] = {"class_type": "PreviewAny", "inputs": {"source": [i, 0]}}
    executor = new_executor()
    result = run_prompt(prompt, executor=executor)
    assert result["success"]
    out = pathlib.Path(env.folder_paths.get_output_directory()) / "loras"
    files = sorted(out.glob("native_core_3_steps_*.safetensors"))
    assert files, list(out.glob("*"))
    from safetensors.torch import load_file

    saved = load_file(str(files[-1]))
    mine = pathlib.Path(env.folder_paths.get_folder_paths("loras")[0]) / "native"
    ours = load_file(str(sorted(mine.glob("*.safetensors"))[-1]))  # Meta-LoRA Save in the same run
    assert saved.keys() == ours.keys() and all(torch.equal(saved[k], ours[k]) for k in ours)
    graph = result["outputs"]["31"]["images"]
    assert graph and (pathlib.Path(env.folder_paths.get_temp_directory()) / graph[0]["filename"]).is_file()
    # Load LoRA Model on the LORA_MODEL patches FLUX exactly as Meta-LoRA Apply does, and it does change FLUX
    lat = {i: _latent(executor, i) for i in ("41", "42", "43")}
    assert torch.equal(lat["41"], lat["42"])
    assert not torch.equal(lat["41"], lat["43"])


def _latent(executor, node_id: str) -> torch.Tensor:
    """A node's first output from the executor's output cache (ComfyUI's own CacheEntry)."""
    import asyncio

    entry = asyncio.run(executor.caches.outputs.get(node_id))
    return entry.outputs[0][0]["samples"]


# ------------------------------------------------------------------ face augment: lists, several faces, report


def test_face_augment_takes_a_folder_of_photos_of_any_size_as_one_person(env, sample):
    folder = env.base_dir / "input" / "person_set"
    folder.mkdir(exist_ok=True)
    shutil.copy(sample("obama"), folder / "a.jpg")
    shutil.copy(sample("obama2"), folder / "b.jpg")
    shutil.copy(sample("t1"), env.base_dir / "input" / "group.jpg")
    prompt = {
        "1": {"class_type": "LoadImageDataSetFromFolder", "inputs": {"folder": "person_set"}},
        "2": {"class_type": "MetaLoRAFaceAugment",
              "inputs": {"image": ["1", 0], "detector": "yunet", "seed": 0, "bucket_resolution": 64}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 2]}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["2", 1]}},
        "5": {"class_type": "LoadImage", "inputs": {"image": "group.jpg"}},
        "6": {"class_type": "MetaLoRAFaceAugment",
              "inputs": {"image": ["5", 0], "detector": "yunet", "seed": 0, "bucket_resolution": 64,
                         "face_index": 2, "other_faces": "drop"}},
        "7": {"class_type": "PreviewAny", "inputs": {"source": ["6", 2]}},
    }
    result = run_prompt(prompt, executor=new_executor())
    folder_info = result["outputs"]["3"]["text"][0]
    assert "crops from 2 photo(s)" in folder_info.splitlines()[0], folder_info
    assert "photo 1 (" in folder_info and "photo 2 (" in folder_info
    sizes = {line.split("(")[1].split(")")[0] for line in folder_info.splitlines() if line.startswith("photo ")}
    assert len(sizes) == 2, sizes  # two different sizes, one person
    group_info = result["outputs"]["7"]["text"][0]
    assert "6 face(s), using face 2" in group_info and "dropped (other faces)" in group_info
    texts = [d["text"] for e, d, _ in result["messages"] if e == "progress_text" and d["node_id"] == "6"]
    assert texts and texts[-1] == group_info  # the same report shows under the node


def test_insightface_folder_follows_extra_model_paths(env, tmp_path):
    import os

    folders = pack("nodes.folders")
    env.folder_paths.folder_names_and_paths.pop("insightface", None)
    try:
        assert folders.insightface_root() == os.path.join(env.folder_paths.models_dir, "insightface")
        env.folder_paths.add_model_folder_path("insightface", str(tmp_path / "faces"))  # what extra_model_paths.yaml does
        assert folders.insightface_root() == str(tmp_path / "faces")
    finally:
        env.folder_paths.folder_names_and_paths.pop("insightface", None)
