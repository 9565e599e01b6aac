"""The generic ComfyUI host (nodes/generic_host.py) in a real ComfyUI, on a tiny FLUX.1: gradients
against float64 references, agreement with the fast FLUX host, and the Train node going on through
it when ComfyUI's FLUX block no longer matches the fast host's copy."""
from __future__ import annotations

import time

import pytest
import torch

from comfy_fixtures import (SKIP_REASON, assert_untouched, comfyui_path, model_output, pack, pack_env,
                            random_meta_adapters)

if comfyui_path() is None:
    pytest.skip(f"SKIPPED: {SKIP_REASON}", allow_module_level=True)


@pytest.fixture(scope="module")
def env(tmp_path_factory, sample):
    return pack_env(tmp_path_factory.mktemp("comfy_generic"), photo=sample("obama"))


@pytest.fixture(scope="module")
def models(env):
    import comfy.sd
    import comfy.utils

    sd = comfy.utils.load_torch_file(str(env.base_dir / "models" / "diffusion_models" / env.names["unet"]))
    return {"fp32": env.nodes.UNETLoader().load_unet(env.names["unet"], "default")[0],
            "fp64": comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": torch.float64})}


def _batch(dtype):
    """Two noisy samples at two sigmas and a synthetic conditioning, the same for every run."""
    g = torch.Generator().manual_seed(7)
    x0, noise = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    cond = pack("nodes.comfy_host").ComfyFluxCond(torch.randn(1, 77, 768, generator=g) * 0.5,
                                                  torch.randn(1, 768, generator=g), 1.0)
    sigma = torch.tensor([0.3, 0.8], dtype=dtype)
    s = sigma[:, None, None, None]
    return (1 - s) * x0.to(dtype) + s * noise.to(dtype), sigma, (noise - x0).double(), cond


def _host(kind: str, model):
    if kind == "fast":
        return pack("nodes.comfy_host").ComfyFluxHost(model)
    return pack("nodes.generic_host").ComfyGenericHost.flux(model)


def _step(host, ad, dtype, *, grad: bool = True):
    """One loss (and backward) through ``host``: (loss, Mid grads, Up grads) in float64."""
    x_t, sigma, target, cond = _batch(dtype)
    for _, a in ad.items():
        a.mid.grad = a.up.grad = None
    handle = host.attach(ad)
    try:
        with host.training(), torch.set_grad_enabled(grad):
            loss = ((host.predict(x_t, sigma, cond).double() - target) ** 2).mean()
            if grad:
                loss.backward()
    finally:
        handle.remove()
    if not grad:
        return float(loss), None, None
    mids = torch.cat([a.mid.grad.double().flatten() for _, a in ad.items()])
    ups = torch.cat([a.up.grad.double().flatten() for _, a in ad.items()])
    return float(loss.detach()), mids, ups


def _adapters(host, dtype, seed: int = 0):
    return random_meta_adapters(pack, host.dims, "all", seed).to(dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_generic_flux1_gradients_match_float64_reference(models, capsys):
    """Generic gradients against the fast host's float64 out-of-place forward (test_comfyui_nodes
    checks that reference against float64 finite differences). ComfyUI's own FLUX code rotates q
    and k in float32 (its rope tables are float32) even in a float64 model, so the generic path on
    the float64 model agrees to about float32 rounding, not to float64's."""
    ref = _host("fast", models["fp64"])
    ad64 = _adapters(ref, torch.float64)
    ref_loss, ref_mid, ref_up = _step(ref, ad64, torch.float64)
    loss64, mid64, up64 = _step(_host("generic", models["fp64"]), ad64, torch.float64)
    gen32 = _host("generic", models["fp32"])
    loss32, mid32, up32 = _step(gen32, _adapters(gen32, torch.float32), torch.float32)
    errors = {"float64 model": (_rel(mid64, ref_mid), _rel(up64, ref_up)),
              "float32 model": (_rel(mid32, ref_mid), _rel(up32, ref_up))}
    with capsys.disabled():
        print(f"\n[metalora] generic host grad rel. error (mid, up) vs float64 reference: {errors}")
    assert ref_mid.norm() > 0 and ref_up.norm() > 0
    assert abs(loss64 - ref_loss) <= 1e-7 * ref_loss and abs(loss32 - ref_loss) <= 1e-6 * ref_loss
    assert max(errors["float64 model"]) < 1e-6
    assert max(errors["float32 model"]) < 1e-5


def test_generic_and_fast_flux1_agree_on_one_step(models):
    """Same adapters, same step, float32: the two ComfyUI hosts give one loss and one gradient."""
    fast, generic = _host("fast", models["fp32"]), _host("generic", models["fp32"])
    ad = _adapters(fast, torch.float32, seed=3)
    loss_f, mid_f, up_f = _step(fast, ad, torch.float32)
    loss_g, mid_g, up_g = _step(generic, ad, torch.float32)
    assert abs(loss_g - loss_f) <= 1e-6 * loss_f
    assert _rel(mid_g, mid_f) < 1e-5 and _rel(up_g, up_f) < 1e-5
    # ComfyUI unloading the clone mid-run (which ejects the adapters) does not drop them from the forward
    x_t, sigma, _, cond = _batch(torch.float32)
    handle = generic.attach(ad)
    try:
        with generic.training(), torch.no_grad():
            adapted = generic.predict(x_t, sigma, cond)
            generic.patcher.eject_model()
            again = generic.predict(x_t, sigma, cond)
    finally:
        handle.remove()
    with torch.no_grad():
        bare = generic.predict(x_t, sigma, cond)
    assert (adapted - bare).abs().max() > 1e-3
    torch.testing.assert_close(again, adapted, rtol=0, atol=0)


def test_generic_and_fast_flux1_agree_on_fp8_weights(env, models):
    """Weights stored as float8 (Load Diffusion Model's fp8_e4m3fn), computed in float32 by ComfyUI's
    own cast: the generic host's step equals the fast host's."""
    fp8 = env.nodes.UNETLoader().load_unet(env.names["unet"], "fp8_e4m3fn")[0]
    assert fp8.model.diffusion_model.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn
    fast, generic = _host("fast", fp8), _host("generic", fp8)
    ad = _adapters(fast, torch.float32, seed=4)
    loss_f, mid_f, up_f = _step(fast, ad, torch.float32)
    loss_g, mid_g, up_g = _step(generic, ad, torch.float32)
    assert abs(loss_g - loss_f) <= 1e-6 * loss_f
    assert _rel(mid_g, mid_f) < 1e-5 and _rel(up_g, up_f) < 1e-5


def test_family_layer_table_is_the_fast_hosts_on_flux1(models):
    """The table the model family gives (what later families use) names the same ComfyUI module
    and rows for every FLUX.1 layer as the fast host's, read from ComfyUI's own key map."""
    comfy_host, generic = pack("nodes.comfy_host"), pack("nodes.generic_host")
    model = models["fp32"]
    dm = model.model.diffusion_model
    table = generic.family_layers(comfy_host.flux_dims(model))
    fast = comfy_host.canonical_to_comfy(model)
    fast = {k: (m, start, dm.get_submodule(m).out_features if size is None else size)
            for k, (m, start, size) in fast.items() if k in table}
    assert len(table) == 2 * 14 + 2 * 6 and table == fast
    host = generic.ComfyGenericHost.of_family(model, comfy_host.flux_dims(model))
    ad = _adapters(host, torch.float32, seed=5)
    torch.testing.assert_close(_step(host, ad, torch.float32)[1], _step(_host("generic", model), ad, torch.float32)[1],
                               rtol=0, atol=0)


def test_velocity_from_the_denoised_latent_where_no_wrapper_runs(models, monkeypatch):
    """A family whose diffusion model runs no ``diffusion_model`` wrapper: the velocity comes from
    ``apply_model``'s denoised latent and equals the raw output to float32 rounding."""
    import comfy.patcher_extension as ext

    host = _host("generic", models["fp32"])
    x_t, sigma, _, cond = _batch(torch.float32)
    with torch.no_grad():
        raw = host.predict(x_t, sigma, cond)
        real = ext.get_all_wrappers
        monkeypatch.setattr(ext, "get_all_wrappers", lambda kind, *a, **k: [] if kind == ext.WrappersMP.DIFFUSION_MODEL
                            else real(kind, *a, **k))
        derived = host.predict(x_t, sigma, cond)
    assert raw.abs().max() > 0.1
    torch.testing.assert_close(derived, raw, rtol=1e-5, atol=1e-5)


def test_generic_host_refuses_models_that_are_not_flow_matching(models):
    import comfy.model_base

    model = models["fp32"].clone()
    eps = comfy.model_base.model_sampling(model.model.model_config, comfy.model_base.ModelType.EPS)
    model.add_object_patch("model_sampling", eps)  # what a sampling-override node does
    with pytest.raises(ValueError, match=r"trains flow-matching models .*samples with ModelSampling"):
        _host("generic", model)
    _host("generic", models["fp32"])  # FLUX's own sampling is flow matching


# ------------------------------------------------------------------ saved tensors under in-place writes


def _residual_block(x: torch.Tensor, w: torch.Tensor, in_place: bool) -> torch.Tensor:
    """ComfyUI's block pattern: a LayerNorm reads the residual stream, then it is added to in place."""
    h = x * 2
    for _ in range(2):
        n = torch.nn.functional.layer_norm(h, h.shape[-1:]) @ w
        if in_place:
            h += torch.tanh(n)
            h[:, :1] *= 0.5
        else:
            h = h + torch.tanh(n)
            h = torch.cat((h[:, :1] * 0.5, h[:, 1:]), 1)
    return (h ** 2).sum()


def test_copy_on_write_keeps_saved_tensors_as_they_were_saved(env):
    cow = pack("nodes.generic_host").CopyOnWriteSaved
    g = torch.Generator().manual_seed(0)
    x0, w0 = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(4, 4, generator=g, dtype=torch.float64)
    grads = []
    for in_place in (False, True):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        with cow().active() if in_place else torch.enable_grad():
            loss = _residual_block(x, w, in_place)
        loss.backward()
        grads.append((x.grad, w.grad))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-12)
    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):  # what autograd alone says
        _residual_block(x, w, True).backward()


