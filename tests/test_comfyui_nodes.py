"""The MetaLoRA node pack in a real ComfyUI (in-process), on tiny FLUX-format checkpoints.

Needs ``COMFYUI_PATH`` (a ComfyUI checkout whose Python environment runs these tests); skips
with a message otherwise.
"""
from __future__ import annotations

import math
import pathlib
import time

import pytest
import torch

from comfy_fixtures import (REPO, SKIP_REASON, assert_untouched, comfyui_path, model_output, new_executor,
                            output_files, pack, pack_env, random_meta_adapters, run_prompt)

if comfyui_path() is None:
    pytest.skip(f"SKIPPED: {SKIP_REASON}", allow_module_level=True)

NODE_IDS = ["MetaLoRAPriorLoader", "MetaLoRAFaceAugment", "MetaLoRATrain", "MetaLoRAApply", "MetaLoRASave"]
TRAIN_CAPTION = "a photo of a man"


def stage2_config(**kw):
    """A Stage2Config of the pack as ComfyUI imported it."""
    return pack("metalora_core.train.stage2").Stage2Config(**kw)


@pytest.fixture(scope="session")
def env(tmp_path_factory, sample):
    return pack_env(tmp_path_factory.mktemp("comfy_base"), photo=sample("obama"))


@pytest.fixture(scope="session")
def loaded(env):
    """UNET (float32), VAE, obama's crops (64 px buckets), a fixed synthetic CONDITIONING."""
    nodes = env.nodes
    model = nodes.UNETLoader().load_unet(env.names["unet"], "default")[0]
    vae = nodes.VAELoader().load_vae(env.names["vae"])[0]
    from PIL import Image

    person = pack("metalora_core.faces.person")
    crops = person.person_crops([Image.open(env.base_dir / "input" / "obama.jpg")], detector="yunet", seed=0, resolution=64)[0]
    g = torch.Generator().manual_seed(1)
    cond = [[torch.randn(1, 77, 768, generator=g) * 0.5, {"pooled_output": torch.randn(1, 768, generator=g)}]]
    return model, vae, crops, cond


def graph(env, *, prompt: str = "a man on the moon", steps: int = 3, seed: int = 0, force: bool = False,
          weight_dtype: str = "default") -> dict:
    n = env.names
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": n["unet"], "weight_dtype": weight_dtype}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": n["clip"], "type": "stable_diffusion"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": n["vae"]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": TRAIN_CAPTION, "clip": ["2", 0]}},
        "5": {"class_type": "LoadImage", "inputs": {"image": "obama.jpg"}},
        "6": {"class_type": "MetaLoRAFaceAugment",
              "inputs": {"image": ["5", 0], "detector": "yunet", "seed": 0, "bucket_resolution": 64}},
        "7": {"class_type": "MetaLoRATrain",
              "inputs": {"model": ["1", 0], "vae": ["3", 0], "crops": ["6", 0], "positive": ["4", 0],
                         "steps": steps, "rank": 1, "learning_rate": 4e-4, "seed": seed, "resolution": 64,
                         "gradient_checkpointing": True, "preview_every": 2, "force_retrain": force}},
        "8": {"class_type": "MetaLoRAApply", "inputs": {"model": ["1", 0], "meta_lora": ["7", 0], "strength": 1.0}},
        "9": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["2", 0]}},
        "10": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "11": {"class_type": "KSampler",
               "inputs": {"model": ["8", 0], "seed": 0, "steps": 2, "cfg": 1.0, "sampler_name": "euler",
                          "scheduler": "simple", "positive": ["9", 0], "negative": ["9", 0],
                          "latent_image": ["10", 0], "denoise": 1.0}},
        "12": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["3", 0]}},
        "13": {"class_type": "SaveImage", "inputs": {"images": ["12", 0], "filename_prefix": "metalora"}},
        "14": {"class_type": "MetaLoRASave",
               "inputs": {"meta_lora": ["7", 0], "subfolder": "metalora", "filename_prefix": "obama"}},
    }


