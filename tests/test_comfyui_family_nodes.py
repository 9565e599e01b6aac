"""FLUX.2 and Z-Image in the nodes, in a real ComfyUI (FLUX.1-dev beside them where the check is
the same): tiny models of each from state dicts with ComfyUI's key names (detected as ComfyUI's own
model types), the generic host's gradients against a float64 reference, Train -> Apply against
Save -> core LoraLoaderModelOnly, the family in the saved LoRA, and a prior of another family
refused in one line."""
from __future__ import annotations

import pytest
import torch

from comfy_fixtures import (SKIP_REASON, TINY_FLUX2_CONFIG, TINY_ZIMAGE_CONFIG, ZIMAGE_FULL_CONFIG,
                            comfy_module_state_dict, comfyui_path, pack, pack_env, random_meta_adapters,
                            tiny_flux2_vae_state_dict, tiny_flux_state_dict, tiny_zimage_model)

if comfyui_path() is None:
    pytest.skip(f"SKIPPED: {SKIP_REASON}", allow_module_level=True)

FAMILIES = ("flux2", "zimage")


@pytest.fixture(scope="module")
def env(tmp_path_factory, sample):
    return pack_env(tmp_path_factory.mktemp("comfy_family_nodes"), photo=sample("obama"))


@pytest.fixture(scope="module")
def crops(env):
    from PIL import Image

    person = pack("metalora_core.faces.person")
    return person.person_crops([Image.open(env.base_dir / "input" / "obama.jpg")], detector="yunet", seed=0,
                               resolution=64)[0]


def _models(env, name: str) -> dict:
    """fp32 and fp64 ComfyUI MODELs of one tiny family, its VAE, family, dims and text width."""
    import comfy.sd

    families = pack("metalora_core.lora.families")
    pooled = None
    if name == "flux1":  # the fast host's family, here for the Train -> Apply == Save -> loader check
        sd = tiny_flux_state_dict(seed=0)
        fp32 = comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options={"dtype": torch.float32})
        fp64 = comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options={"dtype": torch.float64})
        vae = env.nodes.VAELoader().load_vae(env.names["vae"])[0]
        family, width, pooled = families.FLUX1, 768, 768
        return {"fp32": fp32, "fp64": fp64, "vae": vae, "family": family,
                "dims": pack("nodes.comfy_host").flux_dims(fp32), "width": width, "pooled": pooled}
    if name == "flux2":
        sd = comfy_module_state_dict("flux", TINY_FLUX2_CONFIG, seed=0)
        fp32 = comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options={"dtype": torch.float32})
        fp64 = comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options={"dtype": torch.float64})
        vae = comfy.sd.VAE(sd=tiny_flux2_vae_state_dict(1))
        family, width = families.FLUX2, TINY_FLUX2_CONFIG["context_in_dim"]
    else:
        sd = comfy_module_state_dict("lumina", TINY_ZIMAGE_CONFIG, seed=0)
        fp32, fp64 = tiny_zimage_model(dict(sd)), tiny_zimage_model(dict(sd), torch.float64)
        vae = env.nodes.VAELoader().load_vae(env.names["vae"])[0]  # Z-Image uses the FLUX.1 VAE
        family, width = families.ZIMAGE, TINY_ZIMAGE_CONFIG["cap_feat_dim"]
    dims = pack("nodes.training").generic_family_dims(fp32)
    return {"fp32": fp32, "fp64": fp64, "vae": vae, "family": family, "dims": dims, "width": width, "pooled": pooled}


@pytest.fixture(scope="module")
def models(env):
    return {name: _models(env, name) for name in ("flux1", *FAMILIES)}


def _cond(width: int, seed: int = 1, pooled: int | None = None):
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(1, 12, width, generator=g) * 0.5
    return [[text, {} if pooled is None else {"pooled_output": torch.randn(1, pooled, generator=g)}]]


def _latent_shape(m) -> tuple[int, int, int]:
    fmt = m["fp32"].model.latent_format
    side = 64 // fmt.spacial_downscale_ratio  # a 64-pixel crop
    return fmt.latent_channels, side, side


