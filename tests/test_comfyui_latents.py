"""Crop latents encoded once per ComfyUI process (real ComfyUI in-process, tiny FLUX-format files).

A run of Meta-LoRA Train that changes only training settings finds the VAE latents of its crops
(both orientations) already made; another VAE or other pixels encode again. Needs
``COMFYUI_PATH``.
"""
from __future__ import annotations

import shutil

import pytest
import torch

from comfy_fixtures import REPO, SKIP_REASON, comfyui_path, load_comfy_in_process, new_executor, pack, run_prompt, \
    write_tiny_flux_models

if comfyui_path() is None:
    pytest.skip(f"SKIPPED: {SKIP_REASON}", allow_module_level=True)


@pytest.fixture(scope="module")
def env(tmp_path_factory, sample):
    base = tmp_path_factory.mktemp("comfy_latents")
    names = write_tiny_flux_models(base / "models", seed=0)
    other = tmp_path_factory.mktemp("other_vae")
    write_tiny_flux_models(other, seed=5)
    shutil.copy(other / "vae" / names["vae"], base / "models" / "vae" / "other_vae.safetensors")
    state = load_comfy_in_process(base, custom_node_paths=[REPO])
    pack("nodes.folders").register_folders()
    shutil.copy(sample("obama"), base / "input" / "obama.jpg")
    state.names = names
    return state


@pytest.fixture
def vae_calls(monkeypatch):
    """Counts the images ComfyUI's VAE encodes (its real ``VAE.encode``, wrapped)."""
    import comfy.sd

    seen = []
    real = comfy.sd.VAE.encode

    def counted(self, pixels):
        seen.append(int(pixels.shape[0]))
        return real(self, pixels)

    monkeypatch.setattr(comfy.sd.VAE, "encode", counted)
    return seen


def graph(env, *, steps: int = 2, lr: float = 4e-4, rank: int = 1, seed: int = 0, layers: str = "all",
          memory: str = "auto", vae: str | None = None, augmentation: str = "paper_grid") -> dict:
    n = env.names
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": n["unet"], "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": n["clip"], "type": "stable_diffusion"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": vae or n["vae"]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a man", "clip": ["2", 0]}},
        "5": {"class_type": "LoadImage", "inputs": {"image": "obama.jpg"}},
        "6": {"class_type": "MetaLoRAFaceAugment",
              "inputs": {"image": ["5", 0], "detector": "yunet", "seed": 0, "bucket_resolution": 64,
                         "augmentation": augmentation}},
        "7": {"class_type": "MetaLoRATrain",
              "inputs": {"model": ["1", 0], "vae": ["3", 0], "crops": ["6", 0], "positive": ["4", 0],
                         "steps": steps, "rank": rank, "learning_rate": lr, "seed": seed, "resolution": 64,
                         "gradient_checkpointing": False, "preview_every": 1, "force_retrain": False,
                         "memory": memory, "layers": layers}},
        "8": {"class_type": "PreviewImage", "inputs": {"images": ["7", 1]}},  # the loss curve
    }


def texts(result: dict, node: str = "7") -> list[str]:
    return [d["text"] for e, d, _ in result["messages"] if e == "progress_text" and d["node_id"] == node]


def test_training_settings_change_encodes_nothing_in_an_old_graph(env, vae_calls):
    """Crops + VAE straight into Train: the first run encodes every crop and its mirror image once;
    runs that change steps, lr, rank, seed, layers or memory call the VAE encoder not at all (the
    preview's latent included)."""
    pack("nodes.latents").CACHE.clear()
    executor = new_executor()
    first = run_prompt(graph(env), executor=executor)
    said, line = texts(first)[:2]
    crops = int(line.split()[1])  # "encoded 25 crops and their mirror images in ..."
    assert crops > 1 and line.startswith(f"encoded {crops} crops and their mirror images in "), line
    assert said.startswith(f"encoding {crops} crops and their mirror images with the VAE (once"), said
    assert sum(vae_calls) == 2 * crops, vae_calls
    for change in (dict(steps=3), dict(lr=1e-3), dict(rank=2), dict(seed=4), dict(layers="attn"),
                   dict(memory="low", steps=4)):  # memory alone: the trained result is the same (disk cache)
        vae_calls.clear()
        run = run_prompt(graph(env, **change), executor=executor)
        assert "7" in {d["node"] for e, d, _ in run["messages"] if e == "executing"}, change  # it trained again
        assert texts(run)[0] == (f"crop latents reused: {crops} crops and their mirror images were encoded "
                                 "before (no VAE work)"), change
        assert any(t.startswith("step 1/") for t in texts(run)), change
        assert vae_calls == [], change


