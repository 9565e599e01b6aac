"""`metalora personalize` and `metalora meta-train` on diffusers folders of FLUX.2 (Klein) and Z-Image.

Tiny real pipelines of each family (``hosts.tiny_families``: the family's transformer and VAE classes,
a Qwen3 text encoder and a tokenizer built locally) are saved and run through the real CLI entry.
Checked per family: the host's velocity is the pipeline's own denoising step (sign, timestep,
packing, latent normalisation), the LoRA file has the family's keys and modelspec and, loaded by
diffusers, gives the trained three-layer adapters' output; Stage-2 gradients match a float64
reference; meta-train writes a prior of the family; a prior of another family and folders,
pipelines and transformer files that do not fit are refused in one line.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from metalora_core.cli import main
from metalora_core.formats.describe import describe_file, model_family
from metalora_core.formats.lora import PREFIX, load_adapter_state, load_lora
from metalora_core.formats.prior import load_prior, make_prior, save_prior, validate_prior
from metalora_core.hosts.diffusers_family import (DiffusersFamilyHost, FamilyTextCond, collate_family_conds,
                                                  diffusers_host, encode_caption, load_pipeline)
from metalora_core.hosts.tiny_families import build_tiny_flux2_pipeline, build_tiny_zimage_pipeline
from metalora_core.lora.families import FLUX1, FLUX2, ZIMAGE, FluxDims
from metalora_core.lora.flow import add_noise, flow_loss, velocity_target
from metalora_core.train.recipe import build_adapters
from metalora_core.train.stage1 import MetaTrainConfig
from metalora_core.train.stage1.bank import initial_downs
from references import merged_float64
from sample_photos import sample_photo
from test_robust import one_error_line

BUILDERS = {"flux2": (FLUX2, build_tiny_flux2_pipeline), "zimage": (ZIMAGE, build_tiny_zimage_pipeline)}
FAMILY_IDS = sorted(BUILDERS)
CAPTION = "a photo of a man"


@pytest.fixture(scope="module", params=FAMILY_IDS)
def tiny(request, tmp_path_factory):
    """(family id, family, pipeline, saved folder) of one family's tiny pipeline."""
    family, build = BUILDERS[request.param]
    pipe = build(0)
    folder = tmp_path_factory.mktemp(request.param) / "model"
    pipe.save_pretrained(str(folder))
    return request.param, family, pipe, folder


def _latent(family, batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, family.latent_channels, 8, 8, generator=torch.Generator().manual_seed(seed))