def test_copy_on_write_refuses_a_write_it_did_not_see(env):
    cow = pack("nodes.generic_host").CopyOnWriteSaved
    x = torch.randn(3, 4, requires_grad=True)
    with cow().active():
        h = x * 2
        y = (h * h).sum()  # keeps h
    with torch.no_grad():
        h.add_(1)  # after the forward, outside the mode
    with pytest.raises(RuntimeError, match="modified in place by an operation the generic ComfyUI host could not see"):
        y.backward()


# ------------------------------------------------------------------ the Train node's fallback


def _altered_single_block(monkeypatch):
    """ComfyUI's FLUX single block computing something else (as a ComfyUI update might): the same
    block with its output passed through ``out + 0.05 * tanh(out)``."""
    import comfy.ldm.flux.layers as layers

    real = layers.SingleStreamBlock.forward

    def altered(self, x, *args, **kwargs):
        out = real(self, x, *args, **kwargs)
        return out + 0.05 * torch.tanh(out)

    monkeypatch.setattr(layers.SingleStreamBlock, "forward", altered)


def _altered_fast_copy(monkeypatch):
    """The fast host's out-of-place copy of the single block altered as ``_altered_single_block``."""
    blocks = pack("nodes.comfy_host")._Blocks
    real = blocks.single

    def altered(self, *args):
        out = real(self, *args)
        return out + 0.05 * torch.tanh(out)

    monkeypatch.setattr(blocks, "single", altered)


