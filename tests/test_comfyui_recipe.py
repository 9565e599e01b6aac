"""The Stage-2 recipe in a real ComfyUI (in-process): a stable cache key and one provenance for every save.

Needs ``COMFYUI_PATH`` (a ComfyUI checkout whose Python environment runs these tests); skips
with a message otherwise.
"""
from __future__ import annotations

import pathlib
import shutil

import pytest
import torch

from comfy_fixtures import (REPO, SKIP_REASON, comfyui_path, load_comfy_in_process, new_executor, pack,
                            random_meta_adapters, run_prompt, write_tiny_flux_models)

if comfyui_path() is None:
    pytest.skip(f"SKIPPED: {SKIP_REASON}", allow_module_level=True)


@pytest.fixture(scope="module")
def env(tmp_path_factory, sample):
    base = tmp_path_factory.mktemp("comfy_recipe")
    names = write_tiny_flux_models(base / "models", seed=0)
    state = load_comfy_in_process(base, custom_node_paths=[REPO])
    pack("nodes.folders").register_folders()  # the folders of this base dir
    shutil.copy(sample("obama"), base / "input" / "obama.jpg")
    # PNG decodes to the same pixels everywhere (ComfyUI decodes JPEG with PyAV, the CLI with PIL)
    from PIL import Image

    Image.open(sample("obama")).convert("RGB").save(base / "input" / "obama.png")
    Image.open(sample("t1")).convert("RGB").save(base / "input" / "group.png")  # six people
    state.names = names
    return state


def graph(env, *, seed: int, steps: int = 2, prompt: str = "a man on the moon", photo: str = "obama.jpg") -> dict:
    """Load -> augment -> train -> apply -> sample -> save image, and save the LoRA."""
    n = env.names
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": n["unet"], "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": n["clip"], "type": "stable_diffusion"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": n["vae"]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a man", "clip": ["2", 0]}},
        "5": {"class_type": "LoadImage", "inputs": {"image": photo}},
        "6": {"class_type": "MetaLoRAFaceAugment",
              "inputs": {"image": ["5", 0], "detector": "yunet", "seed": 0, "bucket_resolution": 64}},
        "7": {"class_type": "MetaLoRATrain",
              "inputs": {"model": ["1", 0], "vae": ["3", 0], "crops": ["6", 0], "positive": ["4", 0],
                         "steps": steps, "rank": 1, "learning_rate": 1e-2, "seed": seed, "resolution": 64,
                         "gradient_checkpointing": False, "preview_every": 0, "force_retrain": False}},
        "8": {"class_type": "MetaLoRAApply", "inputs": {"model": ["1", 0], "meta_lora": ["7", 0], "strength": 1.0}},
        "9": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["2", 0]}},
        "10": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "11": {"class_type": "KSampler",
               "inputs": {"model": ["8", 0], "seed": 0, "steps": 1, "cfg": 1.0, "sampler_name": "euler",
                          "scheduler": "simple", "positive": ["9", 0], "negative": ["9", 0],
                          "latent_image": ["10", 0], "denoise": 1.0}},
        "12": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["3", 0]}},
        "13": {"class_type": "PreviewImage", "inputs": {"images": ["12", 0]}},
        "14": {"class_type": "MetaLoRASave",
               "inputs": {"meta_lora": ["7", 0], "subfolder": "recipe", "filename_prefix": f"seed{seed}"}},
    }


def texts(result: dict, node: str) -> list[str]:
    return [d["text"] for e, d, _ in result["messages"] if e == "progress_text" and d["node_id"] == node]


def saved_metadata(env, result: dict) -> dict[str, str]:
    from safetensors import safe_open

    name = result["outputs"]["14"]["text"][0]
    path = pathlib.Path(env.folder_paths.get_folder_paths("loras")[0]) / name
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def restart() -> None:
    """What a ComfyUI restart leaves: no model in memory (the caller also takes a fresh executor)."""
    import comfy.model_management

    comfy.model_management.unload_all_models()
    comfy.model_management.soft_empty_cache()


