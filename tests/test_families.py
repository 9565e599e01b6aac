"""Model families: every canonical layer of every preset is an nn.Linear of the stated shape in a
tiny real diffusers model of that family; dims are read back from the model's config; name tables
map ComfyUI/BFL and kohya names onto canonical ones."""
from __future__ import annotations

import pytest
import torch

from metalora_core.lora.families import (
    FAMILIES,
    FLUX1,
    FLUX2,
    PRESET_NAMES,
    ZIMAGE,
    Flux2Dims,
    FluxDims,
    ZImageDims,
    family_named,
    family_of_diffusers_config,
    shared_input_groups,
)


def _flux1():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))


def _flux2():
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4))


def _zimage():
    from diffusers import ZImageTransformer2DModel

    return ZImageTransformer2DModel(in_channels=16, dim=64, n_layers=2, n_refiner_layers=1, n_heads=4, n_kv_heads=2,
                                    cap_feat_dim=32, axes_dims=[4, 6, 6], axes_lens=[64, 32, 32])


MODELS = {"flux.1-dev": _flux1, "flux.2": _flux2, "z-image": _zimage}
EXPECTED_DIMS = {
    "flux.1-dev": FluxDims(hidden=32, mlp_hidden=128, num_double=2, num_single=2),
    "flux.2": Flux2Dims(hidden=32, mlp_hidden=96, num_double=2, num_single=2),
    "z-image": ZImageDims(hidden=64, ffn_hidden=170, kv=64, adaln_in=64, num_layers=2, num_refiner=1),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def family_model(request):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MODELS[request.param]()
    return FAMILIES[request.param], model


def test_every_preset_layer_is_a_linear_of_the_stated_shape(family_model):
    family, model = family_model
    assert family_of_diffusers_config(model.config) is family
    dims = family.dims_from_diffusers_config(model.config)
    assert dims == EXPECTED_DIMS[family.name] and dims.family is family
    modules = dict(model.named_modules())
    linears = {n for n, m in modules.items() if isinstance(m, torch.nn.Linear)}
    sizes = {}
    for preset in PRESET_NAMES:
        shapes = family.resolve(preset, dims)
        sizes[preset] = len(shapes)
        for name, (fin, fout) in shapes.items():
            m = modules.get(name)
            assert isinstance(m, torch.nn.Linear), f"{family.name}: {name} is {type(m).__name__}"
            assert (m.in_features, m.out_features) == (fin, fout), name
        # model order: sorted by the family's order key, the names stay where resolve put them
        assert sorted(shapes, key=family.order) == list(shapes)
    assert sizes["attn"] < sizes["attn_mlp"] < sizes["all"]
    # "all" is every Linear inside the blocks (plus FLUX.2's shared modulation): no block Linear left out
    block_prefixes = tuple(g.prefix + "." for g in family.groups if g.prefix)
    in_blocks = {n for n in linears if n.startswith(block_prefixes)}
    assert in_blocks <= set(family.resolve("all", dims)), sorted(in_blocks - set(family.resolve("all", dims)))


def test_canonical_and_kohya_names_resolve_to_themselves(family_model):
    family, model = family_model
    dims = family.dims_from_diffusers_config(model.config)
    for name in family.resolve("all", dims):
        assert family.canonical(name) == (name,)
        assert family.kohya_canonical("lora_transformer_" + name.replace(".", "_")) == (name,)
    assert family.canonical("proj_out") == () and family.canonical("nope.0.attn.to_q") == ()


def test_comfy_names_cover_every_layer_once(family_model):
    family, model = family_model
    dims = family.dims_from_diffusers_config(model.config)
    comfy = family.comfy_modules(dims)
    covered = [n for names in comfy.values() for n in names]
    assert sorted(covered) == sorted(family.resolve("all", dims))
    for module, names in comfy.items():
        assert family.canonical(module) == names
        assert family.kohya_canonical("lora_unet_" + module.replace(".", "_")) == names


def test_fused_comfy_modules_are_the_concatenated_canonical_layers():
    d1 = FluxDims(hidden=32, mlp_hidden=128, num_double=1, num_single=1)
    assert FLUX1.canonical("single_blocks.0.linear1") == tuple(
        f"single_transformer_blocks.0.{s}" for s in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"))
    assert FLUX1.canonical("double_blocks.0.img_attn.qkv") == tuple(
        f"transformer_blocks.0.attn.{s}" for s in ("to_q", "to_k", "to_v"))
    shapes = FLUX1.resolve("all", d1)
    assert sum(shapes[n][1] for n in FLUX1.canonical("single_blocks.0.linear1")) == 3 * 32 + 128
    d2 = Flux2Dims(hidden=32, mlp_hidden=96, num_double=1, num_single=1)
    assert FLUX2.canonical("double_stream_modulation_img.lin") == ("double_stream_modulation_img.linear",)
    assert FLUX2.resolve("all", d2)["single_transformer_blocks.0.attn.to_qkv_mlp_proj"] == (32, 3 * 32 + 2 * 96)
    assert ZIMAGE.canonical("context_refiner.0.attention.qkv") == tuple(
        f"context_refiner.0.attention.{s}" for s in ("to_q", "to_k", "to_v"))
    assert ZIMAGE.canonical("context_refiner.0.adaLN_modulation.0") == ()  # the context refiner has none


def test_flux1_constants():
    assert FluxDims() == FluxDims(hidden=3072, mlp_hidden=12288, num_double=19, num_single=38)
    assert len(FLUX1.resolve("all", FluxDims())) == 494 and len(FLUX1.resolve("attn_mlp", FluxDims())) == 418
    assert FLUX1.pixels_per_token == 16 and FLUX1.image_tokens(64, 64) == 1024
    assert FLUX1.shift_for(32, 32) == pytest.approx(1.6487212707001282)  # exp(0.5) at 256 tokens
    with pytest.raises(ValueError, match="Z-Image has no resolution-shift rule"):
        ZIMAGE.shift_for(64, 64)
    assert family_named("FLUX.1-dev") is FLUX1 and family_named("z-image") is ZIMAGE
    assert family_named("tiny-flux") is None


def test_dims_are_checked_and_typed():
    with pytest.raises(ValueError, match="FluxDims.hidden must be positive, got 0"):
        FluxDims(hidden=0)
    with pytest.raises(ValueError, match="ZImageDims.num_layers must be >= 0, got -1"):
        ZImageDims(num_layers=-1)
    with pytest.raises(ValueError, match="FluxDims are not FLUX.2 dims"):
        FLUX2.resolve("all", FluxDims(hidden=32, mlp_hidden=128, num_double=1, num_single=1))
    with pytest.raises(ValueError, match="unknown target preset 'qkv'"):
        FLUX1.resolve("qkv", FluxDims())
    with pytest.raises(ValueError, match="transformer class 'SD3Transformer2DModel' is not a supported model"):
        family_of_diffusers_config({"_class_name": "SD3Transformer2DModel"})


def test_shared_input_groups_per_family():
    names = list(FLUX1.resolve("all", FluxDims(hidden=32, mlp_hidden=128, num_double=1, num_single=1)))
    groups = shared_input_groups(names, FLUX1)
    assert ("single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k",
            "single_transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.proj_mlp") in groups
    assert shared_input_groups(names) == groups  # the union of every family's table agrees on FLUX.1
    z = list(ZIMAGE.resolve("all", ZImageDims(num_layers=1, num_refiner=0)))
    assert shared_input_groups(z, ZIMAGE) == [("layers.0.attention.to_q", "layers.0.attention.to_k",
                                               "layers.0.attention.to_v"),
                                              ("layers.0.feed_forward.w1", "layers.0.feed_forward.w3")]


def test_a_prior_of_another_family_is_refused_naming_both(tmp_path):
    from metalora_core.formats.prior import load_prior, make_prior, save_prior, validate_prior

    d2 = Flux2Dims(hidden=32, mlp_hidden=96, num_double=1, num_single=1)
    prior = make_prior(d2, r1=2, preset="all", generator=torch.Generator().manual_seed(0))
    assert prior.base_model == "flux.2"
    path = save_prior(prior, tmp_path / "flux2.safetensors")
    loaded = load_prior(path)
    assert validate_prior(loaded, d2) == FLUX2.resolve("all", d2)
    with pytest.raises(ValueError, match=r"flux2.safetensors was made for FLUX.2 \(base_model 'flux.2'\), "
                                         r"this model is FLUX.1-dev; use a prior made for FLUX.1-dev"):
        validate_prior(loaded, FluxDims(hidden=32, mlp_hidden=128, num_double=1, num_single=1))


def test_a_comfyui_named_zimage_lora_reads_as_a_zimage_prior(tmp_path):
    from safetensors.torch import save_file

    from metalora_core.formats.prior import load_prior, validate_prior

    dims = ZImageDims(hidden=64, ffn_hidden=170, kv=64, adaln_in=64, num_layers=1, num_refiner=1)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for module, names in ZIMAGE.comfy_modules(dims).items():
        fin = ZIMAGE.resolve("all", dims)[names[0]][0]
        tensors[f"diffusion_model.{module}.lora_A.weight"] = torch.randn(2, fin, generator=g)
        tensors[f"diffusion_model.{module}.lora_B.weight"] = torch.zeros(8, 2)
    save_file(tensors, tmp_path / "z.safetensors")
    prior = load_prior(tmp_path / "z.safetensors")
    assert prior.base_model == "z-image" and prior.source == "peft"
    assert list(validate_prior(prior, dims)) == list(ZIMAGE.resolve("all", dims))
    qkv = tensors["diffusion_model.layers.0.attention.qkv.lora_A.weight"]
    assert torch.equal(prior.downs["layers.0.attention.to_k"], qkv)  # a fused module's Down serves each part
    with pytest.raises(ValueError, match=r"z.safetensors was made for Z-Image \(base_model 'z-image'\), this model "
                                         r"is FLUX.1-dev; use a prior made for FLUX.1-dev"):
        validate_prior(prior, FluxDims(hidden=64, mlp_hidden=256, num_double=1, num_single=1))


def test_the_family_module_imports_without_torch():
    """The bottom layer: torch-free code (the CLI's --help, Stage-1's config) reads presets from it."""
    import subprocess
    import sys

    code = ("import sys, metalora_core.lora.families, metalora_core.lora.layers, metalora_core.train.stage1.config; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-500:]
