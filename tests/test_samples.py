"""The tests' sample photos (tests/sample_photos.py) come from registry archives, hash-checked and cached."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import sample_photos as samples


def test_every_sample_has_a_licence_note() -> None:
    assert set(samples.SAMPLE_LICENSES) == set(samples.SAMPLE_NAMES)
    assert "public domain" in samples.SAMPLE_LICENSES["astronaut"]
    assert "CC0" in samples.SAMPLE_LICENSES["coffee"]


def test_unknown_name_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown sample photo 'nope'.*obama"):
        samples.sample_photo("nope")


def test_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("METALORA_CACHE", str(tmp_path))
    assert samples.cache_dir() == tmp_path / "samples"
    monkeypatch.delenv("METALORA_CACHE")
    assert samples.cache_dir() == Path.home() / ".cache" / "metalora" / "samples"


@pytest.mark.parametrize("name", ["obama", "obama2", "obama3", "biden", "astronaut", "coffee", "t1"])
def test_samples_are_real_images(sample, name: str) -> None:
    path = sample(name)
    with Image.open(path) as im:
        assert min(im.size) >= 400


def test_corrupt_cache_is_refetched(sample, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    good = sample("astronaut").read_bytes()
    monkeypatch.setenv("METALORA_CACHE", str(tmp_path))
    bad = tmp_path / "samples" / "astronaut.png"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a png")
    fetched: list[str] = []
    monkeypatch.setattr(
        samples,
        "_fetch_source",
        lambda key: (fetched.append(key), bad.write_bytes(good)),  # no second download
    )
    assert samples.sample_photo("astronaut").read_bytes() == good
    assert fetched == ["scikit-image"]


def test_offline_pip_failure_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("METALORA_CACHE", str(tmp_path))
    monkeypatch.setitem(
        samples._SOURCES, "face_recognition", samples._Source("face-recognition-does-not-exist==0.0.0", sdist=True)
    )
    with pytest.raises(RuntimeError, match="pip could not download face-recognition-does-not-exist"):
        samples.sample_photo("obama")
    assert not (tmp_path / "samples").exists()  # nothing cached, not even an empty folder


def test_script_prints_paths_and_lays_out_identities(sample, tmp_path: Path) -> None:
    """`python tests/sample_photos.py` is what `make demo` and `make meta-train-tiny` call."""
    script = Path(samples.__file__)
    env = {**os.environ, "PYTHONPATH": str(script.parents[1])}
    out = subprocess.run([sys.executable, str(script), "astronaut", "--identities", str(tmp_path / "ids")],
                         capture_output=True, text=True, check=True, env=env)
    assert out.stdout.splitlines() == [str(sample("astronaut")), str(tmp_path / "ids")]
    laid = sorted(str(p.relative_to(tmp_path / "ids")) for p in (tmp_path / "ids").rglob("*.*"))
    assert laid == ["astronaut/astronaut.png", "biden/biden.jpg", "obama/obama.jpg", "obama/obama2.jpg",
                    "obama/obama3.jpg"]