def texts(result: dict, node: str) -> list[str]:
    return [d["text"] for e, d, _ in result["messages"] if e == "progress_text" and d["node_id"] == node]


def executed_nodes(result: dict) -> set[str]:
    return {d["node"] for e, d, _ in result["messages"] if e == "executing" and d.get("node")}


def cached_nodes(result: dict) -> set[str]:
    return {n for e, d, _ in result["messages"] if e == "execution_cached" for n in d["nodes"]}


# ------------------------------------------------------------------------------------------ tests


def test_pack_loads_and_nodes_are_listed(env):
    assert env.custom_nodes_loaded[str(REPO)] is True
    for node_id in NODE_IDS:
        cls = env.nodes.NODE_CLASS_MAPPINGS[node_id]
        info = cls.GET_NODE_INFO_V1()
        assert info["category"].startswith("MetaLoRA/")
        inputs = {**info["input"]["required"], **info["input"].get("optional", {})}
        for name, spec in inputs.items():
            assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
    train = env.nodes.NODE_CLASS_MAPPINGS["MetaLoRATrain"].GET_NODE_INFO_V1()["input"]
    assert set(train["required"]) == {"model", "vae", "crops", "positive", "steps", "rank", "learning_rate", "seed",
                                      "resolution", "gradient_checkpointing", "preview_every", "force_retrain"}
    assert set(train["optional"]) == {"prior", "memory", "layers"}
    assert train["optional"]["memory"][1]["default"] == "auto"
    assert train["optional"]["layers"][1]["default"] == "all" and set(train["optional"]["layers"][1]["options"]) == {
        "all", "attn_mlp", "attn"}
    assert train["required"]["steps"][1]["default"] == 375 and train["required"]["rank"][1]["default"] == 1
    assert "meta_lora" in env.folder_paths.folder_names_and_paths


@pytest.fixture(scope="module")
def executor(env):
    """One PromptExecutor kept across graph runs, as a running server keeps its output cache."""
    return new_executor()


def test_chain_reuse_and_restart(env, executor, capsys):
    t0 = time.perf_counter()
    first = run_prompt(graph(env), executor=executor)
    wall = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\n[metalora] ComfyUI chain (load image -> augment -> train 3 steps -> apply -> sample -> save) "
              f"wall time {wall:.1f}s")
    assert first["success"]
    assert any(p.suffix == ".png" and p.is_file() for p in output_files(first, env.base_dir))
    lora = pathlib.Path(env.folder_paths.get_folder_paths("loras")[0]) / "metalora" / "obama_00001.safetensors"
    assert lora.is_file()
    assert "metalora/obama_00001.safetensors" in env.folder_paths.get_filename_list("loras")
    steps = [t for t in texts(first, "7") if t.startswith("step ")]
    assert [t.split()[1] for t in steps] == ["1/3", "2/3", "3/3"] and "loss" in steps[0]
    assert any(e == "preview_image" for e, _, _ in first["messages"])
    # only the sampling prompt changes: ComfyUI's output cache must not run the train node again
    second = run_prompt(graph(env, prompt="a man in a forest"), executor=executor)
    assert "7" in cached_nodes(second) and "7" not in executed_nodes(second) and not texts(second, "7")
    assert "11" in executed_nodes(second)
    # a "restart" (fresh executor, empty output cache): the disk cache answers, no training step
    third = run_prompt(graph(env), executor=new_executor())
    assert "7" in executed_nodes(third)
    assert texts(third, "7") and texts(third, "7")[0].startswith("loaded from cache")
    assert (lora.parent / "obama_00002.safetensors").is_file()  # saved again: numbered, not overwritten


