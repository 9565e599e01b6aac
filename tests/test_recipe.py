"""The one Stage-2 recipe: cache key over the whole config, provenance, hosts, crops at a resolution."""
from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

from metalora_core.cli import main
from metalora_core.faces.person import person_crops
from metalora_core.formats.files import read_safetensors
from metalora_core.formats.lora import load_adapter_state, load_lora
from metalora_core.formats.prior import load_prior, make_prior, save_prior, validate_prior
from metalora_core.formats.store import image_digest, store_cached_adapters, weights_identity
from metalora_core.hosts.diffusers_flux import DiffusersFluxHost, encode_prompt
from metalora_core.hosts.tiny import TINY_T5_LEN, build_tiny_flux_pipeline
from metalora_core.lora.layers import FluxDims
from metalora_core.train import host as host_protocol
from metalora_core.train.recipe import (RESULT_NEUTRAL, Provenance, plan_stage2, resolve_preset, run_stage2,
                                        stage2_key)
from metalora_core.train.stage2 import Stage2Config

# another valid value for every Stage2Config field
CHANGED = {"steps": 7, "lr": 1e-3, "weight_decay": 0.01, "rank": 2, "seed": 1, "sigma_mode": "uniform",
           "resolution_shift": True, "max_grad_norm": 0.5, "batch_size": 2, "preset": "attn", "noise_device": "cpu", "sync_every": 1}


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_flux_pipeline(seed=0)


@pytest.fixture(scope="module")
def crops(sample):
    return person_crops([sample("obama")], detector="yunet", resolution=64, seed=0)[0]


def _key(config: Stage2Config, **parts) -> str:
    base = dict(model_id="m", images_sha256="i", prior_sha256="p", cond_sha256="c")
    base.update(parts)
    return stage2_key(config, **base)


def test_cache_key_covers_every_result_setting_and_input():
    assert set(CHANGED) == {f.name for f in dataclasses.fields(Stage2Config)}, "add the new field to CHANGED"
    base = Stage2Config()
    keys = {_key(base)}
    for name, value in CHANGED.items():
        assert getattr(base, name) != value
        key = _key(dataclasses.replace(base, **{name: value}))
        assert (key == _key(base)) == (name in RESULT_NEUTRAL), name  # only the neutral ones share the key
        keys.add(key)
    for part in ("model_id", "images_sha256", "prior_sha256", "cond_sha256"):
        keys.add(_key(base, **{part: "other"}))
    keys.add(_key(base, flips=False))
    assert len(keys) == 1 + len(CHANGED) - len(RESULT_NEUTRAL) + 5, "a setting or input does not reach the cache key"
    assert RESULT_NEUTRAL == ("sync_every",)


def test_prior_preset_wins_over_the_setting(pipe, crops):
    host = DiffusersFluxHost.from_pipeline(pipe)
    cond = encode_prompt(pipe, "a photo of a man", max_sequence_length=TINY_T5_LEN)
    prior = make_prior(host.dims, r1=2, preset="attn", generator=torch.Generator().manual_seed(0))
    assert resolve_preset(prior, Stage2Config(preset="all")) == "attn"
    assert resolve_preset(None, Stage2Config(preset="all")) == "all"
    # with a prior the plain-LoRA setting does not change the result, so it does not split the cache
    p1, p2 = (plan_stage2(host, crops, cond, prior, Stage2Config(preset=s)).provenance for s in ("all", "attn_mlp"))
    assert p1 == p2 and p1.preset == p1.config.preset == "attn" and p1.cache_key == p2.cache_key


def test_diffusers_host_implements_flow_host(pipe):
    host = DiffusersFluxHost.from_pipeline(pipe)
    members = [n for n in vars(host_protocol.FlowHost) if not n.startswith("_")] + ["dims"]
    for name in members:
        assert hasattr(host, name), f"DiffusersFluxHost lacks FlowHost.{name}"
    latents = host.encode_images([pipe.image_processor.postprocess(torch.zeros(1, 3, 32, 48), "pil")[0]])
    assert latents[0].shape == (16, 4, 6) and latents[0].dtype == torch.float32
    with pytest.raises(ValueError, match="has no VAE"):
        DiffusersFluxHost(pipe.transformer).encode_images([])


def test_guidance_travels_in_the_conditioning(pipe):
    host = DiffusersFluxHost.from_pipeline(pipe)
    c1 = encode_prompt(pipe, "a photo of a man", max_sequence_length=TINY_T5_LEN)
    c35 = encode_prompt(pipe, "a photo of a man", max_sequence_length=TINY_T5_LEN, guidance=3.5)
    assert c1.guidance == 1.0 and c35.guidance == 3.5 and c1.digest() != c35.digest()
    g = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(1, 16, 4, 4, generator=g), torch.tensor([0.5])
    with torch.no_grad():
        assert not torch.equal(host.predict(x, sigma, c1), host.predict(x, sigma, c35))
    both = host.collate([c35, dataclasses.replace(c35, prompt_embeds=c35.prompt_embeds + 1)])
    assert both.guidance == 3.5 and both.prompt_embeds.shape[0] == 2
    with pytest.raises(ValueError, match="mixes guidance"):
        host.collate([c1, c35])


