"""Guards that must hold: atomic writes under a kill or a failed write, config and prior validation,
the default small-face warning. Each test here fails when its guard is removed."""
from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from metalora_core.faces import get_detector, load_image, select_face
from metalora_core.formats.files import (atomic_save_png, atomic_save_safetensors, atomic_target, atomic_write_bytes,
                                         read_safetensors)
from metalora_core.formats.prior import load_prior, make_prior, save_prior, validate_prior
from metalora_core.lora.layers import FluxDims
from metalora_core.train.recipe import build_adapters
from metalora_core.train.stage2 import Stage2Config

REPO = Path(__file__).resolve().parents[1]
TINY_DIMS = FluxDims(hidden=64, mlp_hidden=256, num_double=2, num_single=2)

# ------------------------------------------------------------------ atomic writes

# The writer child: one real atomic helper writing a large file; killed with SIGKILL mid-write.
_SIZE = 256 << 20
_WRITER = f"""
import sys, torch
from metalora_core.formats.files import atomic_save_safetensors, atomic_write_bytes
kind, path = sys.argv[1], sys.argv[2]
data = b"\\x01" * {_SIZE} if kind == "bytes" else {{"w": torch.ones({_SIZE // 4})}}
print("ready", flush=True)
if kind == "bytes":
    atomic_write_bytes(path, data)
else:
    atomic_save_safetensors(data, path, {{"note": "new"}})
"""


def _writing(folder: Path, target: Path, old: bytes | None) -> bool:
    """True once bytes of the new file exist in the folder (in a temp file, or in the target itself)."""
    for entry in os.scandir(folder):
        size = entry.stat().st_size
        if entry.path == str(target):
            if old is None or size != len(old):
                return True
        elif size > 0:
            return True
    return False


