"""Stage-1 checkpoints of format version 2 keep loading and resuming.

``tests/data/stage1_checkpoint_v2.safetensors`` was written by the Stage-1 trainer of the
single-module layout (``train/stage1.py``) on the tiny FLUX: the run below, stopped at step 4, in
the middle of the second bucket visit (one item still queued), with Down and the Mid/Up of all
three identities holding AdamW moments.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from metalora_core.data.latents import MetaTrainData
from metalora_core.formats.files import read_safetensors
from metalora_core.hosts.diffusers_flux import DiffusersFluxHost, encode_prompt
from metalora_core.hosts.tiny import TINY_T5_LEN, build_tiny_flux_pipeline
from metalora_core.train.stage1 import MetaTrainConfig, MetaTrainer, load_checkpoint, meta_train, save_checkpoint

FIXTURE = Path(__file__).parent / "data" / "stage1_checkpoint_v2.safetensors"
CAPTION = "a photo of a person"
CONFIG = MetaTrainConfig(steps=4, bucket_steps=3, warmup_steps=1, identities_per_bucket=2, batch_size=2, r1=2,
                         preset="attn", lr=2e-3, seed=5)


@pytest.fixture(scope="module")
def run():
    """The fixture's tiny FLUX and data: 3 identities x 3 (plain, mirrored) latent pairs."""
    pipe = build_tiny_flux_pipeline(0)
    g = torch.Generator().manual_seed(11)
    latents = [(torch.randn(16, 8, 8, generator=g), torch.randn(16, 8, 8, generator=g)) for _ in range(9)]
    data = MetaTrainData(identities=["a", "b", "c"], latents=latents, item_identity=[0, 0, 0, 1, 1, 1, 2, 2, 2],
                         item_caption=[CAPTION] * 9,
                         conds={CAPTION: encode_prompt(pipe, CAPTION, max_sequence_length=TINY_T5_LEN)})
    return DiffusersFluxHost(pipe.transformer), data


def test_fixture_is_a_version_2_checkpoint_mid_visit():
    tensors, meta = read_safetensors(FIXTURE)
    assert (meta["format"], meta["format_version"]) == ("metalora.metatrain-checkpoint", "2")
    state = load_checkpoint(FIXTURE)
    assert state["step"] == 4 and state["queue_visit"] == 1 and len(state["queue"]) == 1
    assert state["buckets"] == [[0, 1], [2]] and len(state["losses"]) == 4
    assert state["down_adam"] and len(state["bank"]["adam"]) == len(state["bank"]["params"])
    assert {k[0] for k in state["bank"]["params"]} == {0, 1, 2}
    assert "rng.torch" not in tensors and "rng.generator" in tensors


def test_fixture_loads_and_saves_back_to_the_same_file_contents(run, tmp_path):
    host, data = run
    trainer = MetaTrainer(host, data, CONFIG)
    trainer.load_state_dict(load_checkpoint(FIXTURE), source=str(FIXTURE))
    again = save_checkpoint(tmp_path / "again.safetensors", trainer)
    a, meta_a = read_safetensors(FIXTURE)
    b, meta_b = read_safetensors(again)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert {k: v for k, v in meta_a.items() if k != "state"} == {k: v for k, v in meta_b.items() if k != "state"}
    assert json.loads(meta_a["state"]) == json.loads(meta_b["state"])


def test_fixture_resumes_as_the_uninterrupted_run(run, tmp_path):
    """Resumed at step 4 and run to step 10 (into the third and fourth visits), it matches a run
    from step 0 (bit for bit on the machine that wrote the fixture; float-tolerance elsewhere)."""
    host, data = run
    ck = tmp_path / "checkpoint.safetensors"
    shutil.copyfile(FIXTURE, ck)
    config = dataclasses.replace(CONFIG, steps=10)
    got = meta_train(host, data, config, checkpoint_path=ck, resume=True)
    ref = meta_train(host, data, config)
    assert got.resumed_from == 4 and got.steps == ref.steps == 10
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses), rtol=1e-5, atol=1e-6)
    for n in ref.downs:
        torch.testing.assert_close(got.downs[n], ref.downs[n], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(got.downs[n], load_checkpoint(FIXTURE)["downs"][n]) for n in got.downs)