@pytest.fixture(scope="module")
def loaded(env):
    from PIL import Image

    person = pack("metalora_core.faces.person")
    crops, _ = person.person_crops([Image.open(env.base_dir / "input" / "obama.jpg")], detector="yunet", seed=0,
                                   resolution=64)
    g = torch.Generator().manual_seed(1)
    cond = [[torch.randn(1, 77, 768, generator=g) * 0.5, {"pooled_output": torch.randn(1, 768, generator=g)}]]
    return env.nodes.VAELoader().load_vae(env.names["vae"])[0], crops, cond


def _train(model, loaded, *, steps: int, seed: int, preview_every: int = 0):
    training, stage2 = pack("nodes.training"), pack("metalora_core.train.stage2")
    vae, crops, cond = loaded
    messages = []
    settings = training.TrainSettings(stage2.Stage2Config(steps=steps, lr=2e-2, seed=seed), resolution=64,
                                      preview_every=preview_every, force_retrain=True)
    real = training.send_text
    training.send_text = lambda msg, node_id: messages.append(msg)
    try:
        with torch.inference_mode():  # as ComfyUI's executor runs nodes
            return training.train_meta_lora(model, vae, None, crops, cond, settings), messages
    finally:
        training.send_text = real


def test_altered_comfy_block_trains_on_the_generic_path(models, loaded, monkeypatch, capsys):
    model = models["fp32"]
    _altered_single_block(monkeypatch)
    before = model_output(model)
    result, messages = _train(model, loaded, steps=3, seed=5, preview_every=2)  # previews on the generic host too
    notes = [m for m in messages if "own model instead" in m]
    assert len(notes) == 1 and "FLUX single block computes differently" in notes[0], messages
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    assert any(float(a.up.detach().abs().max()) > 0 for _, a in result.adapters.items()), "nothing was trained"
    assert_untouched(model, before)
    # its gradients on the generic path against the fast host's float64 out-of-place copy, altered the same way
    gen = _host("generic", model)
    ad = _adapters(gen, torch.float32, seed=2)
    _, mid, up = _step(gen, ad, torch.float32)
    with pytest.raises(pack("nodes.comfy_host").BlockMismatch):  # the fast copy as shipped disagrees
        _host("fast", models["fp64"]).self_check(_batch(torch.float64)[3])
    _altered_fast_copy(monkeypatch)
    ref = _host("fast", models["fp64"])
    ref.self_check(_batch(torch.float64)[3])  # altered alike: the copy agrees with ComfyUI's block again
    _, ref_mid, ref_up = _step(ref, ad.to(torch.float64), torch.float64)
    errors = (_rel(mid, ref_mid), _rel(up, ref_up))
    with capsys.disabled():
        print(f"\n[metalora] altered FLUX single block, generic host grad rel. error (mid, up) vs float64 "
              f"reference: {errors}")
    assert max(errors) < 1e-5