def _randomize_up(adapters, seed: int = 1, scale: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, a in adapters.items():
            a.up.copy_(torch.randn(a.up.shape, generator=g) * scale)


# ------------------------------------------------------------------ the host against the pipelines


def test_predict_is_the_pipelines_own_denoising_step(tiny):
    """One Euler step of the pipeline's own ``__call__`` from latents x at its sigma s gives
    ``x - s * v`` with the host's velocity v: the same packing, position ids, timestep scaling,
    sign and (FLUX.2) latent normalisation."""
    name, family, pipe, _ = tiny
    host = DiffusersFamilyHost.from_pipeline(pipe)
    assert host.family is family and host.dims == family.dims_from_diffusers_config(pipe.transformer.config)
    cond = encode_caption(pipe, CAPTION)
    x = _latent(family, 1)
    if family is FLUX2:
        cls = type(pipe)
        mean = pipe.vae.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(pipe.vae.bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
        out = pipe(prompt=CAPTION, height=64, width=64, num_inference_steps=1, sigmas=[0.6],
                   latents=cls._patchify_latents(x), output_type="latent", guidance_scale=1.0).images
        out = cls._unpatchify_latents((cls._patchify_latents(out) - mean) / std)  # the pipeline de-normalises
    else:
        out = pipe(prompt=CAPTION, height=64, width=64, num_inference_steps=1, sigmas=[0.6], latents=x.clone(),
                   output_type="latent", guidance_scale=0.0).images
    sigma = float(pipe.scheduler.sigmas[0])  # 0.6 after the scheduler's shift
    assert 0.6 < sigma < 1.0
    with torch.no_grad():
        v = host.predict(x, torch.tensor([sigma]), cond)
    assert v.shape == x.shape and v.abs().max() > 0.1
    torch.testing.assert_close(out, x - sigma * v, rtol=1e-5, atol=1e-5)


def test_batch_rows_with_their_own_captions_are_each_items_prediction(tiny):
    """A collated batch (Stage-1: one caption per item; Z-Image captions of different lengths) gives
    each row what the item alone gives."""
    name, family, pipe, _ = tiny
    host = DiffusersFamilyHost.from_pipeline(pipe)
    conds = [encode_caption(pipe, CAPTION), encode_caption(pipe, "a close-up photo of a smiling woman, red hair")]
    if family is ZIMAGE:
        assert conds[0].lengths != conds[1].lengths
    batch = collate_family_conds(conds)
    x, sigma = _latent(family, 2), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        together = host.predict(x, sigma, batch)
        alone = torch.cat([host.predict(x[i:i + 1], sigma[i:i + 1], conds[i]) for i in range(2)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)
    assert collate_family_conds([conds[0]] * 3) is conds[0]
    with pytest.raises(ValueError, match="mixes guidance"):
        collate_family_conds([conds[0], FamilyTextCond(conds[1].prompt_embeds, conds[1].text_ids, conds[1].lengths,
                                                       guidance=2.0)])


def test_host_refuses_inputs_that_do_not_fit(tiny):
    name, family, pipe, _ = tiny
    host = DiffusersFamilyHost(pipe.transformer)  # no VAE
    with pytest.raises(ValueError, match="has no VAE; build it with DiffusersFamilyHost.from_pipeline"):
        host.encode_images([Image.new("RGB", (64, 64))])
    cond = encode_caption(pipe, CAPTION)
    with pytest.raises(ValueError, match="guidance nan is not a finite number"):
        FamilyTextCond(cond.prompt_embeds, cond.text_ids, cond.lengths, guidance=float("nan"))
    two = collate_family_conds([cond, encode_caption(pipe, "a photo of a woman")])
    with torch.no_grad(), pytest.raises(ValueError, match="the conditioning has 2 rows for a batch of 3"):
        host.predict(_latent(family, 3), torch.full((3,), 0.5), two)
    if family is FLUX2:  # FLUX.2 pads every caption to max_sequence_length; Z-Image keeps each caption's length
        with torch.no_grad(), pytest.raises(ValueError, match="latent size 8x7 must be even"):
            host.predict(torch.randn(1, family.latent_channels, 8, 7), torch.tensor([0.5]), cond)
        with pytest.raises(ValueError, match="different token lengths"):
            collate_family_conds([cond, encode_caption(pipe, CAPTION, max_sequence_length=64)])


def _merged_float64_loss(transformer, adapters, x0, noise, sigma, cond):
    """Reference on an independent path: float64, deltas merged into the weights, no hooks."""
    ref, ad64 = merged_float64(transformer, adapters)
    c64 = FamilyTextCond(cond.prompt_embeds.double(), cond.text_ids, cond.lengths, cond.guidance)
    pred = DiffusersFamilyHost(ref).predict(add_noise(x0.double(), noise.double(), sigma.double()), sigma.double(), c64)
    return torch.mean((pred - velocity_target(x0.double(), noise.double())) ** 2), ad64


@pytest.mark.parametrize("checkpoint", [0, 1, 2])
def test_stage2_gradients_match_the_float64_reference(tiny, checkpoint):
    """Every Mid/Up gradient of one Stage-2 step (every layer of the family adapted, blocks
    checkpointed or not) within 1e-4 of float64 with the deltas merged into the weights."""
    name, family, pipe, _ = tiny
    host = DiffusersFamilyHost(pipe.transformer, checkpoint_every=checkpoint)
    prior = make_prior(host.dims, r1=4, preset="all", generator=torch.Generator().manual_seed(0))
    adapters = build_adapters(host.dims, prior, rank=2, seed=0)
    _randomize_up(adapters)
    g = torch.Generator().manual_seed(5)
    x0, noise, sigma = _latent(family, 2, 5), torch.randn(2, family.latent_channels, 8, 8, generator=g), \
        torch.tensor([0.6, 0.25])
    cond = encode_caption(pipe, CAPTION)
    with host.training(), torch.enable_grad(), host.attach(adapters):
        assert pipe.transformer.gradient_checkpointing is (checkpoint > 0)
        loss = flow_loss(host.predict(add_noise(x0, noise, sigma), sigma, cond), velocity_target(x0, noise))
        loss.backward()
    assert all(p.grad is None for p in pipe.transformer.parameters())
    assert all(p.requires_grad is False for p in pipe.transformer.parameters())  # as the pipeline left them
    assert not pipe.transformer.gradient_checkpointing
    ref_loss, ad64 = _merged_float64_loss(pipe.transformer, adapters, x0, noise, sigma, cond)
    ref_loss.backward()
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-5, atol=1e-7)
    worst = 0.0
    for (n, a), (_, r) in zip(adapters.items(), ad64.items()):
        assert a.down.grad is None, f"{n}: Down must stay frozen in Stage-2"
        for p, q in ((a.mid, r.mid), (a.up, r.up)):
            worst = max(worst, float((p.grad.double() - q.grad).norm() / q.grad.norm().clamp_min(1e-30)))
    assert worst < 1e-4, f"worst relative gradient error {worst:.2e}"


# ------------------------------------------------------------------ the CLI


def _personalize(folder: Path, out: Path, *extra: str) -> list[str]:
    return ["personalize", "--model", str(folder), "--image", str(sample_photo("obama")), "--out", str(out),
            "--steps", "2", "--resolution", "128", "--dtype", "float32", "--device", "cpu", "--caption", CAPTION,
            *extra]


def test_personalize_writes_the_family_lora_that_diffusers_loads_as_the_trained_adapters(tiny, tmp_path):
    name, family, pipe, folder = tiny
    dims = family.dims_from_diffusers_config(pipe.transformer.config)
    prior = save_prior(make_prior(dims, r1=4, preset="all", generator=torch.Generator().manual_seed(0)),
                       tmp_path / "prior.safetensors")
    lora, state = tmp_path / "lora.safetensors", tmp_path / "state.safetensors"
    assert main(_personalize(folder, lora, "--prior", str(prior), "--state", str(state), "--rank", "2",
                             "--lr", "0.02")) == 0
    tensors, meta = load_lora(lora)
    names = list(family.resolve("all", dims))
    assert set(tensors) == {f"{PREFIX}{n}.lora_{ab}.weight" for n in names for ab in "AB"}
    assert (meta["base_model"], meta["modelspec.architecture"], meta["modelspec.implementation"]) == (
        family.name, family.modelspec_architecture, family.modelspec_implementation)
    assert meta["mode"] == "meta" and meta["steps"] == "2"
    # the keys alone name the family (for inspect)
    assert model_family(list(tensors)) == {"flux2": "flux.2", "zimage": "z-image"}[name]
    info = describe_file(lora)
    assert info["family"] == model_family(list(tensors)) and info["problems"] == []

    exported = tmp_path / "exported.safetensors"  # the state exported again names the same family
    assert main(["export", str(state), "--out", str(exported)]) == 0
    again, emeta = load_lora(exported)
    assert set(again) == set(tensors) and all(torch.equal(again[k], tensors[k]) for k in tensors)
    assert (emeta["base_model"], emeta["modelspec.architecture"]) == (family.name, family.modelspec_architecture)

    # the three-layer adapters of the state, attached, against the merged LoRA loaded by diffusers
    adapters, smeta = load_adapter_state(state)
    assert smeta["base_model"] == family.name and set(adapters.names) == set(names)
    host = diffusers_host(pipe.transformer, vae=pipe.vae, pipe=pipe)
    cond = encode_caption(pipe, CAPTION)
    x, sigma = _latent(family, 2, 3), torch.tensor([0.35, 0.9])
    with torch.no_grad():
        base = host.predict(x, sigma, cond)
        with host.attach(adapters):
            three_layer = host.predict(x, sigma, cond)
    pipe.load_lora_weights(str(lora), adapter_name="metalora")
    try:
        with torch.no_grad():
            merged = host.predict(x, sigma, cond)
    finally:
        pipe.unload_lora_weights()
    assert (three_layer - base).abs().max() > 1e-3  # the trained LoRA does something
    torch.testing.assert_close(merged, three_layer, rtol=1e-5, atol=1e-5)


def test_inspect_names_the_family_from_comfyui_names_too(tiny):
    """A LoRA with ComfyUI's module names: FLUX.2 shares FLUX.1's block names, its top-level
    modulation layers alone tell it apart; Z-Image's names are its own."""
    name, family, pipe, _ = tiny
    dims = family.dims_from_diffusers_config(pipe.transformer.config)
    keys = [f"diffusion_model.{m}.lora_{ab}.weight" for m in family.comfy_modules(dims) for ab in "AB"]
    assert model_family(keys) == {"flux2": "flux.2", "zimage": "z-image"}[name]
    flux1 = FLUX1.comfy_modules(FluxDims(hidden=32, mlp_hidden=128, num_double=2, num_single=2))
    assert model_family([f"diffusion_model.{m}.lora_A.weight" for m in flux1]) == "flux"


def _identities(root: Path) -> Path:
    """Three identities of two drawn photos each (two aspect buckets); one photo has its own caption."""
    for i, colour in enumerate([(230, 190, 160), (120, 80, 50), (250, 220, 200)]):
        d = root / f"id{i}"
        d.mkdir(parents=True)
        for k in range(2):
            size = (64, 64) if k == 0 else (80, 64)
            img = Image.new("RGB", size, (40 + 50 * k, 60, 90))
            cx, cy = size[0] // 2 + 4 * k, size[1] // 2
            ImageDraw.Draw(img).ellipse([cx - 16, cy - 20, cx + 16, cy + 20], fill=colour)
            img.save(d / f"{k}.png")
    (root / "id1" / "0.txt").write_text("a close-up photo of a person with dark skin", encoding="utf-8")
    return root


def test_meta_train_writes_a_prior_of_the_family(tiny, tmp_path, capsys):
    name, family, pipe, folder = tiny
    out = tmp_path / "run"
    assert main(["meta-train", "--data", str(_identities(tmp_path / "data")), "--out", str(out), "--model", str(folder),
                 "--steps", "4", "--bucket-steps", "2", "--warmup-steps", "1", "--identities-per-bucket", "2",
                 "--batch-size", "2", "--r1", "2", "--r2", "1", "--resolution", "64", "--dtype", "float32",
                 "--device", "cpu", "--max-sequence-length", "128"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["base_model"] == family.name and summary["steps"] == 4
    prior = load_prior(out / "prior.safetensors")
    dims = family.dims_from_diffusers_config(pipe.transformer.config)
    assert prior.base_model == family.name and prior.r1 == 2
    assert list(validate_prior(prior, dims)) == list(family.resolve("all", dims))
    initial = initial_downs(MetaTrainConfig(r1=2, r2=1, seed=0), family.resolve("all", dims))
    moved = [n for n in prior.downs if not torch.equal(prior.downs[n], initial[n])]
    assert len(moved) == len(prior.downs)  # every layer's Down was trained
    capsys.readouterr()
    # the prior is one personalize takes on this family's model
    assert main(_personalize(folder, tmp_path / "lora.safetensors", "--prior", str(out / "prior.safetensors"))) == 0


# ------------------------------------------------------------------ refusals, one line each


def test_a_prior_of_another_family_is_refused_naming_both(tiny, tmp_path, capsys):
    name, family, pipe, folder = tiny
    other = FLUX2 if family is ZIMAGE else ZIMAGE
    other_dims = (FLUX2.dims_from_diffusers_config(build_tiny_flux2_pipeline(0).transformer.config) if other is FLUX2
                  else ZIMAGE.dims_from_diffusers_config(build_tiny_zimage_pipeline(0).transformer.config))
    for dims, made_for in ((FluxDims(hidden=32, mlp_hidden=128, num_double=2, num_single=2), FLUX1),
                           (other_dims, other)):
        prior = save_prior(make_prior(dims, r1=2, preset="attn", generator=torch.Generator().manual_seed(0)),
                           tmp_path / f"{made_for.name}.safetensors")
        out = tmp_path / "lora.safetensors"
        assert main(_personalize(folder, out, "--prior", str(prior))) == 2
        one_error_line(capsys.readouterr().err, f"was made for {made_for.title}", f"this model is {family.title}",
                       f"use a prior made for {family.title}")
        assert not out.exists()


def test_folders_pipelines_and_transformer_files_that_do_not_fit_are_refused(tiny, tmp_path, capsys):
    name, family, pipe, folder = tiny
    out = tmp_path / "lora.safetensors"

    def edited(tag: str, path: str, **changes) -> Path:
        copy_ = tmp_path / tag
        shutil.copytree(folder, copy_)
        data = json.loads((copy_ / path).read_text())
        data.update(changes)
        (copy_ / path).write_text(json.dumps(data))
        return copy_

    cases = [
        (edited("pipe", "model_index.json", _class_name="QwenImagePipeline"),
         ["holds a QwenImagePipeline pipeline", "which MetaLoRA does not train", "ZImagePipeline", "Flux2KleinPipeline"]),
        (edited("tcls", "transformer/config.json", _class_name="QwenImageTransformer2DModel"),
         ["names QwenImageTransformer2DModel", f"not {family.diffusers_class}"]),
        (edited("mixed", "model_index.json", _class_name="ZImagePipeline" if family is FLUX2 else "Flux2KleinPipeline"),
         ["the folder is mixed up", family.diffusers_class, family.title]),
        (edited("depth", "transformer/config.json", **{"n_layers" if family is ZIMAGE else "num_single_layers": None}),
         ["transformer/config.json lacks", "n_layers" if family is ZIMAGE else "num_single_layers", "damaged"]),
    ]
    for model, needles in cases:
        assert main(_personalize(model, out)) == 2, needles
        one_error_line(capsys.readouterr().err, *needles)
    with pytest.raises(ValueError, match="names the pipeline QwenImagePipeline, which MetaLoRA does not load"):
        load_pipeline(tmp_path / "pipe", dtype="float32", device="cpu")
    # a FLUX.1 transformer file for this family's folder
    flux1 = tmp_path / "flux1.safetensors"
    save_file({"transformer_blocks.0.attn.to_q.weight": torch.zeros(2, 2),
               "single_transformer_blocks.0.proj_mlp.weight": torch.zeros(2, 2)} if family is ZIMAGE else
              {"layers.0.attention.to_q.weight": torch.zeros(2, 2)}, str(flux1))
    assert main(_personalize(folder, out, "--transformer", str(flux1))) == 2
    one_error_line(capsys.readouterr().err, f"is not a {family.title} transformer", f"pass a {family.title} transformer")
    assert not out.exists()
    with pytest.raises(ValueError, match="DiffusersFamilyHost trains FLUX.2 and Z-Image"):
        from metalora_core.hosts.tiny import TinyFluxConfig, build_tiny_flux_pipeline

        DiffusersFamilyHost(build_tiny_flux_pipeline(0, TinyFluxConfig(num_double=1, num_single=1)).transformer)


def test_a_single_file_transformer_of_the_family_overrides_the_folders(tiny, tmp_path):
    name, family, pipe, folder = tiny
    changed = {k: v + 0.01 if k.endswith("weight") and v.ndim == 2 else v
               for k, v in pipe.transformer.state_dict().items()}
    single = tmp_path / "transformer.safetensors"
    save_file({k: v.contiguous() for k, v in changed.items()}, str(single))
    loaded = load_pipeline(folder, dtype="float32", device="cpu", transformer=single)
    assert type(loaded).__name__ == type(pipe).__name__
    got = loaded.transformer.state_dict()
    assert set(got) == set(changed) and all(torch.equal(got[k], changed[k]) for k in changed)
    out = tmp_path / "lora.safetensors"
    assert main(_personalize(folder, out, "--transformer", str(single), "--preset", "attn")) == 0
    _, meta = load_lora(out)
    assert meta["base_model"] == family.name and meta["preset"] == "attn"