def test_model_identity_ignores_patches_applied_in_place(env):
    import comfy.model_management

    training, host_mod = pack("nodes.training"), pack("nodes.comfy_host")
    model = env.nodes.UNETLoader().load_unet(env.names["unet"], "default")[0]
    before = host_mod.model_identity(model)
    live = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    dims = host_mod.flux_dims(model)
    result = pack("metalora_core.train.stage2").TrainResult
    applied = training.apply_meta_lora(model, result(adapters=random_meta_adapters(pack, dims, "attn", 1)), 1.0)
    other = training.apply_meta_lora(model, result(adapters=random_meta_adapters(pack, dims, "attn", 2)), 1.0)
    try:
        with torch.inference_mode():
            comfy.model_management.load_models_gpu([applied], force_full_load=True)  # what KSampler does
        now = model.model.diffusion_model.state_dict()
        patched = [k for k in live if not torch.equal(now[k], live[k])]
        assert patched, "ComfyUI did not patch the shared weights in place; the test would be vacuous"
        as_loaded = host_mod.weights_as_loaded(model)
        assert all(torch.equal(as_loaded[k], live[k]) for k in live), "identity read patched weights"
        assert host_mod.model_identity(model) == before
        # a MODEL's own patches are part of what it trains on: they change its identity
        assert host_mod.model_identity(applied) != before
        assert host_mod.model_identity(other) != host_mod.model_identity(applied)  # same keys, other tensors
    finally:
        restart()
    assert host_mod.model_identity(model) == before


def test_cache_hit_after_apply_sample_and_restart_restores_provenance(env):
    import comfy.model_management

    executor = new_executor()
    first = run_prompt(graph(env, seed=31), executor=executor)  # trains, applies, samples: weights patched in place
    assert texts(first, "7")[-1].startswith("step 2/2")
    assert comfy.model_management.current_loaded_models, "the LoRA-applied MODEL should still be loaded"
    # same server, other seed: the train node sees the MODEL while the seed-31 LoRA is patched into its weights
    trained = run_prompt(graph(env, seed=32), executor=executor)
    said = texts(trained, "7")
    assert said[0].startswith("crop latents reused: ") and [t.split()[1] for t in said[1:]] == ["1/2", "2/2"], said
    restart()
    hit = run_prompt(graph(env, seed=32), executor=new_executor())
    steps = texts(hit, "7")
    assert steps and steps[0].startswith("loaded from cache") and not any(t.startswith("step") for t in steps), steps
    m_train, m_hit = saved_metadata(env, trained), saved_metadata(env, hit)
    assert m_hit == m_train  # the same provenance keys and values, after a restart too
    p = pack("metalora_core.train.recipe").Provenance.from_metadata(m_hit)
    assert (p.config.seed, p.config.steps, p.config.rank, p.config.lr, p.mode, p.detector, p.resolution) == \
        (32, 2, 1, 1e-2, "lora", "yunet", 64)
    cache = pathlib.Path(env.folder_paths.get_folder_paths("meta_lora_cache")[0])
    assert (cache / f"{p.cache_key}.safetensors").is_file()
    assert len(list(cache.glob("*.safetensors"))) == 2  # seeds 31 and 32: no duplicate entry


def test_cli_and_node_write_the_same_provenance_keys(env, tmp_path, sample):
    from metalora_core.cli import main
    from metalora_core.formats.lora import load_lora
    from metalora_core.hosts.tiny import build_tiny_flux_pipeline

    node = saved_metadata(env, run_prompt(graph(env, seed=0, photo="obama.png"), executor=new_executor()))
    build_tiny_flux_pipeline(seed=0).save_pretrained(str(tmp_path / "flux"))
    out = tmp_path / "cli.safetensors"
    photo = env.base_dir / "input" / "obama.png"
    assert main(["personalize", "--model", str(tmp_path / "flux"), "--image", str(photo), "--out", str(out),
                 "--steps", "2", "--lr", "1e-2", "--resolution", "64", "--seed", "0", "--detector", "yunet",
                 "--dtype", "float32", "--device", "cpu", "--caption", "a photo of a man",
                 "--state", str(tmp_path / "state.safetensors")]) == 0
    assert main(["export", str(tmp_path / "state.safetensors"), "--out", str(tmp_path / "export.safetensors")]) == 0
    _, cli = load_lora(out)
    _, exported = load_lora(tmp_path / "export.safetensors")
    assert set(cli) == set(node) == set(exported) and exported == cli
    same = ("images_sha256", "images", "detector", "augmentation", "resolution", "seed", "steps", "rank", "lr",
            "preset", "mode", "prior_sha256", "guidance", "provenance_version", "format", "base_model")
    assert {k: cli[k] for k in same} == {k: node[k] for k in same}  # same photo, same settings: same values
    assert cli["caption"] == "a photo of a man" and node["caption"] == ""  # a CONDITIONING carries no text
    assert cli["model_id"] != node["model_id"] and cli["cache_key"] != node["cache_key"]  # two different models