def test_model_identity_follows_the_weights(pipe):
    host = DiffusersFluxHost.from_pipeline(pipe)
    ident = host.identity()
    assert host.identity() == ident
    state = dict(pipe.transformer.state_dict())
    last = sorted(state)[-1]
    changed = dict(state, **{last: state[last] + 1})
    assert weights_identity(state) != weights_identity(changed)
    assert weights_identity(state, extra="x") != weights_identity(state)


def test_run_stage2_provenance(pipe, crops):
    host = DiffusersFluxHost.from_pipeline(pipe)
    cond = encode_prompt(pipe, "a photo of a man", max_sequence_length=TINY_T5_LEN, guidance=2.0)
    config = Stage2Config(steps=2, rank=2, seed=3, preset="attn")
    run = run_stage2(host, crops, cond, None, config, caption="a photo of a man")
    p = run.provenance
    assert len(run.losses) == 2 and run.adapters.rank == 2 and run.adapters.preset == "attn"
    assert p.config == config and (p.preset, p.mode) == ("attn", "lora")
    assert p.images_sha256 == image_digest(crops.images) and p.images == len(crops.images)
    assert p.cond_sha256 == cond.digest() and p.guidance == 2.0 and p.prior_sha256 == ""
    assert (p.detector, p.augmentation, p.resolution, p.caption) == ("yunet", "paper_grid", 64, "a photo of a man")
    assert p.model_id == host.identity()
    assert p.cache_key == stage2_key(config, model_id=p.model_id, images_sha256=p.images_sha256,
                                     prior_sha256="", cond_sha256=p.cond_sha256, flips=True)
    assert plan_stage2(host, crops, cond, None, config, caption="a photo of a man").provenance == p
    meta = run.metadata
    config_keys = {f.name for f in dataclasses.fields(Stage2Config)} - {"preset"}
    assert set(meta) == {f.name for f in dataclasses.fields(Provenance)} - {"config"} | config_keys
    assert Provenance.from_metadata(meta) == p


def test_provenance_from_incomplete_metadata_is_refused(pipe, crops):
    host = DiffusersFluxHost.from_pipeline(pipe)
    cond = encode_prompt(pipe, "a photo of a man", max_sequence_length=TINY_T5_LEN)
    meta = plan_stage2(host, crops, cond, None, Stage2Config(steps=1)).provenance.to_metadata()
    with pytest.raises(ValueError, match="no provenance key 'images_sha256'"):
        Provenance.from_metadata({k: v for k, v in meta.items() if k != "images_sha256"})
    with pytest.raises(ValueError, match="'resolution_shift' has value 'maybe'"):
        Provenance.from_metadata({**meta, "resolution_shift": "maybe"})


def test_cache_entry_refuses_a_different_key(tmp_path, pipe):
    from metalora_core.train.recipe import build_adapters

    ad = build_adapters(FluxDims.from_diffusers_config(pipe.transformer.config), None, rank=1, preset="attn")
    with pytest.raises(ValueError, match="differs from the entry's key"):
        store_cached_adapters(tmp_path, "a" * 64, ad, cache_key="b" * 64)
    path = store_cached_adapters(tmp_path, "a" * 64, ad, cache_key="a" * 64, seed="1")
    assert read_safetensors(path)[1]["cache_key"] == "a" * 64


def test_crops_at_another_resolution_are_cut_from_the_photo(sample, crops):
    assert crops.at_resolution(64) is crops and crops.resolution == 64
    again = crops.at_resolution(96)
    direct = person_crops([sample("obama")], detector="yunet", resolution=96, seed=0)[0]
    assert again.resolution == 96 and len(again.crops) == len(direct.crops)
    assert [c.box for c in again.crops] == [c.box for c in direct.crops]
    assert [c.flipped for c in again.crops] == [c.flipped for c in direct.crops]
    assert image_digest(again.images) == image_digest(direct.images)  # one resize from the photo, not two
    assert image_digest(again.images) != image_digest([c.image.resize(d.size) for c, d in zip(crops.crops, direct.crops)])