def test_trains_on_fp8_weights(env, executor):
    """FLUX loaded with fp8 weights (what fits a 24 GB card) trains: ComfyUI casts per layer."""
    result = run_prompt(graph(env, steps=2, seed=5, force=True, weight_dtype="fp8_e4m3fn"), executor=executor)
    assert result["success"]
    losses = [float(t.split("loss")[1].split()[0]) for t in texts(result, "7") if t.startswith("step ")]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)


def test_cancel_in_graph_leaves_no_file(env, executor):
    import comfy.model_management
    import comfy.utils

    loras = pathlib.Path(env.folder_paths.get_folder_paths("loras")[0])
    cache = pathlib.Path(env.folder_paths.get_folder_paths("meta_lora_cache")[0])
    before_loras, before_cache = set(loras.rglob("*")), set(cache.glob("*"))
    fired = []
    original = comfy.utils.PROGRESS_BAR_HOOK

    def hook(value, total, preview, prompt_id=None, node_id=None):
        original(value, total, preview, prompt_id=prompt_id, node_id=node_id)
        if node_id == "7" and value >= 2 and not fired:
            fired.append(value)
            comfy.model_management.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        result = run_prompt(graph(env, steps=8, seed=5, force=True), raise_on_error=False, executor=executor)
    finally:
        comfy.utils.set_progress_bar_global_hook(original)
    assert not result["success"]
    assert any(e == "execution_interrupted" for e, _ in result["status_messages"])
    assert fired and texts(result, "7")[-1].startswith(f"step {fired[0]}/8")  # stopped within one step
    assert set(loras.rglob("*")) == before_loras and set(cache.glob("*")) == before_cache
    assert comfy.model_management.in_training is False


def test_apply_matches_lora_loader_and_model_untouched(env, loaded):
    model, vae, crops, cond = loaded
    training, store = pack("nodes.training"), pack("metalora_core.formats.store")
    before = model_output(model)
    settings = training.TrainSettings(stage2_config(steps=3, lr=2e-2, seed=1), resolution=64, preview_every=0, force_retrain=True)
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        result = training.train_meta_lora(model, vae, None, crops, cond, settings)
    assert_untouched(model, before)
    applied = training.apply_meta_lora(model, result, 0.7)
    path = store.save_lora_new(result.adapters, training.lora_folder(), "equiv", "plain")
    training.refresh_lora_list()
    name = training.relative_lora_name(path)
    assert name in env.folder_paths.get_filename_list("loras")
    loader = env.nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, 0.7)[0]
    out_apply, out_loader = model_output(applied), model_output(loader)
    assert (out_apply - before).abs().max() > 1e-4, "the LoRA changed nothing; the test would be vacuous"
    torch.testing.assert_close(out_apply, out_loader, rtol=0, atol=1e-6)
    assert_untouched(model, before)


def test_cancel_direct_leaves_model_clean(env, loaded):
    import comfy.model_management
    import comfy.utils

    model, vae, crops, cond = loaded
    training = pack("nodes.training")
    before = model_output(model)
    original = comfy.utils.PROGRESS_BAR_HOOK

    def hook(value, total, preview, prompt_id=None, node_id=None):
        if value >= 2:
            comfy.model_management.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(hook)
    settings = training.TrainSettings(stage2_config(steps=6, seed=9), resolution=64, preview_every=0, force_retrain=True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException), torch.inference_mode():
            training.train_meta_lora(model, vae, None, crops, cond, settings)
    finally:
        comfy.utils.set_progress_bar_global_hook(original)
    assert_untouched(model, before)


