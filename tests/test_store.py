"""Saving LoRAs where loaders find them (numbered, never overwriting, confined) and the adapter cache."""
from __future__ import annotations

import os

import pytest
import torch

from metalora_core.formats import store
from metalora_core.lora.adapter import AdapterSet
from metalora_core.formats.lora import load_lora, lora_state_dict


def _adapters(seed: int = 0) -> AdapterSet:
    g = torch.Generator().manual_seed(seed)
    ad = AdapterSet.meta_random({"transformer_blocks.0.attn.to_q": (8, 8)}, r1=4, r2=1, preset="attn", generator=g)
    with torch.no_grad():
        ad["transformer_blocks.0.attn.to_q"].up.normal_(generator=g)
    return ad


def test_numbered_names_never_overwrite(tmp_path):
    a = store.save_lora_new(_adapters(0), tmp_path, "people/ann", "ann", steps="3")
    b = store.save_lora_new(_adapters(1), tmp_path, "people/ann", "ann")
    assert a.name == "ann_00001.safetensors" and b.name == "ann_00002.safetensors"
    assert a.parent == (tmp_path / "people/ann").resolve()
    first, meta = load_lora(a)
    assert meta["steps"] == "3"
    assert torch.equal(first["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"],
                       lora_state_dict(_adapters(0))["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"])
    assert sorted(p.name for p in a.parent.iterdir()) == ["ann_00001.safetensors", "ann_00002.safetensors"]


@pytest.mark.parametrize("subfolder,prefix", [("../out", "x"), ("/etc", "x"), ("a", "../../x"), ("a", "")])
def test_names_stay_inside_the_folder(tmp_path, subfolder, prefix):
    with pytest.raises(ValueError):
        store.save_lora_new(_adapters(), tmp_path / "loras", subfolder, prefix)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_without_hard_links_the_name_is_still_exclusive(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise PermissionError("this filesystem has no hard links")

    monkeypatch.setattr(os, "link", no_links)
    a = store.save_lora_new(_adapters(0), tmp_path, "", "p")
    b = store.save_lora_new(_adapters(1), tmp_path, "", "p")
    assert (a.name, b.name) == ("p_00001.safetensors", "p_00002.safetensors")
    ta, tb = load_lora(a)[0], load_lora(b)[0]
    assert any(not torch.equal(ta[k], tb[k]) for k in ta)
    assert not list(tmp_path.glob(".*partial*"))


def test_adapter_cache_roundtrip(tmp_path):
    key = store.content_key({"prior": "abc", "steps": 3})
    assert store.content_key({"steps": 3, "prior": "abc"}) == key
    assert store.content_key({"prior": "abc", "steps": 4}) != key
    assert store.load_cached_adapters(tmp_path, key) is None
    store.store_cached_adapters(tmp_path, key, _adapters(0), steps="3")
    back, meta = store.load_cached_adapters(tmp_path, key)
    ref = lora_state_dict(_adapters(0))
    assert meta["steps"] == "3" and all(torch.equal(lora_state_dict(back)[k], ref[k]) for k in ref)
