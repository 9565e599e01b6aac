"""Saving LoRAs where loaders find them (numbered, never overwriting, confined) and the adapter cache."""
from __future__ import annotations

import os
import re

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


@pytest.mark.parametrize("subfolder,prefix,expected", [
    ("metalora", "Zoë test", "metalora/Zoë test_00001.safetensors"),  # what ComfyUI's Save Image accepts
    ("", "people/ann", "people/ann_00001.safetensors"),  # folders in the prefix, as in Save Image
    ("a\\b", "it's (v2) #1 & co", "a/b/it's (v2) #1 & co_00001.safetensors"),
])
def test_names_save_image_accepts_are_accepted(tmp_path, subfolder, prefix, expected):
    path = store.save_lora_new(_adapters(), tmp_path, subfolder, prefix)
    assert path == (tmp_path / expected).resolve() and path.is_file()


@pytest.mark.parametrize("subfolder,prefix,message", [
    ("metalora", "..", "filename_prefix '..': '..' is not a name (it would leave the folder)"),
    ("metalora", ".", "filename_prefix '.': '.' is not a name (it would name no file)"),
    ("a/./b", "x", "subfolder 'a/./b': '.' is not a name"),
    ("..", "x", "subfolder '..': '..' is not a name (it would leave the folder)"),
    ("metalora", "a\x00b", "filename_prefix 'a\\x00b' holds '\\x00', which file names cannot contain"),
    ("metalora", "tab\tname", "holds '\\t'"),
    ("/etc", "x", "subfolder '/etc' is an absolute path"),
    ("metalora", "people/", "filename_prefix 'people/' gives no file name"),
])
def test_save_name_refuses_only_escapes_dots_and_forbidden_characters(tmp_path, subfolder, prefix, message):
    with pytest.raises(ValueError) as e:
        store.check_save_name(subfolder, prefix)
    assert message in str(e.value)
    with pytest.raises(ValueError):
        store.save_lora_new(_adapters(), tmp_path, subfolder, prefix)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_save_name_on_windows_refuses_what_windows_forbids():
    assert store.check_save_name("metalora", "a:b|c") == ("metalora", "a:b|c")  # legal on POSIX
    for prefix, needle in [("a|b", "holds '|'"), ("x?", "holds '?'"), ("CON", "reserved device name"),
                           ("name.", "trailing dot or space"), ("C:x", "absolute path")]:
        with pytest.raises(ValueError, match=re.escape(needle)):
            store.check_save_name("metalora", prefix, windows=True)


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


def test_an_ignored_cache_entry_says_why(tmp_path):
    key = store.content_key({"prior": "abc"})
    said: list[str] = []
    assert store.load_cached_adapters(tmp_path, key, on_ignored=said.append) is None
    assert said == []  # no entry: nothing to say
    store.cache_path(tmp_path, key).write_bytes(b"not safetensors")
    assert store.load_cached_adapters(tmp_path, key, on_ignored=said.append) is None
    entry = store.cache_path(tmp_path, key)
    assert len(said) == 1 and said[0].startswith(f"ignoring unreadable training cache entry {entry.name} ({entry} is not")
    assert said[0].endswith("; training again")
    other = store.content_key({"prior": "xyz"})
    store.store_cached_adapters(tmp_path, other, _adapters(0))
    store.cache_path(tmp_path, other).rename(store.cache_path(tmp_path, key))  # an entry under the wrong name
    assert store.load_cached_adapters(tmp_path, key, on_ignored=said.append) is None
    assert said[1] == f"training cache entry {store.cache_path(tmp_path, key)} holds key {other!r}; training again"