def test_the_photo_as_it_is_encodes_no_mirror_image(env, vae_calls):
    """augmentation none trains the photo unflipped: the VAE encodes the one crop, not its mirror."""
    pack("nodes.latents").CACHE.clear()
    run = run_prompt(graph(env, augmentation="none", seed=7), executor=new_executor())
    said, line = texts(run)[:2]
    assert said.startswith("encoding 1 crops with the VAE (once"), said
    assert line.startswith("encoded 1 crops in "), line
    assert vae_calls == [1], vae_calls
    assert any(t.startswith("step 1/") for t in texts(run))


def test_another_vae_or_other_pixels_encode_again(env, vae_calls):
    """The key is the VAE's content and the crop's pixels: another VAE file encodes again; the same
    file loaded again (a new VAE object) reuses; other pixels (another resolution) encode again."""
    from PIL import Image

    latents, nodes = pack("nodes.latents"), env.nodes
    images = [Image.effect_mandelbrot((48, 32), (-2, -1, 1, 1), 40).convert("RGB"),
              Image.linear_gradient("L").resize((48, 32)).convert("RGB")]
    vae = nodes.VAELoader().load_vae(env.names["vae"])[0]
    again = nodes.VAELoader().load_vae(env.names["vae"])[0]
    other = nodes.VAELoader().load_vae("other_vae.safetensors")[0]
    assert again is not vae
    latents.CACHE.clear()
    with torch.inference_mode():
        first = latents.VaeEncoder(vae)(images)
        assert vae_calls == [2]  # one batch: both images are 48x32
        same = latents.VaeEncoder(again)(images)
        assert vae_calls == [2]
        assert all(torch.equal(a, b) for a, b in zip(first, same))
        theirs = latents.VaeEncoder(other)(images)
        assert len(vae_calls) == 2 and not torch.equal(theirs[0], first[0])
        enc = latents.VaeEncoder(vae)
        enc([im.resize((64, 48)) for im in images])
        assert len(vae_calls) == 3 and (enc.encoded, enc.reused) == (2, 0)


def test_vae_identity_reads_weights_as_loaded_not_weights_patched_in_place(env):
    import comfy.model_management

    latents = pack("nodes.latents")
    vae = env.nodes.VAELoader().load_vae(env.names["vae"])[0]
    before = latents.vae_identity(vae)
    live = {k: v.clone() for k, v in vae.first_stage_model.state_dict().items()}
    patched = vae.patcher.clone()  # every weight patched: the identity reads only a few of them
    patched.add_patches({k: (torch.full_like(v, 0.5),) for k, v in live.items()}, 1.0)
    try:
        with torch.inference_mode():
            comfy.model_management.load_models_gpu([patched], force_full_load=True)
        now = vae.first_stage_model.state_dict()
        assert all(not torch.equal(now[k], v) for k, v in live.items()), \
            "ComfyUI did not patch the VAE in place; the test would be vacuous"
        assert latents.vae_identity(vae) == before
    finally:
        comfy.model_management.unload_all_models()
    assert latents.vae_identity(vae) == before
    now = vae.first_stage_model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in live.items())


def test_cached_latents_are_the_bits_the_vae_gives(env):
    """The host's latents, encoded now or reused, are bit for bit ComfyUI's VAE encode of each size
    batch in the model's latent space (what the host computed before latents were kept)."""
    from PIL import Image

    latents, host_mod, images_mod = pack("nodes.latents"), pack("nodes.comfy_host"), pack("nodes.images")
    model = env.nodes.UNETLoader().load_unet(env.names["unet"], "default")[0]
    vae = env.nodes.VAELoader().load_vae(env.names["vae"])[0]
    pics = [Image.effect_mandelbrot(size, (-2, -1, 1, 1), 30 + i).convert("RGB")
            for i, size in enumerate([(48, 32), (32, 48), (48, 32)])]
    latents.CACHE.clear()
    with torch.inference_mode():
        want = [None] * 3
        for idx in ([0, 2], [1]):
            z = model.model.process_latent_in(vae.encode(images_mod.pils_to_image([pics[i] for i in idx])).float())
            for j, i in enumerate(idx):
                want[i] = z[j].float().cpu()
        fresh = host_mod.ComfyFluxHost(model, vae=vae).encode_images(pics)
        kept = host_mod.ComfyFluxHost(model, vae=vae).encode_images(pics)
    assert len(latents.CACHE) == 3
    for w, a, b in zip(want, fresh, kept):
        assert torch.equal(w, a) and torch.equal(w, b)