def test_cli_personalize_and_export_write_the_same_provenance(tmp_path, sample, pipe, monkeypatch):
    from metalora_core.train import recipe

    fits = []  # the prior is checked against the model once per run: the CLI's early check hands its fit on
    monkeypatch.setattr(recipe, "validate_prior", lambda *a, **k: fits.append(a) or validate_prior(*a, **k))
    model_dir = tmp_path / "flux"
    pipe.save_pretrained(str(model_dir))
    dims = FluxDims.from_diffusers_config(pipe.transformer.config)
    prior_path = save_prior(make_prior(dims, r1=4, preset="attn", generator=torch.Generator().manual_seed(0)),
                            tmp_path / "prior.safetensors")
    lora, state, exported = (tmp_path / "out" / n for n in ("lora.safetensors", "state.safetensors", "x.safetensors"))
    assert main(["personalize", "--model", str(model_dir), "--prior", str(prior_path), "--image", str(sample("obama")),
                 "--out", str(lora), "--state", str(state), "--steps", "2", "--resolution", "64", "--seed", "4",
                 "--rank", "2", "--dtype", "float32", "--device", "cpu", "--caption", "a photo of a man",
                 "--guidance", "1.5", "--detector", "yunet"]) == 0
    assert len(fits) == 1
    assert main(["export", str(state), "--out", str(exported)]) == 0
    _, m_lora = load_lora(lora)
    _, m_state = load_adapter_state(state)
    _, m_export = load_lora(exported)
    p = Provenance.from_metadata(m_lora)
    assert Provenance.from_metadata(m_state) == p == Provenance.from_metadata(m_export)
    made = person_crops([sample("obama")], detector="yunet", resolution=64, seed=4)[0]
    assert p.images_sha256 == image_digest(made.images)  # the training pixels, not the file bytes
    assert p.prior_sha256 == load_prior(prior_path).sha256 and p.mode == "meta" and p.preset == "attn"
    assert (p.config.steps, p.config.seed, p.config.rank, p.guidance, p.caption) == (2, 4, 2, 1.5, "a photo of a man")
    # an adapter state without provenance (older version) is refused with the fix
    from metalora_core.formats.lora import save_adapter_state

    adapters, _ = load_adapter_state(state)
    old = save_adapter_state(adapters, tmp_path / "old.safetensors", steps="2")
    assert main(["export", str(old), "--out", str(tmp_path / "y.safetensors")]) == 2


def test_a_prior_fitted_to_other_dims_is_fitted_again_and_a_misfit_fails_before_encoding(pipe, crops, monkeypatch):
    from metalora_core.train import recipe

    host = DiffusersFluxHost.from_pipeline(pipe)
    cond = encode_prompt(pipe, "a photo of a man", max_sequence_length=TINY_T5_LEN)
    prior = make_prior(host.dims, r1=2, preset="attn", generator=torch.Generator().manual_seed(0))
    fitted = recipe.fit_prior(prior, host.dims)
    fits = []
    monkeypatch.setattr(recipe, "validate_prior", lambda *a, **k: fits.append(a[1]) or validate_prior(*a, **k))
    assert plan_stage2(host, crops, cond, fitted, Stage2Config(steps=1)).shapes == fitted.shapes and fits == []
    other = FluxDims(hidden=host.dims.hidden, mlp_hidden=host.dims.mlp_hidden, num_double=host.dims.num_double + 1,
                     num_single=host.dims.num_single)
    plan = plan_stage2(host, crops, cond, recipe.FittedPrior(prior, other, {}), Stage2Config(steps=1))
    assert fits == [host.dims] and plan.shapes == fitted.shapes  # a fit for another model: fitted again to this one
    wide = make_prior(dataclasses.replace(host.dims, hidden=2 * host.dims.hidden), r1=2, preset="attn",
                      generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(host, "encode_images", lambda images: pytest.fail("encoded before the prior was checked"))
    with pytest.raises(ValueError, match="^my prior"):
        run_stage2(host, crops, cond, wide, Stage2Config(steps=1), prior_source="my prior")


def test_photos_as_they_are_train_unflipped_and_grid_crops_flipped(pipe, sample):
    from metalora_core.train.recipe import prepare_stage2

    host = DiffusersFluxHost.from_pipeline(pipe)
    cond = encode_prompt(pipe, "a photo of a man", max_sequence_length=TINY_T5_LEN)
    whole, _ = person_crops([sample("obama")], detector="yunet", resolution=64, seed=0, grid=False)
    grid, _ = person_crops([sample("obama")], detector="yunet", resolution=64, seed=0)
    plans = [plan_stage2(host, c, cond, None, Stage2Config(steps=1)) for c in (whole, grid)]
    assert [p.flips for p in plans] == [False, True] and not any(c.flipped for c in whole.crops)
    (_, single), (_, pairs) = (prepare_stage2(host, p) for p in plans)
    assert all(isinstance(z, torch.Tensor) for z in single) and all(isinstance(z, tuple) for z in pairs)
    # the same pixels trained without flips are another result
    unflipped = plan_stage2(host, whole.images, cond, None, Stage2Config(steps=1)).provenance.cache_key
    assert plans[0].provenance.cache_key != unflipped and plans[0].provenance.images_sha256 == image_digest(whole.images)


def test_a_result_without_provenance_has_no_metadata(pipe):
    from metalora_core.train.stage2 import TrainResult

    with pytest.raises(ValueError, match="has no provenance; train it with train.recipe.run_stage2"):
        TrainResult(adapters=None).metadata


def test_provenance_of_a_prior_files_own_layers_reads_back(pipe, crops):
    host = DiffusersFluxHost.from_pipeline(pipe)
    cond = encode_prompt(pipe, "a photo of a man", max_sequence_length=TINY_T5_LEN)
    prior = make_prior(host.dims, r1=2, preset="attn", generator=torch.Generator().manual_seed(0))
    own = dataclasses.replace(prior, preset=None)  # layers of the file, no preset name
    p = plan_stage2(host, crops, cond, own, Stage2Config(preset="attn_mlp", steps=1)).provenance
    assert p.preset == "" and p.to_metadata()["preset"] == "" and Provenance.from_metadata(p.to_metadata()) == p
    with pytest.raises(ValueError, match="provenance settings do not make a Stage-2 config: steps must be >= 1"):
        Provenance.from_metadata({**p.to_metadata(), "steps": "0"})


def _noise_images(n: int, size: int = 32):
    from PIL import Image

    g = torch.Generator().manual_seed(11)
    return [Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).byte().numpy()) for _ in range(n)]


