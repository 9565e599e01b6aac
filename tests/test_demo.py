"""The embedded demo end to end (few steps): every promised file, a sane report, a loadable LoRA."""
from __future__ import annotations

import json

import torch

from metalora_core.cli import main
from metalora_core.formats.lora import load_lora
from metalora_core.formats.prior import load_prior


def test_demo_writes_all_outputs(tmp_path, capsys, sample):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "6", "--photo", str(sample("astronaut"))]) == 0
    printed = capsys.readouterr().out.splitlines()
    for name in ("prior.safetensors", "crops.png", "lora.safetensors", "samples.png", "loss.png", "report.json"):
        assert (out / name).is_file(), name
        assert any(line.split()[-1:] == [str(out / name)] for line in printed), (name, printed)
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 6 and report["detector"] == "yunet" and report["crops"] >= 5
    assert report["seconds_per_step"] > 0 and report["peak_memory_mb"] > 0
    assert all(isinstance(report[k], float) for k in ("first_loss", "last_loss"))
    prior = load_prior(out / "prior.safetensors")
    tensors, meta = load_lora(out / "lora.safetensors")
    assert meta["prior_sha256"] == prior.sha256 and meta["steps"] == "6" and meta["rank"] == "1"
    assert len(tensors) == 2 * len(prior.downs)
    assert any(t.abs().max() > 0 for k, t in tensors.items() if k.endswith("lora_B.weight"))
    assert not any(torch.isnan(t).any() for t in tensors.values())
    assert not list(out.glob(".*.tmp")), "no temp files left behind"


def test_demo_without_a_photo_is_a_clear_error(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", "1"]) == 2
    assert "pass --photo PATH" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