def _output(m, model, seed: int = 3) -> torch.Tensor:
    """The MODEL's output (velocity) on a fixed random input, as sampling runs it (weights patched)."""
    import comfy.model_management

    generic, host_mod = pack("nodes.generic_host"), pack("nodes.comfy_host")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, *_latent_shape(m), generator=g)
    cond = host_mod.ComfyFluxCond.from_conditioning(_cond(m["width"], seed, m["pooled"]))
    comfy.model_management.load_models_gpu([model])
    with torch.inference_mode():
        return generic.ComfyGenericHost.of_family(model, m["dims"]).predict(x, torch.tensor([0.7]), cond).clone()


# ------------------------------------------------------------------ detection


def test_flux2_tiny_model_is_comfyuis_flux2(models):
    import comfy.model_base

    m = models["flux2"]
    families = pack("metalora_core.lora.families")
    assert type(m["fp32"].model) is comfy.model_base.Flux2
    assert m["dims"] == families.Flux2Dims(hidden=128, mlp_hidden=384, num_double=1, num_single=2)
    assert m["fp32"].model.latent_format.latent_channels == 128


def test_zimage_comfyui_detects_z_image_and_the_tiny_model_is_its_class(models):
    """ComfyUI 0.33 detects Z-Image at its own width only (dim 3840): a full-size key set (shapes
    only) is detected as ``supported_models.ZImage``; the tiny model is that config's model class."""
    import comfy.model_base
    import comfy.model_detection
    import comfy.supported_models

    full = comfy_module_state_dict("lumina", ZIMAGE_FULL_CONFIG, meta=True)
    config = comfy.model_detection.model_config_from_unet(full, "")
    assert type(config) is comfy.supported_models.ZImage
    assert config.unet_config["z_image_modulation"] and config.unet_config["dim"] == 3840
    m = models["zimage"]
    families = pack("metalora_core.lora.families")
    assert type(m["fp32"].model) is comfy.model_base.Lumina2
    assert m["dims"] == families.ZImageDims(hidden=256, ffn_hidden=688, kv=256, adaln_in=256, num_layers=2,
                                            num_refiner=1)
    assert pack("nodes.training").generic_family_dims(m["fp32"]) is not None


def test_zimage_lumina2_itself_is_refused_naming_the_families(models, crops):
    """Lumina 2 shares ComfyUI's model class with Z-Image, not its layers (no Z-Image modulation)."""
    config = dict(TINY_ZIMAGE_CONFIG, z_image_modulation=False)
    lumina = tiny_zimage_model(comfy_module_state_dict("lumina", config), config=config, kind="Lumina2")
    assert pack("nodes.training").generic_family_dims(lumina) is None
    m = dict(models["zimage"], fp32=lumina)
    with pytest.raises(ValueError) as e:
        _train(m, crops, None, steps=1)
    msg = str(e.value)
    assert "\n" not in msg and "FLUX.1-dev, FLUX.2 and Z-Image" in msg and "Lumina2" in msg, msg


@pytest.mark.parametrize("name", FAMILIES)
def test_conditioning_of_another_width_is_refused_in_one_line(models, crops, name):
    m = dict(models[name], width=4096)  # T5-XXL states, as FLUX.1's text encoder gives
    with pytest.raises(ValueError) as e:
        _train(m, crops, None, steps=1)
    msg = str(e.value)
    title = models[name]["family"].title
    assert "\n" not in msg and "4096-wide" in msg and f"{title} MODEL reads {models[name]['width']}" in msg, msg


def test_flux1_stays_on_the_fast_host(env):
    m = env.nodes.UNETLoader().load_unet(env.names["unet"], "default")[0]
    assert pack("nodes.training").generic_family_dims(m) is None


# ------------------------------------------------------------------ gradients