def test_training_goes_on_through_comfyui_if_the_fast_block_copy_differs(env, loaded, monkeypatch, caplog):
    """A ComfyUI update that changes the FLUX block math must not train the wrong model: training
    goes on through ComfyUI's own model (the generic host), and says so in one line."""
    model, vae, crops, cond = loaded
    training, host_mod = pack("nodes.training"), pack("nodes.comfy_host")
    before = model_output(model)
    real = host_mod._Blocks.single

    def drifted(self, i, x, *rest):  # stands in for ComfyUI's block having changed underneath
        return real(self, i, x, *rest) * 1.01

    monkeypatch.setattr(host_mod._Blocks, "single", drifted)
    settings = training.TrainSettings(stage2_config(steps=2, seed=11), resolution=64, preview_every=0, force_retrain=True)
    with torch.inference_mode():
        result = training.train_meta_lora(model, vae, None, crops, cond, settings)
    notes = [r.getMessage() for r in caplog.records if "own model instead" in r.getMessage()]
    assert len(notes) == 1 and "FLUX single block computes differently" in notes[0], notes
    assert len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)
    assert_untouched(model, before)


def test_out_of_memory_gives_advice_and_leaves_model_clean(env, loaded, monkeypatch):
    model, vae, crops, cond = loaded
    training = pack("nodes.training")
    before = model_output(model)
    real = training.execute_stage2

    def oom(host, plan, callback):  # the allocator failing at step 1
        def fail(step, loss):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(host, plan, fail)

    monkeypatch.setattr(training, "execute_stage2", oom)
    settings = training.TrainSettings(stage2_config(steps=3, seed=12), resolution=64, preview_every=0, force_retrain=True)
    with pytest.raises(RuntimeError, match="ran out of GPU memory: set memory to low .or turn on gradient_checkpointing.;.*fp8_e4m3fn"), \
            torch.inference_mode():
        training.train_meta_lora(model, vae, None, crops, cond, settings)
    assert_untouched(model, before)


# ------------------------------------------------------------------------------ gradients


def _prior_adapters(dims, seed: int, dtype=torch.float32):
    return random_meta_adapters(pack, dims, "attn_mlp", seed).to(dtype)


def _batch():
    """Two noisy samples at two sigmas and a synthetic conditioning, the same for every gradient run."""
    g = torch.Generator().manual_seed(7)
    x0, noise = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    cond = pack("nodes.comfy_host").ComfyFluxCond(torch.randn(1, 77, 768, generator=g) * 0.5,
                                                  torch.randn(1, 768, generator=g), 1.0)
    return x0, noise, torch.tensor([0.3, 0.8]), cond


def _grads(model, *, checkpointing: bool, dtype, seed: int = 0):
    host_mod = pack("nodes.comfy_host")
    host = host_mod.ComfyFluxHost(model, checkpoint_every=int(checkpointing))
    ad = _prior_adapters(host.dims, seed, dtype)
    x0, noise, sigma, cond = _batch()
    handle = host.attach(ad)
    try:
        with host.training(), torch.enable_grad():
            s = sigma.to(dtype)[:, None, None, None]
            pred = host.predict(((1 - s) * x0.to(dtype) + s * noise.to(dtype)), sigma.to(dtype), cond)
            loss = ((pred.double() - (noise - x0).double()) ** 2).mean()
            loss.backward()
    finally:
        handle.remove()
    mids = torch.cat([a.mid.grad.double().flatten() for _, a in ad.items()])
    ups = torch.cat([a.up.grad.double().flatten() for _, a in ad.items()])
    return mids, ups, ad, host, float(loss.detach())


@pytest.fixture(scope="session")
def model64(env):
    import comfy.sd
    import comfy.utils

    sd = comfy.utils.load_torch_file(str(env.base_dir / "models" / "diffusion_models" / env.names["unet"]))
    return comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": torch.float64})


