"""The ComfyUI FLUX host and the diffusers FLUX host compute the same model.

One tiny FLUX (ComfyUI's file layout) is loaded by ComfyUI; the same weights are moved into a
diffusers ``FluxTransformer2DModel`` through ComfyUI's own key map (``comfy.utils.flux_to_diffusers``).
With the same Meta-LoRA adapters on every Linear of the blocks (preset ``all``), both hosts must give
the same velocity and the same Mid/Up gradients: a LoRA trained in one is the LoRA of the other.
Needs ``COMFYUI_PATH``.
"""
from __future__ import annotations

import copy

import pytest
import torch

from comfy_fixtures import (REPO, SKIP_REASON, comfyui_path, load_comfy_in_process, pack, random_meta_adapters,
                            write_tiny_flux_models)

if comfyui_path() is None:
    pytest.skip(f"SKIPPED: {SKIP_REASON}", allow_module_level=True)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    from diffusers import FluxTransformer2DModel

    base = tmp_path_factory.mktemp("comfy_cross")
    names = write_tiny_flux_models(base / "models", seed=4)
    state = load_comfy_in_process(base, custom_node_paths=[REPO])
    import comfy.utils  # importable once ComfyUI is on the path
    model = state.nodes.UNETLoader().load_unet(names["unet"], "default")[0]
    comfy_sd = model.model.diffusion_model.state_dict()
    dm = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
                                attention_head_dim=128, num_attention_heads=2, joint_attention_dim=768,
                                pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56)).eval()
    key_map = comfy.utils.flux_to_diffusers(dict(model.model.model_config.unet_config), output_prefix="")
    weights = {}
    for key in dm.state_dict():
        target = key_map[key]
        if isinstance(target, str):
            weights[key] = comfy_sd[target]
        elif target[1] is None:  # a transform (final layer: scale/shift swapped, its own inverse)
            weights[key] = target[2](comfy_sd[target[0]])
        else:
            dim, offset, size = target[1]
            weights[key] = comfy_sd[target[0]].narrow(dim, offset, size)
    dm.load_state_dict({k: v.float().clone() for k, v in weights.items()}, strict=True)
    dm.requires_grad_(False)
    return pack("nodes.comfy_host").ComfyFluxHost(model), pack("metalora_core.hosts.diffusers_flux").DiffusersFluxHost(dm)


def _adapters(dims, seed: int = 0):
    return random_meta_adapters(pack, dims, "all", seed)


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x0, noise = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 16, 8, 8, generator=g)
    ctx, pooled = torch.randn(1, 77, 768, generator=g), torch.randn(1, 768, generator=g)
    return x0, noise, torch.tensor([0.7]), ctx, pooled


def _loss_and_grads(host, adapters, cond, x0, noise, sigma):
    flow = pack("metalora_core.lora.flow")
    handle = host.attach(adapters)
    try:
        with host.training(), torch.enable_grad():
            pred = host.predict(flow.add_noise(x0, noise, sigma), sigma, cond)
            loss = flow.flow_loss(pred, flow.velocity_target(x0, noise))
            loss.backward()
    finally:
        handle.remove()
    grads = {n: (a.mid.grad.clone(), a.up.grad.clone()) for n, a in adapters.items()}
    return float(loss.detach()), pred.detach(), grads


def test_comfyui_and_diffusers_hosts_agree(hosts):
    chost, dhost = hosts
    dh, ch = pack("metalora_core.hosts.diffusers_flux"), pack("nodes.comfy_host")
    assert chost.dims == dhost.dims
    x0, noise, sigma, ctx, pooled = _inputs()
    ccond, dcond = ch.ComfyFluxCond(ctx, pooled, 1.0), dh.FluxTextCond(ctx, pooled, torch.zeros(77, 3))
    with torch.no_grad():
        base_c, base_d = chost.predict(noise, sigma, ccond), dhost.predict(noise, sigma, dcond)
    torch.testing.assert_close(base_c, base_d, rtol=1e-5, atol=1e-5)

    ad = _adapters(dhost.dims)
    loss_c, pred_c, grads_c = _loss_and_grads(chost, copy.deepcopy(ad), ccond, x0, noise, sigma)
    loss_d, pred_d, grads_d = _loss_and_grads(dhost, copy.deepcopy(ad), dcond, x0, noise, sigma)
    with torch.no_grad():
        plain = dhost.predict(pack("metalora_core.lora.flow").add_noise(x0, noise, sigma), sigma, dcond)
    assert (pred_d - plain).abs().max() > 1e-3, "the adapters change the output (the comparison is not vacuous)"
    torch.testing.assert_close(pred_c, pred_d, rtol=1e-5, atol=1e-5)
    assert loss_c == pytest.approx(loss_d, rel=1e-5)
    worst = 0.0
    for name in grads_d:
        for gc, gd in zip(grads_c[name], grads_d[name]):
            worst = max(worst, float((gc - gd).norm() / gd.norm().clamp_min(1e-30)))
    assert worst < 1e-4, f"Mid/Up gradients differ between the hosts: worst relative error {worst:.2e}"
