"""`metalora cache-prune`: the adapter cache kept under a size limit, nothing else touched."""
from __future__ import annotations

import json
import os

import pytest

from metalora_core.cli import main
from metalora_core.formats.cache_prune import parse_size, prune_cache


def _entry(folder, i: int, size: int, mtime: int):
    p = folder / f"{i:064x}.safetensors"
    p.write_bytes(b"x" * size)
    os.utime(p, (mtime, mtime))
    return p


def test_oldest_entries_go_until_the_rest_fits(tmp_path):
    e = [_entry(tmp_path, i, 1000, 1_000_000 + i) for i in range(5)]
    prior = tmp_path / "my_prior.safetensors"
    prior.write_bytes(b"p" * 5000)  # not a cache entry: never touched
    tmp = tmp_path / f".{'a' * 64}.safetensors.123.tmp"
    tmp.write_bytes(b"t")
    r = prune_cache(tmp_path, 2500, dry_run=True)
    assert [p.name for p in r.removed] == [tmp.name, e[0].name, e[1].name, e[2].name] and all(p.exists() for p in e)
    r = prune_cache(tmp_path, 2500)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([e[3].name, e[4].name, prior.name])
    assert r.bytes_after == 2000 and r.bytes_before == 5001
    assert prune_cache(tmp_path, 0).kept == [] and prior.exists()


def test_cli_and_sizes(tmp_path, capsys):
    for i in range(3):
        _entry(tmp_path, i, 2**20, 1_000_000 + i)
    assert main(["cache-prune", str(tmp_path), "--max-size", "1.5M"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["removed"]) == 2 and out["kept"] == 1
    assert parse_size("2G") == 2**31 and parse_size("500m") == 500 * 2**20 and parse_size("0") == 0
    with pytest.raises(ValueError, match="unit"):
        parse_size("2 parsecs")
    assert main(["cache-prune", str(tmp_path / "nope")]) == 2