def test_out_of_place_blocks_equal_comfy_blocks(env, loaded):
    model = loaded[0]
    host_mod = pack("nodes.comfy_host")
    dm = model.model.diffusion_model
    blocks = host_mod._Blocks(dm, {}, checkpoint_every=0)
    g = torch.Generator().manual_seed(0)
    img, txt, vec = torch.randn(1, 16, 256, generator=g), torch.randn(1, 77, 256, generator=g), torch.randn(1, 256, generator=g)
    ids = torch.zeros(1, 93, 3)
    ids[0, 77:, 1] = torch.arange(16) // 4
    ids[0, 77:, 2] = torch.arange(16) % 4
    pe = dm.pe_embedder(ids)
    with torch.no_grad():
        ref_img, ref_txt = dm.double_blocks[0](img=img.clone(), txt=txt.clone(), vec=vec, pe=pe)
        out_img, out_txt = blocks.double(0, img, txt, vec, pe, None, {})
        x = torch.cat((txt, img), 1)
        ref_x = dm.single_blocks[1](x.clone(), vec=vec, pe=pe)
        out_x = blocks.single(1, x, vec, pe, None, {})
    torch.testing.assert_close(out_img, ref_img, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out_txt, ref_txt, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out_x, ref_x, rtol=1e-6, atol=1e-6)
    # the whole model through the block-replace patches (zero Up: delta exactly 0) equals ComfyUI's forward
    host = host_mod.ComfyFluxHost(model)
    cond = host_mod.ComfyFluxCond(txt.new_zeros(1, 77, 768) + 0.1, torch.ones(1, 768) * 0.1, 1.0)
    xt, sig = torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.5])
    with torch.no_grad():
        base = host.predict(xt, sig, cond)
        ad = _prior_adapters(host.dims, 0)
        for _, a in ad.items():
            a.up.zero_()
        handle = host.attach(ad)
        try:
            patched = host.predict(xt, sig, cond)
        finally:
            handle.remove()
    torch.testing.assert_close(patched, base, rtol=1e-6, atol=1e-6)


def test_gradients_match_float64_reference(env, loaded, model64, capsys):
    model = loaded[0]
    ref_mid, ref_up, ad64, host64, _ = _grads(model64, checkpointing=False, dtype=torch.float64)
    rel = {}
    for ckpt in (False, True):
        mid, up, *_ = _grads(model, checkpointing=ckpt, dtype=torch.float32)
        rel[ckpt] = (float((mid - ref_mid).norm() / ref_mid.norm()), float((up - ref_up).norm() / ref_up.norm()))
    mid64c, up64c, *_ = _grads(model64, checkpointing=True, dtype=torch.float64)
    rel64 = (float((mid64c - ref_mid).norm() / ref_mid.norm()), float((up64c - ref_up).norm() / ref_up.norm()))
    # finite differences (float64) on one Mid and one Up entry of a first-block layer
    name = "transformer_blocks.0.attn.to_q"
    fd = {}
    for which in ("mid", "up"):
        p = getattr(ad64[name], which)
        analytic = p.grad[0, 0].item()
        eps, vals = 1e-6, []
        for sign in (1, -1):
            with torch.no_grad():
                p[0, 0] += sign * eps
            vals.append(_loss64(host64, ad64))
            with torch.no_grad():
                p[0, 0] -= sign * eps
        fd[which] = (analytic, (vals[0] - vals[1]) / (2 * eps))
    with capsys.disabled():
        print(f"\n[metalora] grad rel. error vs float64 out-of-place reference: float32 ckpt off mid/up "
              f"{rel[False][0]:.2e}/{rel[False][1]:.2e}, float32 ckpt on {rel[True][0]:.2e}/{rel[True][1]:.2e}, "
              f"float64 ckpt on {rel64[0]:.2e}/{rel64[1]:.2e}; finite diff {fd}")
    for r in (*rel[False], *rel[True]):
        assert r < 1e-5
    assert max(rel64) < 1e-10
    for analytic, numeric in fd.values():
        assert abs(analytic - numeric) <= 1e-6 * max(1e-3, abs(numeric))


