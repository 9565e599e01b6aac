"""FLUX.1-dev prior and LoRA files stay byte-identical for the same seed and settings.

A tiny FLUX.1 (real diffusers classes) is meta-trained for a few steps on drawn identities
(Stage-1 through ``prepare_dataset``, ``meta_train``, ``to_prior``, ``save_prior``), then the
prior drives a short Stage-2 run whose LoRA is exported with ``save_lora``. Both files are
compared byte for byte with the ones in tests/data, written by the same code before the model
family became a parameter. The LoRA's ``modelspec.date`` is the day of the run: the fixture's
date (same length) is put in its place before comparing.

``METALORA_WRITE_FIXTURES=1`` writes the files into tests/data instead of comparing.
"""
from __future__ import annotations

import datetime
import os
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from metalora_core.data.identities import DatasetConfig, prepare_dataset, vae_fingerprint
from metalora_core.formats.lora import save_lora
from metalora_core.formats.prior import load_prior, save_prior
from metalora_core.hosts.diffusers_flux import DiffusersFluxHost, encode_images, encode_prompt
from metalora_core.hosts.tiny import TINY_T5_LEN, TinyFluxConfig, build_tiny_flux_pipeline
from metalora_core.train.recipe import build_adapters
from metalora_core.train.stage1 import MetaTrainConfig, meta_train, to_prior
from metalora_core.train.stage2 import Stage2Config, personalize

DATA = Path(__file__).parent / "data"
PRIOR = DATA / "flux1_tiny_prior.safetensors"
LORA = DATA / "flux1_tiny_lora.safetensors"
FIXTURE_DATE = b"2026-12-06"
WRITE = os.environ.get("METALORA_WRITE_FIXTURES") == "1"


def _identities(root: Path) -> Path:
    for i, colour in enumerate([(230, 190, 160), (120, 80, 50), (250, 220, 200)]):
        d = root / f"id{i}"
        d.mkdir(parents=True)
        for k in range(2):
            size = (64, 64) if k == 0 else (80, 64)  # two aspect buckets
            img = Image.new("RGB", size, (40 + 50 * k, 60, 90))
            cx, cy = size[0] // 2 + 4 * k, size[1] // 2
            ImageDraw.Draw(img).ellipse([cx - 16, cy - 20, cx + 16, cy + 20], fill=colour)
            img.save(d / f"{k}.png")
    return root


def _make(tmp: Path) -> tuple[Path, Path]:
    pipe = build_tiny_flux_pipeline(0, TinyFluxConfig(heads=2, num_double=1, num_single=1))
    host = DiffusersFluxHost(pipe.transformer)
    data = prepare_dataset(
        _identities(tmp / "data"), encode=lambda ims: encode_images(pipe.vae, ims),
        encoder_id=vae_fingerprint(pipe.vae),
        encode_caption=lambda c: encode_prompt(pipe, c, max_sequence_length=TINY_T5_LEN),
        config=DatasetConfig(augment=False, bucket_area=64 * 64, class_caption="a photo of a person"),
        cache_dir=tmp / "cache")
    config = MetaTrainConfig(steps=4, bucket_steps=2, warmup_steps=1, identities_per_bucket=2, batch_size=2,
                             r1=2, r2=1, lr=2e-3, seed=0, resolution_shift=True)
    prior = to_prior(meta_train(host, data, config), domain="person", data_summary=data.summary)
    prior_path = save_prior(prior, tmp / PRIOR.name)
    prior = load_prior(prior_path)
    adapters = build_adapters(host.dims, prior, rank=1, seed=0)
    items = [z for z, k in zip(data.latents, data.item_identity) if k == 0]
    personalize(host, adapters, items, data.conds["a photo of a person"],
                Stage2Config(steps=2, seed=0, resolution_shift=True))
    lora_path = save_lora(adapters, tmp / LORA.name, steps=2, resolution=64, prior_sha256=prior.sha256)
    return prior_path, lora_path


def _undated(data: bytes) -> bytes:
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat().encode()
    return data.replace(today, FIXTURE_DATE)


def test_flux1_prior_and_lora_files_are_byte_identical(tmp_path):
    prior_path, lora_path = _make(tmp_path)
    if WRITE:
        PRIOR.write_bytes(prior_path.read_bytes())
        LORA.write_bytes(_undated(lora_path.read_bytes()))
        pytest.skip("fixtures written")
    assert prior_path.read_bytes() == PRIOR.read_bytes()
    assert _undated(lora_path.read_bytes()) == LORA.read_bytes()
