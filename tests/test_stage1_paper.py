"""Stage-1 and Stage-2 set to what the paper says: bucket size from photos, per-step flips,
the default target layers, no hidden global RNG, imports that point one way."""
from __future__ import annotations

import argparse
import ast
import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image, ImageDraw, ImageOps

from metalora_core.data.identities import DatasetConfig, prepare_dataset, vae_fingerprint
from metalora_core.data.latents import MetaTrainData, encode_flip_pairs, pick_orientation
from metalora_core.faces import resize_to_bucket
from metalora_core.hosts.diffusers_flux import DiffusersFluxHost, encode_images, encode_prompt
from metalora_core.hosts.tiny import TINY_T5_LEN, build_tiny_flux_pipeline
from metalora_core.lora.layers import DEFAULT_PRESET, FluxDims, resolve_targets
from metalora_core.train.recipe import build_adapters
from metalora_core.train.stage1 import (
    MetaTrainConfig,
    MetaTrainer,
    load_checkpoint,
    make_buckets,
    meta_train,
    plan_buckets,
    schedule_at,
)
from metalora_core.train.stage2 import Stage2Config, personalize

CORE = Path(__file__).resolve().parents[1] / "metalora_core"


def _person(k: int, size=(64, 64)) -> Image.Image:
    """A left-right asymmetric picture (a mirrored copy differs from it)."""
    img = Image.new("RGB", size, (30 + 40 * k, 70, 110))
    d = ImageDraw.Draw(img)
    w, h = size
    d.ellipse([w // 4, h // 4, w // 4 + 26, h // 4 + 34], fill=(230, 190, 160 - 20 * k))
    d.rectangle([w - 14, 4, w - 4, h - 4], fill=(250, 250, 20))  # a bar on the right only
    return img


@pytest.fixture(scope="module")
def tiny():
    pipe = build_tiny_flux_pipeline(0)
    cond = encode_prompt(pipe, "a photo of a person", max_sequence_length=TINY_T5_LEN)
    return SimpleNamespace(pipe=pipe, host=DiffusersFluxHost.from_pipeline(pipe), cond=cond,
                           encode=lambda ims: encode_images(pipe.vae, ims))


# --- bucket size counts photos --------------------------------------------------------------


def test_paper_setting_gives_50_identities_per_bucket_21_buckets_1000_trained():
    """1,050 identities x 20 photos, batch 4, q_bucket 2,500, q_total 50,000 (paper Sec. 3, appendix A)."""
    config = MetaTrainConfig()  # the paper's defaults
    plan = plan_buckets(config, [20] * 1050)
    assert plan.identities_per_bucket == 50  # 2,500 x 4 / (10 x 20): each photo used 10 times per visit
    assert plan.buckets == 21 and plan.visits == 20
    assert plan.identities_visited == 1000 and plan.identities == 1050
    # the same count from the schedule itself: the buckets that q_total's steps fall into
    buckets = make_buckets(1050, plan.identities_per_bucket, config.seed)
    visited = {schedule_at(s, config, len(buckets)).bucket for s in range(0, config.steps, config.bucket_steps)}
    assert len(buckets) == 21 and sum(len(buckets[b]) for b in visited) == 1000
    assert plan.steps_to_visit_all == 21 * 2500


def test_crops_of_one_photo_count_once():
    """16 crops per photo must not shrink N 16-fold (the crop grid is Stage-2's augmentation)."""
    z = torch.zeros(4, 2, 2)
    n_ids, photos, crops = 3, 20, 16
    ident = [k for k in range(n_ids) for _ in range(photos * crops)]
    photo = [k * photos + p for k in range(n_ids) for p in range(photos) for _ in range(crops)]
    data = MetaTrainData(identities=["a", "b", "c"], latents=[z] * len(ident), item_identity=ident,
                         item_caption=["c"] * len(ident), conds={"c": None}, item_photo=photo)
    assert data.photos_per_identity() == [20, 20, 20]
    one_per_item = MetaTrainData(identities=["a"], latents=[z] * 5, item_identity=[0] * 5, item_caption=["c"] * 5,
                                 conds={"c": None})
    assert one_per_item.photos_per_identity() == [5]


def test_trainer_sizes_buckets_from_photos_and_warns_when_few_identities_are_trained(tiny, caplog):
    z = [(torch.randn(16, 8, 8, generator=torch.Generator().manual_seed(i)),) * 2 for i in range(24)]
    # 4 identities x 2 photos x 3 crops; auto N: 6 steps x batch 1 / (3 uses x 2 photos) = 1 identity per bucket
    ident = [i // 6 for i in range(24)]
    photo = [i // 3 for i in range(24)]
    data = MetaTrainData(identities=list("abcd"), latents=z, item_identity=ident, item_caption=["c"] * 24,
                         conds={"c": tiny.cond}, item_photo=photo)
    config = MetaTrainConfig(steps=6, bucket_steps=6, warmup_steps=2, batch_size=1, uses_per_example=3, r1=2,
                             preset="attn")
    with caplog.at_level(logging.INFO, logger="metalora_core.train.stage1"):
        trainer = MetaTrainer(tiny.host, data, config)
    assert trainer.plan.identities_per_bucket == 1
    assert len(trainer.buckets) == 4 and trainer.plan.identities_visited == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("visit only 1 of 4 identities" in r.getMessage() and "24" in r.getMessage() for r in warnings)
    assert any("1 of 4 identities trained" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="metalora_core.train.stage1"):
        MetaTrainer(tiny.host, data, MetaTrainConfig(steps=24, bucket_steps=6, warmup_steps=2, batch_size=1,
                                                     uses_per_example=3, r1=2, preset="attn"))
    assert not caplog.records  # every identity is visited: no warning
    # photos, not crops: with batch 6 the photo count gives N = 2, the crop count would give 1
    big = MetaTrainer(tiny.host, data, MetaTrainConfig(steps=12, bucket_steps=6, warmup_steps=2, batch_size=6,
                                                       uses_per_example=9, r1=2, preset="attn"))
    assert big.plan.identities_per_bucket == 2  # round(6 x 6 / (9 x 2 photos)); from 6 crops: round(0.67) = 1


# --- flips per step -------------------------------------------------------------------------


def test_mirrored_latent_is_the_encoding_of_the_mirrored_image(tiny):
    images = [_person(0), _person(1, (96, 64))]
    pairs = encode_flip_pairs(tiny.encode, images)
    assert len(pairs) == 2
    for (plain, mirrored), im in zip(pairs, images):
        assert plain.shape == mirrored.shape
        torch.testing.assert_close(mirrored, tiny.encode([ImageOps.mirror(im)])[0], rtol=0, atol=0)
        assert not torch.allclose(mirrored, torch.flip(plain, dims=[-1]), atol=1e-3)  # a VAE is not flip-equivariant
    g = torch.Generator().manual_seed(0)
    drawn = [pick_orientation(pairs[0], g)[1] for _ in range(200)]
    assert 60 < sum(drawn) < 140  # both orientations, about half each
    assert pick_orientation(pairs[0][0], g) == (pairs[0][0], False)  # a single latent: as it is


def _stage2_losses(tiny, latents, seed=0):
    adapters = build_adapters(tiny.host.dims, None, rank=1, preset="attn", seed=seed)
    return personalize(tiny.host, adapters, latents, tiny.cond, Stage2Config(steps=8, seed=seed)).losses


def test_stage2_draws_one_orientation_per_step(tiny):
    (a, b), (c, d) = encode_flip_pairs(tiny.encode, [_person(0), _person(2)])
    both = _stage2_losses(tiny, [(a, b), (c, d)])
    assert both == _stage2_losses(tiny, [(a, b), (c, d)])  # seeded: exactly repeatable
    # the same random draws with one orientation only: a run that never (or always) flips differs
    assert both != _stage2_losses(tiny, [(a, a), (c, c)])
    assert both != _stage2_losses(tiny, [(b, b), (d, d)])
    assert both != _stage2_losses(tiny, [(a, b), (c, d)], seed=1)


def test_pipeline_stage2_trains_on_both_orientations(tiny):
    """The one Stage-2 recipe (``run_stage2``: CLI, demo, Train node) hands Stage-2 (plain, mirrored) pairs."""
    from metalora_core.train.recipe import run_stage2

    images = [_person(0), _person(1)]
    config = Stage2Config(steps=6, seed=3, preset="attn")
    got = run_stage2(tiny.host, images, tiny.cond, None, config).losses
    adapters = build_adapters(tiny.host.dims, None, rank=1, preset="attn", seed=3)
    want = personalize(tiny.host, adapters, encode_flip_pairs(tiny.encode, images), tiny.cond, config).losses
    assert got == want


def test_stage1_draws_one_orientation_per_step(tiny):
    pairs = encode_flip_pairs(tiny.encode, [_person(k) for k in range(4)])

    def run(items):
        seen = []
        data = MetaTrainData(identities=["a", "b"], latents=items, item_identity=[0, 0, 1, 1],
                             item_caption=["c"] * 4, conds={"c": tiny.cond})
        config = MetaTrainConfig(steps=8, bucket_steps=4, warmup_steps=1, identities_per_bucket=1, batch_size=2,
                                 r1=2, preset="attn")
        return meta_train(tiny.host, data, config, callback=seen.append).losses, seen

    losses, seen = run(pairs)
    mirrored = [m for s in seen for m in s.mirrored]
    assert len(mirrored) == 16 and any(mirrored) and not all(mirrored)
    assert losses == run(pairs)[0]
    assert losses != run([(p, p) for p, _ in pairs])[0]
    assert losses != run([(m, m) for _, m in pairs])[0]


def test_stage1_dataset_caches_both_orientations(tiny, tmp_path):
    root = tmp_path / "data"
    for name, k in (("ann", 0), ("bob", 1)):
        (root / name).mkdir(parents=True)
        _person(k).save(root / name / "0.png")
        _person(k + 2, (96, 72)).save(root / name / "1.png")

    def load(config):
        return prepare_dataset(root, encode=tiny.encode, encoder_id=vae_fingerprint(tiny.pipe.vae),
                               encode_caption=lambda c: tiny.cond, config=config, cache_dir=tmp_path / "cache")

    data = load(DatasetConfig(bucket_area=64 * 64))
    assert data.summary["modes"] == {"resize": 4} and data.summary["items"] == 4  # each photo once, no grid
    assert all(isinstance(z, tuple) for z in data.latents)
    photo = resize_to_bucket(Image.open(root / "bob" / "1.png"), 64 * 64)
    plain, mirrored = data.latents[3]
    torch.testing.assert_close(plain, tiny.encode([photo])[0], rtol=0, atol=0)
    torch.testing.assert_close(mirrored, tiny.encode([ImageOps.mirror(photo)])[0], rtol=0, atol=0)
    again = load(DatasetConfig(bucket_area=64 * 64))
    assert again.summary["cache_hits"] == 4 and all(map(torch.equal, again.latents[3], data.latents[3]))
    single = load(DatasetConfig(bucket_area=64 * 64, flip=False))
    assert single.summary["cache_misses"] == 4 and all(isinstance(z, torch.Tensor) for z in single.latents)


def test_bad_pairs_and_photo_indices_are_refused():
    z = torch.zeros(4, 2, 2)
    with pytest.raises(ValueError, match="latent pair 0 must be"):
        MetaTrainData(identities=["a"], latents=[(z, torch.zeros(4, 2, 4))], item_identity=[0], item_caption=["c"],
                      conds={"c": None}).validate()
    with pytest.raises(ValueError, match="1 latents but 2 photo indices"):
        MetaTrainData(identities=["a"], latents=[z], item_identity=[0], item_caption=["c"], conds={"c": None},
                      item_photo=[0, 1]).validate()


def test_state_dict_mid_epoch_resumes_the_same_data_order(tiny):
    """A state taken mid-epoch (items of the bucket still queued) continues exactly as one run."""
    pairs = encode_flip_pairs(tiny.encode, [_person(k) for k in range(6)])
    data = MetaTrainData(identities=["a", "b"], latents=pairs, item_identity=[0, 0, 0, 1, 1, 1],
                         item_caption=["c"] * 6, conds={"c": tiny.cond})

    def config(steps):
        return MetaTrainConfig(steps=steps, bucket_steps=6, warmup_steps=1, identities_per_bucket=2, batch_size=2,
                               r1=2, preset="attn")

    ref = MetaTrainer(tiny.host, data, config(5)).run()
    first = MetaTrainer(tiny.host, data, config(1))
    first.run()
    state = first.state_dict()
    assert len(state["queue"]) == 4 and state["queue_visit"] == 0  # 2 of the epoch's 6 items used
    second = MetaTrainer(tiny.host, data, config(5))
    second.load_state_dict(state)
    got = second.run()
    assert got.resumed_from == 1 and got.losses == ref.losses
    assert all(torch.equal(got.downs[n], ref.downs[n]) for n in ref.downs)


def test_resume_on_another_model_is_refused(tiny, tmp_path):
    from metalora_core.hosts.tiny import TinyFluxConfig

    data = MetaTrainData(identities=["a"], latents=[torch.randn(16, 8, 8, generator=torch.Generator().manual_seed(0))],
                         item_identity=[0], item_caption=["c"], conds={"c": tiny.cond})
    config = MetaTrainConfig(steps=2, bucket_steps=2, warmup_steps=1, batch_size=1, r1=2, preset="attn")
    ck = tmp_path / "ck.safetensors"
    meta_train(tiny.host, data, MetaTrainConfig(**{**config.to_dict(), "steps": 1}), checkpoint_path=ck)
    other = build_tiny_flux_pipeline(0, TinyFluxConfig(num_double=1))
    with pytest.raises(ValueError, match="other adapter layers than this model's"):
        meta_train(DiffusersFluxHost(other.transformer), data, config, checkpoint_path=ck, resume=True)


# --- target layers --------------------------------------------------------------------------


def test_default_preset_is_every_block_linear_as_ai_toolkit_trains():
    assert DEFAULT_PRESET == "all"
    assert MetaTrainConfig().preset == "all"
    flux = FluxDims()  # FLUX.1-dev: 19 double + 38 single blocks
    assert len(resolve_targets("all", flux)) == 494 and len(resolve_targets("attn_mlp", flux)) == 418
    mods = [n for n in resolve_targets("all", flux) if n.endswith(("norm1.linear", "norm1_context.linear", "norm.linear"))]
    assert len(mods) == 19 * 2 + 38  # the modulation layers are included
    from metalora_core.cli import build_parser

    args = build_parser().parse_args(["personalize", "--model", "m", "--image", "x.jpg", "--out", "o"])
    assert args.preset is None  # resolved to DEFAULT_PRESET when the command runs


# --- the command line -----------------------------------------------------------------------


def test_meta_train_command_uses_each_photo_once_by_default(sample, tmp_path):
    from metalora_core.cli import meta_train as metatrain_commands

    data = tmp_path / "photos"
    for ident, names in {"obama": ("obama", "obama2"), "biden": ("biden",)}.items():
        (data / ident).mkdir(parents=True)
        for n in names:
            shutil.copyfile(sample(n), data / ident / sample(n).name)
    parser = argparse.ArgumentParser()
    metatrain_commands.register(parser.add_subparsers())
    out = tmp_path / "out"
    args = parser.parse_args(["meta-train", "--tiny", "--data", str(data), "--out", str(out), "--steps", "2",
                              "--bucket-steps", "2", "--warmup-steps", "1", "--resolution", "48"])
    text = args.func(args)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["modes"] == {"resize": 3} and summary["data"]["items"] == 3  # photos, not crops
    assert summary["data"]["flip"] is True
    assert summary["plan"]["identities"] == 2 and summary["plan"]["identities_visited"] == 2
    assert "trained  2 of 2 identities" in text
    bad = parser.parse_args(["meta-train", "--tiny", "--data", str(data), "--out", str(tmp_path / "out2"), "--crop-grid",
                             "--no-augment"])
    with pytest.raises(ValueError, match="--crop-grid and --no-augment"):
        bad.func(bad)


# --- no global RNG, imports point one way ---------------------------------------------------


def test_resume_leaves_the_global_rng_alone(tiny, tmp_path):
    pairs = encode_flip_pairs(tiny.encode, [_person(k) for k in range(2)])
    data = MetaTrainData(identities=["a", "b"], latents=pairs, item_identity=[0, 1], item_caption=["c"] * 2,
                         conds={"c": tiny.cond})
    config = MetaTrainConfig(steps=4, bucket_steps=2, warmup_steps=1, identities_per_bucket=1, batch_size=1, r1=2,
                             preset="attn")
    ck = tmp_path / "ck.safetensors"
    with torch.random.fork_rng(devices=[]):
        meta_train(tiny.host, data, MetaTrainConfig(**{**config.to_dict(), "steps": 2}), checkpoint_path=ck)
        torch.manual_seed(1234)  # the caller's own global stream, unlike the one at checkpoint time
        before = torch.get_rng_state()
        meta_train(tiny.host, data, config, checkpoint_path=ck, resume=True)
        assert torch.equal(torch.get_rng_state(), before)
    assert "rng.torch" not in load_checkpoint(ck) and set(load_checkpoint(ck)) >= {"generator", "bank", "downs"}


def _imports(path: Path) -> list[str]:
    out = []
    pkg = path.relative_to(CORE.parent).with_suffix("").parts[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            base = list(pkg[: len(pkg) - node.level + 1]) if node.level else []
            out.append(".".join(base + ([node.module] if node.module else [])))
        elif isinstance(node, ast.Import):
            out.extend(a.name for a in node.names)
    return out


def test_imports_point_one_way_and_nothing_seeds_the_global_rng():
    for path in sorted((CORE / "data").glob("*.py")):
        assert not [m for m in _imports(path) if m.startswith("metalora_core.train")], path
    stage_files = sorted([*(CORE / "train").glob("stage*.py"), *(CORE / "train" / "stage1").glob("*.py")])
    assert len(stage_files) >= 6  # stage2.py and the stage1 package's modules
    for path in stage_files:
        assert not [m for m in _imports(path) if m.startswith(("metalora_core.hosts", "metalora_core.cli"))], path
    # (hosts/tiny.py seeds diffusers' model init inside torch.random.fork_rng, which restores it)
    for path in sorted(p for d in ("train", "data", "lora", "faces", "eval", "formats") for p in (CORE / d).rglob("*.py")):
        text = path.read_text()
        for call in ("torch.manual_seed(", "torch.set_rng_state(", "random.seed(", "np.random.seed("):
            assert call not in text, f"{path} calls {call} (use an explicit generator)"
