"""Stage-1 meta-training (Algorithm 1) on a tiny real diffusers FLUX and a tiny dataset built here."""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image, ImageDraw

from metalora_core.hosts.diffusers_flux import DiffusersFluxHost, encode_images, encode_prompt
from metalora_core.formats.files import read_safetensors
from metalora_core.data.identities import DatasetConfig, prepare_dataset, vae_fingerprint
from metalora_core.data.latents import latent_shape
from metalora_core.lora.layers import resolve_targets
from metalora_core.train.stage1 import (
    BucketAdapter,
    IdentityRouter,
    MetaTrainConfig,
    bucket_sizes,
    initial_downs,
    make_buckets,
    meta_train,
    plan_buckets,
    schedule_at,
    to_prior,
)
from metalora_core.formats.prior import load_prior, save_prior, validate_prior
from metalora_core.train.recipe import build_adapters
from metalora_core.hosts.tiny import TINY_T5_LEN, build_tiny_flux_pipeline
from metalora_core.train.stage2 import Stage2Config, personalize

IDENTITIES = ("ann", "bob", "cid", "dan")


def _draw_person(colour: tuple[int, int, int], size: tuple[int, int], k: int) -> Image.Image:
    """A generated 'identity': a face-like blob whose colour is the identity, pose varies with k."""
    img = Image.new("RGB", size, (40 + 30 * k, 60, 90))
    d = ImageDraw.Draw(img)
    w, h = size
    cx = w // 2 + (k - 1) * 6
    d.ellipse([cx - 18, h // 2 - 22, cx + 18, h // 2 + 22], fill=colour)
    d.rectangle([cx - 10, h // 2 + 6, cx + 10, h // 2 + 9], fill=(20, 20, 20))
    return img


def _make_dataset(root: Path) -> Path:
    palette = [(230, 190, 160), (120, 80, 50), (250, 220, 200), (180, 130, 90)]
    for i, name in enumerate(IDENTITIES):
        d = root / name
        d.mkdir(parents=True)
        for k in range(3):
            size = (64, 64) if k < 2 else (96, 72)  # two aspect buckets: 1:1 and 4:3
            _draw_person(palette[i], size, k).save(d / f"{k}.png")
    (root / "ann" / "0.txt").write_text("a photo of a smiling person\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("metatrain")
    pipe = build_tiny_flux_pipeline(0)
    root = _make_dataset(tmp / "data")

    def load(root: Path, config: DatasetConfig, cache: Path):
        return prepare_dataset(
            root, encode=lambda ims: encode_images(pipe.vae, ims), encoder_id=vae_fingerprint(pipe.vae),
            encode_caption=lambda c: encode_prompt(pipe, c, max_sequence_length=TINY_T5_LEN),
            config=config, cache_dir=cache)

    dcfg = DatasetConfig(augment=False, bucket_area=64 * 64, class_caption="a photo of a person")
    data = load(root, dcfg, tmp / "cache")
    return SimpleNamespace(pipe=pipe, host=DiffusersFluxHost(pipe.transformer), data=data, root=root, tmp=tmp,
                           load=load, dcfg=dcfg)


def _config(**kw) -> MetaTrainConfig:
    base = dict(steps=12, bucket_steps=6, warmup_steps=2, identities_per_bucket=2, batch_size=4, r1=4, r2=1,
                lr=2e-3, seed=0)
    base.update(kw)
    return MetaTrainConfig(**base)


def test_config_validation_names_the_bad_value():
    with pytest.raises(ValueError, match="warmup_steps.*7"):
        MetaTrainConfig(bucket_steps=5, warmup_steps=7)
    with pytest.raises(ValueError, match="lr.*-1"):
        MetaTrainConfig(lr=-1.0)
    with pytest.raises(ValueError, match="preset 'nope'"):
        MetaTrainConfig(preset="nope")
    c = MetaTrainConfig()
    assert (c.steps, c.bucket_steps, c.warmup_steps, c.batch_size, c.lr) == (50_000, 2_500, 1_000, 4, 4e-4)


def test_schedule_pure_functions():
    c = _config(steps=30)
    pts = [schedule_at(s, c, 3) for s in range(30)]
    assert [p.bucket for p in pts] == [0] * 6 + [1] * 6 + [2] * 6 + [0] * 6 + [1] * 6
    assert [p.warmup for p in pts[:6]] == [True, True, False, False, False, False]
    buckets = make_buckets(7, 3, seed=5)
    assert sorted(i for b in buckets for i in b) == list(range(7)) and [len(b) for b in buckets] == [3, 3, 1]
    assert make_buckets(7, 3, seed=5) == buckets


def test_bucket_sizes_decide_both_the_buckets_and_the_plan():
    for n, per, steps in ((7, 3, 12), (6, 3, 6), (1, 5, 30), (1050, 50, 50_000), (10, 4, 3)):
        sizes = bucket_sizes(n, per)
        assert sum(sizes) == n and all(1 <= k <= per for k in sizes)
        buckets = make_buckets(n, per, seed=2)
        assert [len(b) for b in buckets] == sizes and sorted(i for b in buckets for i in b) == list(range(n))
        config = MetaTrainConfig(steps=steps, bucket_steps=6, warmup_steps=2, identities_per_bucket=per)
        plan = plan_buckets(config, [3] * n)
        visited = {schedule_at(s, config, len(buckets)).bucket for s in range(0, steps, 6)}
        assert plan.buckets == len(sizes) and plan.identities_visited == sum(len(buckets[b]) for b in visited)
    with pytest.raises(ValueError, match="need >= 1 identity and >= 1 per bucket, got 0 and 3"):
        bucket_sizes(0, 3)


def test_lr_schedule_sets_each_steps_rate_and_defaults_to_the_config(tiny, tmp_path):
    c = _config(steps=12)
    base = meta_train(tiny.host, tiny.data, c)
    constant = meta_train(tiny.host, tiny.data, c, lr_schedule=lambda pt: c.lr)
    assert constant.losses == base.losses
    assert all(torch.equal(constant.downs[n], base.downs[n]) for n in base.downs)
    seen = []

    def first_visit_only(pt):
        seen.append((pt.step, pt.visit))
        return c.lr if pt.visit == 0 else 0.0

    frozen = meta_train(tiny.host, tiny.data, c, lr_schedule=first_visit_only)
    assert seen == [(s, s // 6) for s in range(12)]
    first = meta_train(tiny.host, tiny.data, _config(steps=6))
    assert frozen.losses[:6] == first.losses
    assert all(torch.equal(frozen.downs[n], first.downs[n]) for n in first.downs)  # lr 0 from step 7 on

    def halving(pt):
        return c.lr * 0.5 ** pt.visit

    ref = meta_train(tiny.host, tiny.data, c, lr_schedule=halving)
    assert ref.losses[:6] == base.losses[:6] and ref.losses[6:] != base.losses[6:]
    ck = tmp_path / "checkpoint.safetensors"  # a schedule is a function of the step: a resume gets the same rates
    with pytest.raises(_Killed):
        meta_train(tiny.host, tiny.data, c, checkpoint_path=ck, checkpoint_every=4, callback=_kill_at(9),
                   lr_schedule=halving)
    got = meta_train(tiny.host, tiny.data, c, checkpoint_path=ck, resume=True, lr_schedule=halving)
    assert got.resumed_from == 8 and got.losses == ref.losses
    assert all(torch.equal(got.downs[n], ref.downs[n]) for n in ref.downs)
    with pytest.raises(ValueError, match=r"lr_schedule gave -1.0 for step 1 \(bucket 0, warm-up\)"):
        meta_train(tiny.host, tiny.data, c, lr_schedule=lambda pt: -1.0)


def test_bucket_scheduling_visits_identities_as_specified(tiny):
    c = _config(steps=24)
    seen = []
    result = meta_train(tiny.host, tiny.data, c, callback=seen.append)
    assert len(result.buckets) == 2 and sorted(i for b in result.buckets for i in b) == [0, 1, 2, 3]
    assert [s.step for s in seen] == list(range(1, 25))
    per_visit: dict[int, set[int]] = {}
    for s in seen:
        visit = (s.step - 1) // 6
        assert s.bucket == visit % 2
        assert s.step_in_bucket == (s.step - 1) % 6 + 1
        assert s.phase == ("warm-up" if s.step_in_bucket <= 2 else "joint")
        assert set(s.identities) <= set(result.buckets[s.bucket]), (s.step, s.identities)
        assert 1 <= len(s.identities) <= 4
        per_visit.setdefault(visit, set()).update(s.identities)
    for visit, ids in per_visit.items():  # every identity of the bucket is trained in each visit
        assert ids == set(result.buckets[visit % 2])
    assert any(len(set(s.identities)) > 1 for s in seen)  # batches do mix identities


def test_warmup_leaves_down_unchanged_joint_changes_it(tiny):
    shapes = resolve_targets(_config().preset, tiny.host.dims)  # the default preset: every block Linear
    init = initial_downs(_config(), shapes)

    def downs(steps: int) -> dict[str, torch.Tensor]:
        return meta_train(tiny.host, tiny.data, _config(steps=steps)).downs

    def same(a, b) -> bool:
        return all(torch.equal(a[n], b[n]) for n in a)

    assert same(downs(2), init)  # first bucket's warm-up: Down exactly unchanged
    after_3 = downs(3)
    assert not same(after_3, init)  # first joint step moves it
    assert all(not torch.equal(after_3[n], init[n]) for n in init)  # ... in every layer
    end_of_bucket = downs(6)
    assert same(downs(8), end_of_bucket)  # second bucket's warm-up (Down has AdamW momentum by now)
    assert not same(downs(9), end_of_bucket)


def test_mixed_identity_batch_uses_each_samples_own_mid_up():
    g = torch.Generator().manual_seed(0)
    down = torch.nn.Parameter(torch.randn(4, 6, generator=g))
    mids = [torch.randn(2, 4, generator=g) for _ in range(3)]
    ups = [torch.randn(5, 2, generator=g) for _ in range(3)]
    router = IdentityRouter()
    ad = BucketAdapter(down, mids, ups, router)
    x = torch.randn(3, 7, 6, generator=g)  # (B, L, in)
    router.slots = [0, 2, 0]
    y = ad(x)
    for b, s in enumerate(router.slots):
        ref = x[b] @ down.detach().T @ mids[s].T @ ups[s].T
        torch.testing.assert_close(y[b], ref, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    assert ad.mids[1].grad is None and ad.ups[1].grad is None  # identity 1 is not in the batch
    assert ad.mids[0].grad is not None and ad.mids[2].grad is not None and down.grad is not None
    router.slots = [1, 1, 1]  # single-identity fast path agrees with the per-sample path
    torch.testing.assert_close(ad(x), torch.stack([x[b] @ down.T @ mids[1].T @ ups[1].T for b in range(3)]).detach(),
                               rtol=1e-5, atol=1e-5)


class _Killed(Exception):
    pass


def _kill_at(step: int):
    def cb(info):
        if info.step == step:
            raise _Killed(step)

    return cb


def test_kill_and_resume_equals_uninterrupted_bit_for_bit(tiny):
    c = _config(steps=20)
    ref_ck = tiny.tmp / "ref" / "checkpoint.safetensors"
    ref = meta_train(tiny.host, tiny.data, c, checkpoint_path=ref_ck, checkpoint_every=4)
    ck = tiny.tmp / "killed" / "checkpoint.safetensors"
    with pytest.raises(_Killed):  # dies at step 11: last checkpoint at 8, mid-bucket, joint phase
        meta_train(tiny.host, tiny.data, c, checkpoint_path=ck, checkpoint_every=4, callback=_kill_at(11))
    with pytest.raises(_Killed):  # resumes at 8, dies at 15: last checkpoint at 12, a bucket boundary
        meta_train(tiny.host, tiny.data, c, checkpoint_path=ck, checkpoint_every=4, resume=True,
                   callback=_kill_at(15))
    got = meta_train(tiny.host, tiny.data, c, checkpoint_path=ck, checkpoint_every=4, resume=True)
    assert got.resumed_from == 12
    assert got.losses == ref.losses
    for n in ref.downs:
        assert torch.equal(got.downs[n], ref.downs[n]), n
    a, meta_a = read_safetensors(ref_ck)
    b, meta_b = read_safetensors(ck)
    assert a.keys() == b.keys()  # Down, its AdamW state, the whole bank with moments, RNG states
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads(meta_a["state"]) == json.loads(meta_b["state"])


def test_resume_refuses_other_settings(tiny):
    ck = tiny.tmp / "other" / "checkpoint.safetensors"
    meta_train(tiny.host, tiny.data, _config(steps=3), checkpoint_path=ck)
    with pytest.raises(ValueError, match="lr=0.002.*lr=0.001"):
        meta_train(tiny.host, tiny.data, _config(steps=6, lr=1e-3), checkpoint_path=ck, resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        meta_train(tiny.host, tiny.data, _config(), checkpoint_path=tiny.tmp / "none.safetensors", resume=True)
    extended = meta_train(tiny.host, tiny.data, _config(steps=6), checkpoint_path=ck, resume=True)
    assert extended.resumed_from == 3 and extended.steps == 6


def test_prior_loads_validates_and_drives_stage2(tiny):
    result = meta_train(tiny.host, tiny.data, _config(steps=8))
    prior = to_prior(result, domain="person", base_model="tiny-flux", data_summary=tiny.data.summary)
    path = save_prior(prior, tiny.tmp / "prior.safetensors")
    loaded = load_prior(path)
    assert (loaded.r1, loaded.preset, loaded.domain, loaded.base_model) == (4, "all", "person", "tiny-flux")
    assert loaded.training["steps"] == 8 and loaded.training["data"]["identities"] == 4
    assert loaded.training["identities_trained"] == 4 and loaded.training["buckets"] == 2
    validate_prior(loaded, tiny.host.dims)
    for n, t in result.downs.items():
        assert torch.equal(loaded.downs[n], t)
    adapters = build_adapters(tiny.host.dims, loaded, rank=1, seed=0)
    items = [z for z, k in zip(tiny.data.latents, tiny.data.item_identity) if k == 0 and latent_shape(z)[-1] == 8]
    out = personalize(tiny.host, adapters, items, tiny.data.conds["a photo of a person"], Stage2Config(steps=3))
    assert len(out.losses) == 3 and all(torch.isfinite(torch.tensor(out.losses)))
    assert any(a.up.abs().sum() > 0 for _, a in out.adapters.items())
    for n, a in out.adapters.items():
        assert torch.equal(a.down, loaded.downs[n])  # Stage-2 keeps the prior frozen


def test_latent_cache_is_keyed_by_content_not_order(tiny):
    d = tiny.data
    assert d.summary["cache_misses"] == 12 and d.summary["items"] == 12
    assert d.item_caption.count("a photo of a smiling person") == 1 and len(d.conds) == 2
    moved = tiny.tmp / "moved"
    shutil.copytree(tiny.root, moved)
    (moved / "ann").rename(moved / "zed")  # new order of identities: every image is still a hit
    again = tiny.load(moved, tiny.dcfg, tiny.tmp / "cache")
    assert again.summary["cache_hits"] == 12 and again.summary["cache_misses"] == 0
    old = [(d.identities[k], z) for z, k in zip(d.latents, d.item_identity)]
    for z, k in zip(again.latents, again.item_identity):
        name = "ann" if again.identities[k] == "zed" else again.identities[k]
        assert any(n == name and latent_shape(v) == latent_shape(z) and all(map(torch.equal, z, v)) for n, v in old)
    bigger = tiny.load(tiny.root, DatasetConfig(augment=False, bucket_area=96 * 96), tiny.tmp / "cache")
    assert bigger.summary["cache_misses"] == 12  # other preparation parameters: other keys


def test_nan_guard_stops_with_a_clear_error(tiny):
    d = tiny.data
    bad = type(d)(identities=d.identities, latents=[(a * 1e30, b * 1e30) for a, b in d.latents], item_identity=d.item_identity,
                  item_caption=d.item_caption, conds=d.conds)
    with pytest.raises(RuntimeError, match=r"Stage-1 loss became (inf|nan) at step 1 \(bucket 0, warm-up\)"):
        meta_train(tiny.host, bad, _config(steps=2))


def test_cli_defaults_and_help_come_from_the_config():
    from metalora_core.cli import meta_train as metatrain_commands

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    metatrain_commands.register(sub)
    default = MetaTrainConfig()
    assert metatrain_commands.meta_train_config(parser.parse_args(["meta-train", "--out", "o"])) == default
    tiny_args = parser.parse_args(["meta-train", "--tiny", "--out", "o", "--steps", "7"])
    tiny_config = metatrain_commands.meta_train_config(tiny_args)
    tiny_values = {k: metatrain_commands.TINY[k] for k in ("bucket_steps", "warmup_steps", "identities_per_bucket", "r1")}
    assert tiny_config == MetaTrainConfig(**{**default.to_dict(), **tiny_values, "steps": 7})
    given = parser.parse_args(["meta-train", "--out", "o", "--r1", "3", "--preset", "attn", "--lr", "1e-3",
                               "--batch-size", "2", "--r2", "2", "--seed", "9", "--warmup-steps", "0"])
    assert metatrain_commands.meta_train_config(given) == MetaTrainConfig(
        r1=3, preset="attn", lr=1e-3, batch_size=2, r2=2, seed=9, warmup_steps=0)
    text = " ".join(sub.choices["meta-train"].format_help().split())
    for flag, field in (("q_total", "steps"), ("q_bucket", "bucket_steps"), ("q_warm-up", "warmup_steps"),
                        ("Meta-Down rank", "r1"), ("Mid rank during meta-training", "r2"), ("items per step", "batch_size"),
                        ("AdamW learning rate", "lr"), ("target layers", "preset")):
        assert f"{flag} (default {getattr(default, field)}" in text, flag
    assert f"used ~{default.uses_per_example}x per bucket visit" in text
    with pytest.raises(ValueError, match="MetaTrainConfig.r1 must be an int >= 1, got 0"):
        metatrain_commands.meta_train_config(parser.parse_args(["meta-train", "--out", "o", "--r1", "0"]))


def test_real_photos_with_face_augmentation_and_cli(tiny, sample, tmp_path):
    """The --tiny command path on real photos (face grid, mixed aspect buckets), shortened."""
    from metalora_core.cli import meta_train as metatrain_commands

    data = tmp_path / "photos"
    for ident, names in {"obama": ("obama", "obama2"), "biden": ("biden",)}.items():
        (data / ident).mkdir(parents=True)
        for n in names:
            shutil.copyfile(sample(n), data / ident / sample(n).name)
    parser = argparse.ArgumentParser()
    metatrain_commands.register(parser.add_subparsers())
    args = parser.parse_args(["meta-train", "--tiny", "--data", str(data), "--out", str(tmp_path / "out"),
                              "--steps", "10", "--bucket-steps", "5", "--warmup-steps", "2",
                              "--checkpoint-every", "4", "--resolution", "48", "--crop-grid"])
    args.func(args)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps"] == 10 and summary["data"]["modes"] == {"face-grid": 3}
    assert summary["data"]["items"] > 3  # the crop grid made several crops per photo
    prior = load_prior(tmp_path / "out" / "prior.safetensors")
    validate_prior(prior, tiny.host.dims)
    assert prior.r1 == 8 and prior.training["steps"] == 10
    assert summary["prior_sha256"] == prior.sha256  # the one content hash (formats.files.content_sha256)
    assert Image.open(tmp_path / "out" / "loss.png").size == (640, 360)
