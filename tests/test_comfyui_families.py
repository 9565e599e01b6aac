"""Model families against ComfyUI's own models: every ComfyUI name of a family's table is a Linear
of ComfyUI's FLUX.1, FLUX.2 and Z-Image modules (tiny configs, ComfyUI's own classes), the widths of
its canonical parts add up to it, the dims read from ComfyUI's state dict are the model's, and
ComfyUI's own diffusers key maps (``comfy.utils.flux_to_diffusers`` / ``z_image_to_diffusers``)
put every canonical layer in the same module at the same row offset. Needs ``COMFYUI_PATH``.
"""
from __future__ import annotations

import pytest
import torch

from comfy_fixtures import REPO, SKIP_REASON, comfyui_path, load_comfy_in_process, pack

if comfyui_path() is None:
    pytest.skip(f"SKIPPED: {SKIP_REASON}", allow_module_level=True)


@pytest.fixture(scope="module")
def comfy_models(tmp_path_factory):
    load_comfy_in_process(tmp_path_factory.mktemp("comfy_families"), custom_node_paths=[REPO])
    import comfy.ops
    import comfy.utils
    from comfy.ldm.flux.model import Flux
    from comfy.ldm.lumina.model import NextDiT

    ops = comfy.ops.disable_weight_init
    flux1 = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32,
                 hidden_size=32, mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=3, axes_dim=[4, 6, 6],
                 theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True, txt_ids_dims=[])
    # what comfy/model_detection.py sets for a FLUX.2 state dict, at tiny widths
    flux2 = dict(image_model="flux2", in_channels=16, out_channels=16, vec_in_dim=None, context_in_dim=32,
                 hidden_size=32, mlp_ratio=3.0, num_heads=2, depth=2, depth_single_blocks=3, axes_dim=[4, 4, 4, 4],
                 theta=2000, patch_size=1, qkv_bias=False, guidance_embed=True, global_modulation=True,
                 mlp_silu_act=True, ops_bias=False, txt_ids_dims=[3])
    # what it sets for Z-Image (dim 3840 there), at tiny widths; as many kv heads as heads, as Z-Image has
    # (z_image_to_diffusers slices q, k and v at the full width)
    zimage = dict(patch_size=2, in_channels=16, dim=64, n_layers=2, n_refiner_layers=1, n_heads=4, n_kv_heads=4,
                  multiple_of=16, ffn_dim_multiplier=8.0 / 3.0, qk_norm=True, cap_feat_dim=32, axes_dims=[4, 6, 6],
                  axes_lens=[64, 32, 32], rope_theta=256.0, z_image_modulation=True, time_scale=1000.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return {
            "flux.1-dev": (Flux(**flux1, operations=ops), comfy.utils.flux_to_diffusers(flux1)),
            "flux.2": (Flux(**flux2, operations=ops), comfy.utils.flux_to_diffusers(flux2)),
            "z-image": (NextDiT(**zimage, operations=ops), comfy.utils.z_image_to_diffusers(zimage)),
        }


@pytest.mark.parametrize("name", ["flux.1-dev", "flux.2", "z-image"])
def test_comfy_names_resolve_in_comfyui_models(comfy_models, name):
    families = pack("metalora_core.lora.families")
    family = families.FAMILIES[name]
    model, key_map = comfy_models[name]
    dims = family.dims_from_comfy_state_dict(model.state_dict())
    expected = {"flux.1-dev": families.FluxDims(hidden=32, mlp_hidden=128, num_double=2, num_single=3),
                "flux.2": families.Flux2Dims(hidden=32, mlp_hidden=96, num_double=2, num_single=3),
                "z-image": families.ZImageDims(hidden=64, ffn_hidden=176, kv=64, adaln_in=64, num_layers=2,
                                               num_refiner=1)}[name]
    assert dims == expected
    shapes = family.resolve("all", dims)
    modules = dict(model.named_modules())
    comfy = family.comfy_modules(dims)
    assert sorted(n for names in comfy.values() for n in names) == sorted(shapes)
    missing: list[str] = []
    for module, names in comfy.items():
        m = modules.get(module)
        assert isinstance(m, torch.nn.Linear), f"{name}: {module} is {type(m).__name__}"
        assert m.in_features == shapes[names[0]][0], module
        assert m.out_features == sum(shapes[n][1] for n in names), module
        start = 0
        for n in names:  # ComfyUI's own map: the same module, the same rows
            target = key_map.get(f"{n}.weight")
            if target is None:
                missing.append(n)
                continue
            if isinstance(target, str):
                assert (target, len(names)) == (f"{module}.weight", 1), n
            else:
                assert target[0] == f"{module}.weight", (n, target)
                assert target[1][:2] == (0, start), (n, target)  # (dim, first row)
            start += shapes[n][1]
    # ComfyUI 0.33's diffusers map has no entry for FLUX.2's shared modulation: a diffusers-named LoRA
    # key of these layers would not load there (the ComfyUI names, diffusion_model.<module>, do)
    assert missing == ([g[0] for g in family.comfy_names[2].values()] if name == "flux.2" else [])