def _step(host, ad, m, dtype):
    """One flow-matching loss and backward through ``host``: (loss, Mid grads, Up grads) in float64."""
    g = torch.Generator().manual_seed(7)
    shape = _latent_shape(m)
    x0, noise = torch.randn(2, *shape, generator=g), torch.randn(2, *shape, generator=g)
    cond = pack("nodes.comfy_host").ComfyFluxCond.from_conditioning(_cond(m["width"], 5))
    sigma = torch.tensor([0.3, 0.8], dtype=dtype)
    s = sigma[:, None, None, None]
    x_t, target = (1 - s) * x0.to(dtype) + s * noise.to(dtype), (noise - x0).double()
    for _, a in ad.items():
        a.mid.grad = a.up.grad = None
    handle = host.attach(ad)
    try:
        with host.training():
            loss = ((host.predict(x_t, sigma, cond).double() - target) ** 2).mean()
            grad = loss.requires_grad
            if grad:
                loss.backward()
    finally:
        handle.remove()
    if not grad:
        return float(loss), None, None
    mids = torch.cat([a.mid.grad.double().flatten() for _, a in ad.items()])
    ups = torch.cat([a.up.grad.double().flatten() for _, a in ad.items()])
    return float(loss.detach()), mids, ups


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", FAMILIES)
def test_generic_gradients_match_float64_reference(models, name, capsys):
    """The generic host on the float32 model against the same host on a float64 copy, and that
    float64 gradient against central finite differences on one Mid entry."""
    generic = pack("nodes.generic_host").ComfyGenericHost
    m = models[name]
    ad64 = random_meta_adapters(pack, m["dims"], "all", seed=0).to(torch.float64)
    host64 = generic.of_family(m["fp64"], m["dims"])
    loss64, mid64, up64 = _step(host64, ad64, m, torch.float64)
    loss32, mid32, up32 = _step(generic.of_family(m["fp32"], m["dims"]),
                                random_meta_adapters(pack, m["dims"], "all", seed=0).to(torch.float32), m,
                                torch.float32)
    # finite differences on the first Mid entry of the layer with the largest gradient there
    name0, a0 = max(ad64.items(), key=lambda kv: abs(float(kv[1].mid.grad.flatten()[0])))
    analytic = float(a0.mid.grad.flatten()[0])
    eps, losses = 1e-2, []  # a smaller step measures rounding: at 1e-3 Z-Image's difference was 7e-5
    for sign in (1, -1):
        with torch.no_grad():
            a0.mid.view(-1)[0] += sign * eps
        with torch.no_grad():
            losses.append(_step(host64, ad64, m, torch.float64)[0])
        with torch.no_grad():
            a0.mid.view(-1)[0] -= sign * eps
    numeric = (losses[0] - losses[1]) / (2 * eps)
    errors = {"fp32 mid": _rel(mid32, mid64), "fp32 up": _rel(up32, up64),
              "finite difference": abs(numeric - analytic) / abs(analytic)}
    with capsys.disabled():
        print(f"\n[metalora] {name} generic host gradient rel. errors: {errors} (layer {name0}, d loss / d mid[0] "
              f"{analytic:.6g}, finite difference {numeric:.6g})")
    assert mid64.norm() > 0 and up64.norm() > 0 and abs(analytic) > 0
    assert abs(loss32 - loss64) <= 1e-5 * loss64
    assert errors["fp32 mid"] < 1e-5 and errors["fp32 up"] < 1e-5
    assert errors["finite difference"] < 1e-4


# ------------------------------------------------------------------ Train -> Apply == Save -> LoraLoaderModelOnly


def _family_prior(m, base_model: str | None = None, dims=None):
    prior_mod, layers = pack("metalora_core.formats.prior"), pack("metalora_core.lora.layers")
    dims = dims or m["dims"]
    g = torch.Generator().manual_seed(11)
    downs = {n: torch.randn(4, fin, generator=g) / fin ** 0.5
             for n, (fin, _) in layers.resolve_targets("all", dims).items()}
    return prior_mod.Prior(downs=downs, r1=4, preset="all", base_model=base_model or dims.family.name)


