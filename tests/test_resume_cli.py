"""`metalora meta-train --resume` through the command line: a checkpoint only continues on its own data.

Only the public entry point and the files it writes are used (checkpoint, summary.json), so the test
holds whatever shape Stage-1's code takes inside.
"""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

from metalora_core.cli import main

IDENTITIES = {"ann": (230, 190, 160), "bob": (120, 80, 50), "cid": (250, 220, 200)}


def _make_dataset(root: Path) -> Path:
    """Generated 'identities': a face-like blob whose colour is the identity, pose varies per photo."""
    for name, colour in IDENTITIES.items():
        (root / name).mkdir(parents=True)
        for k in range(2):
            img = Image.new("RGB", (48, 48), (40 + 30 * k, 60, 90))
            d = ImageDraw.Draw(img)
            d.ellipse([14 + 3 * k, 8, 34 + 3 * k, 40], fill=colour)
            img.save(root / name / f"{k}.png")
    return root


def _meta_train(data: Path, out: Path, steps: int, *extra: str) -> int:
    return main(["meta-train", "--tiny", "--data", str(data), "--out", str(out), "--no-augment",
                 "--resolution", "32", "--steps", str(steps), "--bucket-steps", "3", "--warmup-steps", "1",
                 "--identities-per-bucket", "2", "--r1", "2", "--checkpoint-every", "3", *extra])


def test_resume_refuses_changed_data_and_continues_on_the_same(tmp_path, capsys):
    data = _make_dataset(tmp_path / "data")
    out = tmp_path / "run"
    assert _meta_train(data, out, 3) == 0
    checkpoint = out / "checkpoint.safetensors"
    saved = checkpoint.read_bytes()
    capsys.readouterr()

    photo = data / "bob" / "1.png"
    original = photo.read_bytes()
    img = Image.open(photo).convert("RGB")
    img.putpixel((0, 0), (255, 0, 0))  # one pixel of one photo: same names, counts and settings
    img.save(photo)
    assert _meta_train(data, out, 6, "--resume") == 2
    err = capsys.readouterr().err
    assert "other training data" in err and "checkpoint.safetensors" in err, err
    assert checkpoint.read_bytes() == saved  # the refused run wrote nothing over it

    photo.write_bytes(original)  # the same data again: the run continues from step 3
    assert _meta_train(data, out, 6, "--resume") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] == 3 and summary["steps"] == 6