def test_unaltered_flux1_trains_on_the_fast_path(models, loaded):
    result, messages = _train(models["fp32"], loaded, steps=1, seed=6)
    assert not [m for m in messages if "own model instead" in m], messages
    assert len(result.losses) == 1


# ------------------------------------------------------------------ bench figure (printed, not asserted)


def test_bench_generic_vs_fast_seconds_per_step(models, capsys):
    """Seconds per step of both hosts on the same adapters and batch (printed, not asserted), and
    the same loss from both on every timed step."""
    times, losses = {}, {}
    for kind in ("fast", "generic"):
        host = _host(kind, models["fp32"])
        ad = _adapters(host, torch.float32)
        _step(host, ad, torch.float32)  # warm-up
        t0 = time.perf_counter()
        losses[kind] = [_step(host, ad, torch.float32)[0] for _ in range(5)]
        times[kind] = (time.perf_counter() - t0) / 5
    with capsys.disabled():
        print(f"\n[metalora] tiny FLUX.1 on CPU, one step (batch 2, 8x8 latents, 'all' layers): fast "
              f"{times['fast']:.3f} s, generic {times['generic']:.3f} s, "
              f"generic/fast {times['generic'] / times['fast']:.2f}x")
    torch.testing.assert_close(torch.tensor(losses["generic"]), torch.tensor(losses["fast"]), rtol=1e-6, atol=0)