def _train(m, crops, prior, *, steps: int = 2, seed: int = 4, force: bool = True):
    training, stage2 = pack("nodes.training"), pack("metalora_core.train.stage2")
    messages: list[str] = []
    settings = training.TrainSettings(stage2.Stage2Config(steps=steps, lr=5e-2, seed=seed), resolution=64,
                                      preview_every=0, force_retrain=force)
    real = training.send_text
    training.send_text = lambda msg, node_id: messages.append(msg)
    try:
        with torch.inference_mode():  # as ComfyUI's executor runs nodes
            cond = _cond(m["width"], 1, m["pooled"])
            return training.train_meta_lora(m["fp32"], m["vae"], prior, crops, cond, settings), messages
    finally:
        training.send_text = real


@pytest.mark.parametrize("name", ("flux1", *FAMILIES))
def test_train_apply_equals_save_lora_loader(env, models, crops, name):
    import comfy.lora
    import comfy.utils
    import folder_paths

    from nodes import LoraLoaderModelOnly

    definitions = pack("nodes.definitions")
    m = models[name]
    model = m["fp32"]
    before = _output(m, model)
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        result, _, lora_socket, _ = definitions.MetaLoRATrain.execute(
            model, m["vae"], crops, _cond(m["width"], 1, m["pooled"]), steps=2, rank=1, learning_rate=5e-2, seed=4,
            resolution=64, gradient_checkpointing=False, preview_every=0, force_retrain=True,
            prior=_family_prior(m)).args
    assert result.family is m["family"] and len(result.losses) == 2
    assert torch.equal(_output(m, model), before), "the caller's MODEL changed"
    assert model.patches == {}
    again, _ = _train(m, crops, _family_prior(m), force=False)  # the training cache: the same family back
    assert again.from_cache and again.family is m["family"]
    cached = dict(again.adapters.items())
    assert all(torch.equal(cached[k].up, a.up) for k, a in result.adapters.items())

    applied = definitions.MetaLoRAApply.execute(model, result, 1.0).args[0]
    out_apply = _output(m, applied)
    lora_name = definitions.MetaLoRASave.execute(result, "families", f"{name}_person").args[0]
    loaded = LoraLoaderModelOnly().load_lora_model_only(model, lora_name, 1.0)[0]
    out_saved = _output(m, loaded)
    assert (out_apply - before).abs().max() > 1e-4, "the trained LoRA changes nothing"
    torch.testing.assert_close(out_saved, out_apply, rtol=1e-5, atol=1e-5)
    # the Train node's LORA_MODEL output through core Load LoRA Model: the same
    from comfy_extras.nodes_train import LoraModelLoader

    out_socket = _output(m, LoraModelLoader.execute(model, lora_socket, 1.0).args[0])
    torch.testing.assert_close(out_socket, out_apply, rtol=1e-5, atol=1e-5)

    # the file: every key mapped by ComfyUI's own key map, the family named
    path = folder_paths.get_full_path_or_raise("loras", lora_name)
    sd, meta = comfy.utils.load_torch_file(path, return_metadata=True)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    stems = {k.rsplit(".lora_", 1)[0] for k in sd}
    assert stems <= set(key_map), sorted(stems - set(key_map))[:3]
    assert len(comfy.lora.load_lora(sd, key_map)) == len(result.adapters.names) == len(stems)
    assert meta["base_model"] == m["family"].name
    assert meta["modelspec.architecture"] == m["family"].modelspec_architecture
    comfy_named = sorted(s for s in stems if s.startswith("diffusion_model."))
    if name == "flux2":  # the shared modulation Linears, by their ComfyUI names
        assert comfy_named == ["diffusion_model.double_stream_modulation_img.lin",
                               "diffusion_model.double_stream_modulation_txt.lin",
                               "diffusion_model.single_stream_modulation.lin"]
    else:
        assert comfy_named == []


def test_flux1_prior_refused_on_flux2_naming_both(models, crops):
    m = models["flux2"]
    families = pack("metalora_core.lora.families")
    flux1 = families.FluxDims(hidden=128, mlp_hidden=512, num_double=1, num_single=2)
    with pytest.raises(ValueError) as e:
        _train(m, crops, _family_prior(m, dims=flux1), steps=1)
    msg = str(e.value)
    assert "\n" not in msg and "FLUX.1-dev" in msg and "FLUX.2" in msg, msg