def _kill_mid_write(kind: str, target: Path, old: bytes | None) -> None:
    """Lays down ``old`` (None: no file), starts the writer and SIGKILLs it while it writes."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for _ in range(5):
        for leftover in target.parent.glob(f".{target.name}.*.tmp"):  # a killed writer leaves its temp
            leftover.unlink()
        if old is None:
            target.unlink(missing_ok=True)
        else:
            target.write_bytes(old)
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, kind, str(target)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout.readline() == b"ready\n", proc.stderr.read().decode()  # blocks, no busy wait
        deadline = time.monotonic() + 120
        while proc.poll() is None and not _writing(target.parent, target, old):
            assert time.monotonic() < deadline, "the writer never started writing"
            time.sleep(0.0002)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
        if proc.returncode == -signal.SIGKILL:
            for leftover in target.parent.glob(f".{target.name}.*.tmp"):
                leftover.unlink()  # hidden, never the target's name; removed to spare the disk
            return
        assert proc.returncode == 0, err.decode()
        assert target.stat().st_size >= _SIZE  # finished before the kill: whole, then try again
    pytest.fail("the writer always finished before the kill landed; raise _SIZE")


def test_kill_during_atomic_write_bytes_leaves_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    _kill_mid_write("bytes", target, b'{"old": true}')
    assert target.read_bytes() == b'{"old": true}'  # never half of the new one


def test_kill_during_atomic_safetensors_write_leaves_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "prior.safetensors"
    atomic_save_safetensors({"w": torch.arange(4.0)}, target, {"note": "old"})
    _kill_mid_write("safetensors", target, target.read_bytes())
    tensors, meta = read_safetensors(target)  # still a readable file: the old one
    assert meta == {"note": "old"} and torch.equal(tensors["w"], torch.arange(4.0))


def test_kill_during_first_write_leaves_no_target(tmp_path: Path) -> None:
    target = tmp_path / "new.bin"
    _kill_mid_write("bytes", target, None)
    assert not target.exists()  # absent, not half


def test_failed_write_midway_keeps_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "loss.png"
    atomic_save_png(Image.new("RGB", (8, 8), (10, 20, 30)), target)
    old = target.read_bytes()
    with pytest.raises(OSError, match="disk full"):
        with atomic_target(target) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"\x89PNG half of a new file")
            raise OSError("disk full")  # what a failing writer raises halfway
    assert target.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png"]  # temp file removed


def test_failed_encoder_keeps_the_old_file(tmp_path: Path) -> None:
    """A real writer that fails: PIL cannot write a CMYK image as PNG."""
    target = tmp_path / "sheet.png"
    atomic_save_png(Image.new("RGB", (8, 8)), target)
    old = target.read_bytes()
    with pytest.raises(OSError):
        atomic_save_png(Image.new("CMYK", (8, 8)), target)
    assert target.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sheet.png"]


def test_atomic_write_bytes_replaces_whole(tmp_path: Path) -> None:
    target = tmp_path / "a.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two!")
    assert target.read_bytes() == b"two!" and sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


# ------------------------------------------------------------------ Stage-2 config


@pytest.mark.parametrize("lr", [math.nan, -4e-4, math.inf, -math.inf, 0.0])
def test_stage2_rejects_bad_learning_rates(lr: float) -> None:
    with pytest.raises(ValueError, match=rf"lr must be a positive number, got {lr}"):
        Stage2Config(lr=lr)


def test_stage2_accepts_a_good_learning_rate() -> None:
    assert Stage2Config(lr=1e-3).lr == 1e-3


# ------------------------------------------------------------------ priors


def test_prior_with_a_nan_down_is_refused_naming_the_layer(tmp_path: Path) -> None:
    prior = make_prior(TINY_DIMS, r1=4, preset="attn", generator=torch.Generator().manual_seed(0))
    bad_layer = "single_transformer_blocks.1.attn.to_k"
    prior.downs[bad_layer][2, 5] = float("nan")
    loaded = load_prior(save_prior(prior, tmp_path / "nan.safetensors"))
    with pytest.raises(ValueError, match=rf"layer '{bad_layer}' holds NaN or inf values"):
        validate_prior(loaded, TINY_DIMS, source="nan.safetensors")
    with pytest.raises(ValueError, match=rf"layer '{bad_layer}' holds NaN or inf values"):
        build_adapters(TINY_DIMS, loaded, rank=1, seed=0)  # what Stage-2 calls
    prior.downs[bad_layer][2, 5] = 0.0
    validate_prior(prior, TINY_DIMS)  # the same prior without the NaN is fine


def test_prior_with_an_inf_down_is_refused(tmp_path: Path) -> None:
    prior = make_prior(TINY_DIMS, r1=4, preset="attn", generator=torch.Generator().manual_seed(0))
    prior.downs["transformer_blocks.0.attn.to_q"][0, 0] = float("inf")
    with pytest.raises(ValueError, match="layer 'transformer_blocks.0.attn.to_q' holds NaN or inf"):
        validate_prior(prior, TINY_DIMS)


# ------------------------------------------------------------------ small faces


def _photo_with_face_of(sample, scale: float) -> Image.Image:
    """A real face (obama) shrunk by ``scale`` on a 640x640 grey canvas: a small face in a big photo."""
    face = load_image(sample("obama"))
    face = face.resize((round(face.width * scale), round(face.height * scale)), Image.LANCZOS)
    canvas = Image.new("RGB", (640, 640), (128, 128, 128))
    canvas.paste(face, ((640 - face.width) // 2, (640 - face.height) // 2))
    return canvas


def test_default_threshold_warns_for_a_small_real_face(sample, caplog: pytest.LogCaptureFixture) -> None:
    detector = get_detector("yunet")
    small = _photo_with_face_of(sample, 0.15)  # face about 37x51 px
    with caplog.at_level(logging.WARNING, logger="metalora_core.faces.detect"):
        face = select_face(small, detector)  # the default threshold
    assert min(face.width, face.height) < 64
    assert "the selected face is small" in caplog.text and "640x640" in caplog.text


def test_default_threshold_is_quiet_for_a_normal_face(sample, caplog: pytest.LogCaptureFixture) -> None:
    detector = get_detector("yunet")
    normal = _photo_with_face_of(sample, 0.5)  # face about 119x169 px
    with caplog.at_level(logging.WARNING, logger="metalora_core.faces.detect"):
        face = select_face(normal, detector)
    assert min(face.width, face.height) >= 100
    assert "small" not in caplog.text