def test_comfy_host_and_conditioning(env):
    host_mod, protocol = pack("nodes.comfy_host"), pack("metalora_core.train.host")
    model = env.nodes.UNETLoader().load_unet(env.names["unet"], "default")[0]
    host = host_mod.ComfyFluxHost(model)
    for name in [n for n in vars(protocol.FlowHost) if not n.startswith("_")] + ["dims"]:
        assert hasattr(host, name), f"ComfyFluxHost lacks FlowHost.{name}"
    g = torch.Generator().manual_seed(0)
    ctx, pooled = torch.randn(1, 77, 768, generator=g), torch.randn(1, 768, generator=g)
    plain = host_mod.ComfyFluxCond.from_conditioning([[ctx, {"pooled_output": pooled}]])
    guided = host_mod.ComfyFluxCond.from_conditioning([[ctx, {"pooled_output": pooled, "guidance": 3.5}]])
    forced = host_mod.ComfyFluxCond.from_conditioning([[ctx, {"pooled_output": pooled, "guidance": 3.5}]], 2.0)
    assert (plain.guidance, guided.guidance, forced.guidance) == (1.0, 3.5, 2.0)  # a FluxGuidance node's value
    assert len({plain.digest(), guided.digest(), forced.digest()}) == 3
    x, sigma = torch.randn(1, 16, 4, 4, generator=g), torch.tensor([0.5])
    with torch.no_grad():
        assert not torch.equal(host.predict(x, sigma, plain), host.predict(x, sigma, guided))
    assert host.collate([plain, plain]) is plain
    with pytest.raises(ValueError, match="one caption per run"):
        host.collate([plain, guided])
    with pytest.raises(ValueError, match="has no VAE"):
        host.encode_images([])


def test_train_resolution_other_than_the_crops_recuts_them_once(env):
    from PIL import Image

    training, person = pack("nodes.training"), pack("metalora_core.faces.person")
    store = pack("metalora_core.formats.store")
    model = env.nodes.UNETLoader().load_unet(env.names["unet"], "default")[0]
    vae = env.nodes.VAELoader().load_vae(env.names["vae"])[0]
    crops = person.person_crops([Image.open(env.base_dir / "input" / "obama.png")], detector="yunet", seed=0, resolution=64)[0]
    g = torch.Generator().manual_seed(1)
    cond = [[torch.randn(1, 77, 768, generator=g), {"pooled_output": torch.randn(1, 768, generator=g)}]]
    config = pack("metalora_core.train.stage2").Stage2Config(steps=1, seed=3)
    settings = training.TrainSettings(config, resolution=96, preview_every=0, force_retrain=True)
    with torch.inference_mode():
        result = training.train_meta_lora(model, vae, None, crops, cond, settings)
    p = result.provenance
    assert p.resolution == 96 and p.images_sha256 == store.image_digest(crops.at_resolution(96).images)
    assert p.images_sha256 != store.image_digest(crops.images)


def test_face_augment_node_and_the_crops_command_cut_the_same_crops_of_a_group_photo(env, tmp_path):
    """The same group photo and settings: the node (LoadImage's IMAGE in) and ``metalora crops`` give
    identical crops, with the other five people's faces blurred in both."""
    import json

    import numpy as np
    from PIL import Image

    from metalora_core.cli import main

    image = env.nodes.LoadImage().load_image("group.png")[0]
    node = pack("nodes.definitions").MetaLoRAFaceAugment
    crops, _, info = node.execute([image], ["yunet"], [3], [160], other_faces=["blur"]).args
    out = tmp_path / "cli"
    assert main(["crops", str(env.base_dir / "input" / "group.png"), "--out", str(out), "--detector", "yunet",
                 "--seed", "3", "--resolution", "160", "--other-faces", "blur"]) == 0
    listed = json.loads((out / "crops.json").read_text())
    assert listed["blurred"] >= 7 and f"{listed['blurred']} with other faces blurred" in info
    assert len(listed["crops"]) == len(crops.crops) and crops.resolution == 160 and crops.others == "blur"
    for entry, crop in zip(listed["crops"], crops.crops):
        with Image.open(out / entry["file"]) as im:
            assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(crop.image)), entry["file"]


def test_image_conversion_roundtrips_and_refuses_mixed_sizes(env):
    import numpy as np
    from PIL import Image

    images = pack("nodes.images")
    g = np.random.default_rng(0)
    pics = [Image.fromarray(g.integers(0, 256, (12, 20, 3), dtype=np.uint8)) for _ in range(2)]
    batch = images.pils_to_image(pics)
    assert batch.shape == (2, 12, 20, 3) and batch.dtype == torch.float32
    back = images.image_to_pils(batch)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(pics, back))  # exact both ways
    with pytest.raises(ValueError, match="different sizes"):
        images.pils_to_image([pics[0], pics[0].resize((10, 10))])
    with pytest.raises(ValueError, match="expected \\(batch, height, width, 3\\)"):
        images.image_to_pils(batch[0])
