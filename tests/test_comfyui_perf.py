"""ComfyUI host memory and checkpointing: partial checkpointing against the float64 reference,
bytes saved for backward, float8 weights through backward, fused factors once per step."""
from __future__ import annotations

import contextlib

import pytest
import torch

from comfy_fixtures import REPO, SKIP_REASON, comfyui_path, pack, pack_env, random_meta_adapters

if comfyui_path() is None:
    pytest.skip(f"SKIPPED: {SKIP_REASON}", allow_module_level=True)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return pack_env(tmp_path_factory.mktemp("comfy_perf"))


@pytest.fixture(scope="module")
def models(env):
    import comfy.sd
    import comfy.utils

    load = env.nodes.UNETLoader().load_unet
    sd = comfy.utils.load_torch_file(str(env.base_dir / "models" / "diffusion_models" / env.names["unet"]))
    return {"fp32": load(env.names["unet"], "default")[0], "fp8": load(env.names["unet"], "fp8_e4m3fn")[0],
            "fp64": comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": torch.float64})}


def _batch(dtype, batch: int = 2):
    g = torch.Generator().manual_seed(7)
    x0, noise = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    cond = pack("nodes.comfy_host").ComfyFluxCond(torch.randn(1, 77, 768, generator=g) * 0.5,
                                                  torch.randn(1, 768, generator=g), 1.0)
    s = torch.tensor([0.3, 0.8])
    return x0[:batch], noise[:batch], s[:batch], cond


def _step(model, *, adapters=True, checkpoint_every=None, dtype=torch.float32, fp8_recast=True, seed=0,
          preset="attn_mlp", batch: int = 2):
    """One step through the ComfyUI host: (Mid/Up grads, saved bytes, ops by name)."""
    profile = pack("metalora_core.train.profile")
    host_mod = pack("nodes.comfy_host")
    host = host_mod.ComfyFluxHost(model, checkpoint_every=checkpoint_every or 0)
    ad = random_meta_adapters(pack, host.dims, preset, seed).to(dtype)
    if not adapters:
        for _, a in ad.items():
            a.up.data.zero_()
    x0, noise, sigma, cond = _batch(dtype, batch)
    handle = host.attach(ad)
    host._blocks.fp8_recast = fp8_recast
    try:
        with host.training(), torch.enable_grad():
            exclude = list(host.patcher.model.diffusion_model.parameters()) + list(ad.parameters())
            saved, ops = profile.SavedTensors(exclude), profile.OpCounter()
            s = sigma.to(dtype)[:, None, None, None]
            xt = (1 - s) * x0.to(dtype) + s * noise.to(dtype)
            with ops:
                with saved:
                    pred = host.predict(xt, sigma.to(dtype), cond)
                    loss = ((pred.double() - (noise - x0).double()) ** 2).mean()
                loss.backward()
    finally:
        handle.remove()
    grads = torch.cat([p.grad.double().flatten() for p in ad.trainable_parameters()])
    return grads, saved.nbytes, ops.by_op


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_every_kth_block_checkpointing_matches_float64_reference(models):
    ref, *_ = _step(models["fp64"], dtype=torch.float64)
    sizes = {}
    for k in (None, 2, 1):
        grads, sizes[k], _ = _step(models["fp32"], checkpoint_every=k)
        assert _rel(grads, ref) < 1e-5, k
    assert sizes[None] > sizes[2] > sizes[1], sizes


def test_adapters_keep_no_input_copy_and_fused_factors_are_built_once_per_step(models):
    _, bare, _ = _step(models["fp32"], adapters=False)
    # zero Up still trains (Mid/Up need grads): the bytes are those of a real Stage-2 step
    _, meta, ops_off = _step(models["fp32"])
    assert meta / bare < 1.15, (meta, bare)  # the float32 input per adapted Linear measured 1.5x here
    _, _, ops_ckpt = _step(models["fp32"], checkpoint_every=1)
    # qkv (double blocks) and linear1 (single blocks) fuse several adapters: their block-diagonal
    # Mid is built once per step, not again when checkpointing recomputes the blocks
    fused = 2 * 2 + 2  # tiny FLUX: 2 double blocks x (img, txt) qkv + 2 single blocks' linear1
    assert ops_off["block_diag"] == fused
    assert ops_ckpt["block_diag"] == fused


@pytest.mark.parametrize("batch", [2, 1])
def test_trained_modulation_matches_float64_and_keeps_no_normalised_copy(models, monkeypatch, batch):
    """Preset "all" trains the modulation Linears: no modulated LayerNorm keeps its normalised
    input and, with one sample's modulation, no double block the gated sum before its MLP, and
    with PyTorch's attention (ComfyUI's on a GPU) no double block its attention projections'
    outputs; with the float64 reference's gradients."""
    import comfy.ldm.flux.math as flux_math
    from comfy.ldm.modules.attention import attention_pytorch

    monkeypatch.setattr(flux_math, "optimized_attention", attention_pytorch)  # ComfyUI's own blocks too
    ref, *_ = _step(models["fp64"], dtype=torch.float64, preset="all", batch=batch)
    grads, fused, _ = _step(models["fp32"], preset="all", batch=batch)
    assert _rel(grads, ref) < 1e-5
    # recompute too
    assert _rel(_step(models["fp32"], preset="all", checkpoint_every=2, batch=batch)[0], ref) < 1e-5
    host_mod = pack("nodes.comfy_host")

    def plain_norm(norm, x, shift, scale):
        return torch.addcmul(shift, norm(x), 1 + scale)

    def plain_gated_norm(norm, residual, gate, out, shift, scale, again=None):
        y = residual + gate * out  # keeps out for the gate's gradient
        return y, plain_norm(norm, y, shift, scale)

    monkeypatch.setattr(host_mod, "modulated_norm", plain_norm)
    monkeypatch.setattr(host_mod, "gated_modulated_norm", plain_gated_norm)
    plain_grads, plain, _ = _step(models["fp32"], preset="all", batch=batch)
    torch.testing.assert_close(grads, plain_grads, rtol=1e-5, atol=1e-8)  # float32 rounding apart
    # the normalised copies plain autograd keeps where the norm's input needs a gradient (and
    # LayerNorm keeps that input anyway): 2 per stream in a double block but 1 in the first (its
    # inputs need none: there plain and fused keep one activation each), 1 per single block; and
    # one sample: per stream in a double block the gated sum before the MLP's LayerNorm, which
    # the fused blocks recompute from the residual and the attention output; and per stream in a
    # double block the attention output projection's output, which the fused blocks compute again
    # from the attention kernel's output (PyTorch's attention keeps that for its backward)
    dm = models["fp32"].model.diffusion_model
    x0, _, _, cond = _batch(torch.float32, batch)
    img, txt = (x0.shape[2] // 2) * (x0.shape[3] // 2), cond.context.shape[1]
    per_token = x0.shape[0] * dm.hidden_size * 4
    double, single = len(dm.double_blocks), len(dm.single_blocks)
    copies = (2 * double - 1 + single + (double if batch == 1 else 0) + double) * (img + txt)
    # one sample's first LayerNorms (inputs needing no gradient) are LayerNorms with a weight: they
    # keep their per-token statistics and the weight, where the plain ops keep only the normalised x
    first = (2 * (img + txt) + 2 * dm.hidden_size) * 4 if batch == 1 else 0
    assert plain - fused == copies * per_token - first, (plain, fused)


def test_projections_are_computed_again_only_from_an_attention_output_its_kernel_keeps(models, monkeypatch):
    """ComfyUI's CPU attention computes in chunks and keeps nothing of its output: there the
    attention projections' outputs stay kept (computing them again would keep as much). With
    PyTorch's attention each double block computes both again in backward, with the forward's
    bits (the step's factors, the forward's ops)."""
    import comfy.ldm.flux.math as flux_math
    from comfy.ldm.modules.attention import attention_pytorch

    blocks_cls = pack("nodes.comfy_host")._Blocks
    real = blocks_cls._linear_again
    calls = []

    def spy(self, name, module, x):
        y = real(self, name, module, x)
        with torch.enable_grad():  # what the forward computed, with its ops
            forward = self._linear(name, module, x.detach().requires_grad_(True))
        calls.append((name, torch.equal(y, forward.detach())))
        return y

    monkeypatch.setattr(blocks_cls, "_linear_again", spy)
    double = len(models["fp32"].model.diffusion_model.double_blocks)
    for attention, again in ((flux_math.optimized_attention, 0), (attention_pytorch, 2 * double)):
        calls.clear()
        with monkeypatch.context() as m:
            m.setattr(flux_math, "optimized_attention", attention)
            _step(models["fp32"], preset="all", batch=1)
        assert len(calls) == again, (attention.__name__, calls)
        assert all(same for _, same in calls), calls
    assert {n.rsplit(".", 1)[0].split(".", 2)[-1] for n, _ in calls} == {"img_attn", "txt_attn"}


def _kernels(model, preset: str, *, adapters_on: bool) -> int:
    """Ops that compute in one step (the second: the first builds what a run keeps), with the
    adapters or, for the bare step, the same out-of-place blocks with them off and x needing grad."""
    profile = pack("metalora_core.train.profile")
    host = pack("nodes.comfy_host").ComfyFluxHost(model)
    ad = random_meta_adapters(pack, host.dims, preset, 0)
    x0, noise, sigma, cond = _batch(torch.float32)
    xt = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
    handle = host.attach(ad)
    host._blocks.adapters_on = adapters_on
    try:
        with host.training(), torch.enable_grad():
            ops = profile.OpCounter()
            for counted in (False, True):
                x = xt.clone().requires_grad_(not adapters_on)
                with ops if counted else contextlib.nullcontext():
                    ((host.predict(x, sigma, cond) - (noise - x0)) ** 2).mean().backward()
                for p in ad.parameters():
                    p.grad = None
    finally:
        handle.remove()
    assert host.patcher is None and (not adapters_on or ops.by_op["addmm"] > 0)
    return ops.kernels


def test_adapted_step_issues_few_kernels_more_than_the_bare_step(models):
    """One addmm per adapted module, its factors once per step (measured on this 2+2-block model:
    1.18x attn_mlp, 1.32x every layer); with matmuls and casts per adapter and call 1.43x and 1.60x."""
    bare = _kernels(models["fp32"], "attn_mlp", adapters_on=False)
    assert _kernels(models["fp32"], "attn_mlp", adapters_on=True) <= 1.25 * bare
    assert _kernels(models["fp32"], "all", adapters_on=True) <= 1.4 * bare


def test_fp8_weights_stay_fp8_through_backward(models):
    ref, ref_saved, _ = _step(models["fp8"], fp8_recast=False)  # ComfyUI's own cast in F.linear
    grads, saved, _ = _step(models["fp8"])
    torch.testing.assert_close(grads, ref, rtol=1e-6, atol=0)
    assert saved < 0.8 * ref_saved, (saved, ref_saved)  # no compute-dtype copy of the weights kept
    _, fp32_saved, _ = _step(models["fp32"])
    assert saved <= 1.01 * fp32_saved, (saved, fp32_saved)


def test_memory_choice_plans_checkpointing(env):
    training = pack("nodes.training")
    plan = training.checkpoint_plan
    dims = pack("metalora_core.lora.families").FluxDims()  # FLUX.1: width 3072, 19 + 38 blocks
    flux = dict(tokens=1536, element_size=2)
    gib = 1024**3
    assert plan("fast", dims, **flux, free_bytes=1 * gib) == 0
    assert plan("low", dims, **flux, free_bytes=200 * gib) == 1
    # the node's old switch is the "low" choice
    assert training.memory_choice("fast", True) == "low" and training.memory_choice("fast", False) == "fast"
    assert plan("auto", dims, **flux, free_bytes=None) == 0  # CPU: nothing to plan for
    assert plan("auto", dims, **flux, free_bytes=40 * gib) == 0  # ~10 GiB of activations fit
    k = plan("auto", dims, **flux, free_bytes=12 * gib)
    assert 1 < k < 57  # some blocks recomputed, not all
    assert plan("auto", dims, **flux, free_bytes=12 * gib // 2) < k  # less room: denser
    assert plan("auto", dims, **flux, free_bytes=1) == 1
    zimage = pack("metalora_core.lora.families").ZImageDims()  # no measured activation widths: every block
    assert plan("auto", zimage, **flux, free_bytes=40 * gib) == 1
    with pytest.raises(ValueError, match="memory must be one of .*got 'medium'"):
        plan("medium", dims, **flux, free_bytes=None)


def test_checkpoint_every_must_be_an_int_from_zero(models):
    with pytest.raises(ValueError, match="checkpoint_every must be an int >= 0 .*got -1"):
        pack("nodes.comfy_host").ComfyFluxHost(models["fp32"], checkpoint_every=-1)


@pytest.mark.parametrize("preset", ["attn_mlp", "all"])
def test_adapted_step_kernels_within_a_quarter_of_comfyuis_at_flux_depth(preset):
    """The GPU benchmark's kernel count on the ComfyUI host at FLUX.1-dev's depth (19 double + 38
    single blocks; counts do not depend on the width), bf16, no checkpointing, PyTorch attention (what
    ComfyUI runs on an NVIDIA GPU), over the bare step's (the same blocks with the adapters off:
    ComfyUI's own ops). Preset "all" meets it with one silu(vec) and one modulation Down projection
    per step, the gated residuals' 3-op backward and one sample's modulated LayerNorm as one
    LayerNorm (measured 1.158x; attn_mlp 1.095x); with its double blocks' attention projections
    computed again in backward for the gates, 1.183x."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, COMFYUI_PATH=str(comfyui_path()), OMP_NUM_THREADS="1")

    def bench(*shape: str, checkpoints: str = "off") -> list[dict]:
        out = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_stage2.py"), "--tiny", *shape, "--hosts", "comfy",
                              "--weights", "bf16", "--compile", "off", "--checkpoints", checkpoints, "--repeats", "0",
                              "--warmup", "0", "--preset", preset, "--comfy-compute", "bf16"],  # as on a GPU
                             capture_output=True, text=True, env=env, timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
        return [json.loads(x) for x in out.stdout.splitlines()[2:]]

    runs = bench("--depth", "19", "--single-depth", "38", checkpoints="off,all")
    rows = {r["mode"]: r for r in runs if r["checkpoint"] == "off"}
    meta = rows["metalora"]
    assert meta["blocks"] == 57 and "error" not in meta, meta
    assert meta["kernels_ratio_to_bare"] <= 1.25, (meta["kernels"], rows["bare"]["kernels"])
    # the Train node's memory "auto" plans with elements kept per token, block and unit of width: at
    # least what this step keeps (computed in bf16, 256 wide), without checkpointing and with every
    # block checkpointed
    widths = dict(zip(("off", "all"), pack("metalora_core.lora.families").FLUX1.activation_widths))
    for r in runs:
        if r["mode"] == "metalora":
            assert r["compute_dtype"] == "bfloat16", r
            per_unit = r["saved_bytes"] / (57 * (r["image_tokens"] + r["text_tokens"]) * 256 * 2)
            limit = widths[r["checkpoint"]]
            assert per_unit <= limit, (r["checkpoint"], per_unit, limit)
    # the composed figures (what FLUX width is measured with) equal the whole depth's on this host too
    composed = {r["mode"]: r for r in bench("--compose", "19,38") if "composed" in r}
    for mode in ("bare", "metalora"):
        assert (composed[mode]["kernels"], composed[mode]["saved_bytes"]) == (rows[mode]["kernels"],
                                                                              rows[mode]["saved_bytes"]), mode