def _loss64(host, ad) -> float:
    x0, noise, sigma, cond = _batch()
    handle = host.attach(ad)
    try:
        with host.training(), torch.no_grad():
            s = sigma.double()[:, None, None, None]
            pred = host.predict((1 - s) * x0.double() + s * noise.double(), sigma.double(), cond)
            return float(((pred.double() - (noise - x0).double()) ** 2).mean())
    finally:
        handle.remove()


def test_layers_choose_what_a_plain_lora_trains_and_a_prior_keeps_its_own(env, loaded, tmp_path):
    model, vae, crops, cond = loaded
    node = env.nodes.NODE_CLASS_MAPPINGS["MetaLoRATrain"]
    prior_mod, layers = pack("metalora_core.formats.prior"), pack("metalora_core.lora.layers")
    dims = pack("nodes.comfy_host").flux_dims(model)

    def trained(layers_choice, prior=None):
        with torch.inference_mode():
            out = node.execute(model, vae, crops, cond, steps=1, rank=1, learning_rate=4e-4, seed=0, resolution=64,
                               gradient_checkpointing=False, preview_every=0, force_retrain=True, prior=prior,
                               layers=layers_choice)
        return set(out.result[0].adapters.names)

    for choice in ("attn", "attn_mlp", "all"):
        assert trained(choice) == set(layers.resolve_targets(choice, dims)), choice
    assert len(trained("attn")) < len(trained("attn_mlp")) < len(trained("all"))
    prior = prior_mod.load_prior(prior_mod.save_prior(
        prior_mod.make_prior(dims, r1=2, preset="attn", generator=torch.Generator().manual_seed(0)),
        tmp_path / "attn_prior.safetensors"))
    assert trained("all", prior) == set(layers.resolve_targets("attn", dims))  # the prior's layers win


def test_train_validates_the_prior_before_encoding_and_names_the_file(env, loaded, tmp_path):
    """A prior made for another FLUX width fails before any crop is VAE-encoded (vae=None here:
    any encode would be an AttributeError), and the error names the prior file."""
    model, _, crops, cond = loaded
    training, prior_mod = pack("nodes.training"), pack("metalora_core.formats.prior")
    layers = pack("metalora_core.lora.layers")
    wide = layers.FluxDims(hidden=128, mlp_hidden=512, num_double=2, num_single=2)
    path = prior_mod.save_prior(prior_mod.make_prior(wide, r1=4, preset="attn",
                                                     generator=torch.Generator().manual_seed(0)),
                                tmp_path / "wide_prior.safetensors")
    prior = prior_mod.load_prior(path)
    settings = training.TrainSettings(stage2_config(steps=2), resolution=64, preview_every=0, force_retrain=True)
    with torch.inference_mode(), pytest.raises(ValueError, match=rf"prior {path}: layer .*another model width"):
        training.train_meta_lora(model, None, prior, crops, cond, settings)


@pytest.mark.parametrize("folder", ["loras", "meta_lora_cache"])
def test_train_refuses_before_training_when_its_result_could_not_be_kept(env, loaded, tmp_path, folder):
    """The loras folder (Meta-LoRA Save) and the training cache are checked before training: a folder
    path under a regular file fails at once (vae=None: any encode would be an AttributeError, and no
    step runs), with a message naming the folder, and the caller's MODEL stays clean."""
    model, _, crops, cond = loaded
    training, fp = pack("nodes.training"), env.folder_paths
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    bad = str(blocker / folder)
    paths, exts = fp.folder_names_and_paths[folder]
    fp.folder_names_and_paths[folder] = ([bad, *paths], exts)
    settings = training.TrainSettings(stage2_config(steps=2), resolution=64, preview_every=0, force_retrain=True)
    what = "loras folder" if folder == "loras" else "training cache folder"
    try:
        with torch.inference_mode(), pytest.raises(ValueError, match=rf"{what} .*{blocker} is a file, not a folder"):
            training.train_meta_lora(model, None, None, crops, cond, settings)
    finally:
        fp.folder_names_and_paths[folder] = (paths, exts)
    assert model.patches == {}