def test_stage2_recipe_trains_with_the_pipeline_encoders_off_the_device(pipe, monkeypatch):
    """run_stage2 on a pipeline's host: every step runs inside ``encoders_off_device(pipe, host.device)``,
    left afterwards, also when the run raises. (The move itself: the tests below; on a CPU host the
    context moves nothing, so here its entry and exit are what is observed.)"""
    from metalora_core.hosts import diffusers_flux

    real = diffusers_flux.encoders_off_device
    calls, active = [], []

    @contextlib.contextmanager
    def spy(p, device):
        calls.append((p, device))
        active.append(True)
        try:
            with real(p, device):
                yield
        finally:
            active.pop()

    monkeypatch.setattr(diffusers_flux, "encoders_off_device", spy)
    host = DiffusersFluxHost.from_pipeline(pipe)
    cond = encode_prompt(pipe, "a photo of a man", max_sequence_length=TINY_T5_LEN)
    seen = []

    def callback(step, loss):
        seen.append(bool(active))

    run_stage2(host, _noise_images(2), cond, None, Stage2Config(steps=2, preset="attn"), callback)
    assert seen == [True, True] and not active
    assert calls == [(pipe, host.device)]

    def cancel(step, loss):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stage2(host, _noise_images(2), cond, None, Stage2Config(steps=2, preset="attn"), cancel)
    assert not active and len(calls) == 2
    # a host without a pipeline keeps its own VAE off the device the same way
    with DiffusersFluxHost(pipe.transformer, vae=pipe.vae).training():
        assert calls[-1][0].vae is pipe.vae and active


class _Placed(torch.nn.Module):
    """A module that changes device without data (``to_empty``): meta has none to copy."""

    def __init__(self, device: str) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.empty(3, 4, device=device))

    def to(self, device):  # noqa: D102 - the move encoders_off_device asks for
        return self.to_empty(device=device)


def test_encoders_off_device_moves_the_encoders_to_the_cpu_and_back():
    """The VAE and both text encoders on the training device ('meta' here, the CPU being the only real
    device) are on the CPU inside, back afterwards, also after an exception; modules elsewhere and the
    transformer stay where they are."""
    import types

    from metalora_core.hosts.diffusers_flux import encoders_off_device

    pipe = types.SimpleNamespace(vae=_Placed("meta"), text_encoder=_Placed("meta"), text_encoder_2=_Placed("cpu"),
                                 transformer=_Placed("meta"))

    def where():
        return {n: m.w.device.type for n, m in vars(pipe).items()}

    before = {"vae": "meta", "text_encoder": "meta", "text_encoder_2": "cpu", "transformer": "meta"}
    assert where() == before
    with encoders_off_device(pipe, torch.device("meta")):
        assert where() == {"vae": "cpu", "text_encoder": "cpu", "text_encoder_2": "cpu", "transformer": "meta"}
    assert where() == before
    with pytest.raises(RuntimeError, match="stop"):
        with encoders_off_device(pipe, torch.device("meta")):
            assert where()["vae"] == "cpu"
            raise RuntimeError("stop")
    assert where() == before
    with encoders_off_device(types.SimpleNamespace(vae=None), torch.device("meta")):
        pass  # a host without a VAE: nothing to move
    with encoders_off_device(pipe, torch.device("cpu")):
        assert where() == before  # training on the CPU: nothing to gain
